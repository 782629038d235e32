"""The audit's rows of records (``sinks.clickhouse.audit``), without Kafka or ClickHouse: records of
the processors' topics are read for the audit's columns only, records of the ingress's topics and
of dead-letter topics are validated against the whole schema, and either way a record the audit
cannot store is poison with the schema's reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from core.settings import Settings
from schemas import events as ev
from schemas.topics import Topic, TopicCatalog, topic_catalog
from sinks.clickhouse.audit import AuditDecoder, AuditRow, KafkaRecord

TENANT = "acme"
NOW_MS = 1_796_000_000_000


@pytest.fixture(scope="module")
def catalog() -> TopicCatalog:
    return topic_catalog(Settings())


def sent(seq: int | None = 3) -> ev.MessageSent:
    return ev.MessageSent.new(
        tenant_id=TENANT,
        actor=ev.Actor(user_id="alice", device_id="alice-phone"),
        event_id=ev.message_event_id(TENANT, "alice", "m1"),
        occurred_at=datetime(2026, 12, 7, 12, 0, 0, 123456, tzinfo=UTC),
        payload=ev.MessageSentPayload(
            conversation_id="dm:alice:bob",
            client_msg_id="m1",
            body=ev.TextBody(text="hello"),
            conversation_seq=seq,
        ),
    )


def connected() -> ev.Event:
    return ev.parse_event(
        json.dumps(
            {
                "type": "device.connected",
                "event_id": "5b1f5c4e-8f0a-4c59-9d0e-2f4c6c1f7a10",
                "schema_version": "1.0",
                "tenant_id": TENANT,
                "occurred_at": "2026-12-07T13:00:00+01:00",
                "actor": {"user_id": "carol", "device_id": "carol-laptop"},
                "payload": {
                    "user_id": "bob",
                    "device_id": "bob-phone",
                    "platform": "web",
                    "node_id": "ingress-1",
                    "connection_id": "057bb453f2adc8c7",
                },
            }
        )
    )


def event_json(event: ev.Event) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(ev.encode_event(event))
    return value


def record_values(catalog: TopicCatalog) -> dict[Topic, list[bytes]]:
    """Valid records of every processor topic the audit reads with a head, by topic."""
    message = event_json(sent())
    device = event_json(connected())
    inbox = {
        "tenant_id": TENANT,
        "user_id": "bob",
        "conversation_id": "dm:alice:bob",
        "position": 3,
        "event": message,
    }
    sync = {"tenant_id": TENANT, "user_id": "bob", "sync_id": 41, "event": message}
    live = {"node_id": "n1", "tenant_id": TENANT, "user_id": "bob", "event": device}
    group = {"tenant_id": TENANT, "conversation_id": "g:team", "position": 9, "event": message}
    job = {
        "job_id": "0b7d7d3e-33c4-4bb5-a7a3-7d8f2f9a1e01",
        "tenant_id": TENANT,
        "user_id": "bob",
        "conversation_id": "dm:alice:bob",
        "conversation_seq": 3,
        "message_id": message["event_id"],
        "sender_id": "alice",
        "merged_count": 1,
        "unread_total": 2,
        "occurred_at": "2026-12-07T12:00:00Z",
    }
    encode = [json.dumps(value).encode() for value in (message, device)]
    return {
        catalog.messages_sequenced: encode,
        catalog.user_inbox: [json.dumps(inbox).encode()],
        catalog.sync_events: [json.dumps(sync).encode()],
        catalog.live_delivery: [
            json.dumps(live).encode(),
            json.dumps({**live, "sync_id": 7, "event": message}).encode(),
        ],
        catalog.group_delivery: [json.dumps(group).encode()],
        catalog.push_jobs: [json.dumps(job).encode()],
    }


def audit(decoder: AuditDecoder, topic: str, value: bytes | None) -> tuple[AuditRow, Any]:
    audited = decoder.audit(KafkaRecord(topic, 0, 5, b"k", value, NOW_MS))
    return audited.row, audited.poison


def test_a_processor_record_gets_the_columns_the_full_schema_gives_it(
    catalog: TopicCatalog,
) -> None:
    decoder, whole = AuditDecoder(catalog), AuditDecoder(catalog, heads=False)
    for topic, values in record_values(catalog).items():
        for value in values:
            row, poison = audit(decoder, topic.name, value)
            full, full_poison = audit(whole, topic.name, value)
            assert (poison, full_poison) == (None, None), topic.name
            assert row == full, topic.name
            assert row.occurred_at.tzinfo is UTC


def test_a_device_event_names_its_device_user_and_a_time_with_an_offset_is_utc(
    catalog: TopicCatalog,
) -> None:
    live = record_values(catalog)[catalog.live_delivery][0]
    row, poison = audit(AuditDecoder(catalog), catalog.live_delivery.name, live)
    assert poison is None
    assert (row.event_type, row.user_id, row.sync_id) == ("device.connected", "bob", None)
    assert row.occurred_at == datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def test_a_processor_record_is_trusted_beyond_the_audit_columns_an_ingress_record_is_not(
    catalog: TopicCatalog,
) -> None:
    """A record invalid only outside the audit's columns (an empty text body): a processor
    validated what it wrote, so its topic's record is audited with its columns; the same value on
    an ingress topic, which any client-facing producer writes, is checked whole and is poison."""
    value = event_json(sent())
    value["payload"]["body"]["text"] = ""
    raw = json.dumps(value).encode()
    decoder = AuditDecoder(catalog)

    row, poison = audit(decoder, catalog.messages_sequenced.name, raw)
    assert poison is None
    assert (row.event_type, row.conversation_seq) == ("message.sent", 3)

    row, poison = audit(decoder, catalog.messages_in.name, raw)
    assert poison is not None and poison.code == "schema-invalid"
    assert (row.event_type, row.error_code) == ("undecodable", "schema-invalid")


@pytest.mark.parametrize(
    ("change", "code"),
    [
        (lambda event: event.update(event_id="not-a-uuid"), "schema-invalid"),
        (lambda event: event.update(occurred_at="2026-12-07T12:00:00"), "schema-invalid"),
        (lambda event: event["payload"].update(conversation_seq=0), "schema-invalid"),
        (lambda event: event["payload"].update(conversation_seq=2**70), "schema-invalid"),
        (lambda event: event.update(type="message.teleported"), "unknown-type"),
        (lambda event: event.pop("tenant_id"), "schema-invalid"),
    ],
)
def test_a_column_the_head_refuses_makes_poison_with_the_schemas_reason(
    catalog: TopicCatalog, change: Any, code: str
) -> None:
    value = event_json(sent())
    change(value)
    raw = json.dumps(value).encode()
    row, poison = audit(AuditDecoder(catalog), catalog.messages_sequenced.name, raw)
    _, full_poison = audit(AuditDecoder(catalog, heads=False), catalog.messages_sequenced.name, raw)
    assert poison is not None and full_poison is not None
    assert (poison.code, poison.message) == (full_poison.code, full_poison.message)
    assert (row.event_type, row.error_code) == ("undecodable", poison.code)
    assert poison.code == code


@pytest.mark.parametrize(
    ("value", "code"),
    [(b"not json", "malformed-json"), (b"\xff\xfe", "invalid-utf8"), (b"{", "malformed-json")],
)
def test_bytes_that_are_not_a_record_are_poison_as_before(
    catalog: TopicCatalog, value: bytes, code: str
) -> None:
    for topic in (catalog.messages_sequenced.name, catalog.sync_events.name):
        row, poison = audit(AuditDecoder(catalog), topic, value)
        assert poison is not None and poison.code == code
        assert row.raw == value
