"""Kafka records as audit rows: what the ClickHouse sink writes for each record, and why a record
is poison. Pure functions — no Kafka, no ClickHouse — so the row of a record is a function of the
record alone, which is what makes a replayed copy collapse with the first one (schema.py).

A record is decoded by the format of its topic (an event, an ``InboxRecord``, a ``SyncRecord``, a
``LiveDelivery``, a ``PushJob``, a ``PushOutcomeRecord``); a dead-letter topic holds its source's
records, so it is decoded by its source's format, and its reason headers fill the ``error_*``
columns. A record that does not decode is still audited — ``event_type`` ``undecodable``, the raw
value kept, the reason in ``error_code``/``error_message`` — and reported as poison so the sink
can dead-letter it.

A push outcome record is also a row of ``push_outcomes`` (``Audited.push_outcome``), which the sink
inserts next to the audit row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Generic, TypeVar

import msgspec
from pydantic import BaseModel, ValidationError

from core.timeargs import EARLIEST, LATEST, in_range
from schemas.errors import ErrorCode, SchemaError, schema_error
from schemas.events import (
    EVENT_MODELS,
    MAX_SEQ,
    Event,
    GroupDelivery,
    InboxRecord,
    LiveDelivery,
    PushJob,
    PushOutcomeRecord,
    SyncRecord,
    parse_event,
)
from schemas.topics import CleanupPolicy, Topic, TopicCatalog
from sinks.clickhouse.schema import PUSH_JOB, PUSH_OUTCOME, TOMBSTONE, UNDECODABLE

ERROR_CODE_HEADER = "imstream.error.code"
ERROR_MESSAGE_HEADER = "imstream.error.message"
SOURCE_TOPIC_HEADER = "imstream.source.topic"
SOURCE_PARTITION_HEADER = "imstream.source.partition"
SOURCE_OFFSET_HEADER = "imstream.source.offset"

log = logging.getLogger(__name__)

#: The reason code of a record whose decoding raised something else than a schema error (the
#: stream stage uses the same code for a record its rules raise on).
PROCESSING_FAILED = "processing-failed"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Beyond the range ClickHouse's DateTime64 supports (``core.timeargs.in_range``) a time is
#: stored as nonsense (and opens a partition of its own); an integer beyond UInt64 fails the
#: whole insert.
_MAX_UINT32 = 2**32 - 1
_MAX_UINT64 = 2**64 - 1


@dataclass(frozen=True, slots=True)
class KafkaRecord:
    """One consumed record, as plain data."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None
    headers: Sequence[tuple[str, bytes | None]] = ()


@dataclass(frozen=True, slots=True)
class Facts:
    """What the audit knows about a decoded record."""

    event_id: str | None
    event_type: str
    tenant_id: str
    conversation_id: str | None
    user_id: str | None
    sync_id: int | None
    conversation_seq: int | None
    occurred_at: datetime


@dataclass(frozen=True, slots=True)
class Poison:
    """Why a record could not be decoded: a stable code and a readable message."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class AuditRow:
    """One row of ``audit_events``; ``values()`` follows ``schema.AUDIT_COLUMNS``."""

    topic: str
    partition: int
    offset: int
    record_key: bytes | None
    record_timestamp: datetime
    event_id: str | None
    event_type: str
    tenant_id: str
    conversation_id: str | None
    user_id: str | None
    sync_id: int | None
    conversation_seq: int | None
    occurred_at: datetime
    error_code: str | None
    error_message: str | None
    error_source_topic: str | None
    error_source_partition: int | None
    error_source_offset: int | None
    raw: bytes

    def values(self) -> tuple[Any, ...]:
        return (
            self.topic,
            self.partition,
            self.offset,
            self.record_key,
            self.record_timestamp,
            self.event_id,
            self.event_type,
            self.tenant_id,
            self.conversation_id,
            self.user_id,
            self.sync_id,
            self.conversation_seq,
            self.occurred_at,
            self.error_code,
            self.error_message,
            self.error_source_topic,
            self.error_source_partition,
            self.error_source_offset,
            self.raw,
        )


@dataclass(frozen=True, slots=True)
class PushOutcomeRow:
    """One row of ``push_outcomes``; ``values()`` follows ``schema.PUSH_OUTCOME_COLUMNS``."""

    record: PushOutcomeRecord

    def values(self) -> tuple[Any, ...]:
        outcome = self.record
        return (
            outcome.job_id,
            outcome.tenant_id,
            outcome.user_id,
            outcome.conversation_id,
            outcome.message_id,
            outcome.job_occurred_at,
            outcome.device_id or "",
            outcome.provider.value if outcome.provider is not None else "",
            outcome.attempt,
            outcome.outcome.value,
            outcome.status_code,
            outcome.reason,
            outcome.attempted_at,
        )


@dataclass(frozen=True, slots=True)
class Audited:
    """A record's audit row, and the reason it is poison if it could not be decoded."""

    row: AuditRow
    poison: Poison | None
    push_outcome: PushOutcomeRow | None = None
    """The record's ``push_outcomes`` row, for a decodable record of the push-outcomes topic."""


