"""Session fixtures over the real local stack: Kafka, Cassandra and chDB — never mocks.

The stack is started once per test session if it is not already running (and left running, so that
the next run is fast; ``.ci/run`` stops it at the end). Every test gets its own topic names,
keyspaces and ClickHouse databases, so tests never see each other's data.
"""

from __future__ import annotations

import os
import re
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cassandra.cluster import Session
from clickhouse_connect.driver.client import Client
from confluent_kafka.admin import AdminClient, NewTopic
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from core.connections import clickhouse_client, cql_cluster, kafka_config
from core.settings import Settings
from pipelines.stack.manager import LocalStack
from tests.sinks.push.fakes.tls import LocalPki, make_local_pki
from tests.sinks.push.support import ApnsKey


@pytest.fixture(scope="session", autouse=True)
def stream_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The stream workers' state stores (LMDB) of this session: under pytest's temporary
    directory (every worker process the tests start inherits it), not the checkout's; and their
    member admission."""
    path = tmp_path_factory.mktemp("stream-state")
    chosen = {
        "IM_STREAMS__STATE_DIR": str(path),
        # Most tests name members who never sign in; tests/streams/test_admission.py runs the
        # default (known users only) against a worker of its own.
        "IM_STREAMS__MEMBER_ADMISSION": "open",
    }
    before = {name: os.environ.get(name) for name in chosen}
    os.environ.update(chosen)
    yield path
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def settings(stream_state_dir: Path) -> Settings:
    return Settings()


@pytest.fixture(scope="session")
def local_stack(settings: Settings) -> LocalStack:
    """The running local stack's servers (Kafka, Cassandra); started here when not up yet.

    chDB is not checked here: it allows one process per data path, and the ``clickhouse`` fixture
    opens it for the tests that need it (a sink process under test may own another path)."""
    stack = LocalStack(settings, services=("kafka", "cassandra"))
    if not stack.is_up():
        stack.up()
    return stack


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A name no other test uses: the test's name, shortened, plus a random suffix."""
    base = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")[:30]
    return f"t_{base}_{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def kafka_admin(local_stack: LocalStack, settings: Settings) -> AdminClient:
    return AdminClient(kafka_config(settings))


@pytest.fixture
def kafka_topic(kafka_admin: AdminClient, unique_name: str) -> Iterator[str]:
    """A fresh single-partition topic, deleted after the test."""
    futures = kafka_admin.create_topics([NewTopic(unique_name, num_partitions=1)])
    futures[unique_name].result(timeout=30)
    yield unique_name
    kafka_admin.delete_topics([unique_name])[unique_name].result(timeout=30)


@pytest.fixture(scope="session")
def cql_session(local_stack: LocalStack, settings: Settings) -> Iterator[Session]:
    cluster = cql_cluster(settings)
    session = cluster.connect()
    yield session
    cluster.shutdown()


@pytest.fixture
def keyspace(cql_session: Session, unique_name: str) -> Iterator[str]:
    """A fresh keyspace (replication factor 1), dropped after the test."""
    cql_session.execute(
        f"CREATE KEYSPACE {unique_name} WITH replication = "
        "{'class': 'SimpleStrategy', 'replication_factor': 1}"
    )
    yield unique_name
    cql_session.execute(f"DROP KEYSPACE IF EXISTS {unique_name}")


@pytest.fixture(scope="session")
def clickhouse(local_stack: LocalStack, settings: Settings) -> Iterator[Client]:
    """The one ClickHouse client of this process (chDB allows one data path per process)."""
    client = clickhouse_client(settings)
    yield client
    client.close()


@pytest.fixture
def clickhouse_database(clickhouse: Client, unique_name: str) -> Iterator[str]:
    """A fresh ClickHouse database, dropped after the test."""
    clickhouse.command(f"CREATE DATABASE {unique_name}")
    yield unique_name
    clickhouse.command(f"DROP DATABASE IF EXISTS {unique_name}")


# The credentials of the fake push providers (tests/sinks/push/fakes), shared by the push tests
# and the system tests that run the push sink against the fakes.


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LocalPki:
    """A test CA and the fake APNs's certificate signed by it."""
    return make_local_pki(tmp_path_factory.mktemp("push-pki"))


@pytest.fixture(scope="session")
def apns_key() -> ApnsKey:
    """An APNs signing key (.p8) with its key id and team id, as a developer account gives it."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return ApnsKey(
        pem=pem,
        key_id=secrets.token_hex(5).upper(),
        team_id=secrets.token_hex(5).upper(),
        public_key=key.public_key(),
    )


@pytest.fixture(scope="session")
def service_account_key() -> rsa.RSAPrivateKey:
    """The key of the fake FCM's service account."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)
