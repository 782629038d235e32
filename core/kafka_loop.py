"""The Kafka consumer loop kit: the pieces every imstream consumer loop shares, as functions.

The CQL sink, the ClickHouse sink, the push sink and the stream worker's processor loops each
run their own loop — consume, work, commit — because what "work" and "commit" mean differs (a
synchronous commit retried until it lands, a commit in order per partition, a commit that may
fail harmlessly, a Kafka transaction). What they share is here, so that it is written once:

- :class:`FatalError`, the one error that ends a loop (the process exits 70 and is restarted);
- :func:`consumer_error`: a consumed message's error, fatal or not, classified the same way
  everywhere; :func:`input_record` / :func:`input_records`: a message as a
  :class:`~core.records.InputRecord`;
- :func:`subscribe` and :class:`Assignment`: the partitions a member holds and a counter that
  moves at every rebalance;
- :func:`next_offsets` and :func:`commit_offsets`: the commit that survives rebalances — only
  the partitions still assigned are committed, and a commit refused because the group moved on
  is no failure (the partitions' next owner reads those records again).

Plain functions and small dataclasses rather than a base class: each loop keeps its control flow
(and its commit policy) in view, and takes only the pieces it needs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from core.records import InputRecord

log = logging.getLogger(__name__)

#: The exit code of a process a :class:`FatalError` ended (EX_SOFTWARE); its supervisor restarts it.
EXIT_FATAL = 70

#: A partition as the loops key it: (topic, partition).
Partition = tuple[str, int]

#: Offset-commit errors that mean "the group moved on" (a rebalance took the partitions): not a
#: failure of the consumer; the partitions' next owner processes the uncommitted records again.
REBALANCED_COMMIT_ERRORS = frozenset(
    {
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError._NO_OFFSET,
        KafkaError._STATE,
    }
)


class FatalError(Exception):
    """The loop cannot go on (Kafka refused something for good); the process exits with code 70
    and is restarted, resuming from the last committed offsets."""


class RetriableCommitError(Exception):
    """An offset commit failed for now (Kafka says retriable); the loop's policy decides: retry,
    or leave it to the next commit."""

    def __init__(self, error: KafkaError) -> None:
        super().__init__(str(error))
        self.error = error


# -- consumed messages --


def consumer_error(
    message: Message, *, what: str = "consumer", logger: logging.Logger = log
) -> KafkaError | None:
    """The message's error, None for a record. A fatal error raises :class:`FatalError`; any
    other is logged (but the end-of-partition event, which is news, not trouble) and returned:
    the caller skips the message, and may note an end of partition (:func:`is_partition_end`).

    Fatal is ``fatal()`` or the code ``_FATAL``: librdkafka reports its fatal errors to a
    consumer (a static member fenced by a newer one with its ``group.instance.id``) as an event
    of code ``_FATAL`` whose ``fatal()`` is False — the consumer is unusable all the same."""
    error: KafkaError | None = message.error()
    if error is None:
        return None
    if error.fatal() or error.code() == KafkaError._FATAL:
        raise FatalError(f"{what}: {error}")
    if error.code() != KafkaError._PARTITION_EOF:
        logger.warning("%s: %s", what, error)
    return error


def is_partition_end(error: KafkaError) -> bool:
    """Whether the error is the end-of-partition event (``enable.partition.eof``)."""
    return bool(error.code() == KafkaError._PARTITION_EOF)


def input_record(message: Message) -> InputRecord:
    """A consumed record (not an error) as plain data. No timestamp: no loop needs one, and
    asking librdkafka for it costs per record."""
    return InputRecord(
        topic=message.topic() or "",
        partition=message.partition() or 0,
        offset=message.offset() or 0,
        key=message.key(),
        value=message.value(),
    )


def input_records(
    messages: Iterable[Message],
    *,
    what: str = "consumer",
    logger: logging.Logger = log,
    ends: dict[Partition, bool] | None = None,
    on_error: Callable[[KafkaError], None] | None = None,
) -> list[InputRecord]:
    """The records among ``messages``, errors classified by :func:`consumer_error` and skipped.

    ``ends``, when given, follows whether each partition was read to its end: True at its
    end-of-partition event, False at each record, in the order they came (a caught-up check
    reads it). ``on_error`` sees every error skipped."""
    records = []
    for message in messages:
        error = consumer_error(message, what=what, logger=logger)
        if error is not None:
            if ends is not None and is_partition_end(error):
                ends[(message.topic() or "", message.partition() or 0)] = True
            if on_error is not None:
                on_error(error)
            continue
        record = input_record(message)
        if ends is not None:
            ends[(record.topic, record.partition)] = False
        records.append(record)
    return records


# -- rebalances --


def subscribe(
    consumer: Consumer,
    topics: Sequence[str],
    on_assign: Callable[[Consumer, list[TopicPartition]], None],
    on_revoke: Callable[[Consumer, list[TopicPartition]], None],
) -> None:
    """Subscribe with rebalance callbacks. A lost assignment (the member was thrown out of the
    group) is handled as a revoke: the partitions are gone either way, and a commit for them
    would be refused."""
    consumer.subscribe(list(topics), on_assign=on_assign, on_revoke=on_revoke, on_lost=on_revoke)


@dataclass
class Assignment:
    """The partitions this member holds, kept by the rebalance callbacks (which librdkafka runs
    inside ``consume``/``poll``, on the loop's thread), and a counter that moves at every
    rebalance: work read before a rebalance commits only what is still held."""

    partitions: set[Partition] = field(default_factory=set)
    #: Incremented at every assignment and revocation.
    epoch: int = 0

    def assign(self, partitions: Iterable[TopicPartition]) -> set[Partition]:
        """Note an assignment; the partitions it adds."""
        self.epoch += 1
        added = {(tp.topic, tp.partition) for tp in partitions}
        self.partitions |= added
        return added

    def revoke(self, partitions: Iterable[TopicPartition]) -> set[Partition]:
        """Note a revocation (or a loss); the partitions it takes away."""
        self.epoch += 1
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self.partitions -= gone
        return gone


def describe(partitions: Iterable[TopicPartition]) -> str:
    """``topic[0, 1, 2]`` per topic, for the log."""
    by_topic: dict[str, list[int]] = {}
    for tp in partitions:
        by_topic.setdefault(tp.topic, []).append(tp.partition)
    return (
        ", ".join(f"{topic}{sorted(numbers)}" for topic, numbers in sorted(by_topic.items()))
        or "nothing"
    )


# -- commits --


class Positioned(Protocol):
    """Anything read from a partition at an offset (an InputRecord, the audit's KafkaRecord)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...


def next_offsets(records: Iterable[Positioned]) -> dict[Partition, int]:
    """Per partition, the offset to commit once ``records`` are done: just past the last one."""
    offsets: dict[Partition, int] = {}
    for record in records:
        tp = (record.topic, record.partition)
        offsets[tp] = max(offsets.get(tp, -1), record.offset + 1)
    return offsets


class Commit(Enum):
    """How :func:`commit_offsets` ended (a failure raises)."""

    COMMITTED = "committed"
    #: None of the partitions is held any more: nothing was committed.
    NOTHING = "nothing"
    #: Refused because the group moved on; the partitions' next owner reads the records again.
    REBALANCED = "rebalanced"


def commit_offsets(
    consumer: Consumer,
    offsets: Mapping[Partition, int],
    *,
    held: Collection[Partition] | None = None,
    logger: logging.Logger = log,
) -> Commit:
    """Commit ``offsets`` synchronously — of the partitions in ``held`` only, when given (the
    assignment now: a partition revoked meanwhile is its new owner's to commit).

    Raises :class:`RetriableCommitError` when Kafka says to try again, :class:`FatalError` when
    it refuses for good."""
    if held is not None:
        offsets = {tp: offset for tp, offset in offsets.items() if tp in held}
    if not offsets:
        return Commit.NOTHING
    try:
        consumer.commit(
            offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=False
        )
    except KafkaException as exc:
        error = exc.args[0]
        if isinstance(error, KafkaError) and error.code() in REBALANCED_COMMIT_ERRORS:
            logger.warning(
                "commit refused after a rebalance (%s); the partitions' next owner reads those "
                "records again",
                error,
            )
            return Commit.REBALANCED
        if isinstance(error, KafkaError) and error.retriable():
            raise RetriableCommitError(error) from exc
        raise FatalError(f"commit: {exc}") from exc
    return Commit.COMMITTED
