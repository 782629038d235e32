"""The CQL sink in-process over real Kafka and Cassandra: every table's content after one pass,
the same tables after a replay of the whole range, older records fed after newer ones, and
poison records dead-lettered while the batch still commits.

The topic range is built by hand from real events (``schemas.events``), as the stream stage
would have written it: a group of three (then four) members with messages, a recall, edits,
receipts, a rename, membership and role changes (an ownership handover); a direct conversation;
a group deleted and one whose last member left; a large group's ``conversation.advanced``; mute,
badge cleared, a rejected command; push tokens registered, replaced and removed; and poison
records on each of the three topics.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cassandra.cluster import Session

from core.settings import Settings
from schemas.events import (
    Actor,
    BadgeCleared,
    BadgeClearedPayload,
    CommandRejected,
    CommandRejectedPayload,
    ConversationAdvanced,
    ConversationAdvancedPayload,
    ConversationCreated,
    ConversationCreatedPayload,
    ConversationDeleted,
    ConversationDeletedPayload,
    ConversationKind,
    ConversationLeft,
    ConversationLeftPayload,
    ConversationMemberAdded,
    ConversationMemberAddedPayload,
    ConversationMemberRoleChanged,
    ConversationMemberRoleChangedPayload,
    ConversationMuteChanged,
    ConversationMuteChangedPayload,
    ConversationRenamed,
    ConversationRenamedPayload,
    ConversationSummary,
    Event,
    MediaBody,
    MessageBody,
    MessageEdited,
    MessageEditedPayload,
    MessageRecalled,
    MessageRecalledPayload,
    MessageSent,
    MessageSentPayload,
    PushProvider,
    PushTokenRegistered,
    PushTokenRegisteredPayload,
    PushTokenRemovalReason,
    PushTokenRemoved,
    PushTokenRemovedPayload,
    ReceiptRead,
    ReceiptReadPayload,
    Role,
    SyncRecord,
    TextBody,
    direct_conversation_id,
    encode_event,
    message_event_id,
    parse_event,
)
from schemas.topics import TopicCatalog, conversation_key, device_key, topic_catalog, user_key
from sinks.cql.crypto import (
    device_context,
    is_sealed,
    preview_context,
    sync_context,
    timeline_context,
)
from sinks.cql.migrate import migrate
from sinks.cql.rules import withheld
from sinks.cql.sink import CqlSink
from tests.sinks.cql_support import (
    Row,
    catalog_topics,
    committed_lag,
    cql_local_stack,  # noqa: F401 - the local_stack fixture: Kafka and Cassandra only
    keyspace_settings,
    migrated_topics,
    new_prefix,
    produce,
    read_dead_letters,
    select,
    snapshot,
    tenant_keys,
    unsealed,
)

pytestmark = pytest.mark.stack

TENANT = "acme"
T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
SYNC_TTL = 30 * 86400


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def naive(moment: datetime) -> datetime:
    """How the driver returns a timestamp: naive UTC, millisecond precision."""
    return moment.astimezone(UTC).replace(tzinfo=None)


# ---------------------------------------------------------------------------------------------
# The topic range
# ---------------------------------------------------------------------------------------------


@dataclass
class View:
    """One user's view of one conversation, as the user processor keeps it (streams.users)."""

    last_seq: int = 0
    read_seq: int = 0
    unread: list[int] = field(default_factory=list)
    muted: bool = False
    muted_until: datetime | None = None

    def read(self, seq: int) -> None:
        if seq > self.read_seq:
            self.read_seq = seq
            self.unread = [s for s in self.unread if s > seq]

    def summary(self, conversation_id: str) -> ConversationSummary:
        return ConversationSummary(
            conversation_id=conversation_id,
            last_seq=self.last_seq,
            read_seq=self.read_seq,
            unread=len(self.unread),
            muted=self.muted,
            muted_until=self.muted_until,
        )


