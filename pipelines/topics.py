"""Applies the topic catalog (schemas/topics.py) to a Kafka cluster and reports what is there.

``apply_topics`` is idempotent: it creates missing topics, sets the configs the catalog manages
(cleanup policy, retention, min in-sync replicas, segment roll) where they drifted, and adds
partitions when the catalog asks for more. It never removes partitions or changes the
replication factor — Kafka cannot do the first, and the second is a reassignment an operator
plans — and reports both instead.

These are operator tools that block on the AdminClient's futures; async code runs them in a
thread.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
    NewTopic,
    OffsetSpec,
    PartitionMetadata,
    ResourceType,
)

from schemas.topics import MANAGED_CONFIGS, Topic, TopicCatalog

# confluent-kafka leaves this factory unannotated.
_LATEST: OffsetSpec = OffsetSpec.latest()  # type: ignore[no-untyped-call]


#: What a broker answers for a partition it has not yet taken on, for a second or so after a
#: topic is created or grown (``_NOENT``: the client's metadata knows no leader yet); librdkafka
#: does not mark these retriable for admin requests.
_SETTLING = frozenset(
    {
        KafkaError._NOENT,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_LEADER_EPOCH,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        # librdkafka's own metadata has not seen a new partition yet.
        KafkaError._UNKNOWN_PARTITION,
    }
)


class TopicAdminError(RuntimeError):
    """The cluster refused (part of) what the catalog asks; the message says what to do."""


class ChangeAction(StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"


@dataclass(frozen=True, slots=True)
class TopicChange:
    """What ``apply_topics`` did to one topic (or, in a dry run, would do)."""

    topic: Topic
    action: ChangeAction
    configs: Mapping[str, tuple[str | None, str]] = field(default_factory=dict)
    """Each drifted config: the broker's value and the catalog's."""
    partitions_from: int | None = None
    """The partition count before partitions were added, if they were."""
    warnings: tuple[str, ...] = ()
    """What the catalog asks but ``apply_topics`` leaves to an operator."""

    def details(self) -> list[str]:
        """One line per thing done, for operators."""
        if self.action is ChangeAction.CREATED:
            configs = ", ".join(f"{key}={value}" for key, value in self.topic.configs().items())
            return [
                f"{self.topic.partitions} partitions, replication {self.topic.replication}, "
                + configs
            ]
        lines = [f"{key} {was} -> {now}" for key, (was, now) in self.configs.items()]
        if self.partitions_from is not None:
            lines.append(f"partitions {self.partitions_from} -> {self.topic.partitions}")
        return lines


@dataclass(frozen=True, slots=True)
class TopicState:
    """One catalog topic as the cluster has it."""

    topic: Topic
    exists: bool
    partitions: int = 0
    replication: int = 0
    end_offsets: int = 0
    """The sum of the partitions' high watermarks: how many records were ever written."""
    configs: Mapping[str, str] = field(default_factory=dict)
    """The managed configs (``Topic.configs()`` keys) as the broker reports them."""


def apply_topics(
    admin: AdminClient, catalog: TopicCatalog, *, dry_run: bool = False, timeout: float = 30.0
) -> list[TopicChange]:
    """Make the cluster match the catalog; returns one change per topic, in catalog order."""
    metadata = admin.list_topics(timeout=timeout)
    existing = {name: meta for name, meta in metadata.topics.items() if meta.error is None}
    current = _managed_configs(admin, [t for t in catalog if t.name in existing], timeout)
    report = []
    for topic in catalog:
        if topic.name in existing:
            report.append(_compare(topic, existing[topic.name].partitions, current[topic.name]))
        elif topic.replication > len(metadata.brokers):
            raise TopicAdminError(
                f"{topic.name} needs replication factor {topic.replication} but the cluster has "
                f"{len(metadata.brokers)} broker(s); set IM_KAFKA__REPLICATION_FACTOR to at most "
                f"{len(metadata.brokers)}"
            )
        else:
            report.append(TopicChange(topic, ChangeAction.CREATED))
    if not dry_run:
        _execute(admin, report, timeout)
    return report


def _compare(
    topic: Topic, partitions: Mapping[int, PartitionMetadata], current: Mapping[str, str]
) -> TopicChange:
    """How an existing topic differs from the catalog's wish."""
    drifted = {
        key: (current.get(key), value)
        for key, value in topic.configs().items()
        if current.get(key) != value
    }
    grow_from = len(partitions) if len(partitions) < topic.partitions else None
    warnings = []
    if len(partitions) > topic.partitions:
        warnings.append(
            f"keeps {len(partitions)} partitions; the catalog asks {topic.partitions} "
            "(partitions are never removed)"
        )
    replication = len(partitions[0].replicas) if partitions else 0
    if replication != topic.replication:
        warnings.append(
            f"replication factor is {replication}; the catalog asks {topic.replication} "
            "(change it with a partition reassignment)"
        )
    action = ChangeAction.UPDATED if drifted or grow_from is not None else ChangeAction.UNCHANGED
    return TopicChange(topic, action, drifted, grow_from, tuple(warnings))


