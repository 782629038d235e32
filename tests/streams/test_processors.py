"""The batch processors without Kafka: dedupe, positions, sync ids, and replays after crashes.

The runtime commits outputs, state and offsets in one transaction, so in production a batch's
outputs never survive without its state. These tests hold the processors to more than that (the
"defence in depth" of docs/streams.md): a batch's outputs may reach Kafka while its state writes
are lost, and processing resumes from an earlier committed offset — the final sync queues must
still hold every message exactly once, in order, whatever the crash points.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

from pydantic import BaseModel

from core.records import InputRecord, OutputRecord, StateWrite
from core.settings import Settings
from schemas.events import (
    SYSTEM_TENANT,
    Actor,
    CommandRejected,
    ConversationAdvanced,
    ConversationCreated,
    ConversationDeleted,
    ConversationDeletedPayload,
    ConversationKind,
    DeviceConnected,
    DeviceDisconnected,
    DevicePresencePayload,
    Event,
    GroupDelivery,
    InboxRecord,
    LiveDelivery,
    MessageSent,
    NodeLeasePayload,
    NodeLeaseRenewed,
    Platform,
    PushJob,
    QuietHoursSetting,
    SyncRecord,
    UserPushSettingsChanged,
    UserPushSettingsChangedPayload,
    encode_event,
    parse_event,
)
from schemas.topics import TopicCatalog, conversation_key, topic_catalog, user_key
from streams.processors import (
    ACTOR_MISSING,
    USERS_TABLE,
    BatchResult,
    ConversationProcessor,
    ConversationSettings,
    UserProcessor,
    UserSettings,
    lease_key,
)
from streams.state import MemoryState
from tests.streams.support import TENANT, conversation_created, message

CATALOG = topic_catalog(Settings())


class Tables(MemoryState):
    """Table state as the processors read it, written only when a batch 'commits' its state."""

    def read(self, table: str, key: str) -> dict[str, Any] | None:
        return self.get(table, key)

    def write(self, writes: Sequence[StateWrite]) -> None:
        for write in writes:
            self.put(write.table, write.key, write.value)


def create_group(conversation_id: str, members: list[str]) -> ConversationCreated:
    return conversation_created(conversation_id, members, ConversationKind.GROUP)


def send(conversation_id: str, sender: str, client_msg_id: str) -> MessageSent:
    return message(sender, conversation_id, client_msg_id, text=f"hello {client_msg_id}")


M = TypeVar("M", bound=BaseModel)


def decoded(outputs: Sequence[OutputRecord], topic: str, model: type[M]) -> list[M]:
    """The outputs written to ``topic``, decoded as ``model``."""
    return [model.model_validate_json(o.value or b"") for o in outputs if o.topic == topic]


def alice_record(topic: str, offset: int, event: Event) -> InputRecord:
    """``event`` as read at ``offset`` of ``topic``'s partition 0, keyed by alice."""
    return InputRecord(
        topic=topic,
        partition=0,
        offset=offset,
        key=user_key(TENANT, "alice"),
        value=encode_event(event),
    )


def command_records(events: Sequence[Event], catalog: TopicCatalog = CATALOG) -> list[InputRecord]:
    return [
        InputRecord(
            topic=catalog.messages_in.name,
            partition=0,
            offset=offset,
            key=conversation_key(TENANT, str(getattr(event.payload, "conversation_id", ""))),
            value=encode_event(event),
        )
        for offset, event in enumerate(events)
    ]


def as_inputs(outputs: Sequence[OutputRecord], topic: str, first_offset: int) -> list[InputRecord]:
    chosen = [output for output in outputs if output.topic == topic]
    return [
        InputRecord(topic=topic, partition=0, offset=first_offset + index, key=o.key, value=o.value)
        for index, o in enumerate(chosen)
    ]


