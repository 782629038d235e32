"""The conversation processor's rules, as a pure function of (state, command) → outcome.

Every conversation-scoped command — messages, recalls, edits, read receipts, typing, and the
conversation's own lifecycle and membership — is decided here, one conversation at a time and in
the order of its (conversation-keyed) Kafka partition. Nothing in this module does I/O: the
processor (``streams.processors``, run by ``streams.runtime``) reads the state, calls
:func:`decide`, and writes
the outcome — new state, sequenced events, per-user deliveries — in one Kafka transaction. Because
the same state and command always give the same outcome, re-processing after a crash reproduces
exactly what the aborted transaction would have written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from schemas.events import (
    DIRECT_CONVERSATION_PREFIX,
    CommandRejected,
    CommandRejectedPayload,
    ConversationCreated,
    ConversationDeleted,
    ConversationKind,
    ConversationLeft,
    ConversationMemberAdded,
    ConversationMemberRemoved,
    ConversationMemberRoleChanged,
    ConversationRenamed,
    Event,
    MessageEdited,
    MessageRecalled,
    MessageSent,
    ReceiptRead,
    Role,
    TypingChanged,
    derived_event_id,
    direct_conversation_id,
)

#: Roles that may manage a group: rename it, add and remove members.
MANAGERS = frozenset({Role.OWNER, Role.ADMIN})


class RejectReason(StrEnum):
    """Why a command changed nothing; sent back to the requesting user's devices."""

    CONVERSATION_NOT_FOUND = "conversation-not-found"
    CONVERSATION_EXISTS = "conversation-exists"
    CONVERSATION_DELETED = "conversation-deleted"
    NOT_A_MEMBER = "not-a-member"
    NOT_ALLOWED = "not-allowed"
    ALREADY_A_MEMBER = "already-a-member"
    OWNER_MUST_HAND_OVER = "owner-must-hand-over"
    NOT_FOR_DIRECT = "not-for-direct-conversations"
    MESSAGE_NOT_FOUND = "message-not-found"
    NOT_THE_SENDER = "not-the-sender"
    MESSAGE_RECALLED = "message-recalled"
    GROUP_FULL = "group-full"
    CONVERSATION_ID_RESERVED = "conversation-id-reserved"
    UNKNOWN_USER = "unknown-user"


class MemberChanges(Mapping[str, Role]):
    """``base`` with ``changes`` applied (a None role removes the member): the member list after
    a membership change, at the cost of the change, whatever the size of the group."""

    __slots__ = ("_length", "base", "changes")

    def __init__(self, base: Mapping[str, Role], changes: dict[str, Role | None]) -> None:
        self.base = base
        self.changes = changes
        length = len(base)
        for user, role in changes.items():
            if role is None and user in base:
                length -= 1
            elif role is not None and user not in base:
                length += 1
        self._length = length

    def __getitem__(self, user: str) -> Role:
        if user in self.changes:
            role = self.changes[user]
            if role is None:
                raise KeyError(user)
            return role
        return self.base[user]

    def __iter__(self) -> Iterator[str]:
        for user in self.base:
            if self.changes.get(user, True) is not None:
                yield user
        for user, role in self.changes.items():
            if role is not None and user not in self.base:
                yield user

    def __len__(self) -> int:
        return self._length


@dataclass(slots=True)
class ConversationState:
    """What the processor remembers of one conversation.

    Stored fine-grained (``streams.state``): this header as one value (its JSON has the member
    count, not the members) and each member's role as a value of its own, so that no value grows
    with the group and a message writes only the header. ``members`` may be a lazy mapping over
    the stored members: the rules look members up one by one and list them only to fan out.
    """

    kind: ConversationKind
    members: Mapping[str, Role]
    name: str | None = None
    last_seq: int = 0
    deleted: bool = False
    #: A group's owner (None for a direct conversation).
    owner: str | None = None
    #: Read diffusion (docs/streams.md, "Large groups"): the diffusion the members were last
    #: told of. It follows the member count and the threshold; when they disagree, the next
    #: event switches it and tells every member.
    large: bool = False

    def __post_init__(self) -> None:
        if self.owner is None and isinstance(self.members, dict):
            self.owner = next((u for u, role in self.members.items() if role is Role.OWNER), None)

    def to_json(self) -> dict[str, Any]:
        """The header: everything but the members, and how many there are."""
        header: dict[str, Any] = {
            "kind": self.kind.value,
            "name": self.name,
            "last_seq": self.last_seq,
            "deleted": self.deleted,
            "owner": self.owner,
            "members": len(self.members),
        }
        if self.large:
            header["large"] = True
        return header

    @classmethod
    def from_json(cls, data: dict[str, Any], members: Mapping[str, Role]) -> ConversationState:
        return cls(
            kind=ConversationKind(data["kind"]),
            members=members,
            name=data.get("name"),
            last_seq=int(data.get("last_seq", 0)),
            deleted=bool(data.get("deleted", False)),
            owner=data.get("owner"),
            large=bool(data.get("large", False)),
        )