@dataclass
class Scenario:
    """Records for the three topics, and what the user processor would have summarised."""

    catalog: TopicCatalog
    sequenced: list[tuple[str, bytes | None, bytes | None]] = field(default_factory=list)
    sync: list[tuple[str, bytes | None, bytes | None]] = field(default_factory=list)
    tokens: list[tuple[str, bytes | None, bytes | None]] = field(default_factory=list)
    sync_ids: dict[str, int] = field(default_factory=dict)
    views: dict[tuple[str, str], View] = field(default_factory=dict)
    members: dict[str, list[str]] = field(default_factory=dict)
    sync_records: list[SyncRecord] = field(default_factory=list)
    raw: dict[str, bytes] = field(default_factory=dict)
    """Encoded sequenced events by a name the test gives them."""

    def log(self, event: Event, name: str | None = None) -> bytes:
        """Put ``event`` on the conversation log and deliver it to the conversation's members."""
        encoded = encode_event(event)
        conversation_id = str(getattr(event.payload, "conversation_id", ""))
        self.sequenced.append(
            (
                self.catalog.messages_sequenced.name,
                conversation_key(event.tenant_id, conversation_id),
                encoded,
            )
        )
        if name:
            self.raw[name] = encoded
        return encoded

    def deliver(self, event: Event, users: list[str]) -> None:
        for user in users:
            self.queue(user, event)

    def queue(self, user: str, event: Event) -> SyncRecord:
        conversation_id: str | None = getattr(event.payload, "conversation_id", None)
        view = self._apply(user, event, conversation_id)
        self.sync_ids[user] = self.sync_ids.get(user, 0) + 1
        record = SyncRecord(
            tenant_id=TENANT,
            user_id=user,
            sync_id=self.sync_ids[user],
            event=event,
            conversation=view.summary(conversation_id) if view and conversation_id else None,
        )
        self.sync_records.append(record)
        self.sync.append(
            (
                self.catalog.sync_events.name,
                user_key(TENANT, user),
                record.model_dump_json().encode(),
            )
        )
        return record

    def _apply(self, user: str, event: Event, conversation_id: str | None) -> View | None:
        """streams.users.apply_delivery / apply_own_command, for what the summaries show."""
        if conversation_id is None:
            if isinstance(event, BadgeCleared):
                self._read_all(user)
            return None
        key = (user, conversation_id)
        match event:
            case MessageSent():
                view = self.views.setdefault(key, View())
                seq = event.payload.conversation_seq or 0
                view.last_seq = max(view.last_seq, seq)
                if event.actor.user_id == user:
                    view.read(seq)
                elif seq > view.read_seq:
                    view.unread.append(seq)
            case ConversationAdvanced():
                view = self.views.setdefault(key, View())
                view.last_seq = max(view.last_seq, event.payload.conversation_seq)
                if event.payload.sender_id != user:
                    view.unread.append(event.payload.conversation_seq)
            case MessageRecalled():
                view = self.views.setdefault(key, View())
                view.last_seq = max(view.last_seq, event.payload.conversation_seq or 0)
            case ReceiptRead() if event.actor.user_id == user:
                self.views.setdefault(key, View()).read(event.payload.conversation_seq)
            case ConversationCreated():
                self.views.setdefault(key, View())
            case ConversationMuteChanged():
                view = self.views.setdefault(key, View())
                view.muted, view.muted_until = event.payload.muted, event.payload.muted_until
            case ConversationLeft() if event.payload.user_id == user:
                self.views.pop(key, None)
            case ConversationDeleted():
                self.views.pop(key, None)
        return self.views.get(key)

    def _read_all(self, user: str) -> None:
        """Every badge cleared: each of the user's conversations read to its last message."""
        for (owner, _), view in self.views.items():
            if owner == user:
                view.read(view.last_seq)

    def token(self, event: PushTokenRegistered | PushTokenRemoved) -> None:
        p = event.payload
        self.tokens.append(
            (
                self.catalog.push_tokens.name,
                device_key(event.tenant_id, p.user_id, p.device_id),
                encode_event(event),
            )
        )

    def last_summary(self, user: str, conversation_id: str) -> ConversationSummary | None:
        summaries = [
            r.conversation
            for r in self.sync_records
            if r.user_id == user
            and r.conversation
            and r.conversation.conversation_id == conversation_id
        ]
        return summaries[-1] if summaries else None


def _id() -> str:
    return str(uuid.uuid4())


def sent(
    conversation: str, sender: str, seq: int, body: MessageBody, when: datetime
) -> MessageSent:
    client_msg_id = f"c-{conversation}-{seq}"
    return MessageSent.new(
        tenant_id=TENANT,
        actor=Actor(user_id=sender, device_id=f"{sender}-phone"),
        event_id=message_event_id(TENANT, sender, client_msg_id),
        occurred_at=when,
        payload=MessageSentPayload(
            conversation_id=conversation,
            client_msg_id=client_msg_id,
            body=body,
            conversation_seq=seq,
        ),
    )


def receipt(conversation: str, reader: str, seq: int, when: datetime) -> ReceiptRead:
    return ReceiptRead.new(
        tenant_id=TENANT,
        actor=Actor(user_id=reader),
        occurred_at=when,
        payload=ReceiptReadPayload(conversation_id=conversation, conversation_seq=seq),
    )


G1, G2, G3, BIG = "team", "short-lived", "solo", "everyone"
DM = direct_conversation_id(TENANT, "alice", "bob")
LONG_TEXT = "final v2: " + "y" * 150
MEDIA = MediaBody(url="https://cdn.example/p.jpg", mime="image/jpeg", size_bytes=1234)


@dataclass
class Built:
    scenario: Scenario
    ids: dict[str, str]
    poison: dict[str, list[tuple[bytes, str]]]
    """Per source topic: the poison values and their expected error codes."""
    older: list[tuple[str, bytes | None, bytes | None]]
    """Records to feed again after the newer ones."""


def build(catalog: TopicCatalog) -> Built:
    s = Scenario(catalog)
    ids: dict[str, str] = {}
    group = ["alice", "bob", "carol"]
    _messages(s, ids, group)
    _membership(s, ids, group)
    _short_lived_groups(s, ids)
    _own_state(s, ids)
    first_token = _push_tokens(s)
    poison = _poison(s)

    catalog_ = s.catalog
    older: list[tuple[str, bytes | None, bytes | None]] = [
        (catalog_.messages_sequenced.name, conversation_key(TENANT, G1), s.raw["edit6"]),
        (catalog_.messages_sequenced.name, conversation_key(TENANT, G1), s.raw["read_bob_2"]),
        (catalog_.messages_sequenced.name, conversation_key(TENANT, G1), s.raw["created"]),
        (
            catalog_.push_tokens.name,
            device_key(TENANT, "alice", "alice-phone"),
            encode_event(first_token),
        ),
        *[
            (catalog_.sync_events.name, user_key(TENANT, r.user_id), r.model_dump_json().encode())
            for r in s.sync_records
            if r.sync_id == 1
        ],
    ]
    return Built(scenario=s, ids=ids, poison=poison, older=older)


