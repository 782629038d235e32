"""Applying the topic catalog to the real local Kafka, and reading it back."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ResourceType,
)
from typer.testing import CliRunner

from core.connections import kafka_config
from core.settings import Settings
from pipelines.topics import (
    ChangeAction,
    TopicAdminError,
    apply_topics,
    describe_topics,
)
from pipelines.topics_cli import topics_app
from schemas.events import encode_event
from schemas.topics import KAFKA_PARTITIONER, MANAGED_CONFIGS, TopicCatalog, topic_catalog
from tests.schemas.samples import sample_events


def prefixed(settings: Settings, prefix: str, **changes: object) -> Settings:
    kafka = settings.kafka.model_copy(update={"topic_prefix": prefix, **changes})
    return settings.model_copy(update={"kafka": kafka})


def topics_under(admin: AdminClient, prefix: str) -> list[str]:
    return [name for name in admin.list_topics(timeout=30).topics if name.startswith(prefix)]


@pytest.fixture
def prefix(kafka_admin: AdminClient, unique_name: str) -> Iterator[str]:
    """A topic prefix of this test's own; every topic under it is deleted afterwards."""
    prefix = f"{unique_name}."
    yield prefix
    leftovers = topics_under(kafka_admin, prefix)
    if leftovers:
        for future in kafka_admin.delete_topics(leftovers).values():
            future.result(timeout=30)


@pytest.fixture
def catalog(settings: Settings, prefix: str) -> TopicCatalog:
    return topic_catalog(prefixed(settings, prefix))


def broker_configs(admin: AdminClient, name: str) -> dict[str, str]:
    resource = ConfigResource(ResourceType.TOPIC, name)
    entries = admin.describe_configs([resource])[resource].result(timeout=30)
    return {key: entry.value for key, entry in entries.items() if key in MANAGED_CONFIGS}


def settled_config(admin: AdminClient, name: str, key: str, value: str) -> str:
    """The topic's ``key`` once the broker shows ``value``, or what it shows after 10 s: a config
    change is acknowledged once the controller committed it, and the broker that answers
    ``describe_configs`` applies it a moment later (longer on a busy machine)."""
    deadline = time.monotonic() + 10
    while (shown := broker_configs(admin, name)[key]) != value and time.monotonic() < deadline:
        time.sleep(0.05)
    return shown


def partition_count(admin: AdminClient, name: str) -> int:
    return len(admin.list_topics(name, timeout=30).topics[name].partitions)


def test_apply_creates_every_topic_with_its_partitions_and_configs(
    kafka_admin: AdminClient, catalog: TopicCatalog
) -> None:
    changes = apply_topics(kafka_admin, catalog)
    assert [change.topic for change in changes] == list(catalog)
    assert {change.action for change in changes} == {ChangeAction.CREATED}
    on_cluster = kafka_admin.list_topics(timeout=30).topics
    for topic in catalog:
        assert len(on_cluster[topic.name].partitions) == topic.partitions
        configs = broker_configs(kafka_admin, topic.name)
        assert {key: configs[key] for key in topic.configs()} == topic.configs()


def test_second_apply_is_unchanged(kafka_admin: AdminClient, catalog: TopicCatalog) -> None:
    apply_topics(kafka_admin, catalog)
    again = apply_topics(kafka_admin, catalog)
    assert {change.action for change in again} == {ChangeAction.UNCHANGED}
    assert all(change.details() == [] and change.warnings == () for change in again)


def test_dry_run_reports_without_touching_the_cluster(
    kafka_admin: AdminClient, catalog: TopicCatalog, prefix: str
) -> None:
    changes = apply_topics(kafka_admin, catalog, dry_run=True)
    assert {change.action for change in changes} == {ChangeAction.CREATED}
    assert topics_under(kafka_admin, prefix) == []


def test_drifted_configs_are_set_back(kafka_admin: AdminClient, catalog: TopicCatalog) -> None:
    apply_topics(kafka_admin, catalog)
    drift = {
        catalog.messages_in.name: ConfigEntry(
            "retention.ms", "3600000", incremental_operation=AlterConfigOpType.SET
        ),
        catalog.push_tokens.name: ConfigEntry(
            "cleanup.policy", "delete", incremental_operation=AlterConfigOpType.SET
        ),
        catalog.presence.name: ConfigEntry(
            "cleanup.policy", "compact", incremental_operation=AlterConfigOpType.SET
        ),
    }
    resources = [
        ConfigResource(ResourceType.TOPIC, name, incremental_configs=[entry])
        for name, entry in drift.items()
    ]
    for future in kafka_admin.incremental_alter_configs(resources).values():
        future.result(timeout=30)
    for name, entry in drift.items():  # apply_topics must see every drifted value
        assert entry.value is not None
        assert settled_config(kafka_admin, name, entry.name, entry.value) == entry.value

    changes = {change.topic.name: change for change in apply_topics(kafka_admin, catalog)}
    assert changes[catalog.messages_in.name].action is ChangeAction.UPDATED
    assert changes[catalog.messages_in.name].configs == {"retention.ms": ("3600000", "604800000")}
    assert changes[catalog.push_tokens.name].configs == {"cleanup.policy": ("delete", "compact")}
    assert changes[catalog.presence.name].configs == {"cleanup.policy": ("compact", "delete")}
    updated = {name for name, change in changes.items() if change.action is ChangeAction.UPDATED}
    assert updated == set(drift)
    for name, key, value in (
        (catalog.messages_in.name, "retention.ms", "604800000"),
        (catalog.push_tokens.name, "cleanup.policy", "compact"),
        (catalog.presence.name, "cleanup.policy", "delete"),
    ):
        assert settled_config(kafka_admin, name, key, value) == value


