"""How far a consumer group is behind: ``imstream status``, the lag sampler and the benchmarks
count it the same way."""

from __future__ import annotations

from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from core.connections import kafka_config
from core.settings import Settings


def group_lag(settings: Settings, group: str, topics: list[str]) -> int | None:
    """End offsets minus committed offsets over ``topics`` (uncommitted partitions count whole)."""
    admin = AdminClient(kafka_config(settings))
    probe = Consumer(kafka_config(settings, **{"group.id": f"{group}-status-probe"}))
    try:
        partitions = []
        for topic in topics:
            metadata = probe.list_topics(topic, timeout=10).topics.get(topic)
            if metadata is None or metadata.error is not None:
                continue
            partitions += [TopicPartition(topic, p) for p in metadata.partitions]
        request = [ConsumerGroupTopicPartitions(group, partitions)]
        committed = admin.list_consumer_group_offsets(request)[group].result(timeout=10)
        offsets = {(tp.topic, tp.partition): tp.offset for tp in committed.topic_partitions}
        lag = 0
        for tp in partitions:
            low, high = probe.get_watermark_offsets(tp, timeout=10, cached=False)
            done = offsets.get((tp.topic, tp.partition), -1)
            behind = max(0, high - (done if done >= 0 else low))
            # On a topic written in transactions the last offset is usually a commit marker,
            # which a consumer never receives, so its committed offset stays one short of it.
            lag += 0 if behind == 1 else behind
        return lag
    except (KafkaException, TimeoutError):  # unknown lag, shown as such
        return None
    finally:
        probe.close()
