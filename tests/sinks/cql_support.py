"""Helpers for the CQL sink tests: settings for a test's topic prefix and keyspace, the catalog's
topics created and deleted, records produced, the tables read back as sets."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cassandra.cluster import Session
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from core.connections import kafka_config, kafka_producer_config
from core.settings import KafkaSettings, Settings
from pipelines.stack.manager import LocalStack
from pipelines.topics import apply_topics
from schemas.topics import topic_catalog
from sinks.cql.crypto import KeyRing, key_id_of, key_ring, open_value
from sinks.cql.migrate import migrate
from sinks.cql.sink import READY_MESSAGE
from tests.sinks.kafka_support import delete_prefixed_topics

#: The services the CQL sink's tests need: not chDB, whose one data path another process (a
#: ClickHouse sink, the ClickHouse tests) may hold while these run.
CQL_SERVICES = ("kafka", "cassandra")

#: The tables of the serving store (migration 0001), i.e. everything the sink writes.
SERVING_TABLES = frozenset(
    {
        "timeline",
        "messages_by_id",
        "sync_queue",
        "sync_heads",
        "user_conversations",
        "conversations",
        "members",
        "read_positions",
        "devices",
    }
)

Row = tuple[Any, ...]


@pytest.fixture(scope="session", name="local_stack")
def cql_local_stack(settings: Settings) -> LocalStack:
    """Overrides the suite's ``local_stack`` in the modules that import it: Kafka and Cassandra
    only, started when they are not running."""
    stack = LocalStack(settings, services=CQL_SERVICES)
    if not stack.is_up():
        stack.up()
    return stack


def keyspace_settings(settings: Settings, keyspace: str) -> Settings:
    return settings.model_copy(
        update={"cql": settings.cql.model_copy(update={"keyspace": keyspace})}
    )


def prefixed_settings(settings: Settings, prefix: str, keyspace: str | None = None) -> Settings:
    """``settings`` with a topic prefix of its own (and a keyspace)."""
    updated = settings.model_copy(
        update={
            "kafka": KafkaSettings(
                bootstrap_servers=settings.kafka.bootstrap_servers, topic_prefix=prefix
            )
        }
    )
    return keyspace_settings(updated, keyspace) if keyspace else updated


def new_prefix(kind: str) -> str:
    return f"t-{kind}-{uuid.uuid4().hex[:8]}-"


@contextmanager
def catalog_topics(settings: Settings, prefix: str) -> Iterator[Settings]:
    """Every topic of the catalog under ``prefix``, deleted afterwards."""
    prefixed = prefixed_settings(settings, prefix)
    admin = AdminClient(kafka_config(prefixed))
    apply_topics(admin, topic_catalog(prefixed))
    try:
        yield prefixed
    finally:
        delete_prefixed_topics(admin, prefix)


@contextmanager
def migrated_topics(settings: Settings, session: Session, tag: str) -> Iterator[Settings]:
    """Every catalog topic under a prefix of its own and a keyspace ``t_<tag>_…`` migrated to
    the current schema, both dropped afterwards: the settings that name the two."""
    keyspace = f"t_{tag}_{uuid.uuid4().hex[:8]}"
    with catalog_topics(settings, new_prefix(tag)) as prefixed:
        configured = keyspace_settings(prefixed, keyspace)
        migrate(session, keyspace, 1)
        try:
            yield configured
        finally:
            session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=60)


def table_names(session: Session, keyspace: str) -> set[str]:
    rows = session.execute(
        "SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s", (keyspace,)
    )
    return {row.table_name for row in rows}


def table_rows(session: Session, keyspace: str, table: str) -> set[Row]:
    """Every row of ``table`` as a set of tuples (column order of ``SELECT *``)."""
    return {tuple(row) for row in session.execute(f"SELECT * FROM {keyspace}.{table}")}


def snapshot(session: Session, keyspace: str) -> dict[str, set[Row]]:
    """Every serving table's rows."""
    return {table: table_rows(session, keyspace, table) for table in sorted(SERVING_TABLES)}


def tenant_keys(session: Session, settings: Settings) -> KeyRing:
    """The key ring of ``settings`` (its anchor keyspace), as the sink and the ingress use."""
    return key_ring(session, settings)


def unsealed(keys: KeyRing, tenant_id: str, context: str, value: str | None) -> str | None:
    """A stored value as the readers see it: opened with the tenant's key (plaintext as is)."""
    key_id = key_id_of(value)
    return open_value(keys.find(tenant_id, key_id) if key_id else None, context, value)


def select(session: Session, query: str, *values: Any) -> list[Any]:
    return list(session.execute(query, values))


def produce(settings: Settings, records: Sequence[tuple[str, bytes | None, bytes | None]]) -> None:
    """Produce ``(topic, key, value)`` records in order and wait for every acknowledgement."""
    producer = Producer(kafka_producer_config(settings, **{"enable.idempotence": True}))
    for topic, key, value in records:
        producer.produce(topic, key=key, value=value)
        producer.poll(0)
    assert producer.flush(60) == 0


def committed_lag(settings: Settings, group_id: str, topics: Sequence[str]) -> int:
    """Records of ``topics`` past the group's committed offsets (end offsets minus committed)."""
    consumer = Consumer(
        kafka_config(settings, **{"group.id": group_id, "enable.auto.commit": False})
    )
    try:
        metadata = consumer.list_topics(timeout=30)
        partitions = [
            TopicPartition(topic, partition)
            for topic in topics
            for partition in metadata.topics[topic].partitions
        ]
        committed = consumer.committed(partitions, timeout=30)
        lag = 0
        for tp in committed:
            low, high = consumer.get_watermark_offsets(tp, timeout=30)
            position = tp.offset if tp.offset >= 0 else low
            lag += max(0, high - position)
        return lag
    finally:
        consumer.close()


def read_dead_letters(
    settings: Settings, topic: str, *, expected: int, timeout: float = 30.0
) -> list[tuple[bytes | None, bytes | None, dict[str, str]]]:
    """``(key, value, headers)`` of the records of ``topic``, once ``expected`` are there."""
    consumer = Consumer(
        kafka_config(
            settings,
            **{
                "group.id": f"t-dlq-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            },
        )
    )
    consumer.subscribe([topic])
    found: list[tuple[bytes | None, bytes | None, dict[str, str]]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(found) < expected and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error() is not None:
                continue
            headers = {
                name: value.decode() if isinstance(value, bytes) else str(value or "")
                for name, value in _header_pairs(message.headers())
            }
            found.append((message.key(), message.value(), headers))
        # Anything beyond the expected count would be a duplicate dead letter.
        extra = consumer.poll(2.0)
        if extra is not None and extra.error() is None:
            found.append((extra.key(), extra.value(), {}))
    finally:
        consumer.close()
    return found


def _header_pairs(headers: Any) -> list[tuple[str, Any]]:
    if headers is None:
        return []
    return list(headers.items()) if isinstance(headers, dict) else list(headers)


class SinkProcess:
    """``imstream run cql-sink`` as a child process with its own log file."""

    def __init__(self, environment: dict[str, str], log_path: Path) -> None:
        self.environment = environment
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout: float = 60.0) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pipelines", "run", "cql-sink"],
                env=self.environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if READY_MESSAGE in self.log():
                return
            assert self.process.poll() is None, self.tail()
            time.sleep(0.2)
        raise AssertionError(f"the sink was not ready in {ready_timeout}s:\n{self.tail()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit code (None if never started)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        return self.process.returncode
