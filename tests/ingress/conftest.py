"""Fixtures of the gateway tests: per-module topics, a per-module serving keyspace (migrated by
``imstream db migrate``) and a real ingress process on them."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cassandra.cluster import Session
from confluent_kafka.admin import AdminClient

from core.settings import Settings
from pipelines.stack.manager import LocalStack
from tests.ingress.support import (
    IMSTREAM,
    PUSH_APP,
    Gateway,
    create_topics,
    delete_topics,
    migrated_keyspace,
    start_gateway,
    unique,
)
from tests.streams.support import Worker, worker_environment

#: The main gateway's settings: a short hello timeout so that its test is quick, and a rate limit
#: no functional test reaches (tests/ingress/test_limits.py runs a gateway with a tight one).
MAIN_GATEWAY = {
    "auth_timeout_seconds": 2.0,
    # No stream worker or CQL sink stands behind it: a remove, leave, delete or recall is
    # answered once in Kafka, as there is no store that would ever hold its outcome.
    "access_change_timeout_seconds": 0.0,
    "rate_limit_per_second": 100_000.0,
    "rate_limit_burst": 100_000.0,
}


@pytest.fixture(scope="module")
def ingress_settings(
    local_stack: LocalStack, settings: Settings, kafka_admin: AdminClient
) -> Iterator[Settings]:
    """Settings naming this module's own topics (the whole catalog, applied), deleted after."""
    prefixed = create_topics(kafka_admin, settings, unique("t-ingress") + ".")
    yield prefixed
    delete_topics(kafka_admin, prefixed)


@pytest.fixture(scope="module")
def serving_keyspace(ingress_settings: Settings, cql_session: Session) -> Iterator[str]:
    """A keyspace with the serving store's schema, for this module's gateway; dropped after."""
    with migrated_keyspace(ingress_settings, cql_session) as name:
        yield name


@pytest.fixture(scope="module")
def gateway(
    ingress_settings: Settings,
    serving_keyspace: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Gateway]:
    """``imstream run ingress`` on this module's topics and keyspace, ready (Kafka answers, live
    delivery assigned, serving store connected); stopped with SIGTERM after the module, which
    must drain and exit 0."""
    running = start_gateway(
        ingress_settings,
        tmp_path_factory.mktemp("gateway"),
        ingress=MAIN_GATEWAY,
        cql={"keyspace": serving_keyspace},
        push={"apns_topic": PUSH_APP},
        wait=Gateway.serving,
    )
    yield running
    assert running.stop() == 0, running.log()


@dataclass
class Pipeline:
    """What :func:`running_pipeline` runs: the ingress nodes, and the CQL sink's process (a test
    may pause it, as a lagging store)."""

    gateways: list[Gateway]
    cql_sink: subprocess.Popen[bytes]


@contextmanager
def running_pipeline(
    settings: Settings,
    keyspace: str,
    logs: Path,
    *,
    streams: dict[str, str] | None = None,
    nodes: int = 1,
    ingress: dict[str, object] | None = None,
    ca_file: Path | None = None,
) -> Iterator[Pipeline]:
    """Ingress nodes (with ``ingress`` settings; ``ca_file`` the CA a test trusts when they
    serve TLS), a stream worker (with ``streams`` settings) and the CQL sink on these topics
    and this keyspace."""
    environment = {**worker_environment(settings, **(streams or {})), "IM_CQL__KEYSPACE": keyspace}
    worker = Worker(environment, logs / "stream-worker.log")
    worker.start()
    with (logs / "cql-sink.log").open("wb") as log:
        sink = subprocess.Popen(
            [str(IMSTREAM), "run", "cql-sink"],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    gateways: list[Gateway] = []
    try:
        for _ in range(nodes):
            gateways.append(
                start_gateway(
                    settings,
                    logs,
                    ingress={
                        "rate_limit_per_second": 100_000.0,
                        "rate_limit_burst": 100_000.0,
                        **(ingress or {}),
                    },
                    cql={"keyspace": keyspace},
                    wait=Gateway.serving,
                    ca_file=ca_file,
                )
            )
        yield Pipeline(gateways, sink)
    finally:
        for gateway in gateways:
            gateway.stop()
        sink.send_signal(signal.SIGCONT)  # a test may have paused it
        sink.terminate()
        sink.wait(timeout=30)
        worker.stop()


@pytest.fixture(scope="module")
def pipeline(
    ingress_settings: Settings, serving_keyspace: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """Ingress, stream worker and CQL sink on this module's topics and keyspace."""
    logs = tmp_path_factory.mktemp("pipeline")
    with running_pipeline(ingress_settings, serving_keyspace, logs) as running:
        (gateway,) = running.gateways
        yield gateway
