"""A transactional producer for one or more of the worker's processor loops, and its interval.

``Transactions`` runs the transactions of the loops given to it. By default each loop has its
own (one transactional id per processor). With ``IM_STREAMS__SHARED_TRANSACTION`` both loops get
the same one and commit together: most of what a transaction costs Kafka does not depend on how
many records it carries (the coordinator's round trips, the transaction log's records, and per
partition written a verification, a produce request and a marker), so one transaction for both
processors halves the transactions — at a latency cost (docs/streams.md).

When loops share it, each loop still consumes, processes and keeps its state on its own thread;
when it has a batch it hands over what the batch writes — the output and state records, its
input offsets and its consumer's group metadata — and waits. Whichever waiting loop finds no
transaction running leads: it waits until no other loop is still filling a batch for the same
slot (each fills until the slot's start at the latest), then puts every batch handed over into
one transaction — each group's offsets (``send_offsets_to_transaction`` once per group, KIP-447
fencing for each) with all the records — commits it, and hands each loop its outcome. Each loop
then applies its own state writes, on its own thread; a rebalance still happens only inside
``consume``, which no loop calls while its batch is in a transaction. A loop alone is simply
always the leader.

**The interval.** A transaction starts no sooner than ``interval`` after the previous one began;
the loops fill their batches until then. An idle worker does not wait: its next record's slot is
already past. The interval is the last transaction's duration divided by
``IM_STREAMS__COMMIT_TIME_SHARE`` (at 0.5 the worker spends at most about half of its time
committing), between ``IM_STREAMS__COMMIT_INTERVAL_SECONDS`` and
``IM_STREAMS__MAX_COMMIT_INTERVAL_SECONDS`` (equal to the floor by default). A busy broker
answers slower, so the loops commit less often and each transaction carries more.

**Attribution.** A transaction Kafka aborts because it refused one of its records for good is
reported to every batch in it; each loop then processes its batch again one input per
transaction, and those transactions run ``alone`` (never shared), so the input at fault is known
exactly.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition

from core import kafka_loop
from core.connections import kafka_producer_config
from core.records import Headers
from core.settings import Settings

log = logging.getLogger(__name__)

#: How long a blocking Kafka call (init, send offsets, commit, abort) may take before we give up.
KAFKA_CALL_TIMEOUT = 60.0
#: The longest a leader waits for another loop still filling its batch (it fills until the
#: slot's start, so this only guards against a loop stuck in a call).
COLLECT_GRACE = 1.0


class Transaction(Enum):
    """How a transaction ended."""

    COMMITTED = "committed"
    #: Kafka asked for an abort; the inputs are read again.
    ABORTED = "aborted"
    #: Aborted, and Kafka refused one of its records for good (``PERMANENT_RECORD_ERRORS``).
    REFUSED = "refused"


#: Errors with which Kafka refuses a record for good: sending it again cannot help.
PERMANENT_RECORD_ERRORS = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_MSG,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.POLICY_VIOLATION,
    }
)


@dataclass(frozen=True, slots=True)
class Produced:
    """One record a batch writes."""

    topic: str
    key: bytes | None
    value: bytes | None
    partition: int | None = None
    headers: Headers | None = None


@dataclass(eq=False)
class Batch:
    """One loop's part of a transaction: what it writes and the offsets it consumed."""

    owner: str
    records: Sequence[Produced]
    offsets: list[TopicPartition]
    group_metadata: Any
    #: In a transaction of its own (one input of a batch processed one at a time).
    alone: bool = False
    outcome: Transaction | None = None
    #: The error codes of the records Kafka refused in the transaction (delivery reports).
    refusals: list[int] = field(default_factory=list)
    error: BaseException | None = None


@dataclass
class TransactionStats:
    transactions: int = 0
    aborted: int = 0
    #: Batches committed, and those that shared their transaction with another loop's.
    batches: int = 0
    shared: int = 0
    #: The interval now, and the duration of the last transaction (seconds).
    interval: float = 0.0
    last_duration: float = 0.0


