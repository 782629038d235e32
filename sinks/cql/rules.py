"""The CQL sink's write rules: one decoded record → the CQL writes that store it.

Every write states its own timestamp (``USING TIMESTAMP``) taken from the event's order, never
from the wall clock. Writing a cell again with the same timestamp changes nothing, and a cell
written with a lower timestamp than the one stored loses, so a replay of any range, in any
order, leaves every table as a single pass does. One timestamp domain per table (mixing domains
in one table would let an unrelated number win):

=====================  =============================================================
table                  ``USING TIMESTAMP``
=====================  =============================================================
timeline               the entry's ``conversation_seq``; a recall/edit's update of the
                       message's row: the recall's/edit's own seq (a later edit wins)
messages_by_id         the message's seq
read_positions         the read seq (the highest read wins; an older one never moves it back)
conversations, members the event's ``occurred_at`` in microseconds
devices                the event's ``occurred_at`` in microseconds
former_members         the event's ``occurred_at`` in microseconds (the ``members`` domain)
command_outcomes       the event's ``occurred_at`` in microseconds
recalled_messages      the recall's seq
sync_queue, sync_heads the record's ``sync_id`` (the head: the highest wins)
user_conversations     the record's ``sync_id``
=====================  =============================================================

A few rules need the table's current content: applying a recall or an edit to the message's
row (its seq: ``messages_by_id``, cached; for a recall, the message's event, stored again without
its body), the previous owner of a group when ownership is handed
over, whether the last member left, whether a removed push token is still the device's token,
the user's last message when it is recalled or edited, and the user's conversations when every
badge is cleared. Those reads go through :class:`Reads`, whose implementation first completes
every write planned before (the sink processes each partition in order), so they see the
tables as a single in-order pass would. They only ever decide *whether* to write; the write
still carries the event's timestamp, so re-applying them later cannot undo newer state.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from cassandra import ConsistencyLevel
from cassandra.cluster import Session
from cassandra.query import UNSET_VALUE, BoundStatement, PreparedStatement
from pydantic_core import from_json, to_json

from schemas.events import (
    CommandRejected,
    ConversationAdvanced,
    ConversationCreated,
    ConversationDeleted,
    ConversationKind,
    ConversationLeft,
    ConversationMemberAdded,
    ConversationMemberRemoved,
    ConversationMemberRoleChanged,
    ConversationRenamed,
    Event,
    MediaBody,
    MessageBody,
    MessageEdited,
    MessageRecalled,
    MessageSent,
    PushTokenRegistered,
    PushTokenRemoved,
    ReceiptRead,
    Role,
    SyncRecord,
    TextBody,
    WithheldBody,
    encode_event,
    parse_event,
)
from sinks.cql.crypto import (
    KeyRing,
    device_context,
    preview_context,
    seal_event,
    seal_text,
    sync_context,
    timeline_context,
)

log = logging.getLogger(__name__)

PREVIEW_CHARS = 100
MEDIA_PREVIEW = "[media]"
CUSTOM_PREVIEW = "[custom]"
RECALLED_PREVIEW = "[recalled]"
#: Message positions (message id → conversation, seq) remembered for recalls and edits.
MESSAGE_CACHE_SIZE = 100_000
#: The events that take read access away (docs/storage.md, "Read access"): their facts are
#: written at ``ACCESS_CONSISTENCY`` before anything after them, and their command's outcome is
#: recorded for the ingress that waits to answer it.
ACCESS_EVENT_TYPES = frozenset(
    {
        "conversation.member_removed",
        "conversation.left",
        "conversation.deleted",
        "message.recalled",
    }
)
#: A quorum of the local data centre's replicas: a fact written so is seen by every read made
#: so, whichever replicas answer.
ACCESS_CONSISTENCY = ConsistencyLevel.LOCAL_QUORUM
#: How long a command's outcome is kept: its ingress waits seconds for it.
OUTCOME_TTL_SECONDS = 24 * 3600
APPLIED = "applied"
REJECTED = "rejected"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def micros(moment: datetime) -> int:
    """``moment`` as microseconds since the epoch (exact: no float on the way)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(microseconds=1)


