"""The ingress's only way into Kafka: an asyncio producer that answers only after a durable write.

Delivery guarantee: :meth:`DurableProducer.publish` returns a :class:`RecordMetadata` only after the
partition leader has acknowledged the record with ``acks=all`` from an idempotent producer, i.e. the
record is in every in-sync replica and readable at the returned offset. Any other outcome raises, so
the gateway never tells a client ``accepted`` for a write Kafka does not hold. The reverse is not
promised: a publish that raised (timeout, cancellation, shutdown) may still have been written, which
is why clients retry with the same ``client_msg_id`` and the stream processors dedupe on it.

Idempotence makes the producer's own retries harmless (no duplicates, no reordering within a
partition). A record is given ``message.timeout.ms`` to be acknowledged, so a client waits a bounded
time during an outage and then gets ``unavailable`` with a retry-after hint.

Fail fast: once librdkafka reports every broker connection down (``_ALL_BROKERS_DOWN``), a publish
is refused at once with :class:`KafkaUnavailable` instead of waiting ``message.timeout.ms`` for a
record that cannot be written; the producer keeps reconnecting on its own. Kafka counts as
reachable again as soon as a broker connection is up (librdkafka's statistics, every
``_STATS_INTERVAL_MS``), a metadata request succeeds or a record is acknowledged.

Threading: librdkafka runs its own I/O threads; delivery reports are served by ``poll()``, which a
dedicated daemon thread calls in a loop. Reports are queued and handed to the event loop in batches
with ``loop.call_soon_threadsafe``, so neither ``poll()`` nor ``flush()`` nor a metadata request
ever runs on the event loop, and a burst of acknowledgements costs one loop wake-up, not one each.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from confluent_kafka import KafkaError, KafkaException, Message, Producer

_log = logging.getLogger(__name__)

#: Settings the delivery contract depends on; a caller may not weaken them through ``config``.
_DURABILITY_CONFIG: Final[Mapping[str, Any]] = {"enable.idempotence": True, "acks": "all"}
#: Spellings of those settings that mean the same thing.
_DURABLE_SPELLINGS: Final[Mapping[str, frozenset[str]]] = {
    "enable.idempotence": frozenset({"true"}),
    "acks": frozenset({"all", "-1"}),
}

#: Errors that say the record itself can never be written, so retrying it elsewhere is pointless.
_PERMANENT_ERRORS: Final[frozenset[int]] = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_MSG,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError._INVALID_ARG,
        KafkaError._UNKNOWN_PARTITION,
    }
)

#: How long the poll thread blocks in one ``poll()``; it bounds only how fast :meth:`close` returns.
_POLL_INTERVAL_SECONDS: Final = 0.1
#: How often librdkafka reports its brokers' states: how soon a publish is let through again
#: once a broker is back after every connection was down.
_STATS_INTERVAL_MS: Final = 1000

Headers = Mapping[str, bytes | str] | Sequence[tuple[str, bytes | str]]
_Report = tuple["asyncio.Future[RecordMetadata]", KafkaError | None, str, int, int]


@dataclass(frozen=True, slots=True)
class RecordMetadata:
    """Where an acknowledged record lives: readable at ``offset`` of ``topic``/``partition``."""

    topic: str
    partition: int
    offset: int


class PublishError(Exception):
    """A publish that was not acknowledged; the record may or may not have been written."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        #: librdkafka's error name (e.g. ``_MSG_TIMED_OUT``) or a local reason, for logs.
        self.reason = reason


class KafkaUnavailable(PublishError):  # noqa: N818 - named after the client's `unavailable` error
    """Kafka did not acknowledge the record in time; the client may retry after ``retry_after_ms``.

    Raised when brokers are unreachable until ``message.timeout.ms``, when the local queue stays
    full, after a fatal (idempotence) error, and while the producer is closed or closing.
    """

    def __init__(self, message: str, *, reason: str, retry_after_ms: int) -> None:
        super().__init__(message, reason=reason)
        self.retry_after_ms = retry_after_ms


class PublishRejectedError(PublishError):
    """Kafka refused this record for good (too large, not authorised); retrying it cannot help."""


