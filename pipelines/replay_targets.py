"""Replay targets that run in the operator's own process: a topic, and the CQL sink's writes.

The ClickHouse audit's target runs in the process that owns ClickHouse (chDB allows one process
per data path): ``analytics.jobs``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from cassandra.cluster import Session
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from core.connections import kafka_producer_config
from core.kafka_loop import input_record
from core.replay import ReplayError
from core.settings import Settings
from schemas.topics import Topic, TopicCatalog
from sinks.cql.sink import CqlSink, StopRequestedError

#: The header a replayed record carries in its new topic: where it was (``topic/partition/offset``).
REPLAYED_FROM_HEADER = "imstream.replay.from"
#: The header naming the replay run that produced it.
REPLAY_RUN_HEADER = "imstream.replay.run"


class ReplayInterruptedError(Exception):
    """The target stopped mid-chunk because a stop was requested: the chunk is not committed."""


class TopicTarget:
    """Re-publish each record — key, value, headers, timestamp — into ``topic`` (same partition
    when it has that many, else by key), idempotent producer, ``acks=all``; ``apply`` returns once
    Kafka acknowledged the whole chunk."""

    def __init__(self, settings: Settings, topic: Topic, run_id: str, timeout: float = 30.0):
        self.name = f"topic:{topic.logical_name}"
        self.topic = topic
        self.run_id = run_id.encode()
        self.timeout = timeout
        self.producer = Producer(
            kafka_producer_config(
                settings,
                **{
                    "enable.idempotence": True,
                    "acks": "all",
                    "linger.ms": 20,
                    "message.timeout.ms": int(timeout * 1000),
                },
            )
        )
        self.partitions = topic.partitions

    def apply(self, messages: Sequence[Message]) -> None:
        failures: list[KafkaError] = []

        def delivered(failure: KafkaError | None, _message: Message) -> None:
            if failure is not None:
                failures.append(failure)

        for message in messages:
            source = f"{message.topic()}/{message.partition()}/{message.offset()}".encode()
            headers = [
                *(message.headers() or []),
                (REPLAYED_FROM_HEADER, source),
                (REPLAY_RUN_HEADER, self.run_id),
            ]
            partition = message.partition()
            _, timestamp = message.timestamp()
            extra: dict[str, Any] = {}
            if partition is not None and partition < self.partitions:
                extra["partition"] = partition
            if timestamp > 0:
                extra["timestamp"] = timestamp
            while True:
                try:
                    self.producer.produce(
                        self.topic.name,
                        key=message.key(),
                        value=message.value(),
                        headers=headers,
                        on_delivery=delivered,
                        **extra,
                    )
                    break
                except BufferError:
                    self.producer.poll(0.1)
                except KafkaException as error:
                    raise ReplayError("produce-failed", f"{self.topic.name}: {error}") from error
        if self.producer.flush(self.timeout) > 0:
            raise ReplayError(
                "produce-failed", f"{self.topic.name}: not acknowledged within {self.timeout:g} s"
            )
        if failures:
            raise ReplayError("produce-failed", f"{self.topic.name}: {failures[0].str()}")

    def close(self) -> None:
        self.producer.flush(self.timeout)


class CqlTarget:
    """The CQL sink's own planning and writes (``CqlSink.apply``) into ``keyspace``: the same
    cells with the same write timestamps as the live sink wrote, so a replay changes nothing
    that is already right. Poison goes to the source's dead-letter topic, as in the live sink."""

    name = "cql"

    def __init__(
        self,
        settings: Settings,
        session: Session,
        catalog: TopicCatalog,
        keyspace: str,
        stop: threading.Event,
    ) -> None:
        self.sink = CqlSink(settings, session, catalog=catalog, keyspace=keyspace, stop=stop)
        self.sink.consumer.close()  # the replay reads with its own consumer

    @staticmethod
    def reads(catalog: TopicCatalog) -> tuple[Topic, ...]:
        return (catalog.messages_sequenced, catalog.sync_events, catalog.push_tokens)

    def apply(self, messages: Sequence[Message]) -> None:
        records = [input_record(message) for message in messages]
        try:
            self.sink.apply(records)
        except StopRequestedError as stopped:
            raise ReplayInterruptedError("stopped while the CQL cluster was retried") from stopped

    def close(self) -> None:
        self.sink.producer.flush(10)
