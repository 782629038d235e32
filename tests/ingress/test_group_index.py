"""The ingress's index of large groups (no I/O): which connected users get which group event.

A device must never get a group's event from before its user joined or after its user left,
whatever order the connect answers and the group events reach the node in."""

from __future__ import annotations

import json

import pytest

from ingress.groups import GroupFrame, GroupIndex, group_frame
from schemas.errors import SchemaError
from schemas.events import (
    MAX_GROUP_SWITCH_MEMBERS,
    MAX_LARGE_GROUPS_PER_USER,
    Actor,
    ConversationLeft,
    ConversationLeftPayload,
    ConversationMemberAdded,
    ConversationMemberAddedPayload,
    Event,
    GroupDelivery,
    MessageSent,
    MessageSentPayload,
    TextBody,
    TypingChanged,
    TypingChangedPayload,
)
from tests.ingress.support import payloads

TENANT = "acme"
HERE = {"ann", "bob", "cy"}


def connected(user: str) -> bool:
    return user in HERE


def frame(
    event: Event,
    position: int,
    *,
    synced: tuple[str, ...] = (),
    members: list[str] | None = None,
    large: bool = True,
    ephemeral: bool = False,
) -> GroupFrame:
    record = GroupDelivery(
        tenant_id=TENANT,
        conversation_id="g",
        position=position,
        synced=list(synced),
        members=members,
        large=large,
        ephemeral=ephemeral,
        event=event,
    )
    return group_frame(record.model_dump_json().encode())


def message(sender: str, text: str) -> MessageSent:
    return MessageSent.new(
        tenant_id=TENANT,
        actor=Actor(user_id=sender, device_id="d"),
        payload=MessageSentPayload(
            conversation_id="g", client_msg_id=text, body=TextBody(text=text), conversation_seq=1
        ),
    )


def joined(user: str) -> ConversationMemberAdded:
    return ConversationMemberAdded.new(
        tenant_id=TENANT,
        actor=Actor(user_id="owner", device_id="d"),
        payload=ConversationMemberAddedPayload(conversation_id="g", user_id=user),
    )


def left(user: str) -> ConversationLeft:
    return ConversationLeft.new(
        tenant_id=TENANT,
        actor=Actor(user_id=user, device_id="d"),
        payload=ConversationLeftPayload(conversation_id="g", user_id=user),
    )


def test_members_get_events_after_the_position_they_are_known_from() -> None:
    index = GroupIndex()
    index.snapshot(TENANT, "ann", {"g": 10})
    assert index.apply(frame(message("zed", "old"), 9), connected) == []
    assert index.apply(frame(message("zed", "new"), 11), connected) == ["ann"]
    # The sender's own devices have it in their queue.
    assert index.apply(frame(message("ann", "mine"), 12, synced=("ann",)), connected) == []


def test_a_join_and_a_leave_take_effect_in_the_groups_order() -> None:
    index = GroupIndex()
    assert index.apply(frame(joined("bob"), 20, synced=("owner", "bob")), connected) == []
    assert index.apply(frame(message("zed", "hi"), 21), connected) == ["bob"]
    assert index.apply(frame(left("bob"), 22, synced=("bob",)), connected) == []
    assert index.apply(frame(message("zed", "after"), 23), connected) == []
    # A connect answer taken before the leave (older position) does not bring bob back.
    index.snapshot(TENANT, "bob", {"g": 21})
    assert index.apply(frame(message("zed", "later"), 24), connected) == []
    # Re-joined after the leave: the newer answer wins.
    index.snapshot(TENANT, "bob", {"g": 30})
    assert index.apply(frame(message("zed", "back"), 31), connected) == ["bob"]


def test_users_not_connected_here_are_not_indexed() -> None:
    index = GroupIndex()
    index.apply(frame(joined("zoe"), 5), connected)
    assert len(index) == 0


def test_the_switch_indexes_the_members_here_and_the_switch_back_forgets_them() -> None:
    index = GroupIndex()
    switch = frame(joined("cy"), 40, members=["ann", "bob", "cy", "zed"])
    assert index.apply(switch, connected) == []  # everyone has it in their own queue
    assert sorted(index.apply(frame(message("zed", "m"), 41), connected)) == ["ann", "bob", "cy"]
    assert index.apply(frame(left("zed"), 42, large=False), connected) == []
    assert len(index) == 0
    assert index.apply(frame(message("zed", "m2"), 43), connected) == []


def test_typing_reaches_the_members_here_but_the_typist() -> None:
    index = GroupIndex()
    index.snapshot(TENANT, "ann", {"g": 1})
    index.snapshot(TENANT, "bob", {"g": 1})
    typing = TypingChanged.new(
        tenant_id=TENANT,
        actor=Actor(user_id="ann", device_id="d"),
        payload=TypingChangedPayload(conversation_id="g", active=True),
    )
    assert index.apply(frame(typing, 0, ephemeral=True), connected) == ["bob"]


def test_a_users_last_disconnect_forgets_their_groups() -> None:
    index = GroupIndex()
    index.snapshot(TENANT, "ann", {"g": 1, "h": 2})
    assert index.groups_of(TENANT, "ann") == {"g": 1, "h": 2}
    index.forget(TENANT, "ann")
    assert len(index) == 0
    assert index.apply(frame(message("zed", "m"), 5), connected) == []


def test_a_user_is_indexed_in_at_most_the_bound_of_groups() -> None:
    index = GroupIndex()
    index.snapshot(TENANT, "ann", {f"g{n}": 1 for n in range(MAX_LARGE_GROUPS_PER_USER)})
    index.snapshot(TENANT, "ann", {"one-more": 1})
    assert len(index.groups_of(TENANT, "ann")) == MAX_LARGE_GROUPS_PER_USER
    assert index.refused == 1


def test_a_record_the_node_cannot_trust_is_refused_before_it_is_indexed() -> None:
    """The group topic is a door into every node: garbage and oversized lists are refused by
    the decoder (the consumer counts and skips them), never indexed."""
    with pytest.raises(SchemaError):
        group_frame(b"{not json")
    (valid,) = payloads(frame(message("zed", "m"), 1).wire)  # a valid frame, for its event
    event = json.loads(valid)["event"]
    too_many = {
        "tenant_id": TENANT,
        "conversation_id": "g",
        "position": 1,
        "members": [f"u{n}" for n in range(MAX_GROUP_SWITCH_MEMBERS + 1)],
        "event": event,
    }
    with pytest.raises(SchemaError):
        group_frame(json.dumps(too_many).encode())
    too_many_synced = {**too_many, "members": None, "synced": [f"u{n}" for n in range(5)]}
    with pytest.raises(SchemaError):
        group_frame(json.dumps(too_many_synced).encode())
