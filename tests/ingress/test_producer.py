"""DurableProducer against the real local Kafka: accepted means durable, failures are honest."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest
from confluent_kafka import TopicPartition

from core.connections import kafka_config
from core.settings import Settings
from ingress.metrics import IngressMetrics
from ingress.producer import DurableProducer, KafkaUnavailable, RecordMetadata
from pipelines.stack.manager import LocalStack
from tests.ingress.support import free_port, high_watermark, reading_consumer, wait_until


@dataclass(frozen=True)
class Record:
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


def read_records(
    settings: Settings, topic: str, partition: int, offset: int, count: int
) -> list[Record]:
    """Read ``count`` records of a partition from ``offset`` on (blocking; run it in a thread)."""
    consumer = reading_consumer(settings)
    consumer.assign([TopicPartition(topic, partition, offset)])
    records: list[Record] = []
    deadline = time.monotonic() + 30
    try:
        while len(records) < count and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            assert message.error() is None, message.error()
            headers = message.headers() or []
            assert isinstance(headers, list)  # a consumer returns headers as (key, value) pairs
            records.append(
                Record(
                    offset=message.offset() or 0,
                    key=message.key(),
                    value=message.value(),
                    headers=[(name, value) for name, value in headers if isinstance(value, bytes)],
                )
            )
    finally:
        consumer.close()
    return records


async def test_accepted_record_is_committed_and_readable_at_its_offset(
    settings: Settings, kafka_topic: str
) -> None:
    async with DurableProducer(kafka_config(settings)) as producer:
        metadata = await producer.publish(
            kafka_topic, b"conversation-1", b"hello", [("event-type", b"message.sent")]
        )
        # Asked the broker right after publish returned: the record is already below the high
        # watermark, i.e. replicated to every in-sync replica.
        end_offset = await asyncio.to_thread(
            high_watermark, settings, kafka_topic, metadata.partition
        )
    assert metadata == RecordMetadata(kafka_topic, 0, 0)
    assert end_offset == metadata.offset + 1
    [record] = await asyncio.to_thread(
        read_records, settings, kafka_topic, metadata.partition, metadata.offset, 1
    )
    assert record == Record(0, b"conversation-1", b"hello", [("event-type", b"message.sent")])


async def test_concurrent_publishes_all_succeed_with_distinct_offsets(
    settings: Settings, kafka_topic: str
) -> None:
    metrics = IngressMetrics(process_metrics=False)
    values = [f"message-{index}".encode() for index in range(500)]
    async with DurableProducer(
        kafka_config(settings), latency_observer=metrics.produce_latency.observe
    ) as producer:
        results = await asyncio.gather(
            *(producer.publish(kafka_topic, b"conversation-1", value) for value in values)
        )
    offsets = [metadata.offset for metadata in results]
    assert sorted(offsets) == list(range(500))
    assert (
        metrics.registry.get_sample_value("imstream_ingress_produce_latency_seconds_count") == 500
    )
    records = await asyncio.to_thread(read_records, settings, kafka_topic, 0, 0, 500)
    stored = {record.offset: record.value for record in records}
    assert stored == {
        metadata.offset: value for metadata, value in zip(results, values, strict=True)
    }


async def test_full_local_queue_waits_instead_of_failing(
    settings: Settings, kafka_topic: str
) -> None:
    async with DurableProducer(kafka_config(settings), max_queued_messages=10) as producer:
        results = await asyncio.gather(
            *(producer.publish(kafka_topic, b"k", str(index).encode()) for index in range(300))
        )
        assert producer.queue_full_waits > 0
    assert sorted(metadata.offset for metadata in results) == list(range(300))


async def test_close_flushes_publishes_still_in_flight(
    settings: Settings, kafka_topic: str
) -> None:
    producer = DurableProducer(kafka_config(settings))
    await producer.start()
    pending = [
        asyncio.create_task(producer.publish(kafka_topic, b"k", str(index).encode()))
        for index in range(100)
    ]
    await asyncio.sleep(0)  # let every task hand its record to librdkafka
    assert await producer.close(flush_timeout=10) == 0
    results = await asyncio.gather(*pending)
    assert sorted(metadata.offset for metadata in results) == list(range(100))
    with pytest.raises(KafkaUnavailable) as refused:
        await producer.publish(kafka_topic, b"k", b"after close")
    assert refused.value.reason == "closing"


async def test_cancelled_publisher_does_not_disturb_the_others(
    settings: Settings, kafka_topic: str
) -> None:
    async with DurableProducer(kafka_config(settings)) as producer:
        abandoned = asyncio.create_task(producer.publish(kafka_topic, b"k", b"abandoned"))
        await asyncio.sleep(0)
        abandoned.cancel()
        metadata = await producer.publish(kafka_topic, b"k", b"kept")
    assert abandoned.cancelled()
    [record] = await asyncio.to_thread(read_records, settings, kafka_topic, 0, metadata.offset, 1)
    assert record.value == b"kept"


async def test_ready_with_a_live_broker(settings: Settings, local_stack: LocalStack) -> None:
    async with DurableProducer(kafka_config(settings)) as producer:
        assert await producer.ready(metadata_timeout=10)
    assert not await producer.ready()


async def test_unreachable_kafka_raises_unavailable_at_once(settings: Settings) -> None:
    """Once librdkafka said every broker is down, a publish is refused at once instead of
    waiting out the message timeout (20 s here) for a write that cannot happen."""
    message_timeout_ms = 20_000
    observed_latencies: list[float] = []
    dead = kafka_config(settings, **{"bootstrap.servers": f"127.0.0.1:{free_port()}"})
    producer = DurableProducer(
        dead,
        message_timeout_ms=message_timeout_ms,
        retry_after_ms=750,
        latency_observer=observed_latencies.append,
    )
    await producer.start()
    try:
        assert not await producer.ready(metadata_timeout=0.5)
        await wait_until(lambda: producer.unreachable, within=10, what="brokers down")
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(producer.publish("never-written", b"k", b"v") for _ in range(20)),
            return_exceptions=True,
        )
        elapsed = time.monotonic() - started
    finally:
        await producer.close(flush_timeout=1)
    assert all(isinstance(outcome, KafkaUnavailable) for outcome in outcomes), outcomes
    failures = [outcome for outcome in outcomes if isinstance(outcome, KafkaUnavailable)]
    assert {failure.reason for failure in failures} == {"_ALL_BROKERS_DOWN"}
    assert {failure.retry_after_ms for failure in failures} == {750}
    assert observed_latencies == []
    assert elapsed < 1.0


def test_weaker_durability_settings_are_refused(settings: Settings) -> None:
    with pytest.raises(ValueError, match="acks=all"):
        DurableProducer(kafka_config(settings, acks="1"))
    with pytest.raises(ValueError, match=r"enable\.idempotence"):
        DurableProducer(kafka_config(settings, **{"enable.idempotence": False}))
