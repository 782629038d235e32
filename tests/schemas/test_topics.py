"""The topic catalog: names, keys, co-partitioning, dead letters and Kafka-compatible placement."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from core.connections import kafka_config
from core.settings import Settings
from schemas.events import EVENT_TYPES, Actor, DeviceConnected
from schemas.topics import (
    DEAD_LETTER_SUFFIX,
    KAFKA_PARTITIONER,
    CleanupPolicy,
    KeyKind,
    event_key,
    gateway_key,
    murmur2,
    operator_key,
    partition_for_key,
    topic_catalog,
)
from tests.schemas.samples import (
    OPERATOR_EVENT_TYPES,
    PROCESSOR_EVENT_TYPES,
    UNROUTED_EVENT_TYPES,
    sample_events,
)

REPO = Path(__file__).resolve().parents[2]


def with_kafka(settings: Settings, **changes: object) -> Settings:
    return settings.model_copy(update={"kafka": settings.kafka.model_copy(update=changes)})


def test_names_carry_the_prefix_and_replication_comes_from_settings(settings: Settings) -> None:
    catalog = topic_catalog(with_kafka(settings, topic_prefix="staging.", replication_factor=3))
    for topic in catalog:
        assert topic.name == "staging." + topic.logical_name
        assert topic.replication == 3
        assert topic.min_insync_replicas == 2
        assert topic.configs()["min.insync.replicas"] == "2"
    plain = topic_catalog(with_kafka(settings, topic_prefix="", replication_factor=1))
    assert all(topic.name == topic.logical_name for topic in plain)
    assert {topic.min_insync_replicas for topic in plain} == {1}


def test_every_client_event_type_has_exactly_one_inbound_topic(settings: Settings) -> None:
    catalog = topic_catalog(settings)
    inbound = [t for topic in catalog.sources() if topic.ingress for t in topic.events]
    assert set(PROCESSOR_EVENT_TYPES) <= set(EVENT_TYPES)
    assert sorted(inbound) == sorted(set(EVENT_TYPES) - set(UNROUTED_EVENT_TYPES))
    carried = {t for topic in catalog for t in topic.events}
    assert carried <= set(EVENT_TYPES)
    assert carried.isdisjoint(PROCESSOR_EVENT_TYPES)


def test_operator_actions_have_a_topic_of_their_own_that_only_the_audit_reads(
    settings: Settings,
) -> None:
    catalog = topic_catalog(with_kafka(settings, topic_prefix="p."))
    topic = catalog.operator_actions
    assert topic.name == "p.im.operator.actions"
    assert topic.events == OPERATOR_EVENT_TYPES
    assert topic.key is KeyKind.OPERATOR
    assert not topic.ingress
    assert topic.dead_letter is None
    carriers = [t for t in catalog if set(t.events) & set(OPERATOR_EVENT_TYPES)]
    assert carriers == [topic]
    assert operator_key("ops-erin") == b"ops-erin"


@pytest.mark.parametrize("event_type", UNROUTED_EVENT_TYPES)
def test_processor_events_have_no_inbound_topic(settings: Settings, event_type: str) -> None:
    with pytest.raises(ValueError, match=f"no inbound topic carries {event_type}"):
        topic_catalog(settings).route(sample_events()[event_type])


def test_the_conversation_processor_sees_a_conversation_in_one_order(settings: Settings) -> None:
    """Messages, lifecycle and membership commands and read receipts share one conversation-keyed
    topic; the conversation log carries the messages, the conversation's changes and receipts."""
    catalog = topic_catalog(settings)
    conversation_commands = [
        t for t in EVENT_TYPES if t.startswith("conversation.") and t != "conversation.advanced"
    ]
    conversation_commands.remove("conversation.mute_changed")
    messages = ["message.sent", "message.recalled", "message.edited"]
    assert catalog.messages_in.key is KeyKind.CONVERSATION
    assert set(catalog.messages_in.events) == {*messages, *conversation_commands, "receipt.read"}
    assert catalog.user_state_in.events == (
        "conversation.mute_changed",
        "badge.cleared",
        "user.push_settings_changed",
    )
    assert set(catalog.messages_sequenced.events) == {
        *messages,
        *conversation_commands,
        "receipt.read",
    }
    assert not catalog.messages_sequenced.ingress