def _messages(s: Scenario, ids: dict[str, str], group: list[str]) -> None:
    """The group and the direct conversation: sends, recalls, edits and read receipts."""
    created = ConversationCreated.new(
        tenant_id=TENANT,
        actor=Actor(user_id="alice"),
        occurred_at=at(0),
        payload=ConversationCreatedPayload(
            conversation_id=G1, kind=ConversationKind.GROUP, members=group, name="Team"
        ),
    )
    s.log(created, "created")
    s.deliver(created, group)

    dm = ConversationCreated.new(
        tenant_id=TENANT,
        actor=Actor(user_id="alice"),
        occurred_at=at(1),
        payload=ConversationCreatedPayload(
            conversation_id=DM, kind=ConversationKind.DIRECT, members=["alice", "bob"]
        ),
    )
    s.log(dm)
    s.deliver(dm, ["alice", "bob"])

    messages: list[tuple[str, str, str, int, MessageBody, datetime]] = [
        ("msg1", G1, "alice", 1, TextBody(text="hello team"), at(2)),
        ("msg2", G1, "carol", 2, MEDIA, at(3)),
        ("msg3", G1, "bob", 3, TextBody(text="oops " + "x" * 200), at(4)),
        ("dm1", DM, "bob", 1, TextBody(text="lunch?"), at(5)),
        ("dm2", DM, "bob", 2, TextBody(text="wrong chat"), at(5)),
    ]
    for name, conversation, sender, seq, body, when in messages:
        event = sent(conversation, sender, seq, body, when)
        ids[name] = event.event_id
        s.log(event, name)
        s.deliver(event, group if conversation == G1 else ["alice", "bob"])

    recall = MessageRecalled.new(
        tenant_id=TENANT,
        actor=Actor(user_id="bob"),
        occurred_at=at(6),
        payload=MessageRecalledPayload(
            conversation_id=G1, message_id=ids["msg3"], conversation_seq=4
        ),
    )
    ids["recall"] = recall.event_id
    s.log(recall, "recall")
    s.deliver(recall, group)

    dm_recall = MessageRecalled.new(
        tenant_id=TENANT,
        actor=Actor(user_id="bob"),
        occurred_at=at(6),
        payload=MessageRecalledPayload(
            conversation_id=DM, message_id=ids["dm2"], conversation_seq=3
        ),
    )
    ids["dm_recall"] = dm_recall.event_id
    s.log(dm_recall, "dm_recall")
    s.deliver(dm_recall, ["alice", "bob"])

    msg4 = sent(G1, "alice", 5, TextBody(text="draft"), at(7))
    ids["msg4"] = msg4.event_id
    s.log(msg4, "msg4")
    s.deliver(msg4, group)
    for name, target, seq, text, minute in [
        ("edit6", "msg4", 6, "final", 8),
        ("edit7", "msg4", 7, LONG_TEXT, 9),
        ("edit8", "msg1", 8, "hello, team", 10),
    ]:
        edit = MessageEdited.new(
            tenant_id=TENANT,
            actor=Actor(user_id="alice"),
            occurred_at=at(minute),
            payload=MessageEditedPayload(
                conversation_id=G1,
                message_id=ids[target],
                body=TextBody(text=text),
                conversation_seq=seq,
            ),
        )
        ids[name] = edit.event_id
        s.log(edit, name)
        s.deliver(edit, group)

    for name, reader, seq, minute in [
        ("read_bob_2", "bob", 2, 11),
        ("read_carol_8", "carol", 8, 12),
        ("read_bob_8", "bob", 8, 13),
        ("read_bob_5", "bob", 5, 14),  # older than bob's last read: changes nothing
    ]:
        read = receipt(G1, reader, seq, at(minute))
        s.log(read, name)
        s.deliver(read, group)


def _membership(s: Scenario, ids: dict[str, str], group: list[str]) -> None:
    """The group renamed, a member added, roles changed, the new member leaving."""
    renamed = ConversationRenamed.new(
        tenant_id=TENANT,
        actor=Actor(user_id="alice"),
        occurred_at=at(15),
        payload=ConversationRenamedPayload(conversation_id=G1, name="Team 2"),
    )
    s.log(renamed, "renamed")
    s.deliver(renamed, group)

    added = ConversationMemberAdded.new(
        tenant_id=TENANT,
        actor=Actor(user_id="alice"),
        occurred_at=at(16),
        # As sequenced: the sequencer put the group's name in.
        payload=ConversationMemberAddedPayload(conversation_id=G1, user_id="dave", name="Team 2"),
    )
    s.log(added)
    s.deliver(added, [*group, "dave"])
    for user, role, minute in [("bob", Role.ADMIN, 17), ("carol", Role.OWNER, 18)]:
        changed = ConversationMemberRoleChanged.new(
            tenant_id=TENANT,
            actor=Actor(user_id="alice"),
            occurred_at=at(minute),
            payload=ConversationMemberRoleChangedPayload(
                conversation_id=G1, user_id=user, role=role
            ),
        )
        s.log(changed)
        s.deliver(changed, [*group, "dave"])
    left = ConversationLeft.new(
        tenant_id=TENANT,
        actor=Actor(user_id="dave"),
        occurred_at=at(19),
        # As the sequencer stamps it: the conversation's last seq when dave went.
        payload=ConversationLeftPayload(conversation_id=G1, user_id="dave", last_seq=8),
    )
    ids["left"] = left.event_id
    s.log(left)
    s.deliver(left, [*group, "dave"])


