"""The system under the supervisor, shared by the system tests of this package (one start for all
of them: starting it costs as much as a test)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from cassandra.cluster import Session
from confluent_kafka.admin import AdminClient
from cryptography.hazmat.primitives.asymmetric import rsa

from core.settings import Settings
from pipelines.supervisor import ChildSpec, Supervisor
from tests.ingress.support import (
    create_topics,
    delete_topics,
    free_port,
    migrated_keyspace,
    unique,
)
from tests.pipelines.support import PushFakes, Running
from tests.sinks.push.fakes.tls import LocalPki
from tests.sinks.push.support import APNS_TOPIC, ApnsKey

#: What ``imstream up --sink-nice`` defaults to.
SINK_NICE = 10
#: The supervised ingress nodes' presence leases (test_presence.py waits one out).
PRESENCE_RENEW_SECONDS = 1.0
PRESENCE_LEASE_SECONDS = 4.0


@pytest.fixture(scope="package")
def push_fakes(
    pki: LocalPki, apns_key: ApnsKey, service_account_key: rsa.RSAPrivateKey
) -> Iterator[PushFakes]:
    """The fake APNs and FCM the system's push sink sends to, for the whole package."""
    fakes = PushFakes(pki, apns_key, service_account_key)
    fakes.start()
    yield fakes
    fakes.stop()


@pytest.fixture(scope="package")
def supervised(
    push_fakes: PushFakes,
    settings: Settings,
    kafka_admin: AdminClient,
    cql_session: Session,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Running]:
    """Every process kind ``imstream up`` runs — two ingress nodes, the stream worker, the CQL
    sink, the ClickHouse sink and the push sink (on the fake APNs and FCM) — as real processes
    under the supervisor (restarted when they die), on the local stack (``kafka_admin`` and
    ``cql_session`` need it up), on topics of their own, a migrated keyspace and a chDB path of
    their own; ready when yielded."""
    prefixed = create_topics(kafka_admin, settings, unique("t-up") + ".")
    state = tmp_path_factory.mktemp("up")
    with migrated_keyspace(prefixed, cql_session) as keyspace:
        common = {
            "IM_KAFKA__TOPIC_PREFIX": prefixed.kafka.topic_prefix,
            "IM_CQL__KEYSPACE": keyspace,
            "IM_STREAMS__SESSION_TIMEOUT_SECONDS": "6",
            "IM_STREAMS__INSTANCE_ID": unique("worker"),
            "IM_INGRESS__RATE_LIMIT_PER_SECOND": "100000",
            "IM_INGRESS__RATE_LIMIT_BURST": "100000",
            # The deployment's iOS app: the ingress accepts tokens for it, the sink pushes to it.
            "IM_PUSH__APNS_TOPIC": APNS_TOPIC,
            # Presence leases short enough for a test to wait one out (test_presence.py).
            "IM_INGRESS__PRESENCE_RENEW_SECONDS": str(PRESENCE_RENEW_SECONDS),
            "IM_INGRESS__PRESENCE_LEASE_SECONDS": str(PRESENCE_LEASE_SECONDS),
        }
        ports = [free_port(), free_port()]
        internal_ports = [free_port(), free_port()]
        analytics_port = free_port()
        chdb_path = state / "clickhouse"
        specs = [
            ChildSpec("stream-worker", "stream-worker", common),
            *(
                ChildSpec(
                    f"ingress-{i + 1}",
                    "ingress",
                    {
                        **common,
                        "IM_INGRESS__PORT": str(port),
                        "IM_INGRESS__INTERNAL_PORT": str(internal_ports[i]),
                        "IM_INGRESS__NODE_ID": unique("n"),
                    },
                )
                for i, port in enumerate(ports)
            ),
            # The sinks lower in CPU priority, as `imstream up` runs them (--sink-nice).
            ChildSpec("cql-sink", "cql-sink", common, nice=SINK_NICE),
            ChildSpec(
                "clickhouse-sink",
                "clickhouse-sink",
                {
                    **common,
                    # chDB allows one process per data path: the sink gets its own.
                    "IM_CLICKHOUSE__CHDB_PATH": str(chdb_path),
                    "IM_SINKS__ANALYTICS_PORT": str(analytics_port),
                },
                nice=SINK_NICE,
            ),
            ChildSpec(
                "push-sink", "push-sink", {**common, **push_fakes.env(state)}, nice=SINK_NICE
            ),
        ]
        lines: list[str] = []
        supervisor = Supervisor(specs, state / "logs", report=lines.append)
        lock = threading.Lock()
        stop = threading.Event()

        def supervise() -> None:
            while not stop.wait(0.5):
                with lock:
                    supervisor.check()

        supervisor.start_all()
        thread = threading.Thread(target=supervise, daemon=True)
        thread.start()
        running = Running(
            supervisor,
            ports,
            prefixed,
            analytics_port=analytics_port,
            chdb_path=chdb_path,
            lock=lock,
        )
        try:
            running.wait_ready()
            yield running
        finally:
            stop.set()
            thread.join()
            supervisor.stop_all(30)
            delete_topics(kafka_admin, prefixed)


@pytest.fixture
def system(supervised: Running) -> Running:
    """The shared system with every process ready (a test before may have killed some)."""
    supervised.wait_ready()
    return supervised
