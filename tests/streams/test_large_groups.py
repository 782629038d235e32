"""Large groups through both processors (no I/O): read diffusion, its switches, and what each
user's view and each connect's answer say about them (docs/streams.md, "Large groups")."""

from __future__ import annotations

from core.records import InputRecord, OutputRecord
from schemas.events import (
    MAX_LARGE_GROUPS_PER_USER,
    Actor,
    ConversationMemberAdded,
    ConversationMemberAddedPayload,
    ConversationMemberRemoved,
    ConversationMemberRemovedPayload,
    Event,
    GroupDelivery,
    LiveDelivery,
    ReceiptRead,
    ReceiptReadPayload,
    SyncRecord,
)
from schemas.topics import user_key
from streams.processors import (
    ConversationSettings,
    stored_user,
)
from streams.state import child_key
from tests.streams.support import TENANT
from tests.streams.test_processors import (
    CATALOG,
    create_group,
    presence_record,
    send,
)
from tests.streams.test_state_layout import Pipeline

THRESHOLD = 3


class Stage(Pipeline):
    """Both processors (threshold 3) with what they wrote for the nodes and the devices."""

    def __init__(self) -> None:
        super().__init__(ConversationSettings(large_group_threshold=THRESHOLD))
        self.groups: list[GroupDelivery] = []
        self.sync: list[SyncRecord] = []
        self.live: list[LiveDelivery] = []

    def command(self, *events: Event) -> None:
        decided, applied = self.run(events)
        self.groups += [
            GroupDelivery.model_validate_json(o.value or b"")
            for o in decided.outputs
            if o.topic == CATALOG.group_delivery.name
        ]
        self._collect(applied.outputs)

    def user_inputs(self, inputs: list[InputRecord]) -> None:
        applied = self.users.process(inputs, self.user_tables)
        self.user_tables.write(applied.writes)
        self._collect(applied.outputs)

    def _collect(self, outputs: list[OutputRecord]) -> None:
        for output in outputs:
            if output.topic == CATALOG.sync_events.name:
                self.sync.append(SyncRecord.model_validate_json(output.value or b""))
            elif output.topic == CATALOG.live_delivery.name:
                self.live.append(LiveDelivery.model_validate_json(output.value or b""))

    def view(self, user: str, conversation_id: str) -> tuple[int, int, int, bool]:
        state = stored_user(self.user_tables, user_key(TENANT, user).decode())
        assert state is not None
        view = state.conversations[conversation_id]
        return view.last_seq, view.read_seq, view.unread, view.large

    def queue(self, user: str) -> list[str]:
        return [record.event.type for record in self.sync if record.user_id == user]


def added(user: str) -> ConversationMemberAdded:
    return ConversationMemberAdded.new(
        tenant_id=TENANT,
        actor=Actor(user_id="alice", device_id="alice-phone"),
        payload=ConversationMemberAddedPayload(conversation_id="g", user_id=user),
    )


def removed(user: str) -> ConversationMemberRemoved:
    return ConversationMemberRemoved.new(
        tenant_id=TENANT,
        actor=Actor(user_id="alice", device_id="alice-phone"),
        payload=ConversationMemberRemovedPayload(conversation_id="g", user_id=user),
    )


def read(user: str, seq: int) -> ReceiptRead:
    return ReceiptRead.new(
        tenant_id=TENANT,
        actor=Actor(user_id=user, device_id=f"{user}-phone"),
        payload=ReceiptReadPayload(conversation_id="g", conversation_seq=seq),
    )


