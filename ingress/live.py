"""Live delivery: the records of ``im.delivery.live`` addressed to this node, turned into frames.

Key: the ingress node id (``gateway_key``). Placement: the router (a stream processor) writes a
record for a device to the node that holds its connection, as the presence topic says; Kafka's
murmur2 partitioner puts it on partition ``partition_for_key(gateway_key(node_id), partitions)``.
This node reads that one partition only, assigned without a consumer group, and skips records of
other nodes that hash to the same partition.

Delivery guarantee: at most once, best effort. Reading starts at the partition's end when the node
starts (what was addressed to a previous incarnation has no socket to go to) and no offset is
ever committed. A device recovers whatever it missed — a restart, a record lost, a full outbound
queue — by syncing from its cursor. A poison record (not JSON, no addressing fields: the event
itself is the worker's, validated when written, and not checked again) is logged, counted and
skipped; it never stops the consumer, and there is no dead-letter topic for an ephemeral one.

Threading: confluent-kafka's consumer blocks, so it runs in a thread of its own, which also
decodes the records and encodes the ``event`` frames (the stored event's JSON, spliced into the
frame as it is: the worker validated it). The event loop only gets batches of ready
frames (``call_soon_threadsafe``) and puts each into the addressed connection's outbound queue.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from prometheus_client import CollectorRegistry, Counter

from core.connections import consume_ready
from ingress.wsprotocol import text_frame
from schemas.events import read_live_delivery
from schemas.frames import encode_event_frame
from schemas.topics import gateway_key, partition_for_key

_log = logging.getLogger(__name__)

F = TypeVar("F")

#: How long one ``consume`` blocks; it bounds how fast :meth:`LiveDeliveryConsumer.stop` returns.
_POLL_SECONDS: Final = 0.2
_BATCH: Final = 500
#: How long one metadata or offset request may block the thread (and so ``stop``).
_REQUEST_SECONDS: Final = 1.0
#: How often the topic's partition count is checked (an operator may add partitions, which
#: moves this node's records to another partition).
_METADATA_REFRESH_SECONDS: Final = 30.0
_RETRY_SECONDS: Final = 1.0


@dataclass(frozen=True, slots=True)
class LiveFrame:
    """An ``event`` frame, framed for the wire, for some or all devices of one user on this node."""

    tenant_id: str
    user_id: str
    device_ids: tuple[str, ...] | None
    wire: bytes
    #: A connect's answer instead of an event: the user's large groups and their positions.
    groups: dict[str, int] | None = None


class LiveMetrics:
    """What happens to live-delivery records (registered in the ingress's registry)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.records = Counter(
            "imstream_ingress_live_records",
            "Live-delivery records read, by outcome: delivered (to at least one socket), "
            "offline (no addressed device is connected here), other-node, poison.",
            ["outcome"],
            registry=registry,
        )