Decoder = Callable[[bytes], Facts]
M = TypeVar("M", bound=BaseModel)


def event_facts(event: Event) -> Facts:
    """An event's columns. ``user_id`` is the actor, except for device events (presence, push
    tokens), whose user is the device's user whoever caused them — as in the topic key."""
    payload = event.payload
    device_user = getattr(payload, "user_id", None) if hasattr(payload, "device_id") else None
    actor = event.actor.user_id if event.actor is not None else None
    return Facts(
        event_id=event.event_id,
        event_type=event.type,
        tenant_id=event.tenant_id,
        conversation_id=getattr(payload, "conversation_id", None),
        user_id=device_user or actor,
        sync_id=None,
        conversation_seq=getattr(payload, "conversation_seq", None),
        occurred_at=event.occurred_at,
    )


def _decode_event(raw: bytes) -> Facts:
    return event_facts(parse_event(raw))


def _decode_model(model: type[M], raw: bytes) -> M:
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        raise schema_error(error, raw, what="record", known_types=()) from None


def _decode_inbox(raw: bytes) -> Facts:
    record = _decode_model(InboxRecord, raw)
    return replace(
        event_facts(record.event),
        tenant_id=record.tenant_id,
        conversation_id=record.conversation_id,
        user_id=record.user_id,
    )


def _user_decoder(model: type[SyncRecord] | type[LiveDelivery]) -> Callable[[bytes], Facts]:
    """The decoder of a user-keyed record carrying one event and the user's sync id."""

    def decode(raw: bytes) -> Facts:
        record = _decode_model(model, raw)
        return replace(
            event_facts(record.event),
            tenant_id=record.tenant_id,
            user_id=record.user_id,
            sync_id=record.sync_id,
        )

    return decode


def _decode_group(raw: bytes) -> Facts:
    record = _decode_model(GroupDelivery, raw)
    return replace(
        event_facts(record.event),
        tenant_id=record.tenant_id,
        conversation_id=record.conversation_id,
    )


def _decode_push_job(raw: bytes) -> Facts:
    job = _decode_model(PushJob, raw)
    return Facts(
        event_id=job.job_id,
        event_type=PUSH_JOB,
        tenant_id=job.tenant_id,
        conversation_id=job.conversation_id,
        user_id=job.user_id,
        sync_id=None,
        conversation_seq=job.conversation_seq,
        occurred_at=job.occurred_at,
    )


def push_outcome_facts(outcome: PushOutcomeRecord) -> Facts:
    """A push outcome's audit columns: the job's id as ``event_id``, the attempt's time."""
    return Facts(
        event_id=outcome.job_id,
        event_type=PUSH_OUTCOME,
        tenant_id=outcome.tenant_id,
        conversation_id=outcome.conversation_id,
        user_id=outcome.user_id,
        sync_id=None,
        conversation_seq=None,
        occurred_at=outcome.attempted_at,
    )


def _decode_push_outcome(raw: bytes) -> Facts:
    return push_outcome_facts(_decode_model(PushOutcomeRecord, raw))