def preview(body: MessageBody) -> str:
    """What a conversation list shows of a message."""
    if isinstance(body, TextBody):
        return body.text[:PREVIEW_CHARS]
    if isinstance(body, MediaBody):
        return MEDIA_PREVIEW
    if isinstance(body, WithheldBody):
        return RECALLED_PREVIEW
    return CUSTOM_PREVIEW


def withheld(event: Event) -> Event:
    """``event`` without the body it carries (a message or an edit), else ``event`` itself."""
    if isinstance(event, MessageSent | MessageEdited) and not isinstance(
        event.payload.body, WithheldBody
    ):
        return event.model_copy(
            update={"payload": event.payload.model_copy(update={"body": WithheldBody()})}
        )
    return event


def creation_role(event: ConversationCreated, user_id: str) -> Role:
    """The role ``user_id`` gets when ``event`` creates the conversation — the conversation
    processor's rule (``streams.conversations._create``): direct conversations have members only;
    a group's owner is ``owner_id``, else the creator, else the first member."""
    payload = event.payload
    if payload.kind is ConversationKind.DIRECT:
        return Role.MEMBER
    owner = payload.owner_id or (event.actor.user_id if event.actor else "") or payload.members[0]
    return Role.OWNER if user_id == owner else Role.MEMBER


@dataclass(frozen=True, slots=True)
class MemberRow:
    user_id: str
    role: str | None


@dataclass(frozen=True, slots=True)
class UserConversationRow:
    conversation_id: str
    role: str | None
    last_seq: int | None
    last_message_id: str | None


class Reads(Protocol):
    """Reads the rules need; implementations complete the pending writes first."""

    def message_position(self, tenant_id: str, message_id: str) -> tuple[str, int] | None: ...

    def members(self, tenant_id: str, conversation_id: str) -> list[MemberRow]: ...

    def user_conversations(
        self, tenant_id: str, user_id: str, conversation_id: str | None
    ) -> list[UserConversationRow]: ...

    def device_token(self, tenant_id: str, user_id: str, device_id: str) -> str | None: ...

    def timeline_event(self, tenant_id: str, conversation_id: str, seq: int) -> str | None: ...


@dataclass(frozen=True, slots=True)
class LatestWins:
    """A statement that writes the same cells every time (none left unset): of two of its writes
    to the same row, the one with the higher ``USING TIMESTAMP`` leaves the row as both would.
    The positions of its timestamp and of its primary key among the bound values."""

    timestamp: int
    key: tuple[int, ...]


def moot(
    writes: Sequence[BoundStatement], latest_wins: Mapping[PreparedStatement, LatestWins]
) -> dict[int, int]:
    """The writes of ``writes`` that a later one to the same row makes moot (a lower timestamp,
    the same cells): their index → the index of the write that wins. Sending only the winners
    leaves the tables as sending all would (a tie in timestamps keeps every write of the tie)."""
    rows: dict[tuple[Any, ...], list[tuple[int, int]]] = {}
    for index, bound in enumerate(writes):
        rule = latest_wins.get(bound.prepared_statement)
        if rule is None:
            continue
        values = bound.values
        row = (id(bound.prepared_statement), *(values[i] for i in rule.key))
        stamp = int.from_bytes(values[rule.timestamp], "big", signed=True)
        rows.setdefault(row, []).append((stamp, index))
    mooted: dict[int, int] = {}
    for entries in rows.values():
        if len(entries) < 2:
            continue
        highest = max(stamp for stamp, _ in entries)
        winner = next(index for stamp, index in entries if stamp == highest)
        mooted.update((index, winner) for stamp, index in entries if stamp < highest)
    return mooted


