"""The fine-grained state layout (docs/streams.md, "State layout"): no value grows with a user's
history, number of conversations or a group's size, and a message writes the same few small values
whatever its recipients have accumulated. Both processors without Kafka (the real-stack runs are
in test_flows.py, test_crash.py and test_record_limit.py)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence

import pytest

from core.records import InputRecord, StateWrite
from core.settings import Settings
from schemas.events import (
    Actor,
    CommandRejected,
    ConversationMemberAdded,
    ConversationMemberAddedPayload,
    ConversationMemberRoleChanged,
    ConversationMemberRoleChangedPayload,
    DeviceConnected,
    DevicePresencePayload,
    Event,
    GroupDelivery,
    MessageSent,
    Platform,
    Role,
    SyncRecord,
)
from schemas.topics import conversation_key, user_key
from streams.processors import (
    CONVERSATIONS_TABLE,
    USERS_TABLE,
    BatchResult,
    ConversationProcessor,
    ConversationSettings,
    UserProcessor,
    UserSettings,
    stored_user,
)
from streams.state import child_key
from streams.users import MAX_DEVICES, MAX_UNREAD_RANGES, ConversationView, UserState
from streams.users import apply_presence as presence
from tests.streams.support import TENANT
from tests.streams.test_processors import (
    CATALOG,
    Tables,
    as_inputs,
    create_group,
    send,
)


class Pipeline:
    """Both processors, each batch committed: commands in, the users' writes and outputs out."""

    def __init__(self, settings: ConversationSettings | None = None) -> None:
        self.conversations = ConversationProcessor(CATALOG, settings or ConversationSettings())
        self.users = UserProcessor(CATALOG, UserSettings())
        self.conversation_tables = Tables()
        self.user_tables = Tables()
        self.offset = 0
        self.inbox_offset = 0

    def run(self, events: Sequence[Event]) -> tuple[BatchResult, BatchResult]:
        records = []
        for event in events:
            conversation_id = str(getattr(event.payload, "conversation_id", ""))
            records.append(
                InputRecord(
                    topic=CATALOG.messages_in.name,
                    partition=0,
                    offset=self.offset,
                    key=conversation_key(TENANT, conversation_id),
                    value=event.model_dump_json().encode(),
                )
            )
            self.offset += 1
        decided = self.conversations.process(records, self.conversation_tables)
        self.conversation_tables.write(decided.writes)
        inbox = as_inputs(decided.outputs, CATALOG.user_inbox.name, self.inbox_offset)
        self.inbox_offset += len(inbox)
        applied = self.users.process(inbox, self.user_tables)
        self.user_tables.write(applied.writes)
        return decided, applied


def weight(writes: Sequence[StateWrite], prefix: str) -> tuple[int, int]:
    """How many of ``writes`` are under the key ``prefix`` and their JSON bytes."""
    mine = [w for w in writes if w.key.startswith(prefix)]
    return len(mine), sum(len(json.dumps(w.value)) for w in mine)


def test_a_message_writes_the_same_few_small_values_however_many_conversations_and_unread() -> None:
    costs = {}
    for conversations in (1, 50, 500):
        pipeline = Pipeline()
        pipeline.run([create_group(f"g-{n}", ["bob", "ann"]) for n in range(conversations)])
        # A backlog: 20 unread messages from bob in every conversation.
        pipeline.run(
            [send(f"g-{n}", "bob", f"m-{n}-{i}") for n in range(conversations) for i in range(20)]
        )
        decided, applied = pipeline.run([send("g-0", "bob", "one-more")])
        ann = user_key(TENANT, "ann").decode()
        costs[conversations] = (
            weight(applied.writes, ann),
            weight(
                [w for w in decided.writes if w.table == CONVERSATIONS_TABLE],
                conversation_key(TENANT, "g-0").decode(),
            ),
            len(decided.outputs) + len(applied.outputs),
        )
        # The badge number (pushes carry it) still counts every conversation's unread.
        header = pipeline.user_tables.get(USERS_TABLE, ann)
        assert header is not None and header["unread_total"] == conversations * 20 + 1
        whole = stored_user(pipeline.user_tables, ann)
        assert whole is not None and whole.unread_total() == conversations * 20 + 1
    # ann's header and one view; the conversation's header: the same count and (give or take
    # the digits of the numbers) the same bytes whatever ann has accumulated.
    counts = {conversations: (c[0][0], c[1][0], c[2]) for conversations, c in costs.items()}
    assert set(counts.values()) == {(2, 1, counts[1][2])}, counts
    sizes = [c[0][1] + c[1][1] for c in costs.values()]
    assert max(sizes) - min(sizes) <= 16, costs
    assert max(sizes) < 1_500, costs


