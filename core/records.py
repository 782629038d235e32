"""Kafka records as the stream processors see them: plain data, no Kafka client types.

The processors (``streams.processors``) turn a batch of :class:`InputRecord` into
:class:`OutputRecord` values and state writes; the runtime (``streams.runtime``) only moves these
between Kafka and the processors. Keeping the processors free of Kafka makes them testable on
their own and keeps the exactly-once argument (docs/streams.md) in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.topics import Topic, TopicCatalog

Headers = list[tuple[str, bytes]]


# Not frozen: a frozen dataclass's __init__ goes through object.__setattr__ per field, and these
# are built once per record (10% of the worker's CPU in the profile when they were frozen).
@dataclass(slots=True)
class InputRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int = 0


@dataclass(slots=True)
class OutputRecord:
    topic: str
    key: bytes | None
    value: bytes | None
    #: An explicit partition, or None for the key's murmur2 partition.
    partition: int | None = None
    headers: Headers = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StateWrite:
    """A table write: ``value`` None deletes. ``partition`` is the input partition that owns it."""

    table: str
    key: str
    value: dict[str, object] | None
    partition: int


#: The dead-letter code of a record whose stage's rules raised (a bug; the record is kept).
PROCESSING_FAILED = "processing-failed"


def dead_letter(
    catalog: TopicCatalog, source: Topic, record: InputRecord, code: str, message: str
) -> OutputRecord:
    """The poison record, unchanged, on its source's dead-letter topic; the reason in headers."""
    target = catalog.dead_letter_of(source)
    headers = [
        ("imstream.error.code", code.encode()),
        ("imstream.error.message", message.encode()[:1000]),
        ("imstream.source.topic", record.topic.encode()),
        ("imstream.source.partition", str(record.partition).encode()),
        ("imstream.source.offset", str(record.offset).encode()),
    ]
    return OutputRecord(topic=target.name, key=record.key, value=record.value, headers=headers)