def _short_lived_groups(s: Scenario, ids: dict[str, str]) -> None:
    """A group created and deleted; a group whose only member leaves (deleted with it)."""
    for conversation, members, minute in [(G2, ["erin", "frank"], 20), (G3, ["gina"], 21)]:
        group_created = ConversationCreated.new(
            tenant_id=TENANT,
            actor=Actor(user_id=members[0]),
            occurred_at=at(minute),
            payload=ConversationCreatedPayload(
                conversation_id=conversation, kind=ConversationKind.GROUP, members=members
            ),
        )
        s.log(group_created)
        s.deliver(group_created, members)
    deleted = ConversationDeleted.new(
        tenant_id=TENANT,
        actor=Actor(user_id="erin"),
        occurred_at=at(22),
        payload=ConversationDeletedPayload(conversation_id=G2),
    )
    ids["deleted"] = deleted.event_id
    s.log(deleted)
    s.deliver(deleted, ["erin", "frank"])
    alone = ConversationLeft.new(
        tenant_id=TENANT,
        actor=Actor(user_id="gina"),
        occurred_at=at(23),
        payload=ConversationLeftPayload(conversation_id=G3, user_id="gina"),
    )
    s.log(alone)
    s.deliver(alone, ["gina"])


def _own_state(s: Scenario, ids: dict[str, str]) -> None:
    """A large group's light event; the user's own state: mute, every badge cleared; rejected
    commands."""
    # Read diffusion: a large group's member gets the light event only.
    ids["big1"] = _id()
    advanced = ConversationAdvanced.new(
        tenant_id=TENANT,
        occurred_at=at(24),
        actor=Actor(user_id="frank"),
        payload=ConversationAdvancedPayload(
            conversation_id=BIG,
            conversation_seq=41,
            message_id=ids["big1"],
            sender_id="frank",
            entry_type="message.sent",
        ),
    )
    s.queue("erin", advanced)

    # The user's own state: mute, every badge cleared; a rejected command.
    muted_until = at(24 * 60)
    s.queue(
        "bob",
        ConversationMuteChanged.new(
            tenant_id=TENANT,
            actor=Actor(user_id="bob"),
            occurred_at=at(25),
            payload=ConversationMuteChangedPayload(
                conversation_id=G1, muted=True, muted_until=muted_until
            ),
        ),
    )
    s.queue(
        "alice",
        BadgeCleared.new(
            tenant_id=TENANT,
            actor=Actor(user_id="alice"),
            occurred_at=at(26),
            payload=BadgeClearedPayload(),
        ),
    )
    s.queue(
        "frank",
        CommandRejected.new(
            tenant_id=TENANT,
            actor=Actor(user_id="frank"),
            occurred_at=at(27),
            payload=CommandRejectedPayload(
                command_event_id=_id(),
                command_type="message.sent",
                conversation_id=G2,
                reason="conversation-deleted",
            ),
        ),
    )
    ids["refused_delete"] = _id()
    s.queue(
        "carol",
        CommandRejected.new(
            tenant_id=TENANT,
            actor=Actor(user_id="carol"),
            occurred_at=at(27),
            payload=CommandRejectedPayload(
                command_event_id=ids["refused_delete"],
                command_type="conversation.deleted",
                conversation_id=G1,
                reason="not-allowed",
            ),
        ),
    )


def registered(
    user: str, device: str, provider: PushProvider, token: str, minute: int
) -> PushTokenRegistered:
    return PushTokenRegistered.new(
        tenant_id=TENANT,
        occurred_at=at(minute),
        payload=PushTokenRegisteredPayload(
            user_id=user, device_id=device, provider=provider, token=token, app_id="chat.app"
        ),
    )


def removed(
    user: str,
    device: str,
    provider: PushProvider,
    token: str,
    minute: int,
    *,
    reason: PushTokenRemovalReason,
) -> PushTokenRemoved:
    return PushTokenRemoved.new(
        tenant_id=TENANT,
        occurred_at=at(minute),
        payload=PushTokenRemovedPayload(
            user_id=user,
            device_id=device,
            provider=provider,
            token=token,
            app_id="chat.app",
            reason=reason,
        ),
    )


def _push_tokens(s: Scenario) -> PushTokenRegistered:
    """Alice's phone replaces its token, then the old one is rejected by APNs; bob's browser
    unregisters; carol registers. Returns alice's first registration (fed again later)."""
    first_token = registered("alice", "alice-phone", PushProvider.APNS, "tok-a1", 30)
    s.token(first_token)
    s.token(registered("alice", "alice-phone", PushProvider.APNS, "tok-a2", 31))
    s.token(
        removed(
            "alice",
            "alice-phone",
            PushProvider.APNS,
            "tok-a1",
            32,
            reason=PushTokenRemovalReason.PROVIDER_REJECTED,
        )
    )
    s.token(registered("bob", "bob-web", PushProvider.FCM, "tok-b1", 30))
    s.token(
        removed(
            "bob", "bob-web", PushProvider.FCM, "tok-b1", 33, reason=PushTokenRemovalReason.CLIENT
        )
    )
    s.token(registered("carol", "carol-ios", PushProvider.APNS, "tok-c1", 34))
    return first_token