def test_a_group_switches_both_ways_and_every_view_follows() -> None:
    stage = Stage()
    stage.command(create_group("g", ["alice", "bob", "carol"]), send("g", "bob", "m1"))
    assert stage.view("carol", "g") == (1, 0, 1, False)
    # dave is the 4th member: past the threshold of 3. Everyone is told, with the switch.
    stage.command(added("dave"))
    assert all(stage.view(user, "g")[3] for user in ("alice", "bob", "carol", "dave"))
    (switch,) = stage.groups
    assert sorted(switch.members or []) == ["alice", "bob", "carol", "dave"]
    # Read diffusion: each message is one group record and the sender's own queue entry.
    before = len(stage.sync)
    for index in range(5):
        stage.command(send("g", "bob", f"big-{index}"))
    assert len(stage.sync) - before == 5
    assert stage.queue("carol").count("message.sent") == 1  # m1 only
    assert [g.event.type for g in stage.groups[1:]] == ["message.sent"] * 5
    assert all(g.synced == ["bob"] for g in stage.groups[1:])
    assert stage.view("bob", "g")[:2] == (6, 6)  # own messages read the conversation
    stage.command(read("carol", 3))  # carol's own devices hear of it, nobody else
    assert stage.view("carol", "g")[:3] == (3, 3, 0)
    assert stage.queue("bob").count("receipt.read") == 0
    # dave leaves the count at 3: write diffusion again; the views catch up to seq 6 and count
    # what came after their read position as unread.
    stage.command(removed("dave"))
    assert stage.groups[-1].large is False
    assert stage.view("carol", "g") == (6, 3, 3, False)
    assert stage.view("alice", "g") == (6, 0, 6, False)
    assert stage.view("bob", "g") == (6, 6, 0, False)
    stage.command(send("g", "bob", "small-again"))
    assert stage.view("carol", "g") == (7, 3, 4, False)
    assert stage.queue("carol").count("message.sent") == 2


def test_a_connect_answers_with_the_users_large_groups_and_their_positions() -> None:
    stage = Stage()
    stage.command(
        create_group("g", ["alice", "bob", "carol", "dave"]),  # large from birth
        create_group("small", ["alice", "bob"]),
        send("g", "alice", "hello"),
    )
    stage.user_inputs([presence_record(0)])  # alice's phone connects to ingress-2
    (answer,) = [live for live in stage.live if live.groups is not None]
    assert answer.node_id == "ingress-2" and answer.user_id == "alice"
    position = stage.groups[-1].position
    assert answer.groups == {"g": position}
    assert answer.event.type == "device.connected"


def test_a_connects_answer_lists_at_most_the_bound_of_large_groups() -> None:
    stage = Stage()
    key = user_key(TENANT, "alice").decode()
    header = {"last_sync_id": 0, "devices": {}, "large_groups": MAX_LARGE_GROUPS_PER_USER + 20}
    stage.user_tables.put("users", key, header)
    for index in range(MAX_LARGE_GROUPS_PER_USER + 20):
        view = {"last_seq": 1, "read_seq": 1, "unread": [], "large": True, "position": index}
        stage.user_tables.put("users", child_key(key, f"g{index:05d}"), view)
    stage.user_tables.put("users", child_key(key, "small"), {"last_seq": 1, "read_seq": 1})
    stage.user_inputs([presence_record(0)])
    (answer,) = [live for live in stage.live if live.groups is not None]
    assert answer.groups is not None
    assert len(answer.groups) == MAX_LARGE_GROUPS_PER_USER
    assert "small" not in answer.groups
    assert len(answer.model_dump_json()) < 100_000


def test_the_header_counts_large_groups_so_a_connect_reads_views_only_when_there_are_some() -> None:
    stage = Stage()
    stage.command(create_group("g", ["alice", "bob", "carol"]), create_group("s", ["alice", "bob"]))
    header = stage.user_tables.get("users", user_key(TENANT, "alice").decode())
    assert header is not None and "large_groups" not in header
    listed: list[str] = []
    children = stage.user_tables.children

    def counting(table: str, parent: str) -> list[str]:
        listed.append(parent)
        return children(table, parent)

    stage.user_tables.children = counting  # type: ignore[method-assign]
    stage.user_inputs([presence_record(0)])
    assert listed == []  # no large group: the connect read no view
    stage.command(added("dave"))  # the 4th member: "g" is large now
    header = stage.user_tables.get("users", user_key(TENANT, "alice").decode())
    assert header is not None and header["large_groups"] == 1
    stage.user_inputs([presence_record(1)])
    assert listed  # now it lists them, and answers with "g"
    (answer,) = [live for live in stage.live if live.groups is not None]
    assert list(answer.groups or {}) == ["g"]
    stage.command(removed("dave"))  # back to 3: write diffusion
    header = stage.user_tables.get("users", user_key(TENANT, "alice").decode())
    assert header is not None and "large_groups" not in header