def test_a_large_groups_message_writes_its_header_only() -> None:
    pipeline = Pipeline()
    key = conversation_key(TENANT, "big").decode()
    members = {f"user-{n:05d}": Role.MEMBER for n in range(20_000)}
    members["user-00000"] = Role.OWNER
    tables = pipeline.conversation_tables
    for user, role in members.items():
        tables.put(CONVERSATIONS_TABLE, child_key(key, user), {"role": role.value})
    header = {"kind": "group", "name": "all", "last_seq": 0, "deleted": False}
    tables.put(
        CONVERSATIONS_TABLE,
        key,
        {
            "conversation": {
                **header,
                "owner": "user-00000",
                "members": 20_000,
                "large": True,
            },
            "position": 0,
        },
    )
    decided, _applied = pipeline.run([send("big", "user-00042", "hello")])
    (write,) = [w for w in decided.writes if w.table == CONVERSATIONS_TABLE]
    assert write.key == key
    assert len(json.dumps(write.value)) < 300
    # Read diffusion: the sender's queue and one record for every ingress node, whatever the
    # size of the group.
    counts = Counter(o.topic for o in decided.outputs)
    assert counts == {
        CATALOG.messages_sequenced.name: 1,
        CATALOG.user_inbox.name: 1,
        CATALOG.group_delivery.name: 1,
    }


def test_a_group_that_grew_under_a_larger_threshold_switches_in_bounded_records() -> None:
    pipeline = Pipeline()
    key = conversation_key(TENANT, "grown").decode()
    tables = pipeline.conversation_tables
    for n in range(25_000):
        role = Role.OWNER if n == 0 else Role.MEMBER
        tables.put(CONVERSATIONS_TABLE, child_key(key, f"user-{n:05d}"), {"role": role.value})
    header = {"kind": "group", "name": "all", "last_seq": 0, "deleted": False}
    tables.put(
        CONVERSATIONS_TABLE,
        key,
        {"conversation": {**header, "owner": "user-00000", "members": 25_000}, "position": 0},
    )
    decided, _applied = pipeline.run([send("grown", "user-00042", "hello")])
    groups = [
        GroupDelivery.model_validate_json(o.value or b"")
        for o in decided.outputs
        if o.topic == CATALOG.group_delivery.name
    ]
    # The switch: every member told once, the member list to the nodes in bounded records.
    assert [len(g.members or []) for g in groups] == [5_000] * 5
    assert max(len(o.value or b"") for o in decided.outputs) < 900_000


def test_membership_changes_write_the_member_and_the_header_only() -> None:
    pipeline = Pipeline()
    pipeline.run([create_group("team", ["ann", "bob", "cy"])])
    key = conversation_key(TENANT, "team").decode()
    stored = pipeline.conversation_tables.get(CONVERSATIONS_TABLE, key)
    assert stored is not None and stored["conversation"]["members"] == 3
    assert sorted(pipeline.conversation_tables.children(CONVERSATIONS_TABLE, key)) == [
        "ann",
        "bob",
        "cy",
    ]
    handed = pipeline.conversations.process(
        [
            InputRecord(
                topic=CATALOG.messages_in.name,
                partition=0,
                offset=99,
                key=key.encode(),
                value=_role_change("team", "ann", "bob").model_dump_json().encode(),
            )
        ],
        pipeline.conversation_tables,
    )
    written = {w.key: w.value for w in handed.writes}
    assert written == {
        key: written[key],
        child_key(key, "ann"): {"role": "admin"},
        child_key(key, "bob"): {"role": "owner"},
    }
    stored = pipeline.conversation_tables.get(CONVERSATIONS_TABLE, key)
    assert stored is not None and stored["conversation"]["owner"] == "ann"  # not yet committed
    pipeline.conversation_tables.write(handed.writes)
    stored = pipeline.conversation_tables.get(CONVERSATIONS_TABLE, key)
    assert stored is not None and stored["conversation"]["owner"] == "bob"


def _role_change(conversation_id: str, owner: str, heir: str) -> Event:
    return ConversationMemberRoleChanged.new(
        tenant_id=TENANT,
        actor=Actor(user_id=owner),
        payload=ConversationMemberRoleChangedPayload(
            conversation_id=conversation_id, user_id=heir, role=Role.OWNER
        ),
    )


def test_unread_runs_stay_bounded_whatever_the_interleaving() -> None:
    view = ConversationView()
    # The worst case: every other seq an edit or recall (not unread), 20,000 messages.
    for seq in range(1, 40_001, 2):
        view.add_unread(seq)
    assert len(view.unread_ranges) == MAX_UNREAD_RANGES
    assert view.unread >= 20_000  # merged runs count the edits between them: never fewer
    assert len(json.dumps(view.to_json())) < 2_000
    view.read_through(39_000)
    # 500 unread remain (39,001 to 39,999, odd); the merged run counts the edits in it too.
    assert 500 <= view.unread <= 1_000
    assert all(first > 39_000 for first, _last in view.unread_ranges)
    # A run of consecutive unread messages is one run, however long.
    steady = ConversationView()
    for seq in range(1, 100_001):
        steady.add_unread(seq)
    assert steady.unread_ranges == [[1, 100_000]] and steady.unread == 100_000