# -- the audit's columns read straight from a processor's records ------------------------------
#
# A record of a topic that only imstream's processors write (``Topic.ingress`` false) was built
# from models they validated, so the audit reads just its columns, with msgspec: about a tenth of
# the CPU of validating the whole record with pydantic again. The heads below type the columns as
# the schema does where ClickHouse needs it (a UUID, an aware time, sequence numbers in range);
# anything they refuse, and any event type the schema does not name, goes through the full
# pydantic decoding, so a poison record is audited with the same reason as before. Records of
# the ingress's topics and of dead-letter topics are always fully validated.

_Uuid = Annotated[
    str,
    msgspec.Meta(pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"),
]
_Seq = Annotated[int, msgspec.Meta(ge=1, le=MAX_SEQ)]
_Positive = Annotated[int, msgspec.Meta(ge=1)]
_Time = Annotated[datetime, msgspec.Meta(tz=True)]


class _ActorHead(msgspec.Struct):
    user_id: str


class _PayloadHead(msgspec.Struct):
    conversation_id: str | None = None
    conversation_seq: _Seq | None = None
    user_id: str | None = None


class _EventHead(msgspec.Struct):
    event_id: _Uuid
    type: str
    tenant_id: str
    occurred_at: _Time
    payload: _PayloadHead
    actor: _ActorHead | None = None


class _InboxHead(msgspec.Struct):
    tenant_id: str
    user_id: str
    conversation_id: str
    event: _EventHead


class _SyncHead(msgspec.Struct):
    tenant_id: str
    user_id: str
    sync_id: _Positive
    event: _EventHead


class _LiveHead(msgspec.Struct):
    tenant_id: str
    user_id: str
    event: _EventHead
    sync_id: _Positive | None = None


class _GroupHead(msgspec.Struct):
    tenant_id: str
    conversation_id: str
    event: _EventHead


class _PushJobHead(msgspec.Struct):
    job_id: _Uuid
    tenant_id: str
    user_id: str
    conversation_id: str
    conversation_seq: _Seq
    occurred_at: _Time


@dataclass(frozen=True, slots=True)
class _PayloadShape:
    """Which of the columns' fields an event type's payload model has (pydantic ignores the
    others, so the heads must too)."""

    conversation_id: bool
    conversation_seq: bool
    device_user: bool
    """A device event: its user is the payload's ``user_id`` (``event_facts``)."""


def _payload_shape(model: type[BaseModel]) -> _PayloadShape:
    payload = model.model_fields["payload"].annotation
    fields = (
        payload.model_fields if isinstance(payload, type) and issubclass(payload, BaseModel) else {}
    )
    return _PayloadShape(
        conversation_id="conversation_id" in fields,
        conversation_seq="conversation_seq" in fields,
        device_user="device_id" in fields and "user_id" in fields,
    )


_SHAPES: dict[str, _PayloadShape] = {
    event_type: _payload_shape(model) for event_type, model in EVENT_MODELS.items()
}


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is UTC else value.astimezone(UTC)


def _head_facts(
    event: _EventHead,
    *,
    tenant_id: str | None = None,
    conversation_id: str | None = None,
    user_id: str | None = None,
    sync_id: int | None = None,
) -> Facts | None:
    """``event_facts`` of an event head, with what its record says instead where given (as the
    full decoders ``replace`` them); None for a type the schema does not name."""
    shape = _SHAPES.get(event.type)
    if shape is None:
        return None
    payload = event.payload
    if user_id is None:
        device_user = payload.user_id if shape.device_user else None
        user_id = device_user or (event.actor.user_id if event.actor is not None else None)
    if conversation_id is None and shape.conversation_id:
        conversation_id = payload.conversation_id
    return Facts(
        event_id=event.event_id,
        event_type=event.type,
        tenant_id=event.tenant_id if tenant_id is None else tenant_id,
        conversation_id=conversation_id,
        user_id=user_id,
        sync_id=sync_id,
        conversation_seq=payload.conversation_seq if shape.conversation_seq else None,
        occurred_at=_utc(event.occurred_at),
    )


def _inbox_head_facts(record: _InboxHead) -> Facts | None:
    return _head_facts(
        record.event,
        tenant_id=record.tenant_id,
        conversation_id=record.conversation_id,
        user_id=record.user_id,
    )


def _user_head_facts(record: _SyncHead | _LiveHead) -> Facts | None:
    return _head_facts(
        record.event, tenant_id=record.tenant_id, user_id=record.user_id, sync_id=record.sync_id
    )


def _group_head_facts(record: _GroupHead) -> Facts | None:
    return _head_facts(
        record.event, tenant_id=record.tenant_id, conversation_id=record.conversation_id
    )


def _push_job_head_facts(job: _PushJobHead) -> Facts:
    return Facts(
        event_id=job.job_id,
        event_type=PUSH_JOB,
        tenant_id=job.tenant_id,
        conversation_id=job.conversation_id,
        user_id=job.user_id,
        sync_id=None,
        conversation_seq=job.conversation_seq,
        occurred_at=_utc(job.occurred_at),
    )


H = TypeVar("H")


class _HeadDecoder(Generic[H]):
    """A processor topic's decoder: the head's facts, or the full decoding when the head is
    refused (the poison reason then comes from the schema, as for every other record)."""

    def __init__(self, head: type[H], facts: Callable[[H], Facts | None], full: Decoder) -> None:
        self._decoder = msgspec.json.Decoder(head)
        self._facts = facts
        self.full = full

    def __call__(self, raw: bytes) -> Facts:
        try:
            facts = self._facts(self._decoder.decode(raw))
        except msgspec.DecodeError:  # ValidationError too: the schema says why
            return self.full(raw)
        return facts if facts is not None else self.full(raw)


class AuditDecoder:
    """Decodes any record of an audited topic into its row (``audit``)."""

    def __init__(self, catalog: TopicCatalog, *, heads: bool = True) -> None:
        """``heads=False`` validates every record against its whole schema (what the audit did
        before reading processors' records by their heads; tests compare the two)."""
        self.catalog = catalog
        sync = _user_decoder(SyncRecord)
        live = _user_decoder(LiveDelivery)
        by_source: dict[str, Decoder] = {
            catalog.user_inbox.name: _decode_inbox,
            catalog.sync_events.name: sync,
            catalog.live_delivery.name: live,
            catalog.group_delivery.name: _decode_group,
            catalog.push_jobs.name: _decode_push_job,
            catalog.push_outcomes.name: _decode_push_outcome,
        }
        #: Push outcomes are fully decoded: their record is also a push_outcomes row.
        use_heads = heads
        by_head: dict[str, Decoder] = {
            catalog.user_inbox.name: _HeadDecoder(_InboxHead, _inbox_head_facts, _decode_inbox),
            catalog.sync_events.name: _HeadDecoder(_SyncHead, _user_head_facts, sync),
            catalog.live_delivery.name: _HeadDecoder(_LiveHead, _user_head_facts, live),
            catalog.group_delivery.name: _HeadDecoder(_GroupHead, _group_head_facts, _decode_group),
            catalog.push_jobs.name: _HeadDecoder(
                _PushJobHead, _push_job_head_facts, _decode_push_job
            ),
            catalog.push_outcomes.name: _decode_push_outcome,
        }
        event_head = _HeadDecoder(_EventHead, _head_facts, _decode_event)
        self._decoders: dict[str, Decoder] = {}
        self._sources: dict[str, Topic] = {}
        for source in catalog.sources():
            full = by_source.get(source.name, _decode_event)
            # Only the ingress's topics can hold records no processor validated.
            trusted = use_heads and not source.ingress
            self._decoders[source.name] = by_head.get(source.name, event_head) if trusted else full
            self._sources[source.name] = source
            if source.dead_letter is not None:
                self._decoders[source.dead_letter] = full
                self._sources[source.dead_letter] = source

    def source_of(self, topic: str) -> Topic | None:
        """The source topic a record of ``topic`` came from (itself, or a dead letter's source)."""
        return self._sources.get(topic)

    def audit(self, record: KafkaRecord) -> Audited:
        """The record's row; never raises for bad input (that is what ``poison`` is for)."""
        timestamp = _record_time(record.timestamp_ms)
        source = self._sources.get(record.topic)
        dead_letter = source is not None and source.name != record.topic
        facts: Facts | None = None
        poison: Poison | None = None
        if record.value is None:
            if source is not None and source.cleanup is not CleanupPolicy.DELETE:
                facts = _tombstone(timestamp)
            else:
                poison = Poison(str(ErrorCode.MALFORMED_JSON), "the record has no value")
        else:
            decoder = self._decoders.get(record.topic, _decode_event)
            try:
                facts = decoder(record.value)
            except SchemaError as error:
                field = f"{error.field}: " if error.field else ""
                poison = Poison(str(error.code), f"{field}{error.message}")
            except Exception as error:  # a record the decoder cannot handle must not stop the sink
                log.exception("record %s[%d]@%d", record.topic, record.partition, record.offset)
                poison = Poison(PROCESSING_FAILED, repr(error))
            if facts is not None and (problem := _out_of_range(facts)) is not None:
                facts, poison = None, Poison(str(ErrorCode.SCHEMA_INVALID), problem)
        if facts is None:
            facts = _undecodable(timestamp)
        headers = _headers(record.headers) if dead_letter else {}
        error_code = headers.get(ERROR_CODE_HEADER)
        error_message = headers.get(ERROR_MESSAGE_HEADER)
        if not dead_letter and poison is not None:
            error_code, error_message = poison.code, poison.message
        row = AuditRow(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            record_key=record.key,
            record_timestamp=timestamp,
            event_id=facts.event_id,
            event_type=facts.event_type,
            tenant_id=facts.tenant_id,
            conversation_id=facts.conversation_id,
            user_id=facts.user_id,
            sync_id=facts.sync_id,
            conversation_seq=facts.conversation_seq,
            occurred_at=facts.occurred_at,
            error_code=error_code,
            error_message=error_message,
            error_source_topic=headers.get(SOURCE_TOPIC_HEADER),
            error_source_partition=_int_or_none(headers.get(SOURCE_PARTITION_HEADER), _MAX_UINT32),
            error_source_offset=_int_or_none(headers.get(SOURCE_OFFSET_HEADER), _MAX_UINT64),
            raw=record.value or b"",
        )
        push_outcome = None
        if poison is None and record.topic == self.catalog.push_outcomes.name:
            # Decoded once more for its row: outcome records are small and few per message.
            push_outcome = PushOutcomeRow(PushOutcomeRecord.model_validate_json(row.raw))
        return Audited(row=row, poison=poison, push_outcome=push_outcome)


def _tombstone(timestamp: datetime) -> Facts:
    return Facts(None, TOMBSTONE, "", None, None, None, None, timestamp)


def _undecodable(timestamp: datetime) -> Facts:
    return Facts(None, UNDECODABLE, "", None, None, None, None, timestamp)


def _headers(headers: Sequence[tuple[str, bytes | None]]) -> dict[str, str]:
    """The headers as text (the last value of a repeated header wins)."""
    return {
        name: value.decode("utf-8", errors="replace")
        for name, value in headers
        if value is not None
    }


def _record_time(timestamp_ms: int | None) -> datetime:
    """The Kafka timestamp; the epoch when there is none or it is beyond what ClickHouse
    supports."""
    if timestamp_ms is None or timestamp_ms < 0:
        return _EPOCH
    try:
        timestamp = _EPOCH + timedelta(milliseconds=timestamp_ms)
    except OverflowError:
        return _EPOCH
    return timestamp if timestamp <= LATEST else _EPOCH


def _out_of_range(facts: Facts) -> str | None:
    """Why ClickHouse could not store these facts faithfully, if it could not (pydantic's bounds
    are wider: such an event is valid JSON but no real one)."""
    if not in_range(facts.occurred_at):
        return f"occurred_at: outside the years {EARLIEST.year}-{LATEST.year} that the audit stores"
    for name, value in (("sync_id", facts.sync_id), ("conversation_seq", facts.conversation_seq)):
        if value is not None and value > _MAX_UINT64:
            return f"{name}: larger than the audit stores (2^64 - 1)"
    return None


def _int_or_none(value: str | None, maximum: int) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        return None
    return number if 0 <= number <= maximum else None
