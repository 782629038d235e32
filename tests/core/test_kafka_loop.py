"""The Kafka loop kit against the local Kafka: records and errors as the loops see them, the
assignment the rebalance callbacks keep, and the commit that survives a rebalance."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from core.connections import kafka_consumer_config, kafka_producer_config
from core.kafka_loop import (
    Assignment,
    Commit,
    FatalError,
    commit_offsets,
    consumer_error,
    describe,
    input_records,
    next_offsets,
    subscribe,
)
from core.records import InputRecord
from core.settings import Settings

PARTITIONS = 2
#: A short session: a member that joins or leaves settles within seconds.
SESSION = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}


@pytest.fixture
def topic(settings: Settings, kafka_admin: AdminClient, unique_name: str) -> Iterator[str]:
    """A fresh two-partition topic with two records per partition, deleted after the test."""
    futures = kafka_admin.create_topics([NewTopic(unique_name, num_partitions=PARTITIONS)])
    futures[unique_name].result(timeout=30)
    producer = Producer(kafka_producer_config(settings, acks="all"))
    for partition in range(PARTITIONS):
        for index in range(2):
            producer.produce(
                unique_name,
                key=f"k{partition}{index}".encode(),
                value=f"v{partition}{index}".encode(),
                partition=partition,
            )
    assert producer.flush(30) == 0
    yield unique_name
    kafka_admin.delete_topics([unique_name])[unique_name].result(timeout=30)


class Member:
    """A group member as a loop keeps it: a consumer and the kit's assignment."""

    def __init__(self, settings: Settings, group: str, topic: str, **config: object) -> None:
        self.consumer = Consumer(kafka_consumer_config(settings, group, **SESSION, **config))
        self.assignment = Assignment()
        subscribe(self.consumer, [topic], self._on_assign, self._on_revoke)

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assignment.assign(partitions)

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assignment.revoke(partitions)

    def poll(self, timeout: float = 0.2) -> list[InputRecord]:
        return input_records(self.consumer.consume(100, timeout=timeout))

    def close(self) -> None:
        self.consumer.close()


