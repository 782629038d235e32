"""The two stream processors as batch functions: input records + table state → outputs + writes.

Both follow docs/streams.md: decisions are pure (``streams.conversations``, ``streams.users``), so
the same state and batch always give the same outputs and writes. The runtime
(``streams.runtime``) commits a batch's outputs, its :class:`StateWrite` values (to the state
topics) and its input offsets in one Kafka transaction: exactly once for every input.

Defence in depth, should a duplicate ever reach them (a hand-made replay): each state value
records the input offset it has applied, so a re-delivered input is skipped; and every record
sent downstream carries the conversation's ``position``, so the user processor applies each
conversation's records to a user once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NamedTuple

import pydantic_core

from core.records import PROCESSING_FAILED, InputRecord, OutputRecord, StateWrite, dead_letter
from schemas.errors import SchemaError
from schemas.events import (
    DEFAULT_LOCALE,
    MAX_LARGE_GROUPS_PER_USER,
    SYSTEM_TENANT,
    BadgeCleared,
    ConversationAdvanced,
    ConversationAdvancedPayload,
    ConversationMuteChanged,
    ConversationSummary,
    DeviceConnected,
    DeviceDisconnected,
    Event,
    GroupDelivery,
    InboxRecord,
    LiveDelivery,
    MessageEdited,
    MessageRecalled,
    MessageSent,
    NodeLeaseRenewed,
    PushJob,
    Role,
    SyncRecord,
    derived_event_id,
    encode_event,
    encode_inbox,
    parse_event,
)
from schemas.topics import Topic, TopicCatalog, conversation_key, gateway_key, user_key
from streams.conversations import (
    ConversationState,
    Delivery,
    DeliveryKind,
    MessageRecord,
    Outcome,
    command_rejected,
    decide,
)
from streams.state import StateReader, child_key, split_child
from streams.users import (
    Appended,
    ConversationView,
    NodeLease,
    PushPolicy,
    UserOutcome,
    UserState,
    apply_delivery,
    apply_leases,
    apply_own_command,
    apply_presence,
    renew_lease,
)

log = logging.getLogger(__name__)

CONVERSATIONS_TABLE = "conversations"
MESSAGES_TABLE = "messages"
USERS_TABLE = "users"
#: The users each tenant knows (``im.users.known``, read in full by the conversation processor).
KNOWN_USERS_TABLE = "known_users"


@dataclass(slots=True)
class BatchResult:
    outputs: list[OutputRecord] = field(default_factory=list)
    writes: list[StateWrite] = field(default_factory=list)
    skipped: int = 0
    dead_lettered: int = 0


#: The dead-letter code of a record whose outputs Kafka refused for good although they were
#: under the record limit (e.g. a topic configured with a smaller ``max.message.bytes``).
OUTPUT_REFUSED = "output-refused"
#: The dead-letter code of a command with no actor: every command on the conversation inputs is
#: a user's (the ingress names the authenticated user), and without one no membership or role
#: rule could apply. No process writes actor-less commands there, so one is refused, not obeyed.
ACTOR_MISSING = "actor-missing"
#: Members per group-delivery record at a switch to read diffusion: 5,000 ids of at most 64
#: characters are about 340 KB, well under the record limit.
SWITCH_MEMBERS_PER_RECORD = 5_000
#: The dead-letter code of a record whose outputs or state would exceed the record limit
#: (``IM_STREAMS__MAX_RECORD_BYTES``): refused, so that the transaction can commit the rest.
OUTPUT_TOO_LARGE = "output-too-large"


def _process_each(
    catalog: TopicCatalog,
    batch: Sequence[InputRecord],
    state: StateReader,
    one: Callable[[InputRecord, _Overlay, BatchResult], None],
) -> BatchResult:
    """Apply ``one`` to each record; a record that raises is dead-lettered, the batch goes on."""
    result = BatchResult()
    overlay = _Overlay(state)
    for record in batch:
        outcome = BatchResult()
        try:
            one(record, overlay, outcome)
        except Exception as error:  # a record the rules cannot handle must not stop the stage
            log.exception("record %s[%d]@%d failed", record.topic, record.partition, record.offset)
            outcome = BatchResult(dead_lettered=1)
            source = catalog.by_name(record.topic)
            if source.dead_letter is not None:
                outcome.outputs.append(
                    dead_letter(catalog, source, record, PROCESSING_FAILED, repr(error))
                )
        result.outputs.extend(outcome.outputs)
        result.skipped += outcome.skipped
        result.dead_lettered += outcome.dead_lettered
    result.writes = overlay.writes()
    return result


class _BatchProcessor:
    """What both processors share: one record at a time, failures dead-lettered (``_one``)."""

    def __init__(self, catalog: TopicCatalog) -> None:
        self.catalog = catalog
        #: ``catalog.by_name`` without its walk over the catalog (once per record).
        self.topics = {topic.name: topic for topic in catalog}
        self._parsed: dict[int, Any] = {}

    def process(self, batch: Sequence[InputRecord], state: StateReader) -> BatchResult:
        # Each record parsed once, up front: the state keys the batch will read are then
        # fetched together (``StateReader.prefetch``) before any rule runs.
        self._parsed = {id(record): self._parse(record) for record in batch}
        try:
            state.prefetch(self._keys(self._parsed.values()))
            return _process_each(self.catalog, batch, state, self._one)
        finally:
            self._parsed = {}

    def _parsed_input(self, record: InputRecord) -> Any:
        """``record`` as ``_parse`` gave it for this batch."""
        parsed = self._parsed.get(id(record), _UNPARSED)
        return self._parse(record) if parsed is _UNPARSED else parsed

    def _parse(self, record: InputRecord) -> Any:
        raise NotImplementedError

    def _keys(self, parsed: Iterable[Any]) -> dict[str, list[str]]:
        return {}

    def _one(self, record: InputRecord, overlay: _Overlay, result: BatchResult) -> None:
        raise NotImplementedError


_UNPARSED = object()


class _Overlay:
    """Table values as they stand within a batch: later inputs see earlier inputs' writes."""

    def __init__(self, state: StateReader) -> None:
        self._state = state
        self._pending: dict[tuple[str, str], tuple[dict[str, Any] | None, int]] = {}
        #: ``(table, parent) → child → present``, for children written within the batch.
        self._children: dict[tuple[str, str], dict[str, bool]] = {}

    def get(self, table: str, key: str) -> dict[str, Any] | None:
        if (table, key) in self._pending:
            return self._pending[(table, key)][0]
        return self._state.get(table, key)

    def children(self, table: str, parent: str) -> list[str]:
        changed = self._children.get((table, parent))
        stored = self._state.children(table, parent)
        if not changed:
            return stored
        kept = [child for child in stored if changed.get(child, True)]
        known = set(stored)
        added = [child for child, present in changed.items() if present and child not in known]
        return kept + added

    def put(self, table: str, key: str, value: dict[str, Any] | None, partition: int) -> None:
        self._pending[(table, key)] = (value, partition)
        split = split_child(key)
        if split is not None:
            self._children.setdefault((table, split[0]), {})[split[1]] = value is not None

    def writes(self) -> list[StateWrite]:
        return [
            StateWrite(table=table, key=key, value=value, partition=partition)
            for (table, key), (value, partition) in self._pending.items()
        ]