def _poison(s: Scenario) -> dict[str, list[tuple[bytes, str]]]:
    """One poison record per reason and topic, each put in the middle of its topic's records."""
    catalog_ = s.catalog
    wrong_type = encode_event(registered("zed", "zed-1", PushProvider.FCM, "tok-z", 40))
    unsequenced = encode_event(
        sent(G1, "alice", 9, TextBody(text="x"), at(40)).model_copy(
            update={
                "payload": MessageSentPayload(
                    conversation_id=G1, client_msg_id="c-x", body=TextBody(text="x")
                )
            }
        )
    )
    poison = {
        catalog_.messages_sequenced.name: [
            (b"{not json", "malformed-json"),
            (unsequenced, "missing-seq"),
            (wrong_type, "unexpected-type"),
        ],
        catalog_.sync_events.name: [(b'{"tenant_id": "acme", "user_id": "bob"}', "schema-invalid")],
        catalog_.push_tokens.name: [
            (b"\xff\xfe", "invalid-utf8"),
            (s.raw["msg1"], "unexpected-type"),
        ],
    }
    key = {
        catalog_.messages_sequenced.name: conversation_key(TENANT, G1),
        catalog_.sync_events.name: user_key(TENANT, "bob"),
        catalog_.push_tokens.name: device_key(TENANT, "zed", "zed-1"),
    }
    # Interleave the poison with good records: each in the middle of its topic.
    for topic, records in (
        (catalog_.messages_sequenced.name, s.sequenced),
        (catalog_.sync_events.name, s.sync),
        (catalog_.push_tokens.name, s.tokens),
    ):
        middle = len(records) // 2
        records[middle:middle] = [(topic, key[topic], value) for value, _ in poison[topic]]
    return poison


# ---------------------------------------------------------------------------------------------
# Running the sink in-process
# ---------------------------------------------------------------------------------------------


def run_sink(
    settings: Settings, session: Session, *, group_id: str, timeout: float = 60.0
) -> CqlSink:
    """The sink until it has read and committed every assigned partition to its end."""
    stop = threading.Event()
    timer = threading.Timer(timeout, stop.set)
    timer.start()
    sink = CqlSink(settings, session, group_id=group_id)
    try:
        sink.run(stop, until_caught_up=True)
    finally:
        timer.cancel()
    assert not stop.is_set(), f"the sink did not catch up within {timeout}s"
    return sink


# ---------------------------------------------------------------------------------------------
# One scenario, produced once; the first pass of the sink over it
# ---------------------------------------------------------------------------------------------


@dataclass
class World:
    settings: Settings
    keyspace: str
    built: Built
    group_id: str
    tables: dict[str, set[Row]]
    dead_letters: dict[str, list[tuple[bytes | None, bytes | None, dict[str, str]]]]
    first: CqlSink


@pytest.fixture(scope="module")
def world(settings: Settings, cql_session: Session) -> Iterator[World]:
    with migrated_topics(settings, cql_session, "cql_sink") as configured:
        keyspace = configured.cql.keyspace
        catalog = topic_catalog(configured)
        built = build(catalog)
        s = built.scenario
        produce(configured, [*s.sequenced, *s.sync, *s.tokens])
        group_id = f"t-cql-sink-{uuid.uuid4().hex[:8]}"
        first = run_sink(configured, cql_session, group_id=group_id)
        dead_letters = {
            source: read_dead_letters(
                configured,
                catalog.dead_letter_of(catalog.by_name(source)).name,
                expected=len(values),
            )
            for source, values in built.poison.items()
        }
        yield World(
            configured,
            keyspace,
            built,
            group_id,
            snapshot(cql_session, keyspace),
            dead_letters,
            first,
        )


def rows(session: Session, query: str, *values: Any) -> set[tuple[Any, ...]]:
    return {tuple(row) for row in select(session, query, *values)}


# ---------------------------------------------------------------------------------------------
# The tables after one pass
# ---------------------------------------------------------------------------------------------