class Statements:
    """Every statement of the sink, prepared once against ``keyspace``."""

    def __init__(self, session: Session, keyspace: str) -> None:
        def prepare(text: str) -> PreparedStatement:
            return session.prepare(text.replace("{ks}", keyspace))

        uc_where = "WHERE tenant_id = ? AND user_id = ? AND conversation_id = ?"
        self.timeline_entry = prepare(
            "INSERT INTO {ks}.timeline (tenant_id, conversation_id, bucket, seq, entry_type, "
            "event_id, message_id, sender_id, occurred_at, event) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
        )
        self.timeline_recalled = prepare(
            "UPDATE {ks}.timeline USING TIMESTAMP ? SET recalled = true, recalled_seq = ? "
            "WHERE tenant_id = ? AND conversation_id = ? AND bucket = ? AND seq = ?"
        )
        self.timeline_withheld = prepare(
            "UPDATE {ks}.timeline USING TIMESTAMP ? SET event = ?, edited_event = null "
            "WHERE tenant_id = ? AND conversation_id = ? AND bucket = ? AND seq = ?"
        )
        self.select_timeline_event = prepare(
            "SELECT event FROM {ks}.timeline "
            "WHERE tenant_id = ? AND conversation_id = ? AND bucket = ? AND seq = ?"
        )
        self.recalled_message = prepare(
            "INSERT INTO {ks}.recalled_messages (tenant_id, conversation_id, message_id, "
            "recall_seq) VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
        )
        self.former_member = prepare(
            "INSERT INTO {ks}.former_members (tenant_id, conversation_id, user_id, until_seq) "
            "VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
        )
        self.command_outcome = prepare(
            "INSERT INTO {ks}.command_outcomes (tenant_id, command_event_id, outcome) "
            "VALUES (?, ?, ?) USING TTL ? AND TIMESTAMP ?"
        )
        self.timeline_edited = prepare(
            "UPDATE {ks}.timeline USING TIMESTAMP ? SET edited_event = ?, edited_seq = ? "
            "WHERE tenant_id = ? AND conversation_id = ? AND bucket = ? AND seq = ?"
        )
        self.message = prepare(
            "INSERT INTO {ks}.messages_by_id (tenant_id, message_id, conversation_id, seq, "
            "sender_id) VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?"
        )
        self.select_message = prepare(
            "SELECT conversation_id, seq FROM {ks}.messages_by_id "
            "WHERE tenant_id = ? AND message_id = ?"
        )
        self.conversation_created = prepare(
            "INSERT INTO {ks}.conversations (tenant_id, conversation_id, kind, name, created_at, "
            "created_by, deleted) VALUES (?, ?, ?, ?, ?, ?, false) USING TIMESTAMP ?"
        )
        self.conversation_renamed = prepare(
            "UPDATE {ks}.conversations USING TIMESTAMP ? SET name = ? "
            "WHERE tenant_id = ? AND conversation_id = ?"
        )
        self.conversation_deleted = prepare(
            "UPDATE {ks}.conversations USING TIMESTAMP ? SET deleted = true "
            "WHERE tenant_id = ? AND conversation_id = ?"
        )
        self.member = prepare(
            "INSERT INTO {ks}.members (tenant_id, conversation_id, user_id, role, joined_at) "
            "VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?"
        )
        self.member_role = prepare(
            "UPDATE {ks}.members USING TIMESTAMP ? SET role = ? "
            "WHERE tenant_id = ? AND conversation_id = ? AND user_id = ?"
        )
        self.member_gone = prepare(
            "DELETE FROM {ks}.members USING TIMESTAMP ? "
            "WHERE tenant_id = ? AND conversation_id = ? AND user_id = ?"
        )
        self.select_members = prepare(
            "SELECT user_id, role FROM {ks}.members WHERE tenant_id = ? AND conversation_id = ?"
        )
        self.read_position = prepare(
            "UPDATE {ks}.read_positions USING TIMESTAMP ? SET read_seq = ?, read_at = ? "
            "WHERE tenant_id = ? AND conversation_id = ? AND user_id = ?"
        )
        self.sync_entry = prepare(
            "INSERT INTO {ks}.sync_queue (tenant_id, user_id, bucket, sync_id, event_type, "
            "event_id, conversation_id, event) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "USING TTL ? AND TIMESTAMP ?"
        )
        self.sync_head = prepare(
            "UPDATE {ks}.sync_heads USING TIMESTAMP ? SET last_sync_id = ? "
            "WHERE tenant_id = ? AND user_id = ?"
        )
        self.uc_summary = prepare(
            "UPDATE {ks}.user_conversations USING TIMESTAMP ? SET last_seq = ?, read_seq = ?, "
            f"unread = ?, muted = ?, muted_until = ?, large = ?, updated_at = ? {uc_where}"
        )
        self.uc_last_message = prepare(
            "UPDATE {ks}.user_conversations USING TIMESTAMP ? SET last_message_id = ?, "
            f"last_sender_id = ?, last_activity_at = ?, last_preview = ? {uc_where}"
        )
        self.uc_message = prepare(
            "UPDATE {ks}.user_conversations USING TIMESTAMP ? SET last_seq = ?, read_seq = ?, "
            "unread = ?, muted = ?, muted_until = ?, large = ?, updated_at = ?, "
            "last_message_id = ?, last_sender_id = ?, last_activity_at = ?, last_preview = ? "
            f"{uc_where}"
        )
        self.uc_joined = prepare(
            "UPDATE {ks}.user_conversations USING TIMESTAMP ? SET kind = ?, name = ?, role = ?, "
            f"member = true, last_activity_at = ? {uc_where}"
        )
        self.uc_name = prepare(
            f"UPDATE {{ks}}.user_conversations USING TIMESTAMP ? SET name = ? {uc_where}"
        )
        self.uc_role = prepare(
            f"UPDATE {{ks}}.user_conversations USING TIMESTAMP ? SET role = ? {uc_where}"
        )
        self.uc_not_member = prepare(
            f"UPDATE {{ks}}.user_conversations USING TIMESTAMP ? SET member = false {uc_where}"
        )
        self.uc_preview = prepare(
            f"UPDATE {{ks}}.user_conversations USING TIMESTAMP ? SET last_preview = ? {uc_where}"
        )
        self.uc_all_read = prepare(
            "UPDATE {ks}.user_conversations USING TIMESTAMP ? SET read_seq = ?, unread = 0 "
            f"{uc_where}"
        )
        self.select_uc = prepare(
            "SELECT conversation_id, role, last_seq, last_message_id "
            f"FROM {{ks}}.user_conversations {uc_where}"
        )
        self.select_uc_all = prepare(
            "SELECT conversation_id, role, last_seq, last_message_id "
            "FROM {ks}.user_conversations WHERE tenant_id = ? AND user_id = ?"
        )
        self.device = prepare(
            "INSERT INTO {ks}.devices (tenant_id, user_id, device_id, provider, push_token, "
            "app_id, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
        )
        self.device_gone = prepare(
            "DELETE FROM {ks}.devices USING TIMESTAMP ? "
            "WHERE tenant_id = ? AND user_id = ? AND device_id = ?"
        )
        self.select_device = prepare(
            "SELECT push_token FROM {ks}.devices WHERE tenant_id = ? AND user_id = ? "
            "AND device_id = ?"
        )
        #: The statements that write read-access facts: executed before the other writes of
        #: the same batch, at ``ACCESS_CONSISTENCY`` (``CqlSink._flush``).
        self.access = frozenset(
            {
                self.timeline_recalled,
                self.timeline_withheld,
                self.recalled_message,
                self.former_member,
                self.member_gone,
                self.conversation_deleted,
            }
        )
        #: The statements written and read at ``ACCESS_CONSISTENCY``.
        self.quorum = self.access | {self.command_outcome}
        #: The statements of which a batch sends only the latest write per row (``moot``): a
        #: user's head and conversation-list summary, a reader's position, written once per
        #: message by every busy conversation.
        self.latest_wins = {
            self.sync_head: LatestWins(timestamp=0, key=(2, 3)),
            self.uc_summary: LatestWins(timestamp=0, key=(8, 9, 10)),
            self.uc_last_message: LatestWins(timestamp=0, key=(5, 6, 7)),
            self.uc_message: LatestWins(timestamp=0, key=(12, 13, 14)),
            self.read_position: LatestWins(timestamp=0, key=(3, 4, 5)),
        }


