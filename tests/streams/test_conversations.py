"""The conversation rules, decided without I/O: authorization, sequencing, fan-out modes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from schemas.events import (
    Actor,
    ConversationCreated,
    ConversationCreatedPayload,
    ConversationDeleted,
    ConversationDeletedPayload,
    ConversationKind,
    ConversationLeft,
    ConversationLeftPayload,
    ConversationMemberAdded,
    ConversationMemberAddedPayload,
    ConversationMemberRemoved,
    ConversationMemberRemovedPayload,
    ConversationMemberRoleChanged,
    ConversationMemberRoleChangedPayload,
    ConversationRenamed,
    ConversationRenamedPayload,
    Event,
    MessageEdited,
    MessageEditedPayload,
    MessageRecalled,
    MessageRecalledPayload,
    MessageSent,
    MessageSentPayload,
    ReceiptRead,
    ReceiptReadPayload,
    Role,
    TextBody,
    TypingChanged,
    TypingChangedPayload,
    direct_conversation_id,
    message_event_id,
)
from streams.conversations import (
    ConversationState,
    DeliveryKind,
    MessageRecord,
    Outcome,
    RejectReason,
    decide,
)

TENANT = "acme"
CONVERSATION = "c-1"


def by(user: str) -> Actor:
    return Actor(user_id=user, device_id=f"{user}-phone")


def send(user: str, client_msg_id: str, text: str = "hi") -> MessageSent:
    return MessageSent.new(
        tenant_id=TENANT,
        actor=by(user),
        event_id=message_event_id(TENANT, user, client_msg_id),
        payload=MessageSentPayload(
            conversation_id=CONVERSATION, client_msg_id=client_msg_id, body=TextBody(text=text)
        ),
    )


def create(
    conversation_id: str, kind: ConversationKind, members: list[str], **named: str
) -> ConversationCreated:
    """The first member's command creating ``conversation_id`` (``named``: a group's name)."""
    return ConversationCreated.new(
        tenant_id=TENANT,
        actor=by(members[0]),
        payload=ConversationCreatedPayload(
            conversation_id=conversation_id, kind=kind, members=members, **named
        ),
    )


def group(owner: str = "alice", *others: str) -> ConversationState:
    members = {owner: Role.OWNER, **dict.fromkeys(others or ("bob", "carol"), Role.MEMBER)}
    return ConversationState(kind=ConversationKind.GROUP, members=members, name="team")


def rejected(outcome: Outcome) -> RejectReason | None:
    return outcome.rejection.reason if outcome.rejection else None


def test_direct_conversation_id_is_the_same_whoever_creates_it() -> None:
    assert direct_conversation_id(TENANT, "alice", "bob") == direct_conversation_id(
        TENANT, "bob", "alice"
    )
    assert direct_conversation_id(TENANT, "alice", "bob") != direct_conversation_id(
        "other", "alice", "bob"
    )


def test_creating_a_group_makes_the_creator_owner_and_tells_every_member() -> None:
    command = create(CONVERSATION, ConversationKind.GROUP, ["alice", "bob", "carol"], name="team")
    outcome = decide(None, command)
    assert outcome.state is not None
    assert outcome.state.members == {"alice": Role.OWNER, "bob": Role.MEMBER, "carol": Role.MEMBER}
    assert {delivery.user_id for delivery in outcome.deliveries} == {"alice", "bob", "carol"}
    assert rejected(decide(outcome.state, command)) is RejectReason.CONVERSATION_EXISTS


def test_creating_a_direct_conversation_twice_is_harmless() -> None:
    command = create(
        direct_conversation_id(TENANT, "alice", "bob"), ConversationKind.DIRECT, ["alice", "bob"]
    )
    first = decide(None, command)
    assert first.state is not None
    again = decide(first.state, command)
    assert again.rejection is None and not again.state_changed and not again.deliveries


def test_messages_get_strictly_increasing_seqs_and_reach_every_member() -> None:
    state = group()
    seqs = []
    for index in range(5):
        outcome = decide(state, send("bob", f"m{index}"))
        assert outcome.state is not None
        state = outcome.state
        (sequenced,) = outcome.sequenced
        assert isinstance(sequenced, MessageSent)
        seqs.append(sequenced.payload.conversation_seq)
        assert {delivery.user_id for delivery in outcome.deliveries} == {"alice", "bob", "carol"}
        assert {delivery.kind for delivery in outcome.deliveries} == {DeliveryKind.FULL}
    assert seqs == [1, 2, 3, 4, 5]


def test_only_members_send() -> None:
    assert rejected(decide(group(), send("mallory", "m1"))) is RejectReason.NOT_A_MEMBER
    assert rejected(decide(None, send("bob", "m1"))) is RejectReason.CONVERSATION_NOT_FOUND


def large(*others: str) -> ConversationState:
    """A group above the threshold of 3 used below, told of read diffusion."""
    state = group("alice", *(others or ("bob", "carol", "dave")))
    state.large = True
    return state


def added(user: str, by_user: str = "alice") -> ConversationMemberAdded:
    return ConversationMemberAdded.new(
        tenant_id=TENANT,
        actor=by(by_user),
        payload=ConversationMemberAddedPayload(conversation_id=CONVERSATION, user_id=user),
    )


def removed(user: str, by_user: str = "alice") -> ConversationMemberRemoved:
    return ConversationMemberRemoved.new(
        tenant_id=TENANT,
        actor=by(by_user),
        payload=ConversationMemberRemovedPayload(conversation_id=CONVERSATION, user_id=user),
    )


def test_a_large_groups_message_reaches_the_sender_and_one_broadcast() -> None:
    outcome = decide(large(), send("bob", "m1"), large_group_threshold=3)
    (sequenced,) = outcome.sequenced
    assert [delivery.user_id for delivery in outcome.deliveries] == ["bob"]
    assert outcome.deliveries[0].event == sequenced
    assert outcome.broadcast is not None
    assert outcome.broadcast.event == sequenced
    assert outcome.broadcast.synced == ("bob",)
    assert outcome.large and not outcome.switched
    assert outcome.state is not None and outcome.state.large


def test_a_large_groups_membership_change_costs_the_users_it_concerns_only() -> None:
    state = large(*(f"u{index}" for index in range(20)))
    outcome = decide(state, added("newbie"), large_group_threshold=3)
    assert sorted(d.user_id for d in outcome.deliveries) == ["alice", "newbie"]
    assert outcome.broadcast is not None and outcome.broadcast.synced == ("alice", "newbie")
    assert outcome.member_changes == {"newbie": Role.MEMBER}
    outcome = decide(state, removed("u3"), large_group_threshold=3)
    assert sorted(d.user_id for d in outcome.deliveries) == ["alice", "u3"]
    left = ConversationLeft.new(
        tenant_id=TENANT,
        actor=by("u4"),
        payload=ConversationLeftPayload(conversation_id=CONVERSATION, user_id="u4"),
    )
    outcome = decide(state, left, large_group_threshold=3)
    assert [d.user_id for d in outcome.deliveries] == ["u4"]
    promote = ConversationMemberRoleChanged.new(
        tenant_id=TENANT,
        actor=by("alice"),
        payload=ConversationMemberRoleChangedPayload(
            conversation_id=CONVERSATION, user_id="u5", role=Role.OWNER
        ),
    )
    state.owner = "alice"
    outcome = decide(state, promote, large_group_threshold=3)
    assert sorted(d.user_id for d in outcome.deliveries) == ["alice", "u5"]


def test_the_member_past_the_threshold_switches_the_group_and_every_member_is_told() -> None:
    outcome = decide(group("alice", "bob", "carol"), added("dave"), large_group_threshold=3)
    assert outcome.switched and outcome.large
    assert sorted(d.user_id for d in outcome.deliveries) == ["alice", "bob", "carol", "dave"]
    assert outcome.state is not None and outcome.state.large
    assert outcome.broadcast is not None
    assert sorted(outcome.broadcast.members or ()) == ["alice", "bob", "carol", "dave"]
    # The next message is read-diffused.
    following = decide(outcome.state, send("carol", "m1"), large_group_threshold=3)
    assert [d.user_id for d in following.deliveries] == ["carol"]


def test_the_member_back_under_the_threshold_switches_back_and_every_member_is_told() -> None:
    state = large()
    state.last_seq = 40
    outcome = decide(state, removed("dave"), large_group_threshold=3)
    assert outcome.switched and not outcome.large
    assert sorted(d.user_id for d in outcome.deliveries) == ["alice", "bob", "carol", "dave"]
    assert outcome.state is not None and not outcome.state.large
    assert outcome.broadcast is not None and not outcome.broadcast.large
    following = decide(outcome.state, send("carol", "m1"), large_group_threshold=3)
    assert sorted(d.user_id for d in following.deliveries) == ["alice", "bob", "carol"]
    assert following.broadcast is None


def test_a_moved_threshold_switches_at_the_next_stored_event() -> None:
    state = group("alice", "bob", "carol", "dave")  # told of write diffusion, now above 3
    outcome = decide(state, send("bob", "m1"), large_group_threshold=3)
    assert outcome.switched and outcome.large
    assert len(outcome.deliveries) == 4
    typing = TypingChanged.new(
        tenant_id=TENANT,
        actor=by("bob"),
        payload=TypingChangedPayload(conversation_id=CONVERSATION, active=True),
    )
    # Typing stores nothing: it switches nothing, and goes as the group was told.
    assert not decide(state, typing, large_group_threshold=3).switched


def test_a_large_groups_typing_is_one_ephemeral_broadcast() -> None:
    typing = TypingChanged.new(
        tenant_id=TENANT,
        actor=by("bob"),
        payload=TypingChangedPayload(conversation_id=CONVERSATION, active=True),
    )
    outcome = decide(large(), typing, large_group_threshold=3)
    assert outcome.deliveries == []
    assert outcome.broadcast is not None and outcome.broadcast.ephemeral


def test_deleting_a_large_group_tells_the_owner_and_the_nodes() -> None:
    delete = ConversationDeleted.new(
        tenant_id=TENANT,
        actor=by("alice"),
        payload=ConversationDeletedPayload(conversation_id=CONVERSATION),
    )
    outcome = decide(large(), delete, large_group_threshold=3)
    assert [d.user_id for d in outcome.deliveries] == ["alice"]
    assert outcome.broadcast is not None and not outcome.broadcast.large


def amend(kind: type[Event], user: str, message_id: str) -> Event:
    if kind is MessageRecalled:
        return MessageRecalled.new(
            tenant_id=TENANT,
            actor=by(user),
            payload=MessageRecalledPayload(conversation_id=CONVERSATION, message_id=message_id),
        )
    return MessageEdited.new(
        tenant_id=TENANT,
        actor=by(user),
        payload=MessageEditedPayload(
            conversation_id=CONVERSATION, message_id=message_id, body=TextBody(text="fixed")
        ),
    )


@pytest.mark.parametrize(
    ("kind", "user", "reason"),
    [
        (MessageRecalled, "bob", None),
        (MessageRecalled, "alice", None),
        (MessageRecalled, "carol", RejectReason.NOT_THE_SENDER),
        (MessageEdited, "bob", None),
        (MessageEdited, "alice", RejectReason.NOT_THE_SENDER),
    ],
)
def test_recall_and_edit_rules(kind: type[Event], user: str, reason: RejectReason | None) -> None:
    sent = decide(group(), send("bob", "m1"))
    assert sent.state is not None
    records = sent.messages
    (message_id,) = records
    outcome = decide(sent.state, amend(kind, user, message_id), messages=records)
    assert rejected(outcome) is reason
    if reason is None:
        (sequenced,) = outcome.sequenced
        assert sequenced.payload.conversation_seq == 2  # type: ignore[union-attr]


def test_a_recalled_message_cannot_be_recalled_or_edited_again() -> None:
    message_id = message_event_id(TENANT, "bob", "m1")
    records = {message_id: MessageRecord(sender_id="bob", conversation_seq=1, recalled=True)}
    for kind in (MessageRecalled, MessageEdited):
        outcome = decide(group(), amend(kind, "bob", message_id), messages=records)
        assert rejected(outcome) is RejectReason.MESSAGE_RECALLED
    unknown = decide(group(), amend(MessageEdited, "bob", message_id))
    assert rejected(unknown) is RejectReason.MESSAGE_NOT_FOUND


def test_read_position_is_clamped_to_the_last_seq() -> None:
    state = group()
    state.last_seq = 3
    read = ReceiptRead.new(
        tenant_id=TENANT,
        actor=by("carol"),
        payload=ReceiptReadPayload(conversation_id=CONVERSATION, conversation_seq=99),
    )
    outcome = decide(state, read)
    assert {delivery.user_id for delivery in outcome.deliveries} == {"alice", "bob", "carol"}
    assert {delivery.event.payload.conversation_seq for delivery in outcome.deliveries} == {3}  # type: ignore[union-attr]
    # Up to the large-group threshold the receipt is on the conversation log, for who-read.
    (logged,) = outcome.sequenced
    assert isinstance(logged, ReceiptRead)
    assert logged.payload.conversation_seq == 3


def test_in_large_groups_a_read_reaches_only_the_readers_devices() -> None:
    state = group("alice", "bob", "carol", "dave")
    state.last_seq = 5
    read = ReceiptRead.new(
        tenant_id=TENANT,
        actor=by("carol"),
        payload=ReceiptReadPayload(conversation_id=CONVERSATION, conversation_seq=4),
    )
    state.large = True
    outcome = decide(state, read, large_group_threshold=3)
    assert [delivery.user_id for delivery in outcome.deliveries] == ["carol"]
    assert outcome.sequenced == []
    assert outcome.broadcast is None


def test_typing_is_ephemeral_and_not_sent_back_to_the_typist() -> None:
    typing = TypingChanged.new(
        tenant_id=TENANT,
        actor=by("bob"),
        payload=TypingChangedPayload(conversation_id=CONVERSATION, active=True),
    )
    outcome = decide(group(), typing)
    assert {delivery.user_id for delivery in outcome.deliveries} == {"alice", "carol"}
    assert {delivery.kind for delivery in outcome.deliveries} == {DeliveryKind.EPHEMERAL}
    assert not outcome.sequenced


def rename(user: str) -> ConversationRenamed:
    return ConversationRenamed.new(
        tenant_id=TENANT,
        actor=by(user),
        payload=ConversationRenamedPayload(conversation_id=CONVERSATION, name="new name"),
    )


def test_only_owner_or_admin_renames() -> None:
    state = group()
    assert rejected(decide(state, rename("bob"))) is RejectReason.NOT_ALLOWED
    renamed = decide(state, rename("alice"))
    assert renamed.state is not None and renamed.state.name == "new name"


def test_membership_changes_and_their_rules() -> None:
    state = group()
    add = added("dave")
    joined = decide(state, add)
    assert joined.state is not None and "dave" in joined.state.members
    assert "dave" in {delivery.user_id for delivery in joined.deliveries}
    # The new member learns the group's name from the event (the command does not carry it).
    (sequenced,) = joined.sequenced
    assert isinstance(sequenced, ConversationMemberAdded) and sequenced.payload.name == "team"
    assert {delivery.event.event_id for delivery in joined.deliveries} == {add.event_id}
    assert all(delivery.event == sequenced for delivery in joined.deliveries)
    assert rejected(decide(joined.state, add)) is RejectReason.ALREADY_A_MEMBER

    remove_owner = removed("alice")
    assert rejected(decide(joined.state, remove_owner)) is RejectReason.NOT_ALLOWED

    remove = removed("dave")
    left = decide(joined.state, remove)
    assert left.state is not None and "dave" not in left.state.members
    # The removed member hears about it too.
    assert "dave" in {delivery.user_id for delivery in left.deliveries}


def test_the_owner_cannot_leave_without_handing_over() -> None:
    state = group()
    leave = ConversationLeft.new(
        tenant_id=TENANT,
        actor=by("alice"),
        payload=ConversationLeftPayload(conversation_id=CONVERSATION, user_id="alice"),
    )
    assert rejected(decide(state, leave)) is RejectReason.OWNER_MUST_HAND_OVER
    hand_over = ConversationMemberRoleChanged.new(
        tenant_id=TENANT,
        actor=by("alice"),
        payload=ConversationMemberRoleChangedPayload(
            conversation_id=CONVERSATION, user_id="bob", role=Role.OWNER
        ),
    )
    handed = decide(state, hand_over)
    assert handed.state is not None
    assert handed.state.members["bob"] is Role.OWNER
    assert handed.state.members["alice"] is Role.ADMIN
    left = decide(handed.state, leave)
    assert left.rejection is None and left.state is not None
    assert "alice" not in left.state.members


def test_only_the_owner_deletes_and_nothing_happens_afterwards() -> None:
    state = group()
    delete = ConversationDeleted.new(
        tenant_id=TENANT,
        actor=by("bob"),
        payload=ConversationDeletedPayload(conversation_id=CONVERSATION),
    )
    assert rejected(decide(state, delete)) is RejectReason.NOT_ALLOWED
    by_owner = delete.model_copy(update={"actor": by("alice")})
    deleted = decide(state, by_owner)
    assert deleted.state is not None and deleted.state.deleted
    assert rejected(decide(deleted.state, send("bob", "late"))) is RejectReason.CONVERSATION_DELETED


def test_state_survives_its_json_form() -> None:
    state = group()
    state.last_seq = 42
    assert ConversationState.from_json(state.to_json(), state.members) == state
    record = MessageRecord(sender_id="bob", conversation_seq=7, recalled=True)
    assert MessageRecord.from_json(record.to_json()) == record


def test_a_group_cannot_take_a_direct_conversations_id() -> None:
    # The squat: mallory creates a group under alice and bob's direct conversation id.
    squatted = direct_conversation_id(TENANT, "alice", "bob")
    command = create(squatted, ConversationKind.GROUP, ["mallory", "alice", "bob"])
    outcome = decide(None, command)
    assert rejected(outcome) is RejectReason.CONVERSATION_ID_RESERVED
    assert outcome.state is None and not outcome.deliveries
    # The pair's own direct conversation is then created as usual.
    direct = create(squatted, ConversationKind.DIRECT, ["alice", "bob"])
    created = decide(None, direct)
    assert created.rejection is None and created.state is not None


def test_a_direct_conversation_has_only_the_id_its_pair_derives() -> None:
    for conversation_id in (CONVERSATION, direct_conversation_id(TENANT, "alice", "carol")):
        command = create(conversation_id, ConversationKind.DIRECT, ["alice", "bob"])
        assert rejected(decide(None, command)) is RejectReason.CONVERSATION_ID_RESERVED


class Unlisted(dict[str, Role]):
    """Members that may be looked up but not listed: what a 100,000-member group's must be."""

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("a large group's event listed its members")


def test_a_large_groups_events_look_members_up_without_listing_them() -> None:
    state = large()
    state.members = Unlisted({**state.members, **{f"u{n}": Role.MEMBER for n in range(50)}})
    typing = TypingChanged.new(
        tenant_id=TENANT,
        actor=by("bob"),
        payload=TypingChangedPayload(conversation_id=CONVERSATION, active=True),
    )
    read = ReceiptRead.new(
        tenant_id=TENANT,
        actor=by("carol"),
        payload=ReceiptReadPayload(conversation_id=CONVERSATION, conversation_seq=1),
    )
    state.last_seq = 3
    commands = (send("bob", "m1"), typing, read, added("newbie"), removed("u7"), rename("alice"))
    for command in commands:
        outcome = decide(state, command, large_group_threshold=3)
        assert outcome.rejection is None, command.type
        assert len(outcome.deliveries) <= 2, command.type