def test_the_timeline_holds_every_entry_with_recalls_and_latest_edits(
    world: World, cql_session: Session
) -> None:
    ids, raw = world.built.ids, world.built.scenario.raw
    stored = rows(
        cql_session,
        f"SELECT conversation_id, bucket, seq, entry_type, event_id, message_id, sender_id, "
        f"occurred_at, event, recalled, recalled_seq, edited_event, edited_seq "
        f"FROM {world.keyspace}.timeline",
    )
    # Bodies are sealed at rest (each event with a body), and open to what was sent.
    assert all(is_sealed(row[8]) for row in stored if row[3] != "message.recalled" and not row[9])
    keys = tenant_keys(cql_session, world.settings)

    def opened(row: tuple[Any, ...]) -> tuple[Any, ...]:
        conversation, seq = row[0], row[2]
        event = unsealed(keys, TENANT, timeline_context(TENANT, conversation, seq, "event"), row[8])
        context = timeline_context(TENANT, conversation, seq, "edited_event")
        edited = unsealed(keys, TENANT, context, row[11])
        return (*row[:8], event, row[9], row[10], edited, row[12])

    found = {opened(row) for row in stored}

    def entry(
        conversation: str,
        seq: int,
        name: str,
        message: str,
        sender: str,
        *,
        minute: int,
        recalled: bool = False,
    ) -> tuple[Any, ...]:
        event_type = (
            "message.sent"
            if name == message
            else ("message.recalled" if "recall" in name else "message.edited")
        )
        return (
            conversation,
            0,
            seq,
            event_type,
            ids[name],
            ids[message],
            sender,
            naive(at(minute)),
            # A recalled message's row keeps the message without its body.
            encode_event(withheld(parse_event(raw[name]))).decode()
            if recalled
            else raw[name].decode(),
        )

    expected = {
        (*entry(G1, 1, "msg1", "msg1", "alice", minute=2), None, None, raw["edit8"].decode(), 8),
        (*entry(G1, 2, "msg2", "msg2", "carol", minute=3), None, None, None, None),
        (*entry(G1, 3, "msg3", "msg3", "bob", minute=4, recalled=True), True, 4, None, None),
        (*entry(G1, 4, "recall", "msg3", "bob", minute=6), None, None, None, None),
        (*entry(G1, 5, "msg4", "msg4", "alice", minute=7), None, None, raw["edit7"].decode(), 7),
        (*entry(G1, 6, "edit6", "msg4", "alice", minute=8), None, None, None, None),
        (*entry(G1, 7, "edit7", "msg4", "alice", minute=9), None, None, None, None),
        (*entry(G1, 8, "edit8", "msg1", "alice", minute=10), None, None, None, None),
        (*entry(DM, 1, "dm1", "dm1", "bob", minute=5), None, None, None, None),
        (*entry(DM, 2, "dm2", "dm2", "bob", minute=5, recalled=True), True, 3, None, None),
        (*entry(DM, 3, "dm_recall", "dm2", "bob", minute=6), None, None, None, None),
    }
    assert found == expected

    positions = rows(
        cql_session,
        f"SELECT message_id, conversation_id, seq, sender_id FROM {world.keyspace}.messages_by_id",
    )
    assert positions == {
        (ids["msg1"], G1, 1, "alice"),
        (ids["msg2"], G1, 2, "carol"),
        (ids["msg3"], G1, 3, "bob"),
        (ids["msg4"], G1, 5, "alice"),
        (ids["dm1"], DM, 1, "bob"),
        (ids["dm2"], DM, 2, "bob"),
    }


def test_read_access_facts_and_command_outcomes(world: World, cql_session: Session) -> None:
    ids = world.built.ids
    assert rows(
        cql_session,
        f"SELECT conversation_id, user_id, until_seq FROM {world.keyspace}.former_members",
    ) == {(G1, "dave", 8)}  # gina's departure carries no seq (as before version 4): no row
    assert rows(
        cql_session,
        f"SELECT conversation_id, message_id, recall_seq FROM {world.keyspace}.recalled_messages",
    ) == {(G1, ids["msg3"], 4), (DM, ids["dm2"], 3)}
    outcomes = rows(
        cql_session,
        f"SELECT command_event_id, outcome FROM {world.keyspace}.command_outcomes",
    )
    assert {
        (ids["recall"], "applied"),
        (ids["dm_recall"], "applied"),
        (ids["left"], "applied"),
        (ids["deleted"], "applied"),
        (ids["refused_delete"], "rejected"),
    } <= outcomes
    assert len(outcomes) == 6  # and gina's leave; not the refused send


def test_conversations_members_and_read_positions(world: World, cql_session: Session) -> None:
    ks = world.keyspace
    assert rows(
        cql_session,
        f"SELECT conversation_id, kind, name, created_at, created_by, deleted "
        f"FROM {ks}.conversations",
    ) == {
        (G1, "group", "Team 2", naive(at(0)), "alice", False),
        (DM, "direct", None, naive(at(1)), "alice", False),
        (G2, "group", None, naive(at(20)), "erin", True),
        (G3, "group", None, naive(at(21)), "gina", True),  # its last member left
    }
    # carol took over the ownership: alice, the previous owner, is an admin; dave left.
    assert rows(
        cql_session, f"SELECT conversation_id, user_id, role, joined_at FROM {ks}.members"
    ) == {
        (G1, "alice", "admin", naive(at(0))),
        (G1, "bob", "admin", naive(at(0))),
        (G1, "carol", "owner", naive(at(0))),
        (DM, "alice", "member", naive(at(1))),
        (DM, "bob", "member", naive(at(1))),
        (G2, "erin", "owner", naive(at(20))),
        (G2, "frank", "member", naive(at(20))),
    }
    # bob's read of seq 5 came after his read of seq 8: the highest read stays.
    assert rows(
        cql_session,
        f"SELECT conversation_id, user_id, read_seq, read_at FROM {ks}.read_positions",
    ) == {(G1, "bob", 8, naive(at(13))), (G1, "carol", 8, naive(at(12)))}


def test_devices_keep_the_current_token(world: World, cql_session: Session) -> None:
    # alice's phone replaced tok-a1 by tok-a2 before APNs rejected tok-a1; bob's browser left.
    stored = rows(
        cql_session,
        f"SELECT user_id, device_id, provider, push_token, app_id, updated_at "
        f"FROM {world.keyspace}.devices",
    )
    assert all(is_sealed(row[3]) for row in stored)  # push tokens are sealed at rest
    keys = tenant_keys(cql_session, world.settings)
    assert {
        (*row[:3], unsealed(keys, TENANT, device_context(TENANT, row[0], row[1]), row[3]), *row[4:])
        for row in stored
    } == {
        ("alice", "alice-phone", "apns", "tok-a2", "chat.app", naive(at(31))),
        ("carol", "carol-ios", "apns", "tok-c1", "chat.app", naive(at(34))),
    }