class Transactions:
    """The worker's transactional producer, shared by its loops; see the module docstring."""

    def __init__(self, settings: Settings, transactional_id: str) -> None:
        streams = settings.streams
        self.transactional_id = transactional_id
        self.floor = streams.commit_interval_seconds
        self.cap = max(streams.max_commit_interval_seconds, self.floor)
        self.share = streams.commit_time_share
        self.stats = TransactionStats(interval=self.floor)
        self._refusals: list[int] = []
        self._cond = threading.Condition()
        self._queue: list[Batch] = []
        #: Loops that took a first record and are filling their batch for the next slot.
        self._collecting: set[str] = set()
        self._leading = False
        self._initialised = False
        self._last_start = 0.0
        self.producer = Producer(
            kafka_producer_config(
                settings,
                **{
                    "transactional.id": transactional_id,
                    "transaction.timeout.ms": int(streams.transaction_timeout_seconds * 1000),
                    "linger.ms": streams.producer_linger_seconds * 1000,
                    # Adding the offsets right after the batch's partitions gets
                    # CONCURRENT_TRANSACTIONS until the partitions are added, and a produce to a
                    # partition the broker has not verified as part of the transaction yet
                    # (KIP-890) is refused the same way; librdkafka retries each after
                    # retry.backoff.ms, doubling up to the max. At 100 ms (the default) every
                    # batch paid it; at 5 ms a 4-partition transaction still took 30 ms (p50)
                    # on the local broker, at 1 ms 4 to 5 ms.
                    "retry.backoff.ms": 1,
                    "retry.backoff.max.ms": 200,
                    # Only failures are reported (no cost per record): which record Kafka
                    # refused, should a transaction abort.
                    "on_delivery": self._on_delivery_error,
                    "delivery.report.only.error": True,
                    "enable.idempotence": True,
                    "acks": "all",
                },
            )
        )

    # -- used by the loops --

    def initialise(self) -> None:
        """``init_transactions`` once per worker: aborts what a predecessor with the same id left
        open and fences it should it still run."""
        with self._cond:
            if self._initialised:
                return
            call(self.producer.init_transactions, "init_transactions", KAFKA_CALL_TIMEOUT)
            self._initialised = True

    def next_start(self) -> float:
        """When the next transaction may begin (``time.monotonic``); past when idle."""
        return self._last_start + self.stats.interval

    def collecting(self, owner: str) -> None:
        """``owner`` took a first record and fills its batch until ``next_start``: the next
        transaction waits for it."""
        with self._cond:
            self._collecting.add(owner)

    def not_collecting(self, owner: str) -> None:
        with self._cond:
            if owner in self._collecting:
                self._collecting.discard(owner)
                self._cond.notify_all()

    def run(self, batch: Batch) -> Transaction:
        """Commit ``batch`` in the next transaction; blocks until it ended."""
        taken: list[Batch] = []
        with self._cond:
            self._queue.append(batch)
            self._collecting.discard(batch.owner)
            self._cond.notify_all()
            give_up = time.monotonic() + COLLECT_GRACE
            while batch.outcome is None and batch.error is None:
                if not self._leading and (not self._collecting or time.monotonic() > give_up):
                    self._leading = True
                    taken, self._queue = self._queue, []
                    break
                self._cond.wait(0.005)
        if taken:
            try:
                self._lead(taken)
            except BaseException as error:
                for other in taken:
                    if other.outcome is None:
                        other.error = error
                raise
            finally:
                with self._cond:
                    self._leading = False
                    self._cond.notify_all()
        if batch.error is not None:
            raise kafka_loop.FatalError(f"the transaction failed: {batch.error}") from batch.error
        assert batch.outcome is not None
        return batch.outcome

    def close(self) -> None:
        self.producer.flush(10)

    # -- the leader --

    def _lead(self, taken: list[Batch]) -> None:
        together = [batch for batch in taken if not batch.alone]
        groups = [together] if together else []
        groups += [[batch] for batch in taken if batch.alone]
        for group in groups:
            outcome = self._transact(group)
            refusals = list(self._refusals)
            with self._cond:
                for batch in group:
                    batch.refusals = refusals
                    batch.outcome = outcome
                self._cond.notify_all()

    def _transact(self, group: Sequence[Batch]) -> Transaction:
        producer = self.producer
        self._refusals.clear()
        # No wait for the interval here: the loops filled their batches until the slot, and an
        # input processed one at a time (the record-limit fallback) goes at once.
        started = time.monotonic()
        self._last_start = started
        call(producer.begin_transaction, "begin_transaction")
        try:
            for batch in group:
                for record in batch.records:
                    self._produce(record)
            for batch in group:
                producer.send_offsets_to_transaction(
                    batch.offsets, batch.group_metadata, KAFKA_CALL_TIMEOUT
                )
            self._commit()
        except KafkaException as exc:
            error = exc.args[0]
            if not isinstance(error, KafkaError) or not error.txn_requires_abort():
                raise kafka_loop.FatalError(f"transaction: {exc}") from exc
            log.warning(
                "transaction of %s aborted, the inputs will be read again: %s",
                "+".join(batch.owner for batch in group),
                error,
            )
            self.stats.aborted += 1
            call(producer.abort_transaction, "abort_transaction", KAFKA_CALL_TIMEOUT)
            codes = {error.code(), *self._refusals}
            refused = not codes.isdisjoint(PERMANENT_RECORD_ERRORS)
            return Transaction.REFUSED if refused else Transaction.ABORTED
        duration = time.monotonic() - started
        stats = self.stats
        stats.transactions += 1
        stats.batches += len(group)
        stats.shared += len(group) if len(group) > 1 else 0
        stats.last_duration = duration
        stats.interval = min(self.cap, max(self.floor, duration / self.share))
        return Transaction.COMMITTED

    def _produce(self, record: Produced) -> None:
        kwargs: dict[str, Any] = {"key": record.key, "value": record.value}
        if record.partition is not None:
            kwargs["partition"] = record.partition
        if record.headers:
            kwargs["headers"] = record.headers
        while True:
            try:
                self.producer.produce(record.topic, **kwargs)
                return
            except BufferError:  # the local queue is full: let librdkafka send some
                self.producer.poll(0.05)

    def _commit(self) -> None:
        while True:
            try:
                self.producer.commit_transaction(KAFKA_CALL_TIMEOUT)
                return
            except KafkaException as exc:
                error = exc.args[0]
                if isinstance(error, KafkaError) and error.retriable():
                    log.warning("commit_transaction: %s; retrying", error)
                    continue
                raise

    def _on_delivery_error(self, error: KafkaError | None, _message: Message) -> None:
        """Delivery reports of failed records only (``delivery.report.only.error``); served
        while the transaction commits."""
        if error is not None:
            self._refusals.append(error.code())


def call(function: Callable[..., Any], what: str, *args: Any) -> None:
    """A blocking transactional call: retried while Kafka says retriable, else fatal."""
    while True:
        try:
            function(*args)
            return
        except KafkaException as exc:
            error = exc.args[0]
            if isinstance(error, KafkaError) and error.retriable():
                log.warning("%s: %s; retrying", what, error)
                continue
            raise kafka_loop.FatalError(f"{what}: {exc}") from exc