class TopicReader(Generic[F]):
    """Reads partitions of a topic from their end, without a group or commits, in a thread of
    its own, and hands each batch of decoded frames to ``deliver`` on the event loop.

    Subclasses say which partitions (:meth:`_partitions`) and how a record becomes a frame
    (:meth:`_frame`); a record that yields None is skipped.
    """

    def __init__(
        self,
        config: dict[str, Any],
        *,
        topic: str,
        node_id: str,
        name: str,
        deliver: Callable[[Sequence[F]], None],
    ) -> None:
        """``config`` is a librdkafka consumer configuration (``kafka_config``); ``deliver`` is
        called on the event loop with each batch of frames."""
        self._config = {
            **config,
            # Required by the client, never used: the partitions are assigned, nothing committed.
            "group.id": f"imstream-ingress-{name}-{node_id}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "latest",
            # The processors write these topics in transactions.
            "isolation.level": "read_committed",
        }
        self._topic = topic
        self._node_id = node_id
        self._name = name
        self._deliver = deliver
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._assigned = threading.Event()

    @property
    def topic(self) -> str:
        return self._topic

    @property
    def assigned(self) -> bool:
        """Whether the partitions are assigned and positioned (for /readyz and tests)."""
        return self._assigned.is_set()

    @property
    def dead(self) -> bool:
        """Whether the consumer thread ended without being stopped (an unexpected error): the
        node delivers nothing live any more and must be restarted (``Gateway.failure``)."""
        return self._thread is not None and not self._thread.is_alive() and not self._stop.is_set()

    def start(self) -> None:
        """Start the consumer thread; Kafka is contacted there, so this never blocks."""
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__}.start() called twice")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"kafka-{self._name}", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop reading and close the consumer."""
        self._stop.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    # -- on the consumer thread -------------------------------------------------------------

    def _partitions(self, partitions: int) -> list[int]:
        """The partitions to read, of ``partitions``."""
        raise NotImplementedError

    def _frame(self, message: Message) -> F | None:
        raise NotImplementedError

    def _run(self) -> None:
        consumer = Consumer(self._config)
        try:
            partitions = 0
            checked_at = 0.0
            while not self._stop.is_set():
                if time.monotonic() - checked_at > _METADATA_REFRESH_SECONDS or not partitions:
                    current = self._partition_count(consumer)
                    checked_at = time.monotonic()
                    if current and current != partitions:
                        if not self._assign(consumer, current):
                            checked_at = 0.0
                            self._stop.wait(_RETRY_SECONDS)
                            continue
                        partitions = current
                    if not partitions:
                        self._stop.wait(_RETRY_SECONDS)
                        continue
                self._consume(consumer)
        except Exception:
            _log.exception("%s consumer stopped by an unexpected error", self._name)
            self._assigned.clear()
        finally:
            consumer.close()

    def _partition_count(self, consumer: Consumer) -> int:
        try:
            metadata = consumer.list_topics(self._topic, timeout=_REQUEST_SECONDS)
        except KafkaException as error:
            _log.warning("%s: cannot read metadata of %s: %s", self._name, self._topic, error)
            return 0
        topic = metadata.topics.get(self._topic)
        if topic is None or topic.error is not None:
            reason = topic.error.str() if topic is not None and topic.error else "missing"
            _log.warning(
                "%s: topic %s is not usable (%s); run `imstream topics apply`",
                self._name,
                self._topic,
                reason,
            )
            return 0
        return len(topic.partitions)

    def _assign(self, consumer: Consumer, partitions: int) -> bool:
        """Assign the partitions at their current end offsets."""
        assignment = []
        try:
            for partition in self._partitions(partitions):
                _low, high = consumer.get_watermark_offsets(
                    TopicPartition(self._topic, partition),
                    timeout=_REQUEST_SECONDS,
                    cached=False,
                )
                assignment.append(TopicPartition(self._topic, partition, high))
        except KafkaException as error:
            _log.warning("%s: cannot read the end of %s: %s", self._name, self._topic, error)
            return False
        # Explicit offsets rather than OFFSET_END: every record written after this point
        # reaches the sockets, with no window while the client resolves "end" on its own.
        consumer.assign(assignment)
        self._assigned.set()
        _log.info(
            "%s: node %s reads %s%s from %s",
            self._name,
            self._node_id,
            self._topic,
            [tp.partition for tp in assignment],
            [tp.offset for tp in assignment],
        )
        return True

    def _consume(self, consumer: Consumer) -> None:
        messages = consume_ready(consumer, _BATCH, _POLL_SECONDS)
        frames = []
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    _log.warning("%s: consumer error: %s", self._name, error.str())
                continue
            frame = self._frame(message)
            if frame is not None:
                frames.append(frame)
        if frames and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._deliver, frames)
            except RuntimeError:
                _log.debug("event loop closed; %d %s frame(s) dropped", len(frames), self._name)


class LiveDeliveryConsumer(TopicReader[LiveFrame]):
    """Reads this node's partition of the live-delivery topic and hands frames to ``deliver``."""

    def __init__(
        self,
        config: dict[str, Any],
        *,
        topic: str,
        node_id: str,
        deliver: Callable[[Sequence[LiveFrame]], None],
        metrics: LiveMetrics,
    ) -> None:
        super().__init__(config, topic=topic, node_id=node_id, name="live", deliver=deliver)
        self._key = gateway_key(node_id)
        self._metrics = metrics
        self.partition: int | None = None

    def _partitions(self, partitions: int) -> list[int]:
        self.partition = partition_for_key(self._key, partitions)
        return [self.partition]

    def _frame(self, message: Message) -> LiveFrame | None:
        if message.key() != self._key:
            self._metrics.records.labels("other-node").inc()
            return None
        try:
            # Written and validated by the stream worker: read without validating it again,
            # and its event passed through as the JSON it is (LiveDeliveryHead).
            delivery = read_live_delivery(message.value() or b"")
            if delivery.node_id != self._node_id:
                self._metrics.records.labels("other-node").inc()
                return None
            if delivery.groups is not None:
                # A connect's answer: the user's large groups, for this node's index.
                return LiveFrame(
                    tenant_id=delivery.tenant_id,
                    user_id=delivery.user_id,
                    device_ids=None,
                    wire=b"",
                    groups=delivery.groups,
                )
            wire = text_frame(encode_event_frame(delivery.sync_id, delivery.event_json))
        except Exception as error:  # a poison record must never stop live delivery
            self._metrics.records.labels("poison").inc()
            _log.warning(
                "live delivery: skipped poison record at %s[%s]@%s: %s",
                message.topic(),
                message.partition(),
                message.offset(),
                error,
            )
            return None
        return LiveFrame(
            tenant_id=delivery.tenant_id,
            user_id=delivery.user_id,
            device_ids=tuple(delivery.device_ids) if delivery.device_ids is not None else None,
            wire=wire,
        )