def test_online_devices_stay_bounded() -> None:
    state = UserState()
    for n in range(1_000):
        presence(
            state,
            DeviceConnected.new(
                tenant_id=TENANT,
                payload=DevicePresencePayload(
                    user_id="ann",
                    device_id=f"device-{n}",
                    platform=Platform.WEB,
                    node_id="ingress-1",
                    connection_id=f"conn-{n}",
                ),
            ),
        )
    assert len(state.devices) == MAX_DEVICES
    assert "device-999" in state.devices and "device-0" not in state.devices


def test_commands_to_an_invented_conversation_are_refused_each_time_and_leave_no_state() -> None:
    pipeline = Pipeline()
    _decided, applied = pipeline.run([send("nope", "mallory", f"m{n}") for n in range(3)])
    queue = [
        SyncRecord.model_validate_json(o.value or b"")
        for o in applied.outputs
        if o.topic == CATALOG.sync_events.name
    ]
    # Each refusal reaches mallory (the second and third were skipped as "already applied"
    # when a refusal carried the nonexistent conversation's position 1).
    assert [type(s.event) for s in queue] == [CommandRejected] * 3
    mallory = user_key(TENANT, "mallory").decode()
    assert pipeline.user_tables.children(USERS_TABLE, mallory) == []


def test_state_in_the_former_layout_is_split_when_first_touched() -> None:
    pipeline = Pipeline()
    conversation = conversation_key(TENANT, "team").decode()
    ann = user_key(TENANT, "ann").decode()
    pipeline.conversation_tables.put(
        CONVERSATIONS_TABLE,
        conversation,
        {
            "conversation": {
                "kind": "group",
                "members": {"bob": "owner", "ann": "member"},
                "name": "team",
                "last_seq": 2,
                "deleted": False,
            },
            "position": 3,
            "applied": {},
        },
    )
    pipeline.user_tables.put(
        USERS_TABLE,
        ann,
        {
            "user": {
                "last_sync_id": 3,
                "conversations": {"team": {"last_seq": 2, "read_seq": 0, "unread_seqs": [1, 2]}},
                "devices": {},
            },
            "positions": {"team": 3},
            "applied": {},
        },
    )
    _decided, applied = pipeline.run([send("team", "bob", "third")])
    assert sorted(pipeline.conversation_tables.children(CONVERSATIONS_TABLE, conversation)) == [
        "ann",
        "bob",
    ]
    state = stored_user(pipeline.user_tables, ann)
    assert state is not None
    assert state.last_sync_id == 4
    assert state.conversations["team"].unread_ranges == [[1, 3]]
    (sync,) = [
        SyncRecord.model_validate_json(o.value or b"")
        for o in applied.outputs
        if o.topic == CATALOG.sync_events.name and o.key == ann.encode()
    ]
    assert isinstance(sync.event, MessageSent) and sync.event.payload.conversation_seq == 3
    header = pipeline.user_tables.get(USERS_TABLE, ann)
    assert header is not None and "user" not in header and header["unread_total"] == 3


def test_a_tenants_group_size_limit_refuses_creates_and_adds_past_it() -> None:
    pipeline = Pipeline()
    pipeline.conversations = ConversationProcessor(
        CATALOG, ConversationSettings(max_members_by_tenant={TENANT: 3})
    )
    _decided, refused = pipeline.run([create_group("big", ["ann", "bob", "cy", "dee"])])
    _decided, created = pipeline.run([create_group("small", ["ann", "bob", "cy"])])
    _decided, added = pipeline.run([_add("small", "ann", "dee")])

    def events(result: BatchResult) -> list[Event]:
        return [
            SyncRecord.model_validate_json(o.value or b"").event
            for o in result.outputs
            if o.topic == CATALOG.sync_events.name
        ]

    (rejected,) = events(refused)
    assert isinstance(rejected, CommandRejected) and rejected.payload.reason == "group-full"
    assert len(events(created)) == 3
    (rejected,) = events(added)
    assert isinstance(rejected, CommandRejected) and rejected.payload.reason == "group-full"


def test_the_tenant_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IM_STREAMS__TENANT_MAX_MEMBERS", '{"acme": 5000}')
    assert Settings().streams.tenant_max_members == {"acme": 5000}
    monkeypatch.setenv("IM_STREAMS__TENANT_MAX_MEMBERS", '{"acme": 1}')
    with pytest.raises(ValueError, match="tenant_max_members"):
        Settings()


def _add(conversation_id: str, actor: str, user: str) -> Event:
    return ConversationMemberAdded.new(
        tenant_id=TENANT,
        actor=Actor(user_id=actor),
        payload=ConversationMemberAddedPayload(conversation_id=conversation_id, user_id=user),
    )
