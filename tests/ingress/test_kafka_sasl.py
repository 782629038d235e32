"""The pipeline against a SASL_SSL Kafka with ACLs: a throw-away broker of this module.

A second broker (the stack's jars, free ports, a small heap; the shared broker is never touched)
serves clients on SASL_SSL only (SCRAM-SHA-512, TLS 1.3, a certificate from a test CA), with
``StandardAuthorizer`` and no access without an ACL. The ingress and the stream worker each
connect as their own principal with only the ACLs ``imstream topics grant`` writes for them
(``pipelines/kafka_acls.py``), and a message goes from one user to another through them. A
principal without ACLs, the ingress reading what it has no business reading, PLAINTEXT on the
SASL_SSL port, a wrong password and a client that does not trust the CA are all refused.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cassandra.cluster import Session
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from pydantic import SecretStr

from core.connections import kafka_config, kafka_producer_config
from core.pki import make_pki
from core.readiness import read_announcement
from core.settings import KafkaSecurityProtocol, KafkaSettings, Settings, StackSettings
from pipelines.stack.manager import LocalStack
from pipelines.stack.services import KafkaBrokerSecurity
from schemas.topics import topic_catalog
from tests.ingress.support import (
    IMSTREAM,
    create_topics,
    free_port,
    group_message_arrives,
    migrated_keyspace,
    open_device,
    start_gateway,
    unique,
    wait_until,
)
from tests.streams.support import Worker

SERVICES = ("ingress", "stream-worker", "cql-sink", "clickhouse-sink", "push-sink")
SINKS = ("cql-sink", "clickhouse-sink", "push-sink")


@dataclass
class SecureKafka:
    """The module's broker: the administrator's settings (topics applied, ACLs granted) and
    every user's password."""

    stack: LocalStack
    admin: Settings
    passwords: dict[str, str]
    ca_file: Path

    def as_user(self, user: str, password: str | None = None, **kafka: object) -> Settings:
        """The administrator's settings with another principal (and other Kafka settings)."""
        changed = {
            "sasl_username": user,
            "sasl_password": SecretStr(password or self.passwords[user]),
            **kafka,
        }
        return self.admin.model_copy(update={"kafka": self.admin.kafka.model_copy(update=changed)})

    def environment(self, user: str) -> dict[str, str]:
        """The ``IM_KAFKA__`` variables of a process connecting as ``user``."""
        kafka = self.admin.kafka
        return {
            "IM_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "IM_KAFKA__TOPIC_PREFIX": kafka.topic_prefix,
            "IM_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
            "IM_KAFKA__SASL_USERNAME": user,
            "IM_KAFKA__SASL_PASSWORD": self.passwords[user],
            "IM_KAFKA__SSL_CA_LOCATION": str(self.ca_file),
        }