def test_messages_are_sequenced_and_fanned_out_with_positions() -> None:
    tables = Tables()
    processor = ConversationProcessor(CATALOG, ConversationSettings())
    events: list[Event] = [create_group("c-1", ["alice", "bob", "carol"])]
    events += [send("c-1", "bob", f"m{index}") for index in range(3)]
    result = processor.process(command_records(events), tables)
    sequenced = [o for o in result.outputs if o.topic == CATALOG.messages_sequenced.name]
    inbox = decoded(result.outputs, CATALOG.user_inbox.name, InboxRecord)
    assert len(sequenced) == 4
    assert len(inbox) == 4 * 3
    alice = [record for record in inbox if record.user_id == "alice"]
    assert [record.position for record in alice] == [1, 2, 3, 4]
    seqs = [
        record.event.payload.conversation_seq
        for record in alice
        if isinstance(record.event, MessageSent)
    ]
    assert seqs == [1, 2, 3]
    assert all(
        o.key == user_key(TENANT, "alice") for o in result.outputs if b"alice" in (o.key or b"")
    )


def test_a_replayed_batch_is_skipped_once_its_state_is_written() -> None:
    tables = Tables()
    processor = ConversationProcessor(CATALOG, ConversationSettings())
    records = command_records([create_group("c-1", ["alice", "bob"]), send("c-1", "bob", "m1")])
    first = processor.process(records, tables)
    tables.write(first.writes)
    again = processor.process(records, tables)
    assert again.outputs == []
    assert again.skipped == len(records)


def test_a_replayed_batch_without_its_state_gives_identical_outputs() -> None:
    processor = ConversationProcessor(CATALOG, ConversationSettings())
    records = command_records([create_group("c-1", ["alice", "bob"]), send("c-1", "bob", "m1")])
    first = processor.process(records, Tables())
    again = processor.process(records, Tables())
    assert again.outputs == first.outputs


def test_a_retried_send_creates_nothing_and_returns_the_original_seq() -> None:
    tables = Tables()
    processor = ConversationProcessor(CATALOG, ConversationSettings())
    events: list[Event] = [create_group("c-1", ["alice", "bob"]), send("c-1", "bob", "m1")]
    tables.write(processor.process(command_records(events), tables).writes)
    retry = InputRecord(
        topic=CATALOG.messages_in.name,
        partition=0,
        offset=10,
        key=conversation_key(TENANT, "c-1"),
        value=encode_event(send("c-1", "bob", "m1")),
    )
    result = processor.process([retry], tables)
    # Nothing is sequenced or queued; the sender's online devices hear the original id and seq.
    (answer,) = result.outputs
    assert answer.topic == CATALOG.user_inbox.name
    assert answer.key == user_key(TENANT, "bob")
    inbox = InboxRecord.model_validate_json(answer.value or b"")
    assert inbox.ephemeral
    assert isinstance(inbox.event, ConversationAdvanced)
    assert inbox.event.payload.message_id == send("c-1", "bob", "m1").event_id
    assert inbox.event.payload.conversation_seq == 1
    before = tables.read("conversations", conversation_key(TENANT, "c-1").decode())
    assert before is not None
    (write,) = result.writes
    assert write.value is not None
    assert write.value["position"] == before["position"]
    assert write.value["conversation"] == before["conversation"]


def test_poison_records_go_to_the_dead_letter_topic_and_the_batch_goes_on() -> None:
    processor = ConversationProcessor(CATALOG, ConversationSettings())
    good = command_records([create_group("c-1", ["alice", "bob"])])
    poison = InputRecord(
        topic=CATALOG.messages_in.name, partition=0, offset=7, key=b"acme/c-1", value=b"{not json"
    )
    result = processor.process([poison, *good], Tables())
    (dead,) = [o for o in result.outputs if o.topic == CATALOG.messages_in.dead_letter]
    assert dead.value == b"{not json"
    headers = dict(dead.headers)
    assert headers["imstream.error.code"] == b"malformed-json"
    assert headers["imstream.source.offset"] == b"7"
    assert result.dead_lettered == 1
    assert any(o.topic == CATALOG.user_inbox.name for o in result.outputs)