@pytest.mark.parametrize(
    ("event_type", "role", "key"),
    [
        ("message.sent", "messages_in", b"acme/c-1"),
        ("message.edited", "messages_in", b"acme/c-1"),
        ("conversation.created", "messages_in", b"acme/c-2"),
        ("conversation.member_removed", "messages_in", b"acme/c-2"),
        ("conversation.left", "messages_in", b"acme/c-2"),
        ("conversation.deleted", "messages_in", b"acme/c-2"),
        ("receipt.read", "messages_in", b"acme/c-1"),
        ("conversation.mute_changed", "user_state_in", b"acme/alice"),
        ("badge.cleared", "user_state_in", b"acme/alice"),
        ("user.push_settings_changed", "user_state_in", b"acme/alice"),
        ("typing.changed", "typing_in", b"acme/c-1"),
        ("device.connected", "presence", b"acme/alice"),
        ("device.disconnected", "presence", b"acme/alice"),
        ("push_token.removed", "push_tokens", b"acme/alice/alice-phone"),
    ],
)
def test_route_gives_the_inbound_topic_and_key(
    settings: Settings, event_type: str, role: str, key: bytes
) -> None:
    catalog = topic_catalog(settings)
    topic, routed_key = catalog.route(sample_events()[event_type])
    assert topic is getattr(catalog, role)
    assert routed_key == key


def test_every_sample_event_routes(settings: Settings) -> None:
    catalog = topic_catalog(settings)
    for event in sample_events().values():
        if event.type in UNROUTED_EVENT_TYPES:
            continue
        topic, key = catalog.route(event)
        assert event.type in topic.events
        # A node's lease belongs to no tenant: its key starts with the system tenant's.
        assert key.startswith(f"{event.tenant_id}/".encode())
        assert event.tenant_id == ("_system" if event.type == "node.lease_renewed" else "acme")


def test_dead_letters(settings: Settings) -> None:
    catalog = topic_catalog(with_kafka(settings, topic_prefix="p."))
    ephemeral = {catalog.typing_in.name, catalog.live_delivery.name, catalog.group_delivery.name}
    # Only audited: the ClickHouse sink never dead-letters.
    ephemeral.add(catalog.push_outcomes.name)
    ephemeral.add(catalog.operator_actions.name)
    # Read by the ingress nodes only, which log and skip a poison revocation.
    ephemeral.add(catalog.revocations.name)
    state = {
        t.name
        for t in (
            catalog.conversation_state,
            catalog.message_state,
            catalog.user_state,
            catalog.known_users,
        )
    }
    for topic in catalog.sources():
        if topic.name in ephemeral | state:
            assert topic.dead_letter is None
            with pytest.raises(ValueError, match="ephemeral"):
                catalog.dead_letter_of(topic)
            continue
        dead_letter = catalog.dead_letter_of(topic)
        assert dead_letter.name == topic.name + DEAD_LETTER_SUFFIX
        assert dead_letter.key is KeyKind.NONE
        assert dead_letter.dead_letter is None
    assert len(catalog.dead_letters) == len(catalog.sources()) - len(ephemeral) - len(state)
    names = [topic.name for topic in catalog]
    assert len(names) == len(set(names))