def test_every_sync_record_is_queued_once_with_its_head(world: World, cql_session: Session) -> None:
    records = world.built.scenario.sync_records
    found = select(
        cql_session,
        f"SELECT user_id, bucket, sync_id, event_type, event_id, conversation_id, event, "
        f"TTL(event) AS ttl FROM {world.keyspace}.sync_queue",
    )
    assert len(found) == len(records)
    assert {
        (r.user_id, r.bucket, r.sync_id, r.event_type, r.event_id, r.conversation_id) for r in found
    } == {
        (
            r.user_id,
            0,
            r.sync_id,
            r.event.type,
            r.event.event_id,
            r.conversation.conversation_id
            if r.conversation
            else getattr(r.event.payload, "conversation_id", None),
        )
        for r in records
    }
    keys = tenant_keys(cql_session, world.settings)
    events = {
        (r.user_id, r.sync_id): json.loads(
            unsealed(keys, TENANT, sync_context(TENANT, r.user_id, r.sync_id), r.event) or ""
        )
        for r in found
    }
    for record in records:
        assert (
            events[(record.user_id, record.sync_id)]
            == json.loads(record.model_dump_json())["event"]
        )
    assert all(SYNC_TTL - 600 < r.ttl <= SYNC_TTL for r in found)

    heads = rows(cql_session, f"SELECT user_id, last_sync_id FROM {world.keyspace}.sync_heads")
    assert heads == set(world.built.scenario.sync_ids.items())


def test_the_conversation_lists(world: World, cql_session: Session) -> None:
    s, ids = world.built.scenario, world.built.ids
    columns = (
        "kind, name, role, member, last_message_id, last_sender_id, last_preview, last_activity_at"
    )
    summary_columns = "last_seq, read_seq, unread, muted, muted_until, updated_at"
    keys = tenant_keys(cql_session, world.settings)

    def opened(row: tuple[Any, ...]) -> tuple[Any, ...]:
        """The preview (column 8) as readers see it: sealed at rest unless empty."""
        assert row[8] in {None, ""} or is_sealed(row[8])
        context = preview_context(TENANT, row[0], row[1])
        return (*row[:8], unsealed(keys, TENANT, context, row[8]), *row[9:])

    found = {
        (row[0], row[1]): opened(tuple(row))[2:]
        for row in select(
            cql_session,
            f"SELECT user_id, conversation_id, {columns}, {summary_columns}, pinned "
            f"FROM {world.keyspace}.user_conversations",
        )
    }

    last_g1 = (ids["msg4"], "alice", LONG_TEXT[:100], naive(at(7)))
    last_dm = (ids["dm2"], "bob", "[recalled]", naive(at(5)))
    listed = {
        ("alice", G1): ("group", "Team 2", "admin", True, *last_g1),
        ("bob", G1): ("group", "Team 2", "admin", True, *last_g1),
        ("carol", G1): ("group", "Team 2", "owner", True, *last_g1),
        # dave joined (the name on the event), then left; he never saw a message.
        ("dave", G1): ("group", "Team 2", "member", False, None, None, None, naive(at(16))),
        ("alice", DM): ("direct", None, "member", True, *last_dm),
        ("bob", DM): ("direct", None, "member", True, *last_dm),
        ("erin", G2): ("group", None, "owner", False, None, None, None, naive(at(20))),
        ("frank", G2): ("group", None, "member", False, None, None, None, naive(at(20))),
        ("gina", G3): ("group", None, "owner", False, None, None, None, naive(at(21))),
        ("erin", BIG): (None, None, None, None, ids["big1"], "frank", "", naive(at(24))),
    }
    assert set(found) == set(listed)

    def summary(user: str, conversation: str) -> tuple[Any, ...]:
        latest = s.last_summary(user, conversation)
        if latest is None:
            return (None,) * 6
        updated = [
            r.event.occurred_at
            for r in s.sync_records
            if r.user_id == user
            and r.conversation
            and r.conversation.conversation_id == conversation
        ][-1]
        read_seq, unread = latest.read_seq, latest.unread
        if user == "alice":  # every badge cleared last: read up to the last seq
            read_seq, unread = latest.last_seq, 0
        return (
            latest.last_seq,
            read_seq,
            unread,
            latest.muted,
            naive(latest.muted_until) if latest.muted_until else None,
            naive(updated),
        )

    for key, expected in listed.items():
        assert found[key] == (*expected, *summary(*key), None), key
    # The values the summaries carry, spelled out for two of them (the user processor does not
    # move last_seq for an edit: bob's last_seq is the recall's... then msg4's seq, 5).
    assert found[("bob", G1)][8:13] == (5, 8, 0, True, naive(at(24 * 60)))
    assert found[("alice", DM)][8:11] == (3, 3, 0)


def test_poison_records_are_dead_lettered_with_their_reason(world: World) -> None:
    catalog = topic_catalog(world.settings)
    for source, poison in world.built.poison.items():
        found = world.dead_letters[source]
        assert len(found) == len(poison), source
        assert {(value, headers["imstream.error.code"]) for _, value, headers in found} == set(
            poison
        )
        for _key, _value, headers in found:
            assert headers["imstream.source.topic"] == source
            assert int(headers["imstream.source.partition"]) >= 0
            assert int(headers["imstream.source.offset"]) >= 0
            assert headers["imstream.error.message"]
        assert catalog.by_name(source).dead_letter is not None
    # The batches that held them were committed all the same.
    assert committed_lag(world.settings, world.group_id, [t.name for t in world.first.inputs]) == 0
    assert world.first.stats.dead_lettered == sum(len(p) for p in world.built.poison.values())


