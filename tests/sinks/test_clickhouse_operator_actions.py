"""Operator actions reach the audit: a real ``dlq redrive`` on the real Kafka, then the real
ClickHouse sink on chDB stores its ``operator.action`` event (and the records it touched)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest
from clickhouse_connect.driver.client import Client

from core.records import InputRecord, dead_letter
from core.settings import Settings
from pipelines.dlq import redrive
from schemas.events import SYSTEM_TENANT, OperatorAction, encode_event, parse_event
from schemas.topics import conversation_key, topic_catalog
from sinks.clickhouse.sink import ClickHouseSink
from sinks.clickhouse.store import ClickHouseStore
from tests.sinks.clickhouse_support import (
    TENANT,
    Outgoing,
    produce,
    sent,
)
from tests.sinks.test_clickhouse_sink import audit_rows

pytestmark = pytest.mark.stack


def test_a_redrive_is_audited_as_an_operator_action(
    sink_settings: Settings, store: ClickHouseStore, clickhouse: Client
) -> None:
    catalog = topic_catalog(sink_settings)
    source = catalog.messages_in
    value = encode_event(sent("alice", "c-ops", "m-ops", datetime.now(UTC)))
    key = conversation_key(TENANT, "c-ops")
    [original] = produce(sink_settings, [Outgoing(source.name, key, value)])
    poisoned = dead_letter(
        catalog,
        source,
        InputRecord(source.name, original.partition, original.offset, original.key, original.value),
        "processing-failed",
        "RuntimeError('fixed since')",
    )
    produce(
        sink_settings,
        [Outgoing(poisoned.topic, poisoned.key, poisoned.value, list(poisoned.headers or []))],
    )

    result = redrive(sink_settings, poisoned.topic, operator="ops-erin", rate=None)
    assert result.redriven == 1

    ClickHouseSink(sink_settings, store, threading.Event()).run(until_caught_up=True)

    rows = audit_rows(clickhouse, store.database)
    [action_row] = [row for row in rows if row["topic"] == catalog.operator_actions.name]
    assert action_row["event_type"] == "operator.action"
    assert action_row["tenant_id"] == SYSTEM_TENANT
    assert action_row["error_code"] is None
    assert action_row["record_key"] == b"ops-erin"
    action = parse_event(action_row["raw"])
    assert isinstance(action, OperatorAction)
    assert action_row["event_id"] == action.event_id
    assert action.payload.command == "dlq redrive"
    assert action.payload.counts["redriven"] == 1
    # The dead letter with its reason, and the message twice on its source: the original and
    # the redriven copy (same event id, which the stores collapse).
    [dead_row] = [row for row in rows if row["topic"] == poisoned.topic]
    assert dead_row["error_code"] == "processing-failed"
    assert (dead_row["error_source_topic"], dead_row["error_source_offset"]) == (
        source.name,
        original.offset,
    )
    copies = [row for row in rows if row["topic"] == source.name]
    assert [row["raw"] for row in copies] == [value, value]
