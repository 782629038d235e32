"""One smoke test per service of the real local stack."""

from __future__ import annotations

import uuid

from cassandra.cluster import Session
from clickhouse_connect.driver.client import Client
from confluent_kafka import Consumer, Producer

from core.connections import kafka_config
from core.settings import Settings
from pipelines.stack.manager import LocalStack, ServiceState


def test_kafka_round_trip_through_idempotent_producer(settings: Settings, kafka_topic: str) -> None:
    producer = Producer(kafka_config(settings, **{"enable.idempotence": True, "acks": "all"}))
    sent = [f"message-{index}".encode() for index in range(50)]
    delivered: list[bytes] = []

    def on_delivery(error: object, message: object) -> None:
        assert error is None
        delivered.append(message.value())  # type: ignore[attr-defined]

    for value in sent:
        producer.produce(kafka_topic, value=value, key=b"conversation-1", on_delivery=on_delivery)
    assert producer.flush(30) == 0
    assert delivered == sent

    consumer = Consumer(
        kafka_config(
            settings,
            **{
                "group.id": f"smoke-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            },
        )
    )
    consumer.subscribe([kafka_topic])
    received: list[bytes] = []
    try:
        for _ in range(60):
            message = consumer.poll(1.0)
            if message is None or message.error() is not None:
                continue
            received.append(message.value() or b"")
            if len(received) == len(sent):
                break
    finally:
        consumer.close()
    assert received == sent


def test_cql_write_and_read(cql_session: Session, keyspace: str) -> None:
    cql_session.execute(
        f"CREATE TABLE {keyspace}.messages (conversation_id text, seq bigint, body text, "
        "PRIMARY KEY (conversation_id, seq)) WITH CLUSTERING ORDER BY (seq DESC)"
    )
    insert = cql_session.prepare(
        f"INSERT INTO {keyspace}.messages (conversation_id, seq, body) VALUES (?, ?, ?)"
    )
    for seq in range(1, 11):
        cql_session.execute(insert, ("c1", seq, f"body {seq}"))
    rows = list(
        cql_session.execute(
            f"SELECT seq, body FROM {keyspace}.messages WHERE conversation_id = 'c1' LIMIT 3"
        )
    )
    assert [(row.seq, row.body) for row in rows] == [(10, "body 10"), (9, "body 9"), (8, "body 8")]


def test_clickhouse_merge_tree_insert_and_aggregate(
    clickhouse: Client, clickhouse_database: str
) -> None:
    table = f"{clickhouse_database}.events"
    clickhouse.command(
        f"CREATE TABLE {table} (tenant String, kind String, n UInt32) "
        "ENGINE = MergeTree ORDER BY (tenant, kind)"
    )
    rows = [("t1", "text", 1), ("t1", "text", 2), ("t1", "media", 3), ("t2", "text", 4)]
    clickhouse.insert(table, rows, column_names=["tenant", "kind", "n"])
    result = clickhouse.query(
        f"SELECT tenant, count(), sum(n) FROM {table} GROUP BY tenant ORDER BY tenant"
    )
    assert result.result_rows == [("t1", 3, 6), ("t2", 1, 4)]


def test_status_reports_every_service_up(local_stack: LocalStack, settings: Settings) -> None:
    # The whole stack, chDB included (the session's fixture covers only the servers).
    statuses = {status.name: status for status in LocalStack(settings).status()}
    assert set(statuses) == {"kafka", "cassandra", "clickhouse"}
    assert all(status.state is ServiceState.UP for status in statuses.values())
    assert statuses["kafka"].pids and statuses["cassandra"].pids


def test_second_up_is_idempotent(local_stack: LocalStack) -> None:
    before = {status.name: status.pids for status in local_stack.status()}
    after = {status.name: status.pids for status in local_stack.up()}
    assert after == before