class _StoredMembers(Mapping[str, Role]):
    """A conversation's members as stored, one value per member (``<key>#<user>``): looked up
    one by one; listed (sorted, so outputs are the same on every run) only to fan out."""

    __slots__ = ("_count", "_key", "_state")

    def __init__(self, state: _Overlay, key: str, count: int) -> None:
        self._state = state
        self._key = key
        self._count = count

    def __getitem__(self, user: str) -> Role:
        member = self._state.get(CONVERSATIONS_TABLE, child_key(self._key, user))
        if member is None:
            raise KeyError(user)
        return Role(member["role"])

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._state.children(CONVERSATIONS_TABLE, self._key)))

    def __len__(self) -> int:
        return self._count


def _split_conversation(
    overlay: _Overlay, key: str, stored: dict[str, Any], partition: int
) -> dict[str, Any]:
    """A conversation stored before the fine-grained layout (its members inside the value):
    each member becomes a value of its own, within the batch that first touches it."""
    members = {user: Role(role) for user, role in stored["conversation"]["members"].items()}
    for user, role in members.items():
        overlay.put(CONVERSATIONS_TABLE, child_key(key, user), {"role": role.value}, partition)
    header = ConversationState.from_json(stored["conversation"], members).to_json()
    split = {**stored, "conversation": header}
    overlay.put(CONVERSATIONS_TABLE, key, split, partition)
    return split


@dataclass(frozen=True, slots=True)
class ConversationSettings:
    large_group_threshold: int = 500
    max_members: int = 100_000
    #: Per-tenant group-size limits, where a tenant's differs from ``max_members``.
    max_members_by_tenant: Mapping[str, int] = field(default_factory=dict)
    #: Only users the tenant knows (signed in at least once) may be named in a create or an add
    #: (the worker sets it from ``IM_STREAMS__MEMBER_ADMISSION``, ``known`` by default).
    known_users_only: bool = False
    #: How long message records are kept for dedupe and for authorising recalls and edits.
    message_retention: timedelta = timedelta(days=7)