def test_a_catalog_change_is_applied(kafka_admin: AdminClient, catalog: TopicCatalog) -> None:
    apply_topics(kafka_admin, catalog)
    shorter = dataclasses.replace(catalog.push_jobs, retention=timedelta(hours=6))
    changed = dataclasses.replace(catalog, push_jobs=shorter)
    changes = {change.topic.name: change for change in apply_topics(kafka_admin, changed)}
    assert changes[shorter.name].details() == ["retention.ms 86400000 -> 21600000"]
    assert settled_config(kafka_admin, shorter.name, "retention.ms", "21600000") == "21600000"


def test_partitions_grow_but_never_shrink(
    kafka_admin: AdminClient, settings: Settings, prefix: str
) -> None:
    catalog = topic_catalog(prefixed(settings, prefix))
    apply_topics(kafka_admin, catalog)
    # Push tokens are device-keyed, outside the co-partitioned groups: they grow on their own.
    tokens = catalog.push_tokens
    assert tokens.partitions < 5
    grown = topic_catalog(prefixed(settings, prefix), partitions={tokens.logical_name: 5})

    changes = {change.topic.name: change for change in apply_topics(kafka_admin, grown)}
    assert changes[tokens.name].action is ChangeAction.UPDATED
    assert changes[tokens.name].partitions_from == tokens.partitions
    assert partition_count(kafka_admin, tokens.name) == 5
    updated = {name for name, change in changes.items() if change.action is ChangeAction.UPDATED}
    assert updated == {tokens.name}

    back = {change.topic.name: change for change in apply_topics(kafka_admin, catalog)}
    assert back[tokens.name].action is ChangeAction.UNCHANGED
    assert "keeps 5 partitions" in back[tokens.name].warnings[0]
    assert partition_count(kafka_admin, tokens.name) == 5


def test_replication_beyond_the_cluster_is_refused_before_anything_is_created(
    kafka_admin: AdminClient, settings: Settings, prefix: str
) -> None:
    catalog = topic_catalog(prefixed(settings, prefix, replication_factor=3))
    with pytest.raises(TopicAdminError, match="IM_KAFKA__REPLICATION_FACTOR"):
        apply_topics(kafka_admin, catalog)
    assert topics_under(kafka_admin, prefix) == []


def test_describe_reports_partitions_and_end_offsets(
    kafka_admin: AdminClient, settings: Settings, catalog: TopicCatalog
) -> None:
    assert not any(state.exists for state in describe_topics(kafka_admin, catalog))
    apply_topics(kafka_admin, catalog)
    producer = Producer(
        kafka_config(settings, partitioner=KAFKA_PARTITIONER, **{"enable.idempotence": True})
    )
    events = sample_events()
    for event in (
        [events["message.sent"]] * 4
        + [events["message.edited"], events["conversation.created"], events["receipt.read"]]
        + [
            events["device.connected"],
            events["device.disconnected"],
        ]
    ):
        topic, key = catalog.route(event)
        producer.produce(topic.name, key=key, value=encode_event(event))
    assert producer.flush(30) == 0

    states = {state.topic.name: state for state in describe_topics(kafka_admin, catalog)}
    assert states[catalog.messages_in.name].end_offsets == 7
    assert states[catalog.presence.name].end_offsets == 2
    untouched = set(states) - {catalog.messages_in.name, catalog.presence.name}
    assert {states[name].end_offsets for name in untouched} == {0}
    for topic in catalog:
        assert states[topic.name].exists
        assert states[topic.name].partitions == topic.partitions
        assert states[topic.name].replication == topic.replication
        assert states[topic.name].configs["cleanup.policy"] == topic.cleanup.value


def test_cli_apply_and_list(kafka_admin: AdminClient, catalog: TopicCatalog, prefix: str) -> None:
    runner = CliRunner()
    env = {"IM_KAFKA__TOPIC_PREFIX": prefix}

    dry = runner.invoke(topics_app, ["apply", "--dry-run"], env=env)
    assert dry.exit_code == 0, dry.output
    dry_lines = [line.split() for line in dry.output.splitlines()]
    assert ["would", "be", "created", catalog.messages_in.name] in dry_lines
    assert topics_under(kafka_admin, prefix) == []

    first = runner.invoke(topics_app, ["apply"], env=env)
    assert first.exit_code == 0, first.output
    created = [line.split()[1] for line in first.output.splitlines() if line.startswith("created")]
    assert created == [topic.name for topic in catalog]
    second = runner.invoke(topics_app, ["apply"], env=env)
    assert second.output.splitlines()[-1] == f"0 created, 0 updated, {len(list(catalog))} unchanged"

    listed = runner.invoke(topics_app, ["list"], env=env)
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    header = ["TOPIC", "KEY", "PARTITIONS", "CLEANUP", "RETENTION", "END", "OFFSETS"]
    assert lines[0].split() == header
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows[catalog.messages_in.name] == ["conversation", "6", "delete", "7d", "0"]
    assert rows[catalog.presence.name] == ["user", "6", "delete", "7d", "0"]
    assert rows[catalog.push_tokens.name] == ["device", "3", "compact", "forever", "0"]
    assert rows[catalog.user_inbox.name] == ["user", "6", "delete", "7d", "0"]
    assert rows[catalog.live_delivery.name] == ["gateway", "4", "delete", "1h", "0"]
    assert len(rows) == len(list(catalog))


def test_cli_says_what_to_do_when_kafka_is_unreachable(prefix: str) -> None:
    env = {"IM_KAFKA__TOPIC_PREFIX": prefix, "IM_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    result = CliRunner().invoke(topics_app, ["list", "--timeout", "2"], env=env)
    assert result.exit_code == 1
    assert "[kafka-unavailable]" in result.output
    assert "imstream stack up" in result.output