def poll_until(condition: Callable[[], bool], *members: Member, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the group did not settle"
        for member in members:
            member.poll()


def committed(settings: Settings, group: str, topic: str) -> dict[int, int]:
    reader = Consumer(kafka_consumer_config(settings, group))
    try:
        offsets = reader.committed(
            [TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=30
        )
    finally:
        reader.close()
    return {tp.partition: tp.offset for tp in offsets}


def test_input_records_converts_records_and_follows_the_partition_ends(
    settings: Settings, topic: str, unique_name: str
) -> None:
    consumer = Consumer(
        kafka_consumer_config(settings, unique_name, **{"enable.partition.eof": True})
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    ends: dict[tuple[str, int], bool] = {}
    records: list[InputRecord] = []
    errors: list[object] = []
    deadline = time.monotonic() + 30
    try:
        while not (len(ends) == PARTITIONS and all(ends.values())):
            assert time.monotonic() < deadline
            messages = consumer.consume(100, timeout=0.5)
            records += input_records(messages, ends=ends, on_error=errors.append)
    finally:
        consumer.close()
    assert sorted((r.partition, r.offset, r.key, r.value) for r in records) == [
        (p, i, f"k{p}{i}".encode(), f"v{p}{i}".encode())
        for p in range(PARTITIONS)
        for i in range(2)
    ]
    assert all(r.topic == topic and r.timestamp_ms == 0 for r in records)
    assert ends == {(topic, p): True for p in range(PARTITIONS)}
    # The end-of-partition events reached on_error (and were not warned about).
    assert len(errors) >= PARTITIONS
    assert next_offsets(records) == {(topic, p): 2 for p in range(PARTITIONS)}


@pytest.fixture
def join(settings: Settings, topic: str, unique_name: str) -> Iterator[Callable[..., Member]]:
    """Members of this test's group on ``topic``, each closed after the test."""
    joined: list[Member] = []

    def member(**config: object) -> Member:
        joined.append(Member(settings, unique_name, topic, **config))
        return joined[-1]

    yield member
    for member_ in joined:
        member_.close()


def test_a_commit_after_a_revoke_commits_only_the_partitions_still_assigned(
    settings: Settings, topic: str, unique_name: str, join: Callable[..., Member]
) -> None:
    first = join()
    batch: list[InputRecord] = []
    deadline = time.monotonic() + 60
    while len(batch) < 2 * PARTITIONS:
        assert time.monotonic() < deadline
        batch += first.poll()
    assert first.assignment.partitions == {(topic, p) for p in range(PARTITIONS)}
    epoch = first.assignment.epoch

    # A second member joins while the batch is being worked on: the group takes one partition
    # away from the first.
    second = join()
    poll_until(lambda: bool(second.assignment.partitions), first, second)
    poll_until(lambda: len(first.assignment.partitions) == 1, first, second)
    assert first.assignment.epoch > epoch
    [(_, kept)] = first.assignment.partitions
    [(_, taken)] = second.assignment.partitions
    assert kept != taken

    outcome = commit_offsets(first.consumer, next_offsets(batch), held=first.assignment.partitions)
    assert outcome is Commit.COMMITTED
    offsets = committed(settings, unique_name, topic)
    assert offsets[kept] == 2
    assert offsets[taken] < 0  # its new owner's to commit: nothing committed for it


def test_a_commit_of_nothing_still_held_commits_nothing(
    settings: Settings, topic: str, unique_name: str, join: Callable[..., Member]
) -> None:
    member = join()
    poll_until(lambda: bool(member.assignment.partitions), member)
    assert commit_offsets(member.consumer, {(topic, 0): 1}, held=set()) is Commit.NOTHING
    assert all(offset < 0 for offset in committed(settings, unique_name, topic).values())


def test_a_commit_after_the_group_moved_on_is_refused_without_failing_the_loop(
    settings: Settings, topic: str, unique_name: str, join: Callable[..., Member]
) -> None:
    """A member that did not poll within ``max.poll.interval.ms`` has left the group: its
    commit is refused (UNKNOWN_MEMBER_ID), which is no failure of the loop."""
    member = join(**{"max.poll.interval.ms": 6000})
    poll_until(lambda: len(member.assignment.partitions) == PARTITIONS, member)
    time.sleep(7.5)  # a batch that took too long
    offsets = {(topic, 0): 1, (topic, 1): 1}
    outcome = commit_offsets(member.consumer, offsets, held=member.assignment.partitions)
    assert outcome is Commit.REBALANCED
    assert all(offset < 0 for offset in committed(settings, unique_name, topic).values())


def test_a_fatal_consumer_error_ends_the_loop(
    unique_name: str, join: Callable[..., Member]
) -> None:
    """A static member fenced by a newer instance with the same id: librdkafka reports it as a
    fatal error (code ``_FATAL``) to the older one."""
    static = {"group.instance.id": f"{unique_name}-member"}
    older = join(**static)
    poll_until(lambda: bool(older.assignment.partitions), older)
    newer = join(**static)
    deadline = time.monotonic() + 60
    with pytest.raises(FatalError, match="older"):
        while time.monotonic() < deadline:
            newer.poll(0.1)
            for message in older.consumer.consume(100, timeout=0.2):
                consumer_error(message, what="older")


def test_assignment_and_describe() -> None:
    assignment = Assignment()
    added = assignment.assign([TopicPartition("a", 0), TopicPartition("a", 1)])
    assert added == {("a", 0), ("a", 1)}
    assert assignment.revoke([TopicPartition("a", 0)]) == {("a", 0)}
    assert assignment.partitions == {("a", 1)}
    assert assignment.epoch == 2
    assert describe([TopicPartition("b", 2), TopicPartition("a", 1), TopicPartition("b", 0)]) == (
        "a[1], b[0, 2]"
    )
    assert describe([]) == "nothing"
