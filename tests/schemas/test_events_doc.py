"""docs/events.md stays true to the models and the topic catalog."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipelines.settings import Settings
from schemas.events import EVENT_MODELS, EVENT_TYPES, EventEnvelope
from schemas.topics import topic_catalog
from tests.schemas.samples import sample_events

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


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_the_doc_names_the_inbound_topic(settings: Settings, event_type: str) -> None:
    topic, _ = topic_catalog(settings).route(sample_events()[event_type])
    text = event_sections()[event_type]
    assert re.search(rf"Topic\s+`{re.escape(topic.logical_name)}`", text)


def test_envelope_fields_match_the_model() -> None:
    envelope = sections("##")["The envelope"]
    assert sorted(first_column(envelope)) == sorted(EventEnvelope.model_fields)


def test_topic_table_matches_the_catalog(settings: Settings) -> None:
    table = sections("##")["Topic catalog"]
    rows = {
        cells[0].strip("`"): cells[1:4]
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
        ]