def test_non_members_get_a_rejection_in_their_queue() -> None:
    tables = Tables()
    processor = ConversationProcessor(CATALOG, ConversationSettings())
    events: list[Event] = [create_group("c-1", ["alice", "bob"]), send("c-1", "mallory", "m1")]
    result = processor.process(command_records(events), tables)
    (rejection,) = [
        InboxRecord.model_validate_json(o.value or b"")
        for o in result.outputs
        if o.topic == CATALOG.user_inbox.name and o.key == user_key(TENANT, "mallory")
    ]
    assert isinstance(rejection.event, CommandRejected)
    assert rejection.event.payload.reason == "not-a-member"


def test_a_large_groups_message_is_one_group_record_and_the_senders_inbox_record() -> None:
    processor = ConversationProcessor(CATALOG, ConversationSettings(large_group_threshold=2))
    tables = Tables()
    created = processor.process(
        command_records([create_group("c-1", ["alice", "bob", "carol"])]), tables
    )
    tables.write(created.writes)
    # Created above the threshold: every member is told, the nodes get the member list.
    (switch,) = decoded(created.outputs, CATALOG.group_delivery.name, GroupDelivery)
    assert sorted(switch.members or []) == ["alice", "bob", "carol"]
    inboxes = [o for o in created.outputs if o.topic == CATALOG.user_inbox.name]
    assert {InboxRecord.model_validate_json(o.value or b"").large for o in inboxes} == {True}
    assert len(inboxes) == 3
    records = command_records([send("c-1", "bob", "m1")])
    result = processor.process([replace(records[0], offset=1)], tables)
    by_topic: dict[str, list[bytes]] = {}
    for output in result.outputs:
        by_topic.setdefault(output.topic, []).append(output.value or b"")
    assert {topic: len(values) for topic, values in by_topic.items()} == {
        CATALOG.messages_sequenced.name: 1,
        CATALOG.user_inbox.name: 1,
        CATALOG.group_delivery.name: 1,
    }
    inbox = InboxRecord.model_validate_json(by_topic[CATALOG.user_inbox.name][0])
    assert inbox.user_id == "bob" and inbox.large is True
    group = GroupDelivery.model_validate_json(by_topic[CATALOG.group_delivery.name][0])
    assert group.synced == ["bob"] and group.position == inbox.position and group.large
    assert isinstance(group.event, MessageSent) and group.event.payload.conversation_seq == 1


#: alice's phone, connected to the node ingress-2.
ALICE_PHONE = DevicePresencePayload(
    user_id="alice",
    device_id="alice-phone",
    platform=Platform.IOS,
    node_id="ingress-2",
    connection_id="conn-1",
)


def presence_record(offset: int) -> InputRecord:
    event = DeviceConnected.new(
        tenant_id=TENANT,
        payload=ALICE_PHONE,
    )
    return alice_record(CATALOG.presence.name, offset, event)


def test_user_processor_assigns_sync_ids_routes_live_and_pushes_offline() -> None:
    conversations = ConversationProcessor(CATALOG, ConversationSettings())
    conversation_tables = Tables()
    events: list[Event] = [create_group("c-1", ["alice", "bob"]), send("c-1", "bob", "m1")]
    first = conversations.process(command_records(events), conversation_tables)
    conversation_tables.write(first.writes)
    inbox = as_inputs(first.outputs, CATALOG.user_inbox.name, 0)
    users = UserProcessor(CATALOG, UserSettings())
    tables = Tables()
    offline = users.process(inbox, tables)
    tables.write(offline.writes)
    pushes = decoded(offline.outputs, CATALOG.push_jobs.name, PushJob)
    assert [(job.user_id, job.merged_count) for job in pushes] == [("alice", 1)]
    assert not [o for o in offline.outputs if o.topic == CATALOG.live_delivery.name]

    tables.write(users.process([presence_record(0)], tables).writes)
    more = as_inputs(
        conversations.process(
            command_records([*events, send("c-1", "bob", "m2")])[2:],
            conversation_tables,
        ).outputs,
        CATALOG.user_inbox.name,
        len(inbox),
    )
    online = users.process(more, tables)
    (live,) = decoded(online.outputs, CATALOG.live_delivery.name, LiveDelivery)
    assert (live.node_id, live.device_ids, live.user_id) == ("ingress-2", ["alice-phone"], "alice")
    assert not [o for o in online.outputs if o.topic == CATALOG.push_jobs.name]