@dataclass(frozen=True, slots=True)
class MessageRecord:
    """What the processor remembers of one message, to authorise recalls and edits."""

    sender_id: str
    conversation_seq: int
    recalled: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "sender_id": self.sender_id,
            "seq": self.conversation_seq,
            "recalled": self.recalled,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MessageRecord:
        return cls(data["sender_id"], int(data["seq"]), bool(data.get("recalled", False)))


class DeliveryKind(StrEnum):
    """How an event reaches one user's sync queue."""

    #: The whole event is appended to the user's queue (write diffusion).
    FULL = "full"
    #: Routed to online devices and never stored (typing).
    EPHEMERAL = "ephemeral"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event for one user; the user processor gives it a ``sync_id`` unless ephemeral."""

    user_id: str
    event: Event
    kind: DeliveryKind = DeliveryKind.FULL


@dataclass(frozen=True, slots=True)
class Rejection:
    user_id: str
    reason: RejectReason
    command: Event


@dataclass(slots=True)
class Outcome:
    """Everything one command causes; empty lists mean nothing to write."""

    state: ConversationState | None = None
    state_changed: bool = False
    sequenced: list[Event] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    messages: dict[str, MessageRecord] = field(default_factory=dict)
    rejection: Rejection | None = None
    #: Members added (their role), changed (the new role) or removed (None).
    member_changes: dict[str, Role | None] = field(default_factory=dict)
    #: The rules' "every member": turned into ``deliveries`` by :func:`_diffuse`.
    fanout: Fanout | None = None
    #: A large group's event for every ingress node (``im.delivery.groups``), if any.
    broadcast: Broadcast | None = None
    #: The diffusion of the conversation after the command (stamped on its deliveries).
    large: bool = False
    #: Whether the command switched the diffusion (its deliveries then reach every member).
    switched: bool = False


@dataclass(frozen=True, slots=True)
class Fanout:
    """One event for every member of ``members`` but ``excluded``, as the rules decide it.

    Listed only when the diffusion needs it (:func:`_diffuse`): a large group's event reaches
    only the users it concerns, found by lookups, so it costs no pass over the members (a
    100,000-member group's members are 100,000 stored values).
    """

    event: Event
    members: Mapping[str, Role]
    kind: DeliveryKind = DeliveryKind.FULL
    excluded: str | None = None

    def deliveries(self) -> list[Delivery]:
        return [
            Delivery(user_id=user, event=self.event, kind=self.kind)
            for user in self.members
            if user != self.excluded
        ]

    def reaches(self, user: str) -> bool:
        return user != self.excluded and user in self.members


@dataclass(frozen=True, slots=True)
class Broadcast:
    """One event of a large group for the ingress nodes (docs/streams.md, "Large groups")."""

    event: Event
    #: Members who get the event in their own sync queues (nodes skip them).
    synced: tuple[str, ...] = ()
    ephemeral: bool = False
    #: Every member, on the switch to read diffusion (nodes index the ones they hold).
    members: tuple[str, ...] | None = None
    #: False on the event that ends read diffusion (nodes forget the group).
    large: bool = True


def command_rejected(
    command: Event, conversation_id: str | None, reason: RejectReason
) -> CommandRejected:
    """The event that tells the requester's devices a command was refused; its id derived from
    the command's, so re-processing the command rejects it with the same event."""
    return CommandRejected.new(
        tenant_id=command.tenant_id,
        event_id=derived_event_id(command.event_id, "rejected"),
        occurred_at=command.occurred_at,
        actor=command.actor,
        payload=CommandRejectedPayload(
            command_event_id=command.event_id,
            command_type=command.type,
            conversation_id=conversation_id,
            reason=reason.value,
        ),
    )


def _reject(command: Event, user_id: str, reason: RejectReason) -> Outcome:
    return Outcome(rejection=Rejection(user_id=user_id, reason=reason, command=command))


def _to_all(
    event: Event,
    members: Mapping[str, Role],
    kind: DeliveryKind = DeliveryKind.FULL,
    excluded: str | None = None,
) -> Fanout:
    return Fanout(event=event, members=members, kind=kind, excluded=excluded)


def _requester(command: Event) -> str:
    return command.actor.user_id if command.actor is not None else ""


def decide(
    state: ConversationState | None,
    command: Event,
    *,
    messages: dict[str, MessageRecord] | None = None,
    large_group_threshold: int = 500,
    max_members: int = 100_000,
    known: Callable[[str], bool] | None = None,
) -> Outcome:
    """The outcome of ``command`` on a conversation whose current state is ``state``.

    ``messages`` holds the records of the messages the command refers to (recall, edit), looked up
    by the caller. ``known`` tells whether the tenant knows a user (``None``: every user is
    admitted); a create or an add naming one it does not is refused. Sequenced events carry
    ``conversation_seq``. A group larger than ``large_group_threshold`` is read-diffused: its
    events reach the members through one :class:`Broadcast` instead of one delivery each
    (:func:`_diffuse`).
    """
    requester = _requester(command)
    outcome = _decide(
        state, command, requester, messages=messages, max_members=max_members, known=known
    )
    return _diffuse(state, command, requester, outcome, large_group_threshold)


def _decide(
    state: ConversationState | None,
    command: Event,
    requester: str,
    *,
    messages: dict[str, MessageRecord] | None,
    max_members: int,
    known: Callable[[str], bool] | None,
) -> Outcome:
    """The outcome as if every group were write-diffused; :func:`_diffuse` then decides."""
    if isinstance(command, ConversationCreated):
        return _create(state, command, requester, max_members, known)
    if state is None:
        return _reject(command, requester, RejectReason.CONVERSATION_NOT_FOUND)
    if state.deleted:
        return _reject(command, requester, RejectReason.CONVERSATION_DELETED)
    if requester and requester not in state.members:
        return _reject(command, requester, RejectReason.NOT_A_MEMBER)
    match command:
        case MessageSent():
            return _sequence(state, command, requester)
        case MessageRecalled() | MessageEdited():
            record = (messages or {}).get(command.payload.message_id)
            return _amend(state, command, requester, record)
        case ReceiptRead():
            return _read(state, command, requester)
        case TypingChanged():
            typing = _to_all(command, state.members, DeliveryKind.EPHEMERAL, excluded=requester)
            return Outcome(fanout=typing)
        case ConversationRenamed():
            return _rename(state, command, requester)
        case ConversationMemberAdded():
            return _add_member(state, command, requester, max_members, known)
        case ConversationMemberRemoved():
            return _remove_member(state, command, requester)
        case ConversationMemberRoleChanged():
            return _change_role(state, command, requester)
        case ConversationLeft():
            return _leave(state, command, requester)
        case ConversationDeleted():
            return _delete(state, command, requester)
    return _reject(command, requester, RejectReason.NOT_ALLOWED)


def _create(
    state: ConversationState | None,
    command: ConversationCreated,
    requester: str,
    max_members: int,
    known: Callable[[str], bool] | None,
) -> Outcome:
    payload = command.payload
    # A direct conversation's id is the one its pair derives (so nobody else can hold it), and
    # ids of that form belong to direct conversations only: a group taking a pair's id would
    # refuse them their conversation and receive their messages.
    if payload.kind is ConversationKind.DIRECT:
        first, second = payload.members
        reserved = payload.conversation_id != direct_conversation_id(
            command.tenant_id, first, second
        )
    else:
        reserved = payload.conversation_id.startswith(DIRECT_CONVERSATION_PREFIX)
    if reserved:
        return _reject(command, requester, RejectReason.CONVERSATION_ID_RESERVED)
    if state is not None:
        same_members = set(state.members) == set(payload.members)
        if payload.kind is ConversationKind.DIRECT and same_members and not state.deleted:
            # Direct conversations have a deterministic id: creating one twice is not an error.
            return Outcome()
        return _reject(command, requester, RejectReason.CONVERSATION_EXISTS)
    if requester and requester not in payload.members:
        return _reject(command, requester, RejectReason.NOT_A_MEMBER)
    if len(set(payload.members)) > max_members:
        return _reject(command, requester, RejectReason.GROUP_FULL)
    if known is not None and not all(user == requester or known(user) for user in payload.members):
        return _reject(command, requester, RejectReason.UNKNOWN_USER)
    if payload.kind is ConversationKind.DIRECT:
        members = dict.fromkeys(payload.members, Role.MEMBER)
    else:
        owner = payload.owner_id or requester or payload.members[0]
        members = {user: Role.OWNER if user == owner else Role.MEMBER for user in payload.members}
    new_state = ConversationState(kind=payload.kind, members=members, name=payload.name)
    return Outcome(
        state=new_state,
        state_changed=True,
        sequenced=[command],
        fanout=_to_all(command, members),
        member_changes=dict(members),
    )


def _diffuse(
    before: ConversationState | None,
    command: Event,
    requester: str,
    outcome: Outcome,
    threshold: int,
) -> Outcome:
    """Write or read diffusion for the outcome of ``command`` (docs/streams.md, "Large groups").

    A group with more than ``threshold`` members is read-diffused: an event reaches the sync
    queues of the users it concerns only — the requester, and the member it adds, removes or
    promotes — and every other member through one :class:`Broadcast` that every ingress node
    reads. A read receipt reaches the reader only; typing is broadcast. So no event of a large
    group costs records per member, and membership changes cost O(1) records.

    The event that switches the diffusion (the member past the threshold, the one back under
    it, a create above it, or the first stored event after the threshold setting moved) is
    delivered to every member, marked with the new diffusion (``Outcome.switched``), so each
    member's view switches in order with the conversation's events; the switch to read
    diffusion is broadcast with the member list, so that nodes index the members they hold.
    """
    fanout, outcome.fanout = outcome.fanout, None
    after = outcome.state if outcome.state is not None else before
    if after is None or outcome.rejection is not None or fanout is None:
        return outcome
    was_large = before.large if before is not None else False
    stored = fanout.kind is not DeliveryKind.EPHEMERAL
    event = outcome.sequenced[0] if outcome.sequenced else command
    if after.deleted:
        if was_large:
            # Deleting a large group: its members learn it from the broadcast and from the
            # conversation's head (their lists drop it), not from one record each.
            outcome.deliveries = _those(fanout, [requester])
            outcome.broadcast = Broadcast(event=event, synced=(requester,), large=False)
        else:
            outcome.deliveries = fanout.deliveries()
        return outcome
    large = len(after.members) > threshold
    if large != was_large and stored:
        # The switch: every member is told with this event (it reaches all of them anyway
        # unless it is a message or a read, which then reach all of them this once).
        outcome.deliveries = fanout.deliveries()
        outcome.state = replace(after, large=large)
        outcome.state_changed = True
        outcome.switched = True
        outcome.large = large
        members = tuple(after.members) if large else None
        outcome.broadcast = Broadcast(event=event, members=members, large=large)
        return outcome
    if not was_large:
        outcome.deliveries = fanout.deliveries()
        return outcome
    outcome.large = True
    if isinstance(command, ReceiptRead):
        # The reader's own devices only: no receipts to the other members, no who-read.
        outcome.sequenced = []
        outcome.deliveries = _those(fanout, [requester])
        return outcome
    if not stored:  # typing
        outcome.broadcast = Broadcast(event=event, ephemeral=True)
        return outcome
    outcome.deliveries = _those(fanout, sorted(_concerned(command, requester, before)))
    synced = tuple(d.user_id for d in outcome.deliveries)
    outcome.broadcast = Broadcast(event=event, synced=synced)
    return outcome


def _those(fanout: Fanout, users: list[str]) -> list[Delivery]:
    """The fan-out's deliveries to ``users`` only, found by lookups."""
    return [
        Delivery(user_id=user, event=fanout.event, kind=fanout.kind)
        for user in users
        if fanout.reaches(user)
    ]


def _concerned(command: Event, requester: str, before: ConversationState | None) -> set[str]:
    """Who gets a large group's event in their own sync queue: the requester, and the member
    the event adds, removes or changes (with the owner it replaces)."""
    concerned = {requester} if requester else set()
    user = getattr(command.payload, "user_id", None)
    if isinstance(
        command,
        ConversationMemberAdded
        | ConversationMemberRemoved
        | ConversationLeft
        | ConversationMemberRoleChanged,
    ) and isinstance(user, str):
        concerned.add(user)
    if (
        isinstance(command, ConversationMemberRoleChanged)
        and command.payload.role is Role.OWNER
        and before is not None
        and before.owner is not None
    ):
        concerned.add(before.owner)
    return concerned


def _sequence(state: ConversationState, command: MessageSent, requester: str) -> Outcome:
    seq = state.last_seq + 1
    sequenced = command.model_copy(
        update={"payload": command.payload.model_copy(update={"conversation_seq": seq})}
    )
    new_state = replace(state, last_seq=seq)
    return Outcome(
        state=new_state,
        state_changed=True,
        sequenced=[sequenced],
        fanout=_to_all(sequenced, state.members),
        messages={command.event_id: MessageRecord(sender_id=requester, conversation_seq=seq)},
    )


def _amend(
    state: ConversationState,
    command: MessageRecalled | MessageEdited,
    requester: str,
    record: MessageRecord | None,
) -> Outcome:
    if record is None:
        return _reject(command, requester, RejectReason.MESSAGE_NOT_FOUND)
    if record.recalled:
        return _reject(command, requester, RejectReason.MESSAGE_RECALLED)
    may_recall_others = (
        state.kind is ConversationKind.GROUP and state.members.get(requester) in MANAGERS
    )
    if record.sender_id != requester and not (
        isinstance(command, MessageRecalled) and may_recall_others
    ):
        return _reject(command, requester, RejectReason.NOT_THE_SENDER)
    seq = state.last_seq + 1
    sequenced: MessageRecalled | MessageEdited = command.model_copy(
        update={"payload": command.payload.model_copy(update={"conversation_seq": seq})}
    )
    updated = replace(record, recalled=isinstance(command, MessageRecalled))
    return Outcome(
        state=replace(state, last_seq=seq),
        state_changed=True,
        sequenced=[sequenced],
        fanout=_to_all(sequenced, state.members),
        messages={command.payload.message_id: updated},
    )


def _read(state: ConversationState, command: ReceiptRead, requester: str) -> Outcome:
    seq = min(command.payload.conversation_seq, state.last_seq)
    if seq <= 0:
        return Outcome()
    clamped = command
    if seq != command.payload.conversation_seq:
        clamped = command.model_copy(
            update={"payload": command.payload.model_copy(update={"conversation_seq": seq})}
        )
    # The reader's own devices get the read position; the others get a receipt. Both are the
    # same event: a device tells them apart by the actor. The conversation log carries it too,
    # for the who-read store (issue 5's sinks).
    return Outcome(sequenced=[clamped], fanout=_to_all(clamped, state.members))


def _managed(state: ConversationState, command: Event, requester: str) -> Outcome | None:
    """A rejection unless the requester may manage this group; None when allowed."""
    if state.kind is ConversationKind.DIRECT:
        return _reject(command, requester, RejectReason.NOT_FOR_DIRECT)
    if requester and state.members.get(requester) not in MANAGERS:
        return _reject(command, requester, RejectReason.NOT_ALLOWED)
    return None


def _changed(
    state: ConversationState,
    command: Event,
    audience: Mapping[str, Role],
    changes: dict[str, Role | None] | None = None,
) -> Outcome:
    """``state`` after ``command``, told to ``audience``; ``changes`` to the members, if any
    (``state.members`` already has them)."""
    return Outcome(
        state=state,
        state_changed=True,
        sequenced=[command],
        fanout=_to_all(command, audience),
        member_changes=changes or {},
    )


def _rename(state: ConversationState, command: ConversationRenamed, requester: str) -> Outcome:
    if (refused := _managed(state, command, requester)) is not None:
        return refused
    return _changed(replace(state, name=command.payload.name), command, state.members)


def _add_member(
    state: ConversationState,
    command: ConversationMemberAdded,
    requester: str,
    max_members: int,
    known: Callable[[str], bool] | None,
) -> Outcome:
    if (refused := _managed(state, command, requester)) is not None:
        return refused
    user = command.payload.user_id
    if user in state.members:
        return _reject(command, requester, RejectReason.ALREADY_A_MEMBER)
    if len(state.members) >= max_members:
        return _reject(command, requester, RejectReason.GROUP_FULL)
    if known is not None and not known(user):
        return _reject(command, requester, RejectReason.UNKNOWN_USER)
    role = command.payload.role
    if role is Role.OWNER or (
        role is Role.ADMIN and state.members.get(requester) is not Role.OWNER
    ):
        return _reject(command, requester, RejectReason.NOT_ALLOWED)
    changes: dict[str, Role | None] = {user: role}
    members = MemberChanges(state.members, changes)
    # The new member has seen neither the creation nor any rename: the event tells the name,
    # and the seq the member starts reading from.
    named = command.model_copy(
        update={
            "payload": command.payload.model_copy(
                update={"name": state.name, "last_seq": state.last_seq}
            )
        }
    )
    return _changed(replace(state, members=members), named, members, changes)


def _remove_member(
    state: ConversationState, command: ConversationMemberRemoved, requester: str
) -> Outcome:
    if (refused := _managed(state, command, requester)) is not None:
        return refused
    user = command.payload.user_id
    target_role = state.members.get(user)
    if target_role is None:
        return _reject(command, requester, RejectReason.NOT_A_MEMBER)
    # The owner is never removed; admins are removed by the owner only.
    if target_role is Role.OWNER or (
        target_role is Role.ADMIN and state.members.get(requester) is not Role.OWNER
    ):
        return _reject(command, requester, RejectReason.NOT_ALLOWED)
    changes: dict[str, Role | None] = {user: None}
    members = MemberChanges(state.members, changes)
    return _changed(
        replace(state, members=members), _until_now(state, command), state.members, changes
    )


def _change_role(
    state: ConversationState, command: ConversationMemberRoleChanged, requester: str
) -> Outcome:
    if state.kind is ConversationKind.DIRECT:
        return _reject(command, requester, RejectReason.NOT_FOR_DIRECT)
    if requester and state.members.get(requester) is not Role.OWNER:
        return _reject(command, requester, RejectReason.NOT_ALLOWED)
    user, role = command.payload.user_id, command.payload.role
    if user not in state.members:
        return _reject(command, requester, RejectReason.NOT_A_MEMBER)
    changes: dict[str, Role | None] = {}
    owner = state.owner
    if role is Role.OWNER:
        # Handing over: the new owner takes the role, the old owner becomes an admin.
        if state.owner is not None and state.owner != user:
            changes[state.owner] = Role.ADMIN
        owner = user
    elif state.members[user] is Role.OWNER:
        return _reject(command, requester, RejectReason.OWNER_MUST_HAND_OVER)
    changes[user] = role
    members = MemberChanges(state.members, changes)
    return _changed(replace(state, members=members, owner=owner), command, members, changes)


def _leave(state: ConversationState, command: ConversationLeft, requester: str) -> Outcome:
    user = command.payload.user_id
    if requester and user != requester:
        return _reject(command, requester, RejectReason.NOT_ALLOWED)
    if state.kind is ConversationKind.DIRECT:
        return _reject(command, requester, RejectReason.NOT_FOR_DIRECT)
    if state.members.get(user) is Role.OWNER and len(state.members) > 1:
        return _reject(command, requester, RejectReason.OWNER_MUST_HAND_OVER)
    changes: dict[str, Role | None] = {user: None}
    members = MemberChanges(state.members, changes)
    deleted = not members
    return _changed(
        replace(state, members=members, deleted=deleted),
        _until_now(state, command),
        state.members,
        changes,
    )


def _until_now(
    state: ConversationState, command: ConversationMemberRemoved | ConversationLeft
) -> Event:
    """The departure stamped with the conversation's last seq: the former member reads the
    history up to it, and nothing after it (docs/storage.md, "Read access")."""
    return command.model_copy(
        update={"payload": command.payload.model_copy(update={"last_seq": state.last_seq})}
    )


def _delete(state: ConversationState, command: ConversationDeleted, requester: str) -> Outcome:
    if state.kind is ConversationKind.DIRECT:
        return _reject(command, requester, RejectReason.NOT_FOR_DIRECT)
    if requester and state.members.get(requester) is not Role.OWNER:
        return _reject(command, requester, RejectReason.NOT_ALLOWED)
    return _changed(replace(state, deleted=True), command, state.members)