class ConversationProcessor(_BatchProcessor):
    """Per-conversation commands → the conversation log and per-user inbox records.

    Reads ``messages_in`` (and ``typing_in``), keyed by conversation; writes
    ``messages_sequenced`` (keyed by conversation), ``user_inbox`` (keyed by user) and the
    dead-letter topic. State: ``conversations`` (per conversation key) and ``messages`` (per
    message id, for dedupe of ``(sender, client_msg_id)`` and recall/edit rules).
    """

    def __init__(self, catalog: TopicCatalog, settings: ConversationSettings) -> None:
        super().__init__(catalog)
        self.settings = settings

    def _parse(self, record: InputRecord) -> Event | SchemaError:
        try:
            return parse_event(record.value or b"")
        except SchemaError as error:
            return error

    def _keys(self, parsed: Iterable[Any]) -> dict[str, list[str]]:
        conversations: list[str] = []
        messages: list[str] = []
        for command in parsed:
            if isinstance(command, SchemaError):
                continue
            conversation_id = getattr(command.payload, "conversation_id", None)
            if conversation_id is not None:
                conversations.append(conversation_key(command.tenant_id, conversation_id).decode())
            if isinstance(command, MessageSent):
                messages.append(command.event_id)
            elif isinstance(command, MessageRecalled | MessageEdited):
                messages.append(command.payload.message_id)
        return {CONVERSATIONS_TABLE: conversations, MESSAGES_TABLE: messages}

    def _one(self, record: InputRecord, overlay: _Overlay, result: BatchResult) -> None:
        source = self.topics[record.topic]
        command = self._parsed_input(record)
        if isinstance(command, SchemaError):
            result.outputs.append(
                dead_letter(self.catalog, source, record, command.code, command.message)
            )
            result.dead_lettered += 1
            return
        conversation_id = getattr(command.payload, "conversation_id", None)
        if command.type not in source.events or conversation_id is None:
            why = f"{command.type} does not belong on {source.logical_name}"
            self._refuse(source, record, result, "unexpected-type", why)
            return
        if command.actor is None:
            why = f"{command.type} names no actor: only a user's command is obeyed here"
            self._refuse(source, record, result, ACTOR_MISSING, why)
            return
        key = conversation_key(command.tenant_id, conversation_id).decode()
        stored = overlay.get(CONVERSATIONS_TABLE, key)
        if stored is not None and isinstance(stored["conversation"].get("members"), dict):
            stored = _split_conversation(overlay, key, stored, record.partition)
        if stored is not None and record.offset <= stored.get("applied", {}).get(record.topic, -1):
            result.skipped += 1
            return
        state = (
            ConversationState.from_json(
                stored["conversation"],
                _StoredMembers(overlay, key, int(stored["conversation"]["members"])),
            )
            if stored
            else None
        )
        position = int(stored["position"]) if stored else 0
        original = (
            overlay.get(MESSAGES_TABLE, command.event_id)
            if isinstance(command, MessageSent)
            else None
        )
        if isinstance(command, MessageSent) and original is not None:
            # A retried send: the message exists with its id and seq; nothing new is created.
            # The sender's online devices are told the original id and seq (live only: their
            # sync queues already hold the message).
            result.skipped += 1
            result.outputs.append(self._duplicate_answer(command, str(conversation_id), original))
            self._mark_applied(overlay, key, stored, record)
            return
        records = self._referenced_messages(command, overlay)
        tenant_id = command.tenant_id

        def known(user: str) -> bool:
            return overlay.get(KNOWN_USERS_TABLE, user_key(tenant_id, user).decode()) is not None

        outcome = decide(
            state,
            command,
            messages=records,
            known=known if self.settings.known_users_only else None,
            large_group_threshold=self.settings.large_group_threshold,
            max_members=self.settings.max_members_by_tenant.get(
                command.tenant_id, self.settings.max_members
            ),
        )
        self._emit(
            command,
            conversation_id=str(conversation_id),
            key=key,
            state=state,
            position=position,
            outcome=outcome,
            record=record,
            overlay=overlay,
            result=result,
        )

    def _refuse(
        self, source: Topic, record: InputRecord, result: BatchResult, code: str, why: str
    ) -> None:
        """``record`` on its source's dead-letter topic (an ephemeral input has none: dropped)."""
        if source.dead_letter is not None:
            result.outputs.append(dead_letter(self.catalog, source, record, code, why))
            result.dead_lettered += 1

    def _duplicate_answer(
        self, command: MessageSent, conversation_id: str, original: dict[str, Any]
    ) -> OutputRecord:
        record = MessageRecord.from_json(original)
        answer = ConversationAdvanced.new(
            tenant_id=command.tenant_id,
            event_id=derived_event_id(command.event_id, "duplicate"),
            occurred_at=command.occurred_at,
            actor=command.actor,
            payload=ConversationAdvancedPayload(
                conversation_id=conversation_id,
                conversation_seq=record.conversation_seq,
                message_id=command.event_id,
                sender_id=record.sender_id,
                entry_type=command.type,
            ),
        )
        sender = command.actor.user_id if command.actor else record.sender_id
        return self._inbox(
            command.tenant_id, sender, conversation_id, answer, position=0, ephemeral=True
        )

    def _referenced_messages(self, command: Event, overlay: _Overlay) -> dict[str, MessageRecord]:
        if not isinstance(command, MessageRecalled | MessageEdited):
            return {}
        stored = overlay.get(MESSAGES_TABLE, command.payload.message_id)
        if stored is None:
            return {}
        return {command.payload.message_id: MessageRecord.from_json(stored)}

    def _mark_applied(
        self, overlay: _Overlay, key: str, stored: dict[str, Any] | None, record: InputRecord
    ) -> None:
        if stored is None:
            return
        applied = {**stored.get("applied", {}), record.topic: record.offset}
        overlay.put(CONVERSATIONS_TABLE, key, {**stored, "applied": applied}, record.partition)

    def _emit(
        self,
        command: Event,
        *,
        conversation_id: str,
        key: str,
        state: ConversationState | None,
        position: int,
        outcome: Outcome,
        record: InputRecord,
        overlay: _Overlay,
        result: BatchResult,
    ) -> None:
        stored_deliveries = [d for d in outcome.deliveries if d.kind is not DeliveryKind.EPHEMERAL]
        told = outcome.rejection is not None and bool(outcome.rejection.user_id)
        new_position = position + 1 if (stored_deliveries or told) else position
        if state is None and outcome.state is None:
            # No such conversation: nothing stores a position for it, and an invented id must
            # not make the requester's state remember one. Position 0: delivered unordered.
            new_position = position = 0
        for sequenced in outcome.sequenced:
            result.outputs.append(
                OutputRecord(
                    topic=self.catalog.messages_sequenced.name,
                    key=key.encode(),
                    value=encode_event(sequenced),
                )
            )
        encoded: dict[int, bytes] = {}
        # Stamped on stored deliveries: read diffusion (or its end, with the last seq to catch
        # up to), so that each member's view follows the conversation's diffusion in order.
        large = True if outcome.large else (False if outcome.switched else None)
        last_seq = None
        if outcome.switched and not outcome.large and outcome.state is not None:
            last_seq = outcome.state.last_seq
        for delivery in outcome.deliveries:
            ephemeral = delivery.kind is DeliveryKind.EPHEMERAL
            result.outputs.append(
                self._inbox(
                    command.tenant_id,
                    delivery.user_id,
                    conversation_id,
                    delivery.event,
                    position=0 if ephemeral else new_position,
                    ephemeral=ephemeral,
                    encoded=encoded,
                    large=None if ephemeral else large,
                    last_seq=None if ephemeral else last_seq,
                )
            )
        if outcome.broadcast is not None:
            broadcast = outcome.broadcast
            # The member list of a switch, in records of at most SWITCH_MEMBERS_PER_RECORD
            # (well under the record limit with the longest ids).
            members: list[list[str] | None] = [None]
            if broadcast.members is not None:
                listed = list(broadcast.members)
                members = [
                    listed[start : start + SWITCH_MEMBERS_PER_RECORD]
                    for start in range(0, max(len(listed), 1), SWITCH_MEMBERS_PER_RECORD)
                ]
            for chunk in members:
                group = GroupDelivery(
                    tenant_id=command.tenant_id,
                    conversation_id=conversation_id,
                    position=0 if broadcast.ephemeral else new_position,
                    ephemeral=broadcast.ephemeral,
                    large=broadcast.large,
                    synced=list(broadcast.synced),
                    members=chunk,
                    event=broadcast.event,
                )
                result.outputs.append(
                    OutputRecord(
                        topic=self.catalog.group_delivery.name,
                        key=key.encode(),
                        value=group.model_dump_json().encode(),
                    )
                )
        if outcome.rejection is not None and outcome.rejection.user_id:
            rejected = command_rejected(command, conversation_id, outcome.rejection.reason)
            result.outputs.append(
                self._inbox(
                    command.tenant_id,
                    outcome.rejection.user_id,
                    conversation_id,
                    rejected,
                    position=new_position,
                    ephemeral=False,
                )
            )
        for message_id, message in outcome.messages.items():
            value = {
                **message.to_json(),
                "at": command.occurred_at.timestamp(),
                "partition": record.partition,
            }
            overlay.put(MESSAGES_TABLE, message_id, value, record.partition)
        if new_position == position and not outcome.state_changed:
            return
        new_state = outcome.state if outcome.state is not None else state
        if new_state is None:
            return
        stored = overlay.get(CONVERSATIONS_TABLE, key) or {}
        applied = {**stored.get("applied", {}), record.topic: record.offset}
        overlay.put(
            CONVERSATIONS_TABLE,
            key,
            {"conversation": new_state.to_json(), "position": new_position, "applied": applied},
            record.partition,
        )
        for user, role in outcome.member_changes.items():
            member = None if role is None else {"role": role.value}
            overlay.put(CONVERSATIONS_TABLE, child_key(key, user), member, record.partition)

    def _inbox(
        self,
        tenant_id: str,
        user_id: str,
        conversation_id: str,
        event: Event,
        *,
        position: int,
        ephemeral: bool,
        encoded: dict[int, bytes] | None = None,
        large: bool | None = None,
        last_seq: int | None = None,
    ) -> OutputRecord:
        """The inbox record for one user; ``encoded`` caches each event's JSON across the
        members it is fanned out to (keyed by object identity within one ``_emit``)."""
        event_json = encoded.get(id(event)) if encoded is not None else None
        if event_json is None:
            event_json = encode_event(event)
            if encoded is not None:
                encoded[id(event)] = event_json
        return OutputRecord(
            topic=self.catalog.user_inbox.name,
            key=user_key(tenant_id, user_id),
            value=encode_inbox(
                tenant_id=tenant_id,
                user_id=user_id,
                conversation_id=conversation_id,
                position=position,
                ephemeral=ephemeral,
                event_json=event_json,
                large=large,
                last_seq=last_seq,
            ),
        )