def lease_record(
    offset: int, at: datetime, started_at: datetime, partition: int = 0
) -> InputRecord:
    renewal = NodeLeaseRenewed.new(
        tenant_id=SYSTEM_TENANT,
        occurred_at=at,
        payload=NodeLeasePayload(node_id="ingress-2", started_at=started_at, lease_ms=20_000),
    )
    return InputRecord(
        topic=CATALOG.presence.name,
        partition=partition,
        offset=offset,
        key=user_key(SYSTEM_TENANT, "ingress-2"),
        value=encode_event(renewal),
    )


def test_the_user_processor_keeps_node_leases_per_partition_and_decides_by_record_time() -> None:
    """Alice's phone is on ingress-2, whose last renewal on her partition had lapsed by the time
    of bob's message: she is pushed and nothing goes to the node. A renewal on another
    partition changes nothing for her; one on hers brings the phone back online."""
    conversations = ConversationProcessor(CATALOG, ConversationSettings())
    conversation_tables = Tables()
    events: list[Event] = [create_group("c-1", ["alice", "bob"]), send("c-1", "bob", "m1")]
    sent_at = events[1].occurred_at
    started = sent_at - timedelta(minutes=1)
    first = conversations.process(command_records(events), conversation_tables)
    conversation_tables.write(first.writes)
    users = UserProcessor(CATALOG, UserSettings())
    tables = Tables()
    connect = presence_record(1)
    connected = parse_event(connect.value or b"").model_copy(
        update={"occurred_at": started + timedelta(seconds=2)}
    )
    inputs = [
        lease_record(0, started + timedelta(seconds=1), started),
        replace(connect, value=encode_event(connected)),
        lease_record(2, sent_at, started, partition=1),  # another partition's users
    ]
    tables.write(users.process(inputs, tables).writes)
    assert tables.get(USERS_TABLE, lease_key(0, "ingress-2")) == {
        "started_at": started.isoformat(),
        "expires_at": (started + timedelta(seconds=21)).isoformat(),
        "applied": {CATALOG.presence.name: 0},
    }
    assert tables.get(USERS_TABLE, lease_key(1, "ingress-2")) is not None

    inbox = as_inputs(first.outputs, CATALOG.user_inbox.name, 0)
    lapsed = users.process(inbox, tables)
    tables.write(lapsed.writes)
    assert [job.user_id for job in decoded(lapsed.outputs, CATALOG.push_jobs.name, PushJob)] == [
        "alice"
    ]
    assert not [o for o in lapsed.outputs if o.topic == CATALOG.live_delivery.name]

    renewed = users.process([lease_record(3, sent_at, started)], tables)
    tables.write(renewed.writes)
    assert users.process([lease_record(3, sent_at, started)], tables).skipped == 1
    more = as_inputs(
        conversations.process(
            command_records([*events, send("c-1", "bob", "m2")])[2:], conversation_tables
        ).outputs,
        CATALOG.user_inbox.name,
        len(inbox),
    )
    online = users.process(more, tables)
    assert [o for o in online.outputs if o.topic == CATALOG.live_delivery.name]
    assert not [o for o in online.outputs if o.topic == CATALOG.push_jobs.name]


def push_settings_record(offset: int, payload: UserPushSettingsChangedPayload) -> InputRecord:
    event = UserPushSettingsChanged.new(
        tenant_id=TENANT, actor=Actor(user_id="alice", device_id="alice-tablet"), payload=payload
    )
    return alice_record(CATALOG.user_state_in.name, offset, event)