def test_push_tokens_and_processor_state_are_the_compacted_topics(settings: Settings) -> None:
    catalog = topic_catalog(settings)
    compacted = [topic for topic in catalog if topic.cleanup is CleanupPolicy.COMPACT]
    assert compacted == [
        catalog.push_tokens,
        catalog.conversation_state,
        catalog.user_state,
        catalog.known_users,
    ]
    # The message state is the dedupe table: compacted, and deleted after the dedupe window.
    messages = catalog.message_state
    assert messages.cleanup is CleanupPolicy.COMPACT_DELETE
    assert messages.configs()["cleanup.policy"] == "compact,delete"
    assert messages.configs()["retention.ms"] == str(7 * 24 * 3600 * 1000)
    assert messages.partitions == catalog.messages_in.partitions
    assert (catalog.conversation_state.key, catalog.user_state.key) == (
        KeyKind.CONVERSATION,
        KeyKind.USER,
    )
    assert [topic for topic in catalog if topic.key is KeyKind.DEVICE] == [catalog.push_tokens]
    assert catalog.push_tokens.configs()["retention.ms"] == "-1"
    assert catalog.live_delivery.key is KeyKind.GATEWAY
    assert catalog.sync_events.key is KeyKind.USER
    assert catalog.messages_sequenced.key is KeyKind.CONVERSATION


def test_presence_is_user_keyed_and_co_partitioned_with_the_user_processor_inputs(
    settings: Settings,
) -> None:
    catalog = topic_catalog(settings)
    presence = catalog.presence
    assert (presence.key, presence.cleanup) == (KeyKind.USER, CleanupPolicy.DELETE)
    assert presence.configs()["retention.ms"] == str(7 * 24 * 3600 * 1000)
    assert presence.ingress
    for other in (catalog.user_inbox, catalog.user_state_in):
        assert other.key is KeyKind.USER
        assert presence.partitions == other.partitions


def test_a_devices_presence_is_keyed_by_the_devices_user_whoever_the_actor(
    settings: Settings,
) -> None:
    catalog = topic_catalog(settings)
    connected = sample_events()["device.connected"]
    assert isinstance(connected, DeviceConnected)
    for actor in (Actor(user_id="admin"), None):
        event = connected.model_copy(update={"actor": actor})
        assert event_key(event, KeyKind.USER) == b"acme/alice"
        assert catalog.route(event) == (catalog.presence, b"acme/alice")
    # The push-token topic stays device-keyed.
    token = sample_events()["push_token.registered"]
    assert event_key(token, KeyKind.DEVICE) == b"acme/alice/alice-phone"


def test_the_user_inbox_is_internal_user_keyed_with_a_dead_letter_topic(
    settings: Settings,
) -> None:
    catalog = topic_catalog(with_kafka(settings, topic_prefix="p."))
    inbox = catalog.user_inbox
    assert inbox.name == "p." + inbox.logical_name
    assert inbox.key is KeyKind.USER
    assert inbox.cleanup is CleanupPolicy.DELETE
    assert not inbox.ingress
    assert inbox.events == ()
    assert catalog.dead_letter_of(inbox).name == inbox.name + DEAD_LETTER_SUFFIX
    # Read by the user processor together with the user's own commands and presence.
    assert inbox.partitions == catalog.user_state_in.partitions == catalog.presence.partitions


def test_short_lived_topics_roll_segments_as_often_as_they_expire(settings: Settings) -> None:
    catalog = topic_catalog(settings)
    for topic in (catalog.typing_in, catalog.live_delivery):
        assert topic.configs()["segment.ms"] == topic.configs()["retention.ms"]
    assert "segment.ms" not in catalog.messages_in.configs()


def test_partition_overrides(settings: Settings) -> None:
    default = topic_catalog(settings)
    grown = topic_catalog(settings, partitions={default.push_tokens.logical_name: 12})
    assert grown.push_tokens.partitions == 12
    assert grown.presence.partitions == default.presence.partitions
    with pytest.raises(ValueError, match="co-partitioned"):
        topic_catalog(settings, partitions={default.presence.logical_name: 12})
    user_topics = [t for t in default.sources() if t.key is KeyKind.USER]
    assert default.presence in user_topics
    assert default.user_inbox in user_topics
    users = topic_catalog(settings, partitions={topic.logical_name: 12 for topic in user_topics})
    assert {t.partitions for t in users.sources() if t.key is KeyKind.USER} == {12}
    conversation_topics = [t for t in default.sources() if t.key is KeyKind.CONVERSATION]
    together = topic_catalog(
        settings,
        partitions={
            **{topic.logical_name: 24 for topic in conversation_topics},
            default.message_state.logical_name: 24,
        },
    )
    assert {t.partitions for t in together.sources() if t.key is KeyKind.CONVERSATION} == {24}
    with pytest.raises(ValueError, match="co-partitioned"):
        topic_catalog(settings, partitions={default.messages_in.logical_name: 24})
    with pytest.raises(ValueError, match="unknown topic"):
        topic_catalog(settings, partitions={"no.such.topic": 2})


