"""Kafka records as the stream processors see them: plain data, no faust types.

The processors (``streams.processors``) turn a batch of :class:`InputRecord` into
:class:`OutputRecord` values and state writes; the faust agents (``streams.app``) only move these
between Kafka and the processors. Keeping the processors free of faust makes them testable on
their own and keeps the exactly-once argument (docs/streams.md) in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class InputRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int = 0


@dataclass(frozen=True, slots=True)
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