@pytest.fixture(scope="module")
def secure_kafka(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SecureKafka]:
    root = tmp_path_factory.mktemp("sasl-kafka")
    pki = make_pki(root / "pki", {"kafka": ()}, ca_name="sasl test CA")
    passwords = {user: secrets.token_hex(16) for user in ("admin", *SERVICES, "intruder")}
    security = KafkaBrokerSecurity(
        keystore_file=pki["kafka"].bundle_file,
        ca_file=pki.ca_file,
        certificate_name="CN=kafka",
        admin_user="admin",
        admin_password=passwords["admin"],
        users={user: password for user, password in passwords.items() if user != "admin"},
    )
    state_dir = root / "state"
    state_dir.mkdir()
    (state_dir / "jars").symlink_to(settings.stack.state_dir / "jars")
    admin = settings.model_copy(
        update={
            "kafka": KafkaSettings(
                bootstrap_servers=f"127.0.0.1:{free_port()}",
                security_protocol=KafkaSecurityProtocol.SASL_SSL,
                sasl_username="admin",
                sasl_password=SecretStr(passwords["admin"]),
                ssl_ca_location=pki.ca_file,
            ),
            "stack": StackSettings(
                state_dir=state_dir,
                kafka_controller_port=free_port(),
                kafka_heap="384m",
                start_timeout_seconds=90,
                stop_timeout_seconds=20,
            ),
        }
    )
    stack = LocalStack(admin, services=("kafka",), kafka_security=security)
    stack.up()
    try:
        client = AdminClient(kafka_config(admin))
        prefixed = create_topics(client, admin, unique("t-sasl") + ".")
        secure = SecureKafka(stack, prefixed, passwords, pki.ca_file)
        # As an operator grants them: `imstream topics grant`, as the administrator.
        granted = subprocess.run(
            [str(IMSTREAM), "topics", "grant", *(f"--service={name}" for name in SERVICES)],
            env={**os.environ, **secure.environment("admin")},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert granted.returncode == 0, granted.stdout + granted.stderr
        assert "User:stream-worker" in granted.stdout and "transactional_id" in granted.stdout
        yield secure
    finally:
        stack.down()


@contextlib.contextmanager
def running_sinks(
    secure_kafka: SecureKafka, keyspace: str, logs: Path
) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """The three sinks, each as its own principal, started (:func:`wait_ready` waits for them
    while the rest of the pipeline starts)."""
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for sink in SINKS:
            environment = {
                **os.environ,
                **secure_kafka.environment(sink),
                "IM_CQL__KEYSPACE": keyspace,
                "IM_CLICKHOUSE__CHDB_PATH": str(logs / "chdb"),
                "IM_SINKS__ANALYTICS_PORT": str(free_port()),
                "IM_SINKS__SESSION_TIMEOUT_SECONDS": "6",
                "IM_READY_FILE": str(logs / f"{sink}.ready"),
            }
            with (logs / f"{sink}.log").open("wb") as log:
                processes[sink] = subprocess.Popen(
                    [str(IMSTREAM), "run", sink],
                    env=environment,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
        yield processes
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            process.wait(timeout=60)


async def wait_ready(processes: dict[str, subprocess.Popen[bytes]], logs: Path) -> None:
    """Until each sink announced it is ready (its consumer group assigned it partitions)."""
    for sink, process in processes.items():
        await wait_until(
            lambda sink=sink, process=process: (  # type: ignore[misc]
                read_announcement(logs / f"{sink}.ready") is not None or process.poll() is not None
            ),
            within=90,
            what=f"{sink} ready",
        )
        assert process.poll() is None, (logs / f"{sink}.log").read_text()


def committed(secure_kafka: SecureKafka, group: str, topic: str) -> int:
    """The offsets ``group`` committed on ``topic``, summed over its partitions."""
    admin = secure_kafka.admin
    consumer = Consumer(kafka_config(admin, **{"group.id": group}))
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        offsets = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        return sum(max(0, tp.offset) for tp in offsets)
    finally:
        consumer.close()


async def test_the_pipeline_carries_a_message_with_a_principal_per_service(
    secure_kafka: SecureKafka, cql_session: Session, tmp_path: Path
) -> None:
    with (
        migrated_keyspace(secure_kafka.admin, cql_session) as keyspace,
        running_sinks(secure_kafka, keyspace, tmp_path) as sinks,
    ):
        await _carry_a_message(secure_kafka, tmp_path)
        await wait_ready(sinks, tmp_path)
        catalog = topic_catalog(secure_kafka.admin)
        sequenced = catalog.messages_sequenced.name
        prefix = secure_kafka.admin.kafka.topic_prefix
        # Both sinks of the sequenced messages consumed the message, with their own groups.
        for group in (f"{prefix}imstream-cql-sink", f"{prefix}imstream-clickhouse-sink"):
            await wait_until(
                lambda group=group: committed(secure_kafka, group, sequenced) >= 1,  # type: ignore[misc]
                within=60,
                what=f"{group} to commit the message",
            )
        assert all(process.poll() is None for process in sinks.values())
    for sink in SINKS:
        log = (tmp_path / f"{sink}.log").read_text()
        assert "AUTHORIZATION_FAILED" not in log.upper().replace(" ", "_"), log


async def _carry_a_message(secure_kafka: SecureKafka, tmp_path: Path) -> None:
    """One message from ann to ben through an ingress and a stream worker of their own."""
    worker = Worker(
        {
            **os.environ,
            **secure_kafka.environment("stream-worker"),
            "IM_STREAMS__SESSION_TIMEOUT_SECONDS": "6",
        },
        tmp_path / "stream-worker.log",
    )
    worker.start()
    ingress_kafka = secure_kafka.environment("ingress")
    gateway = start_gateway(
        secure_kafka.admin,
        tmp_path,
        kafka={
            key.removeprefix("IM_KAFKA__").lower(): value for key, value in ingress_kafka.items()
        },
        ingress={"rate_limit_per_second": 1000.0, "rate_limit_burst": 1000.0},
    )
    try:
        ann, ben = unique("ann"), unique("ben")
        sender, _ = await open_device(gateway, ann)
        receiver, _ = await open_device(gateway, ben)
        await group_message_arrives(sender, receiver, ben, name="sasl", text="through SASL_SSL")
        await sender.close()
        await receiver.close()
    finally:
        assert gateway.stop() == 0, gateway.log()
        worker.stop()
    assert "AUTHORIZATION_FAILED" not in gateway.log().upper().replace(" ", "_"), gateway.log()
    assert "AUTHORIZATION_FAILED" not in worker.tail().upper().replace(" ", "_"), worker.tail()


def _produce_error(settings: Settings, topic: str) -> KafkaError | None:
    """The delivery error of one record to ``topic`` (None: delivered)."""
    outcome: list[KafkaError | None] = []
    producer = Producer(kafka_producer_config(settings, **{"message.timeout.ms": 10_000}))
    producer.produce(topic, b"x", on_delivery=lambda error, _message: outcome.append(error))
    producer.flush(15)
    assert outcome, "no delivery report"
    return outcome[0]


def _read_error(settings: Settings, topic: str) -> KafkaError | None:
    """The error of reading ``topic`` in a group of the ingress's (None: nothing refused)."""
    consumer = Consumer(
        kafka_config(
            settings, **{"group.id": "imstream-ingress-probe", "enable.auto.commit": False}
        )
    )
    try:
        consumer.subscribe([topic])
        for _ in range(20):
            message = consumer.poll(0.5)
            if message is not None and message.error() is not None:
                return message.error()
        return None
    finally:
        consumer.close()


def test_a_principal_is_refused_what_its_acls_do_not_allow(secure_kafka: SecureKafka) -> None:
    catalog = topic_catalog(secure_kafka.admin)
    intruder = secure_kafka.as_user("intruder")
    error = _produce_error(intruder, catalog.messages_in.name)
    assert error is not None and error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, error
    # The ingress writes client commands, and reads none of the sequenced messages.
    ingress = secure_kafka.as_user("ingress")
    assert _produce_error(ingress, catalog.messages_in.name) is None
    error = _read_error(ingress, catalog.messages_sequenced.name)
    assert error is not None and error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, error
    error = _produce_error(ingress, catalog.messages_sequenced.name)
    assert error is not None and error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, error


@pytest.mark.parametrize(
    "how",
    ["plaintext", "wrong-password", "untrusted-ca"],
)
def test_no_way_in_without_tls_and_credentials(
    secure_kafka: SecureKafka, how: str, tmp_path: Path
) -> None:
    if how == "plaintext":
        settings = secure_kafka.as_user(
            "ingress", security_protocol=KafkaSecurityProtocol.PLAINTEXT
        )
    elif how == "wrong-password":
        settings = secure_kafka.as_user("ingress", password="not-" + secrets.token_hex(8))
    else:
        other = make_pki(tmp_path / "other", {}, ca_name="another CA")
        settings = secure_kafka.as_user("ingress", ssl_ca_location=other.ca_file)
    admin = AdminClient(kafka_config(settings, **{"socket.timeout.ms": 3000}))
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=3)
    # The same client with the right protocol, password and CA gets in.
    allowed = AdminClient(kafka_config(secure_kafka.as_user("ingress")))
    assert allowed.list_topics(timeout=10).brokers