def test_the_keyed_topics_partition_counts_come_from_the_settings(settings: Settings) -> None:
    default = topic_catalog(settings)
    small = topic_catalog(with_kafka(settings, conversation_partitions=2, user_partitions=3))
    for before, after in zip(default, small, strict=True):
        if before.partitions == default.messages_in.partitions and before.key in {
            KeyKind.CONVERSATION,
            KeyKind.USER,
        }:
            assert after.partitions == (2 if before.key is KeyKind.CONVERSATION else 3), after.name
    # Co-partitioned with their inputs: the state topics follow the counts.
    assert small.message_state.partitions == small.conversation_state.partitions == 2
    assert (
        small.user_state.partitions == small.user_inbox.partitions == small.presence.partitions == 3
    )
    # Others keep theirs.
    assert small.live_delivery.partitions == default.live_delivery.partitions


def test_murmur2_matches_the_java_client() -> None:
    # Test vectors of org.apache.kafka.common.utils.UtilsTest#testMurmur2.
    vectors = {
        b"21": -973932308,
        b"foobar": -790332482,
        b"a-little-bit-long-string": -985981536,
        b"a-little-bit-longer-string": -1486304829,
        b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
        b"abc": 479470107,
    }
    for data, signed in vectors.items():
        assert murmur2(data) == signed & 0xFFFFFFFF


@pytest.fixture
def six_partitions(kafka_admin: AdminClient, unique_name: str) -> Iterator[str]:
    kafka_admin.create_topics([NewTopic(unique_name, num_partitions=6)])[unique_name].result(30)
    yield unique_name
    kafka_admin.delete_topics([unique_name])[unique_name].result(timeout=30)


def test_partition_for_key_is_where_librdkafka_puts_the_key(
    settings: Settings, six_partitions: str
) -> None:
    producer = Producer(kafka_config(settings, partitioner=KAFKA_PARTITIONER))
    placed: dict[bytes, int] = {}

    def on_delivery(error: object, message: object) -> None:
        assert error is None
        placed[message.key()] = message.partition()  # type: ignore[attr-defined]

    keys = [gateway_key(f"ingress-{n}") for n in range(20)] + [
        f"acme/conversation-{n}".encode() for n in range(40)
    ]
    for key in keys:
        producer.produce(six_partitions, key=key, value=b"x", on_delivery=on_delivery)
    assert producer.flush(30) == 0
    assert placed == {key: partition_for_key(key, 6) for key in keys}
    assert len(set(placed.values())) == 6


def test_no_topic_name_is_spelled_outside_the_catalog(settings: Settings) -> None:
    """Topic names live in schemas/topics.py; code elsewhere asks the catalog."""
    names = {topic.logical_name for topic in topic_catalog(settings)}
    quoted = re.compile(r"""["']([a-z0-9._-]+)["']""")
    offenders = []
    sources = [
        path
        for folder in ("streams", "ingress", "sinks", "schemas", "pipelines", "dashboards", "tests")
        for path in (REPO / folder).rglob("*.py")
    ]
    sources += list((REPO / "bench").rglob("*.py")) if (REPO / "bench").is_dir() else []
    for path in sources:
        relative = path.relative_to(REPO)
        if relative == Path("schemas/topics.py"):
            continue
        for match in quoted.finditer(path.read_text(encoding="utf-8")):
            if match.group(1) in names:
                offenders.append(f"{relative}: {match.group(1)}")
    assert offenders == []
