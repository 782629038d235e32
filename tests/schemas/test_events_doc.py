"""docs/events.md stays true to the models and the topic catalog."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel

from core.settings import Settings
from schemas.events import (
    EVENT_MODELS,
    EVENT_TYPES,
    SYSTEM_TENANT,
    EventEnvelope,
    GroupDelivery,
    InboxRecord,
    LiveDelivery,
    OperatorOutcome,
    PushJob,
    PushOutcomeRecord,
    SyncRecord,
)
from schemas.topics import KeyKind, Topic, topic_catalog
from streams.conversations import RejectReason
from tests.schemas.samples import (
    OPERATOR_EVENT_TYPES,
    PROCESSOR_EVENT_TYPES,
    UNROUTED_EVENT_TYPES,
    sample_events,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "events.md"


def sections(level: str) -> dict[str, str]:
    """The doc's sections at a heading level, by heading text."""
    parts = re.split(rf"^{level} (.+)$", DOC.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def first_column(text: str) -> list[str]:
    """The backticked names in the first column of a section's table rows."""
    return re.findall(r"^\| `([^`]+)` \|", text, flags=re.MULTILINE)


def event_sections() -> dict[str, str]:
    catalog = sections("##")["Event catalog"]
    parts = re.split(r"^### `(.+)`$", catalog, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_the_doc_lists_every_event_type_once_in_catalog_order() -> None:
    assert list(event_sections()) == list(EVENT_TYPES)


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_payload_fields_match_the_model(event_type: str) -> None:
    payload_model = EVENT_MODELS[event_type].model_fields["payload"].annotation
    assert isinstance(payload_model, type)
    assert first_column(event_sections()[event_type]) == list(payload_model.model_fields)


#: How the doc spells the key of each key kind.
DOC_KEYS = {
    KeyKind.CONVERSATION: "tenant_id/conversation_id",
    KeyKind.USER: "tenant_id/user_id",
    KeyKind.DEVICE: "tenant_id/user_id/device_id",
    KeyKind.OPERATOR: "operator",
}


def names_topic_and_key(text: str, topic: Topic) -> bool:
    """``text`` says "Topic `<topic>`" (an aside in parentheses allowed), then its key."""
    pattern = (
        rf"Topic\s+`{re.escape(topic.logical_name)}`(\s+\([^)]*\))?,\s+"
        rf"key\s+`{re.escape(DOC_KEYS[topic.key])}`"
    )
    return re.search(pattern, text) is not None


@pytest.mark.parametrize("event_type", [t for t in EVENT_TYPES if t not in UNROUTED_EVENT_TYPES])
def test_the_doc_names_the_inbound_topic_and_key(settings: Settings, event_type: str) -> None:
    topic, key = topic_catalog(settings).route(sample_events()[event_type])
    text = event_sections()[event_type]
    assert names_topic_and_key(text, topic)
    assert key.count(b"/") == DOC_KEYS[topic.key].count("/")


@pytest.mark.parametrize("event_type", PROCESSOR_EVENT_TYPES)
def test_processor_events_are_documented_on_the_inbox_and_the_sync_queue(
    settings: Settings, event_type: str
) -> None:
    catalog = topic_catalog(settings)
    text = event_sections()[event_type]
    assert "no inbound topic" in text
    assert names_topic_and_key(text, catalog.user_inbox)
    assert f"`{catalog.sync_events.logical_name}`" in text
    assert "`InboxRecord`" in text and "`SyncRecord`" in text


@pytest.mark.parametrize("event_type", OPERATOR_EVENT_TYPES)
def test_operator_events_are_documented_on_their_topic(settings: Settings, event_type: str) -> None:
    catalog = topic_catalog(settings)
    text = event_sections()[event_type]
    assert "no inbound topic" in text
    assert names_topic_and_key(text, catalog.operator_actions)
    assert f"`{SYSTEM_TENANT}`" in text


def test_every_operator_outcome_is_documented() -> None:
    text = event_sections()["operator.action"]
    documented = re.findall(r"^\* `([a-z-]+)` — ", text, flags=re.MULTILINE)
    assert documented == [outcome.value for outcome in OperatorOutcome]


def test_every_reject_reason_is_documented() -> None:
    text = event_sections()["command.rejected"]
    documented = re.findall(r"^\* `([a-z-]+)` — ", text, flags=re.MULTILINE)
    assert documented == [reason.value for reason in RejectReason]


def record_sections() -> dict[str, str]:
    records = sections("##")["Records"]
    parts = re.split(r"^### `(.+)`$", records, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_every_record_is_documented_with_its_fields_and_topic(settings: Settings) -> None:
    catalog = topic_catalog(settings)
    records: dict[str, tuple[type[BaseModel], Topic]] = {
        "LiveDelivery": (LiveDelivery, catalog.live_delivery),
        "GroupDelivery": (GroupDelivery, catalog.group_delivery),
        "InboxRecord": (InboxRecord, catalog.user_inbox),
        "SyncRecord": (SyncRecord, catalog.sync_events),
        "PushJob": (PushJob, catalog.push_jobs),
        "PushOutcomeRecord": (PushOutcomeRecord, catalog.push_outcomes),
    }
    documented = record_sections()
    assert list(documented) == list(records)
    for name, (model, topic) in records.items():
        assert first_column(documented[name]) == list(model.model_fields), name
        assert f"On `{topic.logical_name}`" in documented[name], name


def test_envelope_fields_match_the_model() -> None:
    envelope = sections("##")["The envelope"]
    assert sorted(first_column(envelope)) == sorted(EventEnvelope.model_fields)


def test_topic_table_matches_the_catalog(settings: Settings) -> None:
    table = sections("##")["Topic catalog"]
    rows = {
        cells[0].strip("`"): cells[1:5]
        for line in table.splitlines()
        if line.startswith("| `")
        for cells in [[cell.strip() for cell in line.strip("|").split("|")]]
    }
    catalog = topic_catalog(settings)
    assert list(rows) == [topic.logical_name for topic in catalog.sources()]
    for topic in catalog.sources():
        assert rows[topic.logical_name] == [
            topic.key.value,
            str(topic.partitions),
            topic.cleanup.value,
            spelled(topic.retention),
        ]


def spelled(retention: timedelta | None) -> str:
    """A retention as the topic table spells it: ``forever``, ``7 days``, ``1 hour``."""
    if retention is None:
        return "forever"
    days, seconds = retention.days, retention.seconds
    if days and not seconds:
        return f"{days} day{'s' if days > 1 else ''}"
    hours = seconds // 3600
    assert not days and hours * 3600 == seconds, retention
    return f"{hours} hour{'s' if hours > 1 else ''}"