@dataclass(frozen=True, slots=True)
class UserSettings:
    push: PushPolicy = field(default_factory=PushPolicy)


class UserProcessor(_BatchProcessor):
    """Per-user inputs → the sync queue, live deliveries and push jobs.

    Reads ``user_inbox`` (inbox records), ``user_state_in`` (mute, badge, push preferences) and
    ``presence``, all placed by user (the ingress nodes' lease renewals go to every presence
    partition, kept per partition and node: :func:`lease_key`); writes ``sync_events`` (keyed
    by user), ``live_delivery`` (keyed by ingress node), ``push_jobs`` (keyed by user, with the
    user's quiet hours and locale) and dead letters. State: ``users`` (per user key). A user
    who muted every push gets no job; a device whose node's lease lapsed counts as offline.
    """

    def __init__(self, catalog: TopicCatalog, settings: UserSettings) -> None:
        super().__init__(catalog)
        self.settings = settings

    def _parse(
        self, record: InputRecord
    ) -> _UserInput | NodeLeaseRenewed | SchemaError | ValueError:
        try:
            if record.topic == self.catalog.user_inbox.name:
                inbox = InboxRecord.model_validate_json(record.value or b"")
                return _UserInput(inbox, inbox.tenant_id, inbox.user_id, inbox.event)
            event = parse_event(record.value or b"")
            if isinstance(event, NodeLeaseRenewed):
                return event
            return _UserInput(None, event.tenant_id, _owner(event), event)
        except (SchemaError, ValueError) as error:
            return error

    def _keys(self, parsed: Iterable[Any]) -> dict[str, list[str]]:
        keys: list[str] = []
        for item in parsed:
            if not isinstance(item, _UserInput):
                continue
            key = user_key(item.tenant_id, item.user_id).decode()
            keys.append(key)
            concerned = _concerned(item.inbox, item.event)
            keys.extend(child_key(key, cid) for cid in concerned or ())
        return {USERS_TABLE: keys}

    def _one(self, record: InputRecord, overlay: _Overlay, result: BatchResult) -> None:
        source = self.topics[record.topic]
        parsed = self._parsed_input(record)
        if isinstance(parsed, NodeLeaseRenewed):
            self._renew(record, parsed, overlay, result)
            return
        if not isinstance(parsed, _UserInput):
            code = getattr(parsed, "code", "schema-invalid")
            result.outputs.append(dead_letter(self.catalog, source, record, str(code), str(parsed)))
            result.dead_lettered += 1
            return
        inbox, tenant_id, user_id, event = parsed
        key = user_key(tenant_id, user_id).decode()
        stored = overlay.get(USERS_TABLE, key)
        if stored is not None and "user" in stored:
            stored = _split_user(overlay, key, stored, record.partition)
        stored = stored or {}
        if record.offset <= stored.get("applied", {}).get(record.topic, -1):
            result.skipped += 1
            return
        concerned = self._views_to_load(inbox, event, overlay, key, stored)
        loaded = {cid: overlay.get(USERS_TABLE, child_key(key, cid)) for cid in concerned}
        state = _user_state(stored, loaded)
        apply_leases(state, self._leases(overlay, record.partition, state), now=event.occurred_at)
        positions = {cid: int(view.get("position", 0)) for cid, view in loaded.items() if view}
        outcome: UserOutcome | None = None
        if inbox is not None:
            if not inbox.ephemeral and inbox.position:
                if inbox.position <= positions.get(inbox.conversation_id, 0):
                    result.skipped += 1
                    return
                positions[inbox.conversation_id] = inbox.position
            kind = DeliveryKind.EPHEMERAL if inbox.ephemeral else DeliveryKind.FULL
            outcome = apply_delivery(
                state,
                user_id,
                Delivery(user_id=user_id, event=event, kind=kind),
                now=event.occurred_at,
                policy=self.settings.push,
                large=inbox.large,
                last_seq=inbox.last_seq,
            )
        elif isinstance(event, DeviceConnected | DeviceDisconnected):
            self._presence(tenant_id, user_id, event, state, positions=positions, result=result)
        else:
            outcome = apply_own_command(state, event)
        if outcome is not None:
            self._emit(tenant_id, user_id, event, outcome, result, state=state)
        if inbox is not None and inbox.ephemeral:
            return
        applied = {**stored.get("applied", {}), record.topic: record.offset}
        overlay.put(USERS_TABLE, key, _user_header(state, applied), record.partition)
        self._put_views(
            overlay, key, record.partition, state=state, loaded=loaded, positions=positions
        )

    @staticmethod
    def _views_to_load(
        inbox: InboxRecord | None,
        event: Event,
        overlay: _Overlay,
        key: str,
        stored: dict[str, Any],
    ) -> list[str]:
        """The conversation views the input needs: those it names, else all of the user's."""
        concerned = _concerned(inbox, event)
        if concerned is not None:
            return concerned
        if isinstance(event, DeviceConnected):
            # The connect's answer lists the user's large groups: the views are read only
            # for a user in some (the header counts them), not at every connect.
            return overlay.children(USERS_TABLE, key) if stored.get("large_groups") else []
        return overlay.children(USERS_TABLE, key)

    def _presence(
        self,
        tenant_id: str,
        user_id: str,
        event: DeviceConnected | DeviceDisconnected,
        state: UserState,
        *,
        positions: dict[str, int],
        result: BatchResult,
    ) -> None:
        """A device (dis)connects: the presence, and at a connect the large groups' answer and
        the first sign-in."""
        apply_presence(state, event)
        if isinstance(event, DeviceConnected) and state.large_groups():
            result.outputs.append(self._groups(tenant_id, user_id, event, state, positions))
        if isinstance(event, DeviceConnected) and not state.known:
            # The first sign-in: from now on the user may be named in creates and adds.
            state.known = True
            since = {"since": event.occurred_at.isoformat()}
            result.outputs.append(
                OutputRecord(
                    topic=self.catalog.known_users.name,
                    key=user_key(tenant_id, user_id),
                    value=pydantic_core.to_json(since),
                )
            )

    @staticmethod
    def _put_views(
        overlay: _Overlay,
        key: str,
        partition: int,
        *,
        state: UserState,
        loaded: dict[str, dict[str, Any] | None],
        positions: dict[str, int],
    ) -> None:
        """Stores the conversation views that changed (a view that is gone is deleted)."""
        for cid in {*loaded, *state.conversations}:
            view = state.conversations.get(cid)
            value = None if view is None else {**view.to_json(), "position": positions.get(cid, 0)}
            if value != loaded.get(cid):
                overlay.put(USERS_TABLE, child_key(key, cid), value, partition)

    def _renew(
        self,
        record: InputRecord,
        renewal: NodeLeaseRenewed,
        overlay: _Overlay,
        result: BatchResult,
    ) -> None:
        """A node's lease renewal, kept for this partition's users (no output)."""
        key = lease_key(record.partition, renewal.payload.node_id)
        stored = overlay.get(USERS_TABLE, key)
        if stored is not None and record.offset <= stored.get("applied", {}).get(record.topic, -1):
            result.skipped += 1
            return
        lease = renew_lease(NodeLease.from_json(stored) if stored else None, renewal)
        value = {**lease.to_json(), "applied": {record.topic: record.offset}}
        overlay.put(USERS_TABLE, key, value, record.partition)

    @staticmethod
    def _leases(overlay: _Overlay, partition: int, state: UserState) -> dict[str, NodeLease]:
        """The leases of the nodes holding the user's devices, as this partition knows them."""
        leases: dict[str, NodeLease] = {}
        for node_id in {online.node_id for online in state.devices.values()}:
            stored = overlay.get(USERS_TABLE, lease_key(partition, node_id))
            if stored is not None:
                leases[node_id] = NodeLease.from_json(stored)
        return leases

    def _emit(
        self,
        tenant_id: str,
        user_id: str,
        source: Event,
        outcome: UserOutcome,
        result: BatchResult,
        *,
        state: UserState,
    ) -> None:
        key = user_key(tenant_id, user_id)
        for appended in outcome.appended:
            sync = SyncRecord(
                tenant_id=tenant_id,
                user_id=user_id,
                sync_id=appended.sync_id,
                event=appended.event,
                conversation=_summary(state, appended.event),
            )
            result.outputs.append(
                OutputRecord(
                    topic=self.catalog.sync_events.name,
                    key=key,
                    value=sync.model_dump_json().encode(),
                )
            )
        for node_id, devices in outcome.live_nodes.items():
            for appended in outcome.appended:
                result.outputs.append(self._live(tenant_id, user_id, node_id, devices, appended))
            for event in outcome.ephemeral:
                delivery = LiveDelivery(
                    node_id=node_id,
                    tenant_id=tenant_id,
                    user_id=user_id,
                    device_ids=devices,
                    event=event,
                )
                result.outputs.append(
                    OutputRecord(
                        topic=self.catalog.live_delivery.name,
                        key=gateway_key(node_id),
                        value=delivery.model_dump_json().encode(),
                    )
                )
        if outcome.push is not None:
            push = outcome.push
            body = source.payload.body if isinstance(source, MessageSent) else None
            job = PushJob(
                job_id=derived_event_id(push.message_id, f"push/{user_id}"),
                tenant_id=tenant_id,
                user_id=user_id,
                conversation_id=push.conversation_id,
                conversation_seq=push.conversation_seq,
                message_id=push.message_id,
                sender_id=push.sender_id,
                body=body,
                merged_count=push.merged_count,
                unread_total=push.unread_total,
                occurred_at=source.occurred_at,
                quiet_hours=push.quiet_hours,
                locale=push.locale or DEFAULT_LOCALE,
            )
            result.outputs.append(
                OutputRecord(
                    topic=self.catalog.push_jobs.name,
                    key=key,
                    value=job.model_dump_json().encode(),
                )
            )

    def _groups(
        self,
        tenant_id: str,
        user_id: str,
        connected: DeviceConnected,
        state: UserState,
        positions: dict[str, int],
    ) -> OutputRecord:
        """The answer to a device's connect for its node: the user's large groups, each with the
        position of the last event the user got from it. The node hands the groups' later
        events (``im.delivery.groups``) to the user's devices (docs/streams.md, "Large
        groups"). In order with the user's deliveries, so no membership change is missed."""
        large = sorted(cid for cid, view in state.conversations.items() if view.large)
        if len(large) > MAX_LARGE_GROUPS_PER_USER:
            log.warning(
                "user %s/%s is in %d large groups; live delivery covers %d of them",
                tenant_id,
                user_id,
                len(large),
                MAX_LARGE_GROUPS_PER_USER,
            )
        groups = {cid: positions.get(cid, 0) for cid in large[:MAX_LARGE_GROUPS_PER_USER]}
        node_id = connected.payload.node_id
        delivery = LiveDelivery(
            node_id=node_id,
            tenant_id=tenant_id,
            user_id=user_id,
            device_ids=[connected.payload.device_id],
            event=connected,
            groups=groups,
        )
        return OutputRecord(
            topic=self.catalog.live_delivery.name,
            key=gateway_key(node_id),
            value=delivery.model_dump_json().encode(),
        )

    def _live(
        self, tenant_id: str, user_id: str, node_id: str, devices: list[str], appended: Appended
    ) -> OutputRecord:
        delivery = LiveDelivery(
            node_id=node_id,
            tenant_id=tenant_id,
            user_id=user_id,
            device_ids=devices,
            sync_id=appended.sync_id,
            event=appended.event,
        )
        return OutputRecord(
            topic=self.catalog.live_delivery.name,
            key=gateway_key(node_id),
            value=delivery.model_dump_json().encode(),
        )


