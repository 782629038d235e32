"""Large groups' live delivery: ``im.delivery.groups`` read in full, handed to member devices here.

A group above the large-group threshold is read-diffused (docs/streams.md, "Large groups"): the
conversation processor writes each of its events once, keyed by conversation, instead of once per
member. Every ingress node reads every partition of that topic (from the end, without a group or
commits, like live delivery) and hands each event to the devices it holds of the group's members.

Which local users are members of which large group (:class:`GroupIndex`) comes from two ordered
sources, never from a request:

* the answer to a device's connect (a ``LiveDelivery`` with ``groups``, written by the user
  processor in order with the user's own membership changes): the user's large groups, each with
  the conversation position of the last event the user got from it;
* the group events themselves, in each conversation's order: a member added, removed or leaving,
  the group deleted, and the member list on the switch to read diffusion.

A user's membership of a group is kept with the position it is known from. An event at position
``q`` reaches a user who is a member known from a position before ``q``; an older connect answer
never overrides a newer event. So a device gets no event of a group from before the user joined
or after the user left (a node that reads the topic late delivers late, in order, not wrongly);
events it does not get live — a connect racing a message, a full outbound queue, a node restart —
it reads from the conversation's history (docs/protocol.md, "Large groups").

Bounds: entries exist only for users connected here (dropped at their last disconnect), at most
``MAX_LARGE_GROUPS_PER_USER`` from a connect answer, and the per-connection outbound queue caps
what a slow device holds. A poison record is logged, counted and skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Message
from prometheus_client import CollectorRegistry, Counter

from ingress.live import TopicReader
from ingress.wsprotocol import text_frame
from schemas.events import (
    MAX_LARGE_GROUPS_PER_USER,
    ConversationDeleted,
    ConversationLeft,
    ConversationMemberAdded,
    ConversationMemberRemoved,
    parse_group_delivery,
)
from schemas.frames import EventFrame

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GroupFrame:
    """One group event as read: what the index needs, and the ``event`` frame, encoded."""

    tenant_id: str
    conversation_id: str
    position: int
    ephemeral: bool
    large: bool
    synced: frozenset[str]
    #: The member list on the switch to read diffusion.
    members: tuple[str, ...] | None
    #: The members the event adds (True) or removes (False).
    joins: tuple[tuple[str, bool], ...]
    deleted: bool
    #: Who caused it (typing is not echoed to its typist).
    actor: str | None
    #: The ``event`` frame, framed for the wire once for every socket it goes to.
    wire: bytes


@dataclass(slots=True)
class _Membership:
    member: bool
    #: The conversation position this is known from.
    position: int


class GroupIndex:
    """The large groups of the users connected to this node, and their members here."""

    def __init__(self) -> None:
        #: (tenant, conversation) → user → membership
        self._groups: dict[tuple[str, str], dict[str, _Membership]] = {}
        #: (tenant, user) → conversations with an entry for the user
        self._users: dict[tuple[str, str], set[str]] = {}
        #: Entries not made: the user already had ``MAX_LARGE_GROUPS_PER_USER`` here.
        self.refused = 0

    def __len__(self) -> int:
        """Entries held (one per connected user and group)."""
        return sum(len(users) for users in self._groups.values())

    def groups_of(self, tenant_id: str, user_id: str) -> dict[str, int]:
        """The groups the user is a member of here, with the position known from (for tests)."""
        found = {}
        for conversation_id in self._users.get((tenant_id, user_id), ()):
            entry = self._groups[(tenant_id, conversation_id)][user_id]
            if entry.member:
                found[conversation_id] = entry.position
        return found

    def snapshot(self, tenant_id: str, user_id: str, groups: dict[str, int]) -> None:
        """A connect's answer: the user is a member of ``groups`` from those positions on."""
        for conversation_id, position in groups.items():
            self._set(tenant_id, conversation_id, user_id, member=True, position=position)

    def forget(self, tenant_id: str, user_id: str) -> None:
        """The user's last device here is gone."""
        for conversation_id in self._users.pop((tenant_id, user_id), ()):
            users = self._groups.get((tenant_id, conversation_id))
            if users is not None:
                users.pop(user_id, None)
                if not users:
                    del self._groups[(tenant_id, conversation_id)]

    def apply(self, frame: GroupFrame, connected: Callable[[str], bool]) -> list[str]:
        """Apply a group event's membership changes for the users ``connected`` here, and return
        the users to hand the event to."""
        key = (frame.tenant_id, frame.conversation_id)
        if frame.deleted or not frame.large:
            # The group is gone or back to write diffusion: its members' queues take over.
            users = self._groups.pop(key, {})
            for user_id in users:
                groups = self._users.get((frame.tenant_id, user_id))
                if groups is not None:
                    groups.discard(frame.conversation_id)
                    if not groups:
                        del self._users[(frame.tenant_id, user_id)]
            return self._audience(users, frame) if frame.deleted else []
        if frame.members is not None:
            for user_id in frame.members:
                if connected(user_id):
                    self._set(*key, user_id, member=True, position=frame.position)
            return []  # the switch reaches every member through their own queues
        for user_id, joined in frame.joins:
            if connected(user_id):
                self._set(*key, user_id, member=joined, position=frame.position)
        return self._audience(self._groups.get(key, {}), frame)

    def _audience(self, users: dict[str, _Membership], frame: GroupFrame) -> list[str]:
        if frame.ephemeral:
            return [u for u, entry in users.items() if entry.member and u != frame.actor]
        return [
            user_id
            for user_id, entry in users.items()
            if entry.member and entry.position < frame.position and user_id not in frame.synced
        ]

    def _set(
        self, tenant_id: str, conversation_id: str, user_id: str, *, member: bool, position: int
    ) -> None:
        users = self._groups.get((tenant_id, conversation_id), {})
        entry = users.get(user_id)
        if entry is None:
            groups = self._users.setdefault((tenant_id, user_id), set())
            if len(groups) >= MAX_LARGE_GROUPS_PER_USER:
                # Bounded like a connect's answer: further groups are read from history.
                self.refused += 1
                return
            groups.add(conversation_id)
            self._groups.setdefault((tenant_id, conversation_id), users)[user_id] = _Membership(
                member, position
            )
        elif member and entry.member:
            # Both say member: the earlier position is the more precise one.
            entry.position = min(entry.position, position)
        elif position >= entry.position:
            entry.member, entry.position = member, position