def test_push_settings_reach_every_device_and_shape_the_push_jobs() -> None:
    conversations = ConversationProcessor(CATALOG, ConversationSettings())
    conversation_tables = Tables()
    events: list[Event] = [
        create_group("c-1", ["alice", "bob"]),
        send("c-1", "bob", "m1"),
        send("c-1", "bob", "m2"),
    ]
    first = conversations.process(command_records(events), conversation_tables)
    inbox = as_inputs(first.outputs, CATALOG.user_inbox.name, 0)
    alice_inbox = [record for record in inbox if record.key == user_key(TENANT, "alice")]
    created, message_1, message_2 = alice_inbox
    users = UserProcessor(CATALOG, UserSettings())
    tables = Tables()
    nights = QuietHoursSetting(start="22:00", end="07:00", time_zone="Europe/Berlin")

    muted = users.process(
        [
            presence_record(0),
            push_settings_record(0, UserPushSettingsChangedPayload(muted=True)),
        ],
        tables,
    )
    tables.write(muted.writes)
    # Every device of the user sees the change: in the sync queue, and live to the online one.
    (synced,) = decoded(muted.outputs, CATALOG.sync_events.name, SyncRecord)
    assert isinstance(synced.event, UserPushSettingsChanged)
    assert (synced.sync_id, synced.conversation) == (1, None)
    (live,) = decoded(muted.outputs, CATALOG.live_delivery.name, LiveDelivery)
    assert (live.sync_id, live.device_ids) == (1, ["alice-phone"])

    # Offline and muted: the message is queued and counted, no push job.
    offline = DeviceDisconnected.new(
        tenant_id=TENANT,
        payload=ALICE_PHONE,
    )
    gone = alice_record(CATALOG.presence.name, 1, offline)
    silenced = users.process([gone, created, message_1], tables)
    tables.write(silenced.writes)
    assert [o.topic for o in silenced.outputs if o.topic == CATALOG.push_jobs.name] == []
    assert len([o for o in silenced.outputs if o.topic == CATALOG.sync_events.name]) == 2

    # Unmuted with quiet hours and a locale: the next job carries them.
    preferences = UserPushSettingsChangedPayload(quiet_hours=nights, locale="de-DE")
    tables.write(users.process([push_settings_record(1, preferences)], tables).writes)
    pushed = users.process([message_2], tables)
    (job,) = decoded(pushed.outputs, CATALOG.push_jobs.name, PushJob)
    assert (job.quiet_hours, job.locale, job.merged_count, job.unread_total) == (
        nights,
        "de-DE",
        1,
        2,
    )


def run_with_crashes(
    commands: list[Event], seed: int, batch_size: int = 7
) -> dict[str, list[SyncRecord]]:
    """Both processors over Kafka-like logs, crashing at random: outputs may land, state is lost,
    and consumption restarts from the last committed offset."""
    rng = random.Random(seed)
    conversations = ConversationProcessor(CATALOG, ConversationSettings())
    users = UserProcessor(CATALOG, UserSettings())
    command_log = command_records(commands)
    inbox_log: list[InputRecord] = []
    sync_log: list[SyncRecord] = []
    conversation_tables, user_tables = Tables(), Tables()

    def drive(
        log: list[InputRecord],
        processor: ConversationProcessor | UserProcessor,
        tables: Tables,
        sink: Any,
    ) -> None:
        committed = 0
        position = 0
        while position < len(log):
            batch = log[position : position + batch_size]
            result: BatchResult = processor.process(batch, tables)
            sink(result.outputs)
            if rng.random() < 0.3:
                # Crash: this batch's state is lost (maybe some earlier too); resume at commit.
                position = committed
                continue
            tables.write(result.writes)
            position += len(batch)
            if rng.random() < 0.5:
                committed = position

    def to_inbox(outputs: list[OutputRecord]) -> None:
        start = len(inbox_log)
        inbox_log.extend(as_inputs(outputs, CATALOG.user_inbox.name, start))

    def to_sync(outputs: list[OutputRecord]) -> None:
        sync_log.extend(decoded(outputs, CATALOG.sync_events.name, SyncRecord))

    drive(command_log, conversations, conversation_tables, to_inbox)
    drive(inbox_log, users, user_tables, to_sync)
    queues: dict[str, dict[int, SyncRecord]] = defaultdict(dict)
    for record in sync_log:
        previous = queues[record.user_id].get(record.sync_id)
        assert previous is None or previous == record, "one sync id, two different events"
        queues[record.user_id][record.sync_id] = record
    return {user: [queue[key] for key in sorted(queue)] for user, queue in queues.items()}