class _UserInput(NamedTuple):
    """A user processor input, parsed."""

    inbox: InboxRecord | None
    tenant_id: str
    user_id: str
    event: Event


def lease_key(partition: int, node_id: str) -> str:
    """Where the users table keeps a node's lease for one partition's users: every partition
    learns each renewal in order with its own users' inputs. ``~`` is in no id, so the key is
    no user's."""
    return user_key(SYSTEM_TENANT, f"~lease-{partition}-{node_id}").decode()


def _concerned(inbox: InboxRecord | None, event: Event) -> list[str] | None:
    """The conversations whose views a user input reads or changes; None for all of them."""
    if inbox is not None:
        return [inbox.conversation_id]
    if isinstance(event, ConversationMuteChanged):
        return [event.payload.conversation_id]
    if isinstance(event, BadgeCleared):
        cid = event.payload.conversation_id
        return None if cid is None else [cid]
    if isinstance(event, DeviceConnected):
        return None  # the connect's answer lists the user's large groups
    return []


def _user_state(header: dict[str, Any], views: dict[str, dict[str, Any] | None]) -> UserState:
    """A user's header and the views an input concerns, as the user rules take them."""
    state = UserState.from_json(header)
    state.conversations = {
        cid: ConversationView.from_json(view) for cid, view in views.items() if view is not None
    }
    loaded_unread = sum(view.unread for view in state.conversations.values())
    state.unread_elsewhere = max(0, int(header.get("unread_total", 0)) - loaded_unread)
    loaded_large = sum(view.large for view in state.conversations.values())
    state.large_elsewhere = max(0, int(header.get("large_groups", 0)) - loaded_large)
    return state