class GroupMetrics:
    """What happens to group-delivery records (registered in the ingress's registry)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.records = Counter(
            "imstream_ingress_group_records",
            "Group-delivery records read, by outcome: delivered (to at least one socket), "
            "none-here (no member device is connected here), poison.",
            ["outcome"],
            registry=registry,
        )


class GroupDeliveryConsumer(TopicReader[GroupFrame]):
    """Reads every partition of the group-delivery topic and hands frames to ``deliver``."""

    def __init__(
        self,
        config: dict[str, Any],
        *,
        topic: str,
        node_id: str,
        deliver: Callable[[Sequence[GroupFrame]], None],
        metrics: GroupMetrics,
    ) -> None:
        super().__init__(config, topic=topic, node_id=node_id, name="groups", deliver=deliver)
        self._metrics = metrics

    def _partitions(self, partitions: int) -> list[int]:
        return list(range(partitions))

    def _frame(self, message: Message) -> GroupFrame | None:
        try:
            return group_frame(message.value() or b"")
        except Exception as error:  # a poison record must never stop delivery
            self._metrics.records.labels("poison").inc()
            _log.warning(
                "group delivery: skipped poison record at %s[%s]@%s: %s",
                message.topic(),
                message.partition(),
                message.offset(),
                error,
            )
            return None


def group_frame(raw: bytes) -> GroupFrame:
    """A group-delivery record as the index and the sockets take it; raises ``SchemaError``."""
    record = parse_group_delivery(raw)
    event = record.event
    joins: Iterable[tuple[str, bool]] = ()
    match event:
        case ConversationMemberAdded():
            joins = ((event.payload.user_id, True),)
        case ConversationMemberRemoved() | ConversationLeft():
            joins = ((event.payload.user_id, False),)
    return GroupFrame(
        tenant_id=record.tenant_id,
        conversation_id=record.conversation_id,
        position=record.position,
        ephemeral=record.ephemeral,
        large=record.large,
        synced=frozenset(record.synced),
        members=tuple(record.members) if record.members is not None else None,
        joins=tuple(joins),
        deleted=isinstance(event, ConversationDeleted),
        actor=event.actor.user_id if event.actor is not None else None,
        wire=text_frame(EventFrame(sync_id=None, event=event).model_dump_json()),
    )