def _execute(admin: AdminClient, report: list[TopicChange], timeout: float) -> None:
    creates = [
        NewTopic(
            change.topic.name,
            num_partitions=change.topic.partitions,
            replication_factor=change.topic.replication,
            config=change.topic.configs(),
        )
        for change in report
        if change.action is ChangeAction.CREATED
    ]
    alters = [
        ConfigResource(
            ResourceType.TOPIC,
            change.topic.name,
            incremental_configs=[
                ConfigEntry(key, now, incremental_operation=AlterConfigOpType.SET)
                for key, (_, now) in change.configs.items()
            ],
        )
        for change in report
        if change.configs
    ]
    grows = [
        NewPartitions(change.topic.name, change.topic.partitions)
        for change in report
        if change.partitions_from is not None
    ]
    failures = []
    if creates:
        failures += _wait(admin.create_topics(creates, request_timeout=timeout), timeout)
    if alters:
        failures += _wait(admin.incremental_alter_configs(alters, request_timeout=timeout), timeout)
    if grows:
        failures += _wait(admin.create_partitions(grows, request_timeout=timeout), timeout)
    if failures:
        raise TopicAdminError("the cluster refused: " + "; ".join(failures))
    # Return only once the new partitions answer, so that callers can use them right away.
    new_partitions = [
        TopicPartition(change.topic.name, partition)
        for change in report
        if change.action is ChangeAction.CREATED or change.partitions_from is not None
        for partition in range(change.partitions_from or 0, change.topic.partitions)
    ]
    _end_offsets(admin, new_partitions, timeout)


def describe_topics(
    admin: AdminClient, catalog: TopicCatalog, *, timeout: float = 30.0
) -> list[TopicState]:
    """Each catalog topic with its partition count, replication, configs and end offsets."""
    metadata = admin.list_topics(timeout=timeout)
    existing = {name: meta for name, meta in metadata.topics.items() if meta.error is None}
    present = [topic for topic in catalog if topic.name in existing]
    configs = _managed_configs(admin, present, timeout)
    all_partitions = [
        TopicPartition(topic.name, partition)
        for topic in present
        for partition in existing[topic.name].partitions
    ]
    end_offsets: dict[str, int] = {}
    for partition, offset in _end_offsets(admin, all_partitions, timeout).items():
        end_offsets[partition.topic] = end_offsets.get(partition.topic, 0) + offset
    states = []
    for topic in catalog:
        if topic.name not in existing:
            states.append(TopicState(topic, exists=False))
            continue
        partitions = existing[topic.name].partitions
        states.append(
            TopicState(
                topic,
                exists=True,
                partitions=len(partitions),
                replication=len(partitions[0].replicas) if partitions else 0,
                end_offsets=end_offsets.get(topic.name, 0),
                configs=configs[topic.name],
            )
        )
    return states


def _managed_configs(
    admin: AdminClient, topics: Iterable[Topic], timeout: float
) -> dict[str, dict[str, str]]:
    """The broker's value of each config the catalog manages, per topic name."""
    resources = [ConfigResource(ResourceType.TOPIC, topic.name) for topic in topics]
    if not resources:
        return {}
    described: dict[str, dict[str, str]] = {}
    for resource, future in admin.describe_configs(resources, request_timeout=timeout).items():
        entries: dict[str, ConfigEntry] = future.result(timeout=timeout)
        described[resource.name] = {
            name: entry.value
            for name, entry in entries.items()
            if name in MANAGED_CONFIGS and entry.value is not None
        }
    return described


def _wait(futures: Mapping[Any, Future[Any]], timeout: float) -> list[str]:
    """Wait for every future; the failures as ``name: reason``."""
    failures = []
    for subject, future in futures.items():
        try:
            future.result(timeout=timeout)
        except KafkaException as error:
            failures.append(f"{getattr(subject, 'name', subject)}: {error.args[0].str()}")
    return failures


def _end_offsets(
    admin: AdminClient, partitions: list[TopicPartition], timeout: float
) -> dict[TopicPartition, int]:
    """Each partition's high watermark, retrying while a new partition's leader settles in."""
    deadline = time.monotonic() + timeout
    offsets: dict[TopicPartition, int] = {}
    pending = partitions
    while pending:
        futures = admin.list_offsets(
            dict.fromkeys(pending, _LATEST), request_timeout=max(1.0, deadline - time.monotonic())
        )
        retry = []
        for partition, future in futures.items():
            try:
                offsets[partition] = future.result().offset
            except KafkaException as error:
                settling = error.args[0].retriable() or error.args[0].code() in _SETTLING
                if not settling or time.monotonic() > deadline:
                    raise TopicAdminError(
                        f"cannot read the end offset of {partition.topic}[{partition.partition}]: "
                        f"{error.args[0].name()}: {error.args[0].str()}"
                    ) from error
                retry.append(partition)
        pending = retry
        if pending:
            time.sleep(0.1)
            # librdkafka answers from its metadata cache, which a long-lived client does not
            # refresh for topics it has just seen created; a metadata request does.
            admin.list_topics(timeout=max(1.0, deadline - time.monotonic()))
    return offsets