def _or_unset(value: Any) -> Any:
    """``None`` as "leave the column alone" rather than a null (which would write a tombstone)."""
    return UNSET_VALUE if value is None else value


class WritePlanner:
    """Turns decoded records into bound statements (see the module docstring for the rules)."""

    def __init__(
        self,
        statements: Statements,
        reads: Reads,
        *,
        timeline_bucket_size: int,
        sync_bucket_size: int,
        sync_ttl_seconds: int,
        keys: KeyRing | None = None,
    ) -> None:
        """With ``keys``, bodies, previews and push tokens are sealed with the tenant's data
        key (``sinks/cql/crypto.py``); without, they are written in clear."""
        self.s = statements
        self.reads = reads
        self.keys = keys
        self.timeline_bucket_size = timeline_bucket_size
        self.sync_bucket_size = sync_bucket_size
        self.sync_ttl_seconds = sync_ttl_seconds
        self._positions: OrderedDict[tuple[str, str], tuple[str, int]] = OrderedDict()
        #: Updates skipped because their target is unknown (a recall of a message never stored).
        self.skipped = 0

    # -- the conversation log (im.messages.sequenced) --

    def sequenced(self, event: Event, raw: bytes) -> list[BoundStatement]:
        match event:
            case MessageSent() | MessageRecalled() | MessageEdited():
                return self._timeline(event, raw.decode())
            case ConversationCreated():
                return self._created(event)
            case ConversationRenamed():
                return [
                    self.s.conversation_renamed.bind(
                        (
                            micros(event.occurred_at),
                            event.payload.name,
                            event.tenant_id,
                            event.payload.conversation_id,
                        )
                    )
                ]
            case ConversationMemberAdded():
                added = event.payload
                return [
                    self.s.member.bind(
                        (
                            event.tenant_id,
                            added.conversation_id,
                            added.user_id,
                            added.role.value,
                            event.occurred_at,
                            micros(event.occurred_at),
                        )
                    )
                ]
            case ConversationMemberRoleChanged():
                return self._role_changed(event)
            case ConversationMemberRemoved() | ConversationLeft():
                return self._member_gone(event)
            case ConversationDeleted():
                return [
                    self._deleted(event.tenant_id, event.payload.conversation_id, event),
                    self._outcome(event.tenant_id, event.event_id, APPLIED, event),
                ]
            case ReceiptRead():
                read = event.payload
                return [
                    self.s.read_position.bind(
                        (
                            read.conversation_seq,
                            read.conversation_seq,
                            event.occurred_at,
                            event.tenant_id,
                            read.conversation_id,
                            event.actor.user_id,
                        )
                    )
                ]
        return []

    def _timeline(
        self, event: MessageSent | MessageRecalled | MessageEdited, raw: str
    ) -> list[BoundStatement]:
        tenant, conversation = event.tenant_id, event.payload.conversation_id
        seq = event.payload.conversation_seq
        if seq is None:  # the sink refuses these before planning
            raise ValueError(f"{event.type} {event.event_id} has no conversation_seq")
        message_id = event.event_id if isinstance(event, MessageSent) else event.payload.message_id
        writes = [
            self.s.timeline_entry.bind(
                (
                    tenant,
                    conversation,
                    seq // self.timeline_bucket_size,
                    seq,
                    event.type,
                    event.event_id,
                    message_id,
                    event.actor.user_id,
                    event.occurred_at,
                    self._seal_event(
                        timeline_context(tenant, conversation, seq, "event"), tenant, raw
                    ),
                    seq,
                )
            )
        ]
        if isinstance(event, MessageSent):
            self._remember(tenant, event.event_id, conversation, seq)
            writes.append(
                self.s.message.bind(
                    (tenant, event.event_id, conversation, seq, event.actor.user_id, seq)
                )
            )
            return writes
        if isinstance(event, MessageRecalled):
            # Whether or not the message's row is found: every read withholds its body from now.
            writes.append(
                self.s.recalled_message.bind((tenant, conversation, message_id, seq, seq))
            )
            writes.append(self._outcome(tenant, event.event_id, APPLIED, event))
        position = self._position(tenant, message_id)
        if position is None or position[0] != conversation:
            self.skipped += 1
            log.warning(
                "%s %s (seq %d of %s/%s) refers to message %s, which is not stored%s; its "
                "timeline row is written, the message's row is not updated",
                event.type,
                event.event_id,
                seq,
                tenant,
                conversation,
                message_id,
                "" if position is None else f" in this conversation (it is in {position[0]})",
            )
            return writes
        target_seq = position[1]
        where = (tenant, conversation, target_seq // self.timeline_bucket_size, target_seq)
        if isinstance(event, MessageRecalled):
            writes.append(self.s.timeline_recalled.bind((seq, seq, *where)))
            original = self.reads.timeline_event(tenant, conversation, target_seq)
            if original is not None:
                # The stored body goes for good: the row keeps the message without it (the
                # recall's timestamp wins over the message's, replayed or not), and the edit.
                redacted = encode_event(withheld(parse_event(original))).decode()
                writes.append(self.s.timeline_withheld.bind((seq, redacted, *where)))
        else:
            context = timeline_context(tenant, conversation, target_seq, "edited_event")
            sealed = self._seal_event(context, tenant, raw)
            writes.append(self.s.timeline_edited.bind((seq, sealed, seq, *where)))
        return writes

    def _seal_event(self, context: str, tenant_id: str, event_json: str) -> str:
        if self.keys is None:
            return event_json
        return seal_event(self.keys.current(tenant_id), context, event_json)

    def _seal_text(self, context: str, tenant_id: str, text: str) -> str:
        if self.keys is None or not text:
            return text
        return seal_text(self.keys.current(tenant_id), context, text)

    def _remember(self, tenant_id: str, message_id: str, conversation_id: str, seq: int) -> None:
        key = (tenant_id, message_id)
        self._positions[key] = (conversation_id, seq)
        self._positions.move_to_end(key)
        while len(self._positions) > MESSAGE_CACHE_SIZE:
            self._positions.popitem(last=False)

    def _position(self, tenant_id: str, message_id: str) -> tuple[str, int] | None:
        cached = self._positions.get((tenant_id, message_id))
        if cached is not None:
            return cached
        found = self.reads.message_position(tenant_id, message_id)
        if found is not None:
            self._remember(tenant_id, message_id, *found)
        return found

    def _created(self, event: ConversationCreated) -> list[BoundStatement]:
        p = event.payload
        at = micros(event.occurred_at)
        writes = [
            self.s.conversation_created.bind(
                (
                    event.tenant_id,
                    p.conversation_id,
                    p.kind.value,
                    _or_unset(p.name),
                    event.occurred_at,
                    _or_unset(event.actor.user_id if event.actor else None),
                    at,
                )
            )
        ]
        writes.extend(
            self.s.member.bind(
                (
                    event.tenant_id,
                    p.conversation_id,
                    user,
                    creation_role(event, user).value,
                    event.occurred_at,
                    at,
                )
            )
            for user in p.members
        )
        return writes

    def _role_changed(self, event: ConversationMemberRoleChanged) -> list[BoundStatement]:
        p = event.payload
        at = micros(event.occurred_at)
        writes: list[BoundStatement] = []
        if p.role is Role.OWNER:
            # Handing over: the previous owner becomes an admin (streams.conversations).
            writes.extend(
                self.s.member_role.bind(
                    (at, Role.ADMIN.value, event.tenant_id, p.conversation_id, member.user_id)
                )
                for member in self.reads.members(event.tenant_id, p.conversation_id)
                if member.role == Role.OWNER.value and member.user_id != p.user_id
            )
        writes.append(
            self.s.member_role.bind(
                (at, p.role.value, event.tenant_id, p.conversation_id, p.user_id)
            )
        )
        return writes

    def _member_gone(
        self, event: ConversationMemberRemoved | ConversationLeft
    ) -> list[BoundStatement]:
        p = event.payload
        at = micros(event.occurred_at)
        writes = [
            self.s.member_gone.bind((at, event.tenant_id, p.conversation_id, p.user_id)),
            self._outcome(event.tenant_id, event.event_id, APPLIED, event),
        ]
        if p.last_seq is not None:
            # The former member reads the history up to the departure (events sequenced before
            # this version carry no seq: such a member reads nothing, as before).
            writes.append(
                self.s.former_member.bind(
                    (event.tenant_id, p.conversation_id, p.user_id, p.last_seq, at)
                )
            )
        if isinstance(event, ConversationLeft):
            # The last member leaving deletes the conversation (streams.conversations._leave).
            others = [
                member
                for member in self.reads.members(event.tenant_id, p.conversation_id)
                if member.user_id != p.user_id
            ]
            if not others:
                writes.append(self._deleted(event.tenant_id, p.conversation_id, event))
        return writes

    def _outcome(self, tenant_id: str, event_id: str, outcome: str, event: Event) -> BoundStatement:
        """The outcome of the command ``event_id``, for the ingress that waits to answer it."""
        return self.s.command_outcome.bind(
            (tenant_id, event_id, outcome, OUTCOME_TTL_SECONDS, micros(event.occurred_at))
        )

    def _deleted(self, tenant_id: str, conversation_id: str, event: Event) -> BoundStatement:
        return self.s.conversation_deleted.bind(
            (micros(event.occurred_at), tenant_id, conversation_id)
        )

    # -- the sync queues (im.sync.events) --

    def sync(self, record: SyncRecord, raw: bytes) -> list[BoundStatement]:
        tenant, user, sync_id = record.tenant_id, record.user_id, record.sync_id
        event = record.event
        conversation_id = listed_id = getattr(event.payload, "conversation_id", None)
        if record.conversation is not None:
            conversation_id = record.conversation.conversation_id
        event_json = to_json(from_json(raw)["event"]).decode()
        writes = [
            self.s.sync_entry.bind(
                (
                    tenant,
                    user,
                    sync_id // self.sync_bucket_size,
                    sync_id,
                    event.type,
                    event.event_id,
                    _or_unset(conversation_id),
                    self._seal_event(sync_context(tenant, user, sync_id), tenant, event_json),
                    self.sync_ttl_seconds,
                    sync_id,
                )
            ),
            self.s.sync_head.bind((sync_id, sync_id, tenant, user)),
        ]
        summary = record.conversation
        last = self._last_message(record)
        if summary is not None:
            cells = (
                summary.last_seq,
                summary.read_seq,
                summary.unread,
                summary.muted,
                summary.muted_until,
                summary.large,
                event.occurred_at,
            )
            row = (tenant, user, summary.conversation_id)
            if last is not None and summary.conversation_id == listed_id:
                # A message: the summary and the last message in one statement (one row).
                writes.append(self.s.uc_message.bind((sync_id, *cells, *last, *row)))
                last = None
            else:
                writes.append(self.s.uc_summary.bind((sync_id, *cells, *row)))
        if last is not None:
            writes.append(self.s.uc_last_message.bind((sync_id, *last, tenant, user, listed_id)))
        else:
            writes.extend(self._conversation_list(record))
        if isinstance(event, CommandRejected) and event.payload.command_type in ACCESS_EVENT_TYPES:
            # A refused remove, leave, delete or recall: its ingress answers at once.
            writes.append(self._outcome(tenant, event.payload.command_event_id, REJECTED, event))
        return writes

    def _conversation_list(self, record: SyncRecord) -> list[BoundStatement]:
        """The conversation-list cells the event itself changes, for the queue's user."""
        tenant, user, at = record.tenant_id, record.user_id, record.sync_id
        event = record.event
        conversation_id: str | None = getattr(event.payload, "conversation_id", None)
        if conversation_id is None:
            if event.type == "badge.cleared":
                # Every badge cleared: the summary is per conversation and absent here.
                return [
                    self.s.uc_all_read.bind(
                        (at, row.last_seq or 0, tenant, user, row.conversation_id)
                    )
                    for row in self.reads.user_conversations(tenant, user, None)
                ]
            return []
        key = (tenant, user, conversation_id)
        match event:
            case MessageRecalled() | MessageEdited():
                return self._list_preview(event, at, key)
            case ConversationCreated():
                created = event.payload
                role = creation_role(event, user).value
                return [
                    self.s.uc_joined.bind(
                        (
                            at,
                            created.kind.value,
                            _or_unset(created.name),
                            role,
                            event.occurred_at,
                            *key,
                        )
                    )
                ]
            case ConversationMemberAdded() if event.payload.user_id == user:
                added = event.payload
                # Only groups take new members; the sequencer put the group's name in.
                return [
                    self.s.uc_joined.bind(
                        (
                            at,
                            ConversationKind.GROUP.value,
                            _or_unset(added.name),
                            added.role.value,
                            event.occurred_at,
                            *key,
                        )
                    )
                ]
            case ConversationRenamed():
                return [self.s.uc_name.bind((at, event.payload.name, *key))]
            case ConversationMemberRoleChanged():
                return self._list_role(event, at, key)
            case ConversationMemberRemoved() | ConversationLeft() if event.payload.user_id == user:
                return [self.s.uc_not_member.bind((at, *key))]
            case ConversationDeleted():
                return [self.s.uc_not_member.bind((at, *key))]
        return []

    def _last_message(self, record: SyncRecord) -> tuple[Any, ...] | None:
        """The conversation-list cells a message sets for the queue's user (the message's id, its
        sender, its time, its preview), or None if the record is not a message."""
        event = record.event
        match event:
            case MessageSent():
                key = (record.tenant_id, record.user_id, event.payload.conversation_id)
                text = preview(event.payload.body)
                sealed = self._seal_text(preview_context(*key), record.tenant_id, text)
                return (event.event_id, event.actor.user_id, event.occurred_at, sealed)
            case ConversationAdvanced() if event.payload.entry_type == "message.sent":
                advanced = event.payload
                return (advanced.message_id, advanced.sender_id, event.occurred_at, "")
        return None

    def _list_preview(
        self, event: MessageRecalled | MessageEdited, at: int, key: tuple[str, str, str]
    ) -> list[BoundStatement]:
        """A recall or an edit changes the list's preview only if it is of the last message."""
        tenant, user, conversation_id = key
        rows = self.reads.user_conversations(tenant, user, conversation_id)
        if not rows or rows[0].last_message_id != event.payload.message_id:
            return []
        text = (
            RECALLED_PREVIEW if isinstance(event, MessageRecalled) else preview(event.payload.body)
        )
        sealed = self._seal_text(preview_context(*key), tenant, text)
        return [self.s.uc_preview.bind((at, sealed, *key))]

    def _list_role(
        self, event: ConversationMemberRoleChanged, at: int, key: tuple[str, str, str]
    ) -> list[BoundStatement]:
        """The user's role in the list: theirs changed, or they handed the ownership over."""
        tenant, user, conversation_id = key
        changed = event.payload
        if changed.user_id == user:
            return [self.s.uc_role.bind((at, changed.role.value, *key))]
        if changed.role is Role.OWNER:
            # Ownership handed over: if this user was the owner, now an admin.
            rows = self.reads.user_conversations(tenant, user, conversation_id)
            if rows and rows[0].role == Role.OWNER.value:
                return [self.s.uc_role.bind((at, Role.ADMIN.value, *key))]
        return []

    # -- devices (im.push.tokens) --

    def push_token(self, event: Event) -> list[BoundStatement]:
        if isinstance(event, PushTokenRemoved):
            removal = event.payload
            current = self.reads.device_token(event.tenant_id, removal.user_id, removal.device_id)
            if current is not None and current != removal.token:
                # The device registered a newer token since: the removal concerns the old one.
                return []
            return [
                self.s.device_gone.bind(
                    (micros(event.occurred_at), event.tenant_id, removal.user_id, removal.device_id)
                )
            ]
        if isinstance(event, PushTokenRegistered):
            registered = event.payload
            return [
                self.s.device.bind(
                    (
                        event.tenant_id,
                        registered.user_id,
                        registered.device_id,
                        registered.provider.value,
                        self._seal_text(
                            device_context(
                                event.tenant_id, registered.user_id, registered.device_id
                            ),
                            event.tenant_id,
                            registered.token,
                        ),
                        registered.app_id,
                        event.occurred_at,
                        micros(event.occurred_at),
                    )
                )
            ]
        return []