# ---------------------------------------------------------------------------------------------
# Replays
# ---------------------------------------------------------------------------------------------


def test_a_replay_of_the_whole_range_leaves_every_table_as_it_was(
    world: World, cql_session: Session
) -> None:
    again = run_sink(world.settings, cql_session, group_id=f"t-cql-replay-{uuid.uuid4().hex[:8]}")
    assert again.stats.records >= world.first.stats.records
    assert snapshot(cql_session, world.keyspace) == world.tables


def test_older_records_fed_after_newer_ones_change_nothing(
    world: World, cql_session: Session
) -> None:
    produce(world.settings, world.built.older)
    # The first pass's group: only the records just produced are new to it.
    again = run_sink(world.settings, cql_session, group_id=world.group_id)
    assert again.stats.records == len(world.built.older)
    assert again.stats.dead_lettered == 0
    assert snapshot(cql_session, world.keyspace) == world.tables
    ks = world.keyspace
    # Spelled out: the later edit, the higher read, the newer name and role, the newer token.
    assert (
        select(
            cql_session,
            f"SELECT edited_seq FROM {ks}.timeline WHERE tenant_id = %s AND conversation_id = %s "
            "AND bucket = 0 AND seq = 5",
            TENANT,
            G1,
        )[0].edited_seq
        == 7
    )
    assert (
        select(
            cql_session,
            f"SELECT read_seq FROM {ks}.read_positions WHERE tenant_id = %s "
            "AND conversation_id = %s AND user_id = 'bob'",
            TENANT,
            G1,
        )[0].read_seq
        == 8
    )
    conversation = select(
        cql_session,
        f"SELECT name FROM {ks}.conversations WHERE tenant_id = %s AND conversation_id = %s",
        TENANT,
        G1,
    )[0]
    assert conversation.name == "Team 2"
    owner = select(
        cql_session,
        f"SELECT role FROM {ks}.members WHERE tenant_id = %s AND conversation_id = %s "
        "AND user_id = 'alice'",
        TENANT,
        G1,
    )[0]
    assert owner.role == "admin"
    token = select(
        cql_session,
        f"SELECT push_token FROM {ks}.devices WHERE tenant_id = %s AND user_id = 'alice'",
        TENANT,
    )[0].push_token
    context = device_context(TENANT, "alice", "alice-phone")
    assert unsealed(tenant_keys(cql_session, world.settings), TENANT, context, token) == "tok-a2"
    assert select(
        cql_session,
        f"SELECT last_seq, role FROM {ks}.user_conversations WHERE tenant_id = %s "
        "AND user_id = 'alice' AND conversation_id = %s",
        TENANT,
        G1,
    )[0] == (5, "admin")  # not the (0, "owner") of alice's first sync record


# ---------------------------------------------------------------------------------------------
# A write the cluster refuses for good
# ---------------------------------------------------------------------------------------------


def test_a_write_the_cluster_refuses_is_dead_lettered_and_the_rest_is_stored(
    settings: Settings, cql_session: Session, keyspace: str
) -> None:
    with catalog_topics(settings, new_prefix("cqlr")) as prefixed:
        # A sync retention beyond Cassandra's maximum TTL (20 years): every sync-queue write is
        # refused with InvalidRequest, for good — no retry can help.
        configured = keyspace_settings(prefixed, keyspace).model_copy(
            update={"sinks": prefixed.sinks.model_copy(update={"sync_retention_days": 365 * 30})}
        )
        migrate(cql_session, keyspace, 1)
        catalog = topic_catalog(configured)
        scenario = Scenario(catalog)
        record = scenario.queue(
            "bob",
            receipt(G1, "bob", 1, at(1)),
        )
        scenario.token(
            PushTokenRegistered.new(
                tenant_id=TENANT,
                occurred_at=at(2),
                payload=PushTokenRegisteredPayload(
                    user_id="bob",
                    device_id="bob-web",
                    provider=PushProvider.FCM,
                    token="tok-b",
                    app_id="chat.app",
                ),
            )
        )
        produce(configured, [*scenario.sync, *scenario.tokens])
        group_id = f"t-cql-refused-{uuid.uuid4().hex[:8]}"
        sink = run_sink(configured, cql_session, group_id=group_id)

        [(key, value, headers)] = read_dead_letters(
            configured, catalog.dead_letter_of(catalog.sync_events).name, expected=1
        )
        assert value == record.model_dump_json().encode()
        assert key == user_key(TENANT, "bob")
        assert headers["imstream.error.code"] == "cql-invalid-request"
        assert "ttl" in headers["imstream.error.message"].lower()
        assert sink.stats.dead_lettered == 1
        [token] = [
            r.push_token for r in select(cql_session, f"SELECT push_token FROM {keyspace}.devices")
        ]
        context = device_context(TENANT, "bob", "bob-web")
        assert unsealed(tenant_keys(cql_session, configured), TENANT, context, token) == "tok-b"
        assert committed_lag(configured, group_id, [t.name for t in sink.inputs]) == 0