def stored_user(state: StateReader, key: str) -> UserState | None:
    """A user's whole state as stored under ``key`` (``user_key``): the header and the view of
    every conversation; None for a user with no state. For inspection and tests."""
    header = state.get(USERS_TABLE, key)
    if header is None:
        return None
    views = {
        cid: state.get(USERS_TABLE, child_key(key, cid)) for cid in state.children(USERS_TABLE, key)
    }
    whole = _user_state(header, views)
    whole.unread_elsewhere = 0
    whole.large_elsewhere = 0
    return whole


def _user_header(state: UserState, applied: dict[str, int]) -> dict[str, Any]:
    header = state.header_json()
    header["unread_total"] = state.unread_total()
    large_groups = state.large_groups()
    if large_groups:
        # Only when some: a connect lists the user's views for its answer only then.
        header["large_groups"] = large_groups
    header["applied"] = applied
    return header


def _split_user(
    overlay: _Overlay, key: str, stored: dict[str, Any], partition: int
) -> dict[str, Any]:
    """A user stored before the fine-grained layout (every conversation inside the value):
    each conversation's view becomes a value of its own, within the batch that first touches
    the user."""
    whole = UserState.from_json(stored["user"])
    positions = stored.get("positions", {})
    for cid, view in whole.conversations.items():
        value = {**view.to_json(), "position": int(positions.get(cid, 0))}
        overlay.put(USERS_TABLE, child_key(key, cid), value, partition)
    header = _user_header(whole, stored.get("applied", {}))
    overlay.put(USERS_TABLE, key, header, partition)
    return header


def _summary(state: UserState, event: Event) -> ConversationSummary | None:
    """The conversation list entry of ``event``'s conversation as ``state`` has it now."""
    conversation_id = getattr(event.payload, "conversation_id", None)
    view = state.conversations.get(conversation_id) if conversation_id else None
    if view is None or conversation_id is None:
        return None
    return ConversationSummary(
        conversation_id=conversation_id,
        last_seq=view.last_seq,
        read_seq=view.read_seq,
        unread=view.unread,
        muted=view.muted,
        muted_until=view.muted_until,
        large=view.large,
    )


def _owner(event: Event) -> str:
    """The user a user-keyed input belongs to: the device's user for presence, else the actor."""
    user_id = getattr(event.payload, "user_id", None)
    if isinstance(event, DeviceConnected | DeviceDisconnected) and user_id:
        return str(user_id)
    if event.actor is None:
        raise ValueError(f"a {event.type} event needs an actor to find its user")
    return event.actor.user_id