def test_crashes_never_lose_or_double_a_message_in_any_sync_queue() -> None:
    members = ["alice", "bob", "carol"]
    commands: list[Event] = [create_group("c-1", members), create_group("c-2", members[:2])]
    for index in range(60):
        conversation = "c-1" if index % 3 else "c-2"
        sender = members[index % 2]
        commands.append(send(conversation, sender, f"m{index}"))
        if index % 10 == 0:
            commands.append(send(conversation, sender, f"m{index}"))  # a client's retry
    expected = {
        user: sorted(
            event.event_id
            for event in commands
            if isinstance(event, MessageSent)
            and (user in members[:2] or event.payload.conversation_id == "c-1")
        )
        for user in members
    }
    for seed in range(20):
        queues = run_with_crashes(commands, seed)
        for user in members:
            messages = [r.event for r in queues[user] if isinstance(r.event, MessageSent)]
            assert sorted({event.event_id for event in messages}) == sorted(set(expected[user]))
            assert len(messages) == len({event.event_id for event in messages}), f"seed {seed}"
            sync_ids = [record.sync_id for record in queues[user]]
            assert sync_ids == sorted(set(sync_ids))
            for conversation in ("c-1", "c-2"):
                seqs = [
                    event.payload.conversation_seq or 0
                    for event in messages
                    if event.payload.conversation_id == conversation
                ]
                assert seqs == sorted(set(seqs)), f"seed {seed}: order broken in {conversation}"


def test_a_command_without_an_actor_is_dead_lettered_and_changes_nothing() -> None:
    # Before, an actor-less command skipped every membership and role check: this one deleted
    # a group nobody asked to delete.
    processor = ConversationProcessor(CATALOG, ConversationSettings())
    tables = Tables()
    tables.write(
        processor.process(command_records([create_group("c-1", ["alice", "bob"])]), tables).writes
    )
    orphan = ConversationDeleted.new(
        tenant_id=TENANT, payload=ConversationDeletedPayload(conversation_id="c-1")
    )
    result = processor.process(command_records([orphan, send("c-1", "bob", "m1")]), tables)
    (dead,) = [o for o in result.outputs if o.topic == CATALOG.messages_in.dead_letter]
    assert dict(dead.headers)["imstream.error.code"] == ACTOR_MISSING.encode()
    assert result.dead_lettered == 1
    # The group still stands: bob's message after it is sequenced and reaches both members.
    inbox = [o for o in result.outputs if o.topic == CATALOG.user_inbox.name]
    assert {o.key for o in inbox} == {user_key(TENANT, "alice"), user_key(TENANT, "bob")}
    (sequenced,) = [o for o in result.outputs if o.topic == CATALOG.messages_sequenced.name]
    assert parse_event(sequenced.value or b"").type == "message.sent"


def test_a_record_the_rules_cannot_handle_is_dead_lettered() -> None:
    processor = ConversationProcessor(CATALOG, ConversationSettings())
    good = command_records([create_group("c-1", ["alice", "bob"])])

    class Failing(MemoryState):
        def get(self, table: str, key: str) -> dict[str, Any] | None:
            raise RuntimeError("state store broke")

    result = processor.process(good, Failing())
    (dead,) = result.outputs
    assert dead.topic == CATALOG.messages_in.dead_letter
    assert dict(dead.headers)["imstream.error.code"] == b"processing-failed"
