"""The baseline: a plain confluent-kafka produce loop with the gateway's producer settings.

It writes the same record (key layout, value and headers as the gateway wrote them, read back from
the topic) to the same topic, with idempotence on and ``acks=all``, the gateway's ``linger.ms``
and queue size, keeping at most ``in_flight`` records unacknowledged — the gateway's concurrency
at the matching connection count — and counts delivery reports. There is no asyncio, WebSocket,
JSON or validation: what is left is the Kafka round trip the gateway cannot avoid.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from core.connections import kafka_producer_config
from core.settings import Settings


@dataclass(frozen=True, slots=True)
class SampleRecord:
    """The record the raw loop writes, in the form the gateway wrote it."""

    value: bytes
    headers: list[tuple[str, str | bytes | None]]
    source: str
    """Where it came from: read back from the gateway's topic, or built from the schemas."""


@dataclass(slots=True)
class RawResult:
    in_flight: int
    delivered_total: int = 0
    delivered_in_window: int = 0
    failed: int = 0
    cpu_seconds: float = 0.0
    """CPU time of this process (all threads) from the first produce to the last delivery."""
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)


def durable_producer_config(settings: Settings) -> dict[str, Any]:
    """The configuration ``ingress.producer.DurableProducer`` runs with in the gateway."""
    timeout_ms = settings.ingress.kafka_message_timeout_ms
    return kafka_producer_config(
        settings,
        **{
            "enable.idempotence": True,
            "acks": "all",
            "message.timeout.ms": timeout_ms,
            "request.timeout.ms": min(30_000, timeout_ms),
            "linger.ms": settings.ingress.kafka_linger_ms,
            "queue.buffering.max.messages": settings.ingress.kafka_max_queued_messages,
        },
    )


def produce_loop(
    settings: Settings,
    topic: str,
    keys: Sequence[bytes],
    record: SampleRecord,
    *,
    in_flight: int,
    warmup: float,
    duration: float,
    on_progress: Callable[[int, float], None],
) -> RawResult:
    """Produce for ``warmup + duration`` seconds with at most ``in_flight`` unacknowledged
    records; count the deliveries acknowledged during the last ``duration`` seconds."""
    result = RawResult(in_flight=in_flight)
    producer = Producer(durable_producer_config(settings))
    outstanding = 0
    monotonic = time.monotonic
    cpu_start = time.process_time()
    start = monotonic()
    measure_from, measure_until = start + warmup, start + warmup + duration

    def delivered(sent_at: float, error: KafkaError | None, _message: Message) -> None:
        nonlocal outstanding
        outstanding -= 1
        if error is not None:
            result.failed += 1
            result.errors[error.name()] = result.errors.get(error.name(), 0) + 1
            return
        result.delivered_total += 1
        now = monotonic()
        if measure_from <= now < measure_until:
            result.delivered_in_window += 1
            result.latencies.append(now - sent_at)

    sequence = 0
    next_progress = start + 1.0
    while (now := monotonic()) < measure_until:
        if outstanding >= in_flight:
            producer.poll(0.01)  # returns as soon as a delivery report is served
        else:
            try:
                producer.produce(
                    topic,
                    value=record.value,
                    key=keys[sequence % len(keys)],
                    headers=record.headers,
                    on_delivery=functools.partial(delivered, now),
                )
            except BufferError:
                producer.poll(0.01)
                continue
            sequence += 1
            outstanding += 1
            producer.poll(0)
        if now >= next_progress:
            next_progress = now + 1.0
            on_progress(result.delivered_in_window, now - start)
    remaining = producer.flush(30)
    result.cpu_seconds = time.process_time() - cpu_start
    result.failed += remaining
    return result