class DurableProducer:
    """An idempotent, ``acks=all`` Kafka producer with an ``await``-able, durable ``publish``.

    Back-pressure: when librdkafka's local queue (``max_queued_messages``) is full, ``publish``
    waits on the event loop (never blocking it) for acknowledgements to free space, for at most
    ``queue_full_timeout_ms``, then raises :class:`KafkaUnavailable`.

    After a fatal error (an idempotence invariant broken on the broker side) librdkafka refuses
    every further record; this producer then fails each publish fast with
    :class:`KafkaUnavailable` and :meth:`ready` reports ``False`` so that the node is taken out of
    rotation and restarted with a fresh producer id.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        message_timeout_ms: int = 5000,
        linger_ms: int = 2,
        max_queued_messages: int = 100_000,
        queue_full_timeout_ms: int | None = None,
        retry_after_ms: int = 1000,
        latency_observer: Callable[[float], None] | None = None,
    ) -> None:
        """Prepare (but do not connect) a producer.

        ``config`` is the base librdkafka configuration, normally
        ``core.connections.kafka_config(settings)``; idempotence and ``acks=all`` are forced
        and a conflicting value is refused. ``latency_observer`` receives the seconds from the call
        to :meth:`publish` to the broker's acknowledgement, for acknowledged records only.
        """
        for key, required in _DURABILITY_CONFIG.items():
            if key in config and str(config[key]).lower() not in _DURABLE_SPELLINGS[key]:
                raise ValueError(
                    f"DurableProducer needs {key}={required}; remove {key}={config[key]!r} from "
                    "the producer configuration"
                )
        if message_timeout_ms <= linger_ms:
            raise ValueError("message_timeout_ms must be larger than linger_ms")
        self._config: dict[str, Any] = {
            **config,
            **_DURABILITY_CONFIG,
            "message.timeout.ms": message_timeout_ms,
            # An in-flight request would otherwise outlive message.timeout.ms (default 30 s).
            "request.timeout.ms": min(30_000, message_timeout_ms),
            "linger.ms": linger_ms,
            "queue.buffering.max.messages": max_queued_messages,
            "error_cb": self._on_error,
            "statistics.interval.ms": _STATS_INTERVAL_MS,
            "stats_cb": self._on_stats,
        }
        self._queue_full_timeout = (
            queue_full_timeout_ms if queue_full_timeout_ms is not None else message_timeout_ms
        ) / 1000
        self._retry_after_ms = retry_after_ms
        self._latency_observer = latency_observer

        self._producer: Producer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poll_thread: threading.Thread | None = None
        self._stop_polling = threading.Event()
        self._closing = False
        self._fatal_error: KafkaError | None = None
        #: Set while every broker connection is down (written on librdkafka's threads).
        self._unreachable: KafkaError | None = None
        # Error codes already logged at warning level since the last acknowledged record.
        self._errors_logged: set[int] = set()
        # Filled by librdkafka callbacks on whichever thread polls; emptied on the event loop.
        self._reports: deque[_Report] = deque()
        self._settle_scheduled = False
        self._space_freed: asyncio.Event | None = None
        self._queue_full_waits = 0

    async def __aenter__(self) -> DurableProducer:
        await self.start()
        return self

    async def __aexit__(self, *_exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Create the librdkafka producer and its poll thread; brokers are contacted lazily."""
        if self._producer is not None:
            raise RuntimeError("DurableProducer.start() called twice")
        self._loop = asyncio.get_running_loop()
        self._space_freed = asyncio.Event()
        self._producer = Producer(self._config)
        self._poll_thread = threading.Thread(
            target=self._poll_forever, name="kafka-producer-poll", daemon=True
        )
        self._poll_thread.start()

    async def publish(
        self,
        topic: str,
        key: bytes | str,
        value: bytes,
        headers: Headers | None = None,
        *,
        partition: int | None = None,
    ) -> RecordMetadata:
        """Write one record and return once ``acks=all`` acknowledged it (see module docstring).

        Raises :class:`KafkaUnavailable` (retry later with the same record) or
        :class:`PublishRejectedError` (the record can never be written). Cancelling the caller
        does not withdraw the record: it may still be written.
        """
        producer, loop = self._require_started()
        started = time.perf_counter()
        future: asyncio.Future[RecordMetadata] = loop.create_future()
        on_delivery = functools.partial(self._on_delivery, future)
        deadline: float | None = None
        while True:
            self._refuse_if_unusable()
            try:
                producer.produce(
                    topic,
                    value=value,
                    key=key,
                    partition=-1 if partition is None else partition,
                    on_delivery=on_delivery,
                    headers=headers,  # type: ignore[arg-type]
                )
                break
            except BufferError:
                self._queue_full_waits += 1
                if deadline is None:
                    deadline = loop.time() + self._queue_full_timeout
                await self._wait_for_space(deadline)
            except KafkaException as exc:
                raise self._failure(exc.args[0]) from exc
        metadata = await future
        if self._latency_observer is not None:
            self._latency_observer(time.perf_counter() - started)
        return metadata

    async def ready(self, metadata_timeout: float = 2.0) -> bool:
        """Whether a broker answers a metadata request within ``metadata_timeout`` s (/readyz)."""
        if self._producer is None or self._closing or self._fatal_error is not None:
            return False
        producer = self._producer
        loop = asyncio.get_running_loop()
        try:
            metadata = await loop.run_in_executor(
                None, functools.partial(producer.list_topics, timeout=metadata_timeout)
            )
        except KafkaException as exc:
            _log.info("Kafka is not ready: %s", exc.args[0])
            return False
        if metadata.brokers:
            self._reachable()
        return bool(metadata.brokers)

    @property
    def fatal_error(self) -> KafkaError | None:
        """The fatal error that made this producer unusable, if one did (the node must restart
        with a fresh producer)."""
        return self._fatal_error

    @property
    def unreachable(self) -> bool:
        """Whether librdkafka said every broker connection is down, and none is up since."""
        return self._unreachable is not None

    async def partition_count(self, topic: str, metadata_timeout: float = 2.0) -> int | None:
        """How many partitions ``topic`` has, as the brokers say; None when they do not answer
        or do not know the topic."""
        if self._producer is None or self._closing:
            return None
        producer = self._producer
        loop = asyncio.get_running_loop()
        try:
            metadata = await loop.run_in_executor(
                None, functools.partial(producer.list_topics, topic, timeout=metadata_timeout)
            )
        except KafkaException:
            return None
        self._reachable()
        found = metadata.topics.get(topic)
        if found is None or found.error is not None or not found.partitions:
            return None
        return len(found.partitions)

    async def close(self, flush_timeout: float = 10.0) -> int:
        """Stop taking records, wait up to ``flush_timeout`` seconds for queued ones, then stop.

        Returns how many records were still unacknowledged at the deadline; their publishers get
        :class:`KafkaUnavailable` (they were purged, although some may have reached the broker).
        """
        if self._producer is None or self._closing:
            return 0
        self._closing = True
        producer = self._producer
        loop = asyncio.get_running_loop()
        unacknowledged: int = await loop.run_in_executor(None, producer.flush, flush_timeout)
        if unacknowledged:
            _log.warning(
                "%d record(s) not acknowledged within %.1f s of shutdown; failing their publishers",
                unacknowledged,
                flush_timeout,
            )
            producer.purge(in_queue=True, in_flight=True, blocking=False)
            await loop.run_in_executor(None, producer.flush, 5.0)
        self._stop_polling.set()
        if self._poll_thread is not None:
            await loop.run_in_executor(None, self._poll_thread.join)
        await loop.run_in_executor(None, producer.close)
        self._settle_reports()
        return unacknowledged

    @property
    def queued(self) -> int:
        """Records handed to librdkafka and not yet acknowledged or failed (for metrics)."""
        return len(self._producer) if self._producer is not None else 0

    @property
    def queue_full_waits(self) -> int:
        """How often a publish found the local queue full and waited (back-pressure events)."""
        return self._queue_full_waits

    def _require_started(self) -> tuple[Producer, asyncio.AbstractEventLoop]:
        if self._producer is None or self._loop is None:
            raise RuntimeError("DurableProducer.publish() before start()")
        return self._producer, self._loop

    def _refuse_if_unusable(self) -> None:
        if self._closing:
            raise KafkaUnavailable(
                "this ingress node is shutting down; retry on another node",
                reason="closing",
                retry_after_ms=self._retry_after_ms,
            )
        if self._fatal_error is not None:
            raise self._failure(self._fatal_error)
        if self._unreachable is not None:
            raise KafkaUnavailable(
                f"Kafka is unreachable from this node ({self._unreachable.str()})",
                reason=self._unreachable.name(),
                retry_after_ms=self._retry_after_ms,
            )

    async def _wait_for_space(self, deadline: float) -> None:
        assert self._space_freed is not None
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise KafkaUnavailable(
                f"Kafka producer queue stayed full for {self._queue_full_timeout:.1f} s",
                reason="queue-full",
                retry_after_ms=self._retry_after_ms,
            )
        # Cleared here, on the loop, right after produce() found the queue full: any settle
        # that runs from now on frees space and sets it again.
        self._space_freed.clear()
        try:
            async with asyncio.timeout(remaining):
                await self._space_freed.wait()
        except TimeoutError:
            pass

    def _failure(self, error: KafkaError) -> PublishError:
        if error.code() in _PERMANENT_ERRORS and not error.fatal():
            return PublishRejectedError(
                f"Kafka rejected the record: {error.str()}", reason=error.name()
            )
        return KafkaUnavailable(
            f"Kafka did not acknowledge the record: {error.str()}",
            reason=error.name(),
            retry_after_ms=self._retry_after_ms,
        )

    # -- callbacks: these run on the poll thread (or the executor thread running flush) ----------

    def _poll_forever(self) -> None:
        assert self._producer is not None
        while not self._stop_polling.is_set():
            try:
                self._producer.poll(_POLL_INTERVAL_SECONDS)
            except Exception:
                # A raising callback must not stop delivery reports for everyone else.
                _log.exception("error while serving Kafka producer callbacks")

    def _on_delivery(
        self, future: asyncio.Future[RecordMetadata], error: KafkaError | None, message: Message
    ) -> None:
        self._reports.append(
            (future, error, message.topic() or "", message.partition() or 0, message.offset() or 0)
        )
        if not self._settle_scheduled:
            self._settle_scheduled = True
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(self._settle_reports)
            except RuntimeError:
                _log.warning("event loop closed with Kafka delivery reports pending")

    def _reachable(self) -> None:
        if self._unreachable is not None:
            self._unreachable = None
            _log.info("Kafka is reachable again; publishing")

    def _on_stats(self, stats_json: str) -> None:
        """A broker connection that is up makes Kafka reachable again."""
        if self._unreachable is None:
            return
        try:
            brokers = json.loads(stats_json).get("brokers", {})
        except ValueError:
            return
        if any(broker.get("state") == "UP" for broker in brokers.values()):
            self._reachable()

    def _on_error(self, error: KafkaError) -> None:
        if error.fatal():
            self._fatal_error = error
            _log.error("fatal Kafka producer error, this producer is unusable: %s", error.str())
            return
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            if self._unreachable is None:
                _log.warning("every Kafka broker is unreachable; refusing sends until one is back")
            self._unreachable = error
        # Connection trouble: librdkafka retries on its own and records time out if it lasts.
        # It reports every reconnect attempt, so only a new kind of error is worth a warning.
        level = logging.DEBUG if error.code() in self._errors_logged else logging.WARNING
        self._errors_logged.add(error.code())
        _log.log(level, "Kafka producer error (retrying): %s", error.str())

    # -- on the event loop -------------------------------------------------------------------------

    def _settle_reports(self) -> None:
        # Cleared before draining: a report appended from now on schedules another settle.
        self._settle_scheduled = False
        reports = self._reports
        for _ in range(len(reports)):
            future, error, topic, partition, offset = reports.popleft()
            if future.done():
                continue  # the publisher was cancelled; the outcome has nobody to go to
            if error is None:
                self._errors_logged.clear()
                self._reachable()
                future.set_result(RecordMetadata(topic, partition, offset))
            else:
                future.set_exception(self._failure(error))
        if self._space_freed is not None:
            self._space_freed.set()
