"""The stream stage's flows through the real worker process and the real local Kafka.

One worker serves the module (large-group threshold 3, so that a 4-member group runs in
read-diffusion mode); each test uses users and conversations of its own. Commands go in the way
the ingress publishes them (``TopicCatalog.route``), and every check reads the output topics back
as a ``read_committed`` consumer: sync queues, the conversation log, live deliveries, push jobs
and the user state the worker restores from.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from core.connections import kafka_config, kafka_producer_config
from core.settings import Settings
from schemas.events import (
    Actor,
    CommandRejected,
    ConversationAdvanced,
    ConversationCreated,
    ConversationCreatedPayload,
    ConversationDeleted,
    ConversationDeletedPayload,
    ConversationKind,
    ConversationMuteChanged,
    ConversationMuteChangedPayload,
    ConversationRenamed,
    ConversationRenamedPayload,
    DeviceConnected,
    DevicePresencePayload,
    Event,
    GroupDelivery,
    LiveDelivery,
    MessageEdited,
    MessageEditedPayload,
    MessageRecalled,
    MessageRecalledPayload,
    MessageSent,
    Platform,
    PushJob,
    ReceiptRead,
    ReceiptReadPayload,
    SyncRecord,
    TextBody,
    TypingChanged,
    TypingChangedPayload,
    direct_conversation_id,
    encode_event,
    message_event_id,
    parse_event,
)
from schemas.topics import TopicCatalog, topic_catalog
from streams.processors import USERS_TABLE, stored_user
from streams.runtime import decode_state
from streams.state import MemoryState
from streams.users import UserState
from tests.streams.support import TENANT, Worker, message, worker_environment

WAIT = 90.0


@pytest.fixture(scope="module")
def flow_worker(
    stream_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    environment = worker_environment(stream_settings, large_group_threshold="3")
    worker = Worker(environment, Path(tmp_path_factory.mktemp("flows")) / "stream-worker.log")
    worker.start()
    yield worker
    worker.stop()


class Kafka:
    """Publishes commands as the ingress does and reads output topics back, read-committed."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.catalog: TopicCatalog = topic_catalog(settings)
        self._producer = Producer(kafka_producer_config(settings, **{"enable.idempotence": True}))
        self._readers: dict[str, Consumer] = {}
        self._records: dict[str, list[tuple[bytes | None, bytes | None]]] = {}
        self._created: dict[str, float] = {}

    def publish(self, *events: Event) -> None:
        for event in events:
            topic, key = self.catalog.route(event)
            self._producer.produce(topic.name, key=key, value=encode_event(event))
        assert self._producer.flush(30) == 0

    def records(self, topic: str) -> list[tuple[bytes | None, bytes | None]]:
        """Everything the topic holds so far (key, value), in partition order."""
        if topic not in self._readers:
            reader = Consumer(
                kafka_config(
                    self.settings,
                    **{
                        "group.id": f"t-flows-{uuid.uuid4().hex}",
                        "enable.auto.commit": False,
                        "isolation.level": "read_committed",
                    },
                )
            )
            partitions = reader.list_topics(topic, timeout=30).topics[topic].partitions
            reader.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
            self._readers[topic] = reader
            self._records[topic] = []
            self._created[topic] = time.monotonic()
        # Drain what is there: until a fetch comes back empty, and not before the reader's
        # first fetches had time to arrive.
        while True:
            messages = self._readers[topic].consume(10_000, timeout=0.3)
            self._records[topic].extend((m.key(), m.value()) for m in messages if m.error() is None)
            if not messages and time.monotonic() - self._created[topic] > 2.0:
                return self._records[topic]

    def wait(self, what: str, check: Callable[[], Any]) -> Any:
        """Poll ``check`` until it returns something truthy; fail after ``WAIT`` seconds."""
        deadline = time.monotonic() + WAIT
        while True:
            result = check()
            if result:
                return result
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.2)

    def queue(self, user: str) -> list[SyncRecord]:
        queue = [
            record
            for record in (
                SyncRecord.model_validate_json(value or b"")
                for _key, value in self.records(self.catalog.sync_events.name)
            )
            if record.user_id == user
        ]
        sync_ids = [record.sync_id for record in queue]
        assert sync_ids == sorted(set(sync_ids)), f"{user}: sync ids not strictly increasing"
        return queue

    def events(self, user: str, kind: type[Any]) -> list[Any]:
        return [record.event for record in self.queue(user) if isinstance(record.event, kind)]

    def live(self) -> list[LiveDelivery]:
        return [
            LiveDelivery.model_validate_json(value or b"")
            for _key, value in self.records(self.catalog.live_delivery.name)
        ]

    def pushes(self) -> list[PushJob]:
        return [
            PushJob.model_validate_json(value or b"")
            for _key, value in self.records(self.catalog.push_jobs.name)
        ]

    def sequenced(self, conversation_id: str) -> list[Event]:
        events = [
            parse_event(value or b"")
            for _key, value in self.records(self.catalog.messages_sequenced.name)
        ]
        return [e for e in events if getattr(e.payload, "conversation_id", None) == conversation_id]

    def user_state(self, user: str) -> UserState:
        state = self.user_state_or_none(user)
        assert state is not None, f"no state for {user}"
        return state

    def user_state_or_none(self, user: str) -> UserState | None:
        latest = MemoryState()
        for key, value in self.records(self.catalog.user_state.name):
            latest.put(USERS_TABLE, (key or b"").decode(), decode_state(value))
        return stored_user(latest, f"{TENANT}/{user}")

    def devices_online(self, user: str, count: int) -> None:
        """Wait until the user processor has applied ``count`` online devices of ``user``
        (presence travels on its own topic, so other inputs may overtake it)."""

        def applied() -> bool:
            state = self.user_state_or_none(user)
            return state is not None and len(state.devices) == count

        self.wait(f"{count} devices of {user} online", applied)


@pytest.fixture
def kafka(stream_settings: Settings, flow_worker: Worker) -> Kafka:
    return Kafka(stream_settings)


def ids(prefix: str) -> Callable[[str], str]:
    suffix = uuid.uuid4().hex[:6]
    return lambda name: f"{prefix}-{name}-{suffix}"


def actor(user: str, device: str = "phone") -> Actor:
    return Actor(user_id=user, device_id=f"{user}-{device}")


def created(owner: str, conversation_id: str, kind: ConversationKind, *others: str) -> Event:
    return ConversationCreated.new(
        tenant_id=TENANT,
        actor=actor(owner),
        event_id=message_event_id(TENANT, owner, f"create-{conversation_id}"),
        payload=ConversationCreatedPayload(
            conversation_id=conversation_id, kind=kind, members=[owner, *others]
        ),
    )


def sent(user: str, conversation_id: str, client_msg_id: str) -> MessageSent:
    return message(user, conversation_id, client_msg_id, text=f"text of {client_msg_id}")


def read(user: str, conversation_id: str, seq: int, device: str = "phone") -> ReceiptRead:
    return ReceiptRead.new(
        tenant_id=TENANT,
        actor=actor(user, device),
        payload=ReceiptReadPayload(conversation_id=conversation_id, conversation_seq=seq),
    )


def online(user: str, device: str, node: str) -> DeviceConnected:
    return DeviceConnected.new(
        tenant_id=TENANT,
        payload=DevicePresencePayload(
            user_id=user,
            device_id=f"{user}-{device}",
            platform=Platform.IOS,
            node_id=node,
            connection_id=f"conn-{uuid.uuid4().hex[:8]}",
        ),
    )


def test_direct_chat_receipts_unread_counts_and_live_routing_to_two_devices(
    kafka: Kafka,
) -> None:
    name = ids("dm")
    ann, ben = name("ann"), name("ben")
    node_a, node_b = name("node-a"), name("node-b")
    conversation_id = direct_conversation_id(TENANT, ann, ben)
    kafka.publish(online(ben, "phone", node_a), online(ben, "laptop", node_b))
    kafka.devices_online(ben, 2)
    kafka.publish(created(ann, conversation_id, ConversationKind.DIRECT, ben))
    messages = [sent(ann, conversation_id, name(f"m{i}")) for i in range(3)]
    kafka.publish(*messages)
    kafka.wait("ben's three messages", lambda: len(kafka.events(ben, MessageSent)) == 3)
    kafka.publish(read(ben, conversation_id, 2, device="laptop"))
    kafka.wait("the receipt at ann", lambda: kafka.events(ann, ReceiptRead))
    kafka.publish(read(ben, conversation_id, 1))  # backwards: changes nothing
    kafka.wait("the second read", lambda: len(kafka.events(ann, ReceiptRead)) == 2)

    for user in (ann, ben):
        got = kafka.events(user, MessageSent)
        assert [m.event_id for m in got] == [m.event_id for m in messages]
        assert [m.payload.conversation_seq for m in got] == [1, 2, 3]
    (receipt, _backwards) = kafka.events(ann, ReceiptRead)
    assert (receipt.actor.user_id, receipt.payload.conversation_seq) == (ben, 2)
    # Both of ben's devices get the read position (the same event in his queue).
    assert [r.payload.conversation_seq for r in kafka.events(ben, ReceiptRead)] == [2, 1]
    state = kafka.wait(
        "ben's state after the reads",
        lambda: (s := kafka.user_state(ben)).conversations[conversation_id].read_seq == 2 and s,
    )
    view = state.conversations[conversation_id]
    assert (view.read_seq, view.unread, view.last_seq) == (2, 1, 3)
    assert kafka.user_state(ann).conversations[conversation_id].unread == 0
    # Every entry carries the conversation as the user sees it then: the list view for sinks.
    summaries = [r.conversation for r in kafka.queue(ben) if r.conversation is not None]
    assert [(c.read_seq, c.unread) for c in summaries[-3:]] == [(0, 3), (2, 1), (2, 1)]
    assert {c.conversation_id for c in summaries} == {conversation_id}
    # Live routing: every one of ben's stored events went to each node holding one of his devices.
    live = [d for d in kafka.live() if d.user_id == ben]
    by_node = {(d.node_id, tuple(d.device_ids or ())) for d in live}
    assert by_node == {(node_a, (f"{ben}-phone",)), (node_b, (f"{ben}-laptop",))}
    ben_sync_ids = {r.sync_id for r in kafka.queue(ben)}
    for node in (node_a, node_b):
        assert {d.sync_id for d in live if d.node_id == node} == ben_sync_ids
    assert not [d for d in kafka.live() if d.user_id == ann]  # ann has no device online
    assert not [p for p in kafka.pushes() if p.user_id in (ann, ben)]  # ben online, ann sender


def test_typing_reaches_online_devices_live_and_is_never_stored(kafka: Kafka) -> None:
    name = ids("typing")
    cat, dog = name("cat"), name("dog")
    node = name("node")
    conversation_id = direct_conversation_id(TENANT, cat, dog)
    kafka.publish(online(dog, "phone", node))
    kafka.devices_online(dog, 1)
    kafka.publish(created(cat, conversation_id, ConversationKind.DIRECT, dog))
    # Typing travels on its own topic: wait until the conversation exists.
    kafka.wait("the conversation", lambda: kafka.events(dog, ConversationCreated))
    typing = TypingChanged.new(
        tenant_id=TENANT,
        actor=actor(cat),
        payload=TypingChangedPayload(conversation_id=conversation_id, active=True),
    )
    kafka.publish(typing)
    delivery = kafka.wait(
        "the typing indicator at dog's node",
        lambda: [d for d in kafka.live() if d.user_id == dog and d.event.type == "typing.changed"],
    )
    assert (delivery[0].node_id, delivery[0].sync_id) == (node, None)
    assert kafka.queue(dog)  # the creation is there …
    assert not kafka.events(dog, TypingChanged)  # … the typing indicator is not
    assert not kafka.events(cat, TypingChanged)


def test_group_authorization_recall_edit_and_duplicate_sends(kafka: Kafka) -> None:
    name = ids("group")
    oli, pat, quin, mallory = name("oli"), name("pat"), name("quin"), name("mallory")
    group_id = name("g")
    members = (oli, pat, quin)
    kafka.publish(created(oli, group_id, ConversationKind.GROUP, pat, quin))
    m1, m2, m3 = (
        sent(oli, group_id, name("m1")),
        sent(pat, group_id, name("m2")),
        sent(quin, group_id, name("m3")),
    )

    def rename(user: str, to: str) -> ConversationRenamed:
        return ConversationRenamed.new(
            tenant_id=TENANT,
            actor=actor(user),
            payload=ConversationRenamedPayload(conversation_id=group_id, name=to),
        )

    def recall(user: str, message: MessageSent) -> MessageRecalled:
        return MessageRecalled.new(
            tenant_id=TENANT,
            actor=actor(user),
            payload=MessageRecalledPayload(conversation_id=group_id, message_id=message.event_id),
        )

    def edit(user: str, message: MessageSent) -> MessageEdited:
        return MessageEdited.new(
            tenant_id=TENANT,
            actor=actor(user),
            payload=MessageEditedPayload(
                conversation_id=group_id, message_id=message.event_id, body=TextBody(text="fixed")
            ),
        )

    kafka.publish(
        sent(mallory, group_id, name("spam")),  # not a member
        rename(pat, "pat's"),  # a member, not an admin
        rename(oli, "renamed"),
        m1,
        m2,
        m2,  # the client re-sent it
        m3,
        recall(quin, m1),  # not the sender, not an admin
        recall(oli, m1),
        edit(pat, m3),  # not the sender
        edit(pat, m2),
        recall(oli, m3),  # the owner recalls another member's message
    )
    kafka.wait(
        "every member's events",
        lambda: all(len(kafka.events(u, MessageRecalled)) == 2 for u in members),
    )
    kafka.wait(
        "the rejections",
        lambda: (
            len([r for u in (mallory, pat, quin) for r in kafka.events(u, CommandRejected)]) == 4
        ),
    )
    reasons = {
        (u, r.payload.command_type, r.payload.reason)
        for u in (mallory, pat, quin)
        for r in kafka.events(u, CommandRejected)
    }
    assert reasons == {
        (mallory, "message.sent", "not-a-member"),
        (pat, "conversation.renamed", "not-allowed"),
        (quin, "message.recalled", "not-the-sender"),
        (pat, "message.edited", "not-the-sender"),
    }
    for user in members:
        assert [e.payload.name for e in kafka.events(user, ConversationRenamed)] == ["renamed"]
        assert [m.event_id for m in kafka.events(user, MessageSent)] == [
            m1.event_id,
            m2.event_id,
            m3.event_id,
        ]
        assert [r.payload.message_id for r in kafka.events(user, MessageRecalled)] == [
            m1.event_id,
            m3.event_id,
        ]
        assert [e.payload.message_id for e in kafka.events(user, MessageEdited)] == [m2.event_id]
    log = kafka.sequenced(group_id)
    seqs = [
        e.payload.conversation_seq or 0
        for e in log
        if isinstance(e, MessageSent | MessageRecalled | MessageEdited)
    ]
    assert seqs == sorted(set(seqs)) == list(range(1, 7))  # m1 m2 m3, two recalls, one edit
    assert sum(1 for e in log if isinstance(e, MessageSent) and e.event_id == m2.event_id) == 1


def test_a_large_group_is_read_diffused_and_its_members_views_still_converge(
    kafka: Kafka,
) -> None:
    name = ids("modes")
    amy, bo, cy, dee = name("amy"), name("bo"), name("cy"), name("dee")
    small, large = name("small"), name("large")  # 3 members: write diffusion; 4 (> 3): read
    kafka.publish(
        created(amy, small, ConversationKind.GROUP, bo, cy),
        created(amy, large, ConversationKind.GROUP, bo, cy, dee),
    )
    for conversation_id in (small, large):
        kafka.publish(
            sent(amy, conversation_id, name(f"{conversation_id}-1")),
            sent(bo, conversation_id, name(f"{conversation_id}-2")),
            sent(amy, conversation_id, name(f"{conversation_id}-3")),
            read(cy, conversation_id, 2),
        )
    kafka.wait("cy's reads", lambda: len(kafka.events(cy, ReceiptRead)) == 2)

    def group_records() -> list[GroupDelivery]:
        return [
            record
            for record in (
                GroupDelivery.model_validate_json(value or b"")
                for _key, value in kafka.records(kafka.catalog.group_delivery.name)
            )
            if record.conversation_id == large
        ]

    kafka.wait("the large group's three messages", lambda: len(group_records()) == 4)
    switch, *messages = group_records()
    # Created above the threshold: the member list once, then one record per message, each
    # naming its sender (whose own queue has it), in seq order.
    assert sorted(switch.members or []) == sorted([amy, bo, cy, dee])
    assert [
        (m.event.payload.conversation_seq, m.synced)  # type: ignore[union-attr]
        for m in messages
    ] == [(1, [amy]), (2, [bo]), (3, [amy])]
    assert [m.position for m in messages] == sorted({m.position for m in messages})

    def messages_in_queue(user: str, conversation_id: str) -> list[tuple[int, str]]:
        return [
            (event.payload.conversation_seq or 0, event.actor.user_id)
            for event in kafka.events(user, MessageSent)
            if event.payload.conversation_id == conversation_id
        ]

    for user in (amy, bo, cy):
        assert messages_in_queue(user, small) == [(1, amy), (2, bo), (3, amy)]
    # In the large group each queue holds the user's own messages only.
    assert messages_in_queue(amy, large) == [(1, amy), (3, amy)]
    assert messages_in_queue(bo, large) == [(2, bo)]
    assert messages_in_queue(cy, large) == messages_in_queue(dee, large) == []
    assert not kafka.events(dee, ConversationAdvanced)
    # Read positions still converge: own messages and own reads move them.
    views = {user: kafka.user_state(user).conversations[large] for user in (amy, bo, cy, dee)}
    assert all(view.large for view in views.values())
    assert (views[amy].read_seq, views[bo].read_seq, views[cy].read_seq) == (3, 2, 2)
    assert kafka.user_state(cy).conversations[small].unread == 1  # read 2, then amy's 3
    # Receipts: the small group's members see cy's read; in the large group only cy's devices.
    assert [r.payload.conversation_id for r in kafka.events(amy, ReceiptRead)] == [small]
    assert sorted(r.payload.conversation_id for r in kafka.events(cy, ReceiptRead)) == sorted(
        [small, large]
    )


def test_push_jobs_for_offline_users_collapse_bursts_and_honour_mute(kafka: Kafka) -> None:
    name = ids("push")
    eve, dan = name("eve"), name("dan")
    loud, quiet = name("loud"), name("quiet")
    kafka.publish(
        created(eve, loud, ConversationKind.GROUP, dan),
        created(eve, quiet, ConversationKind.GROUP, dan),
    )
    # A user mutes a conversation once it is theirs (their devices list it).
    kafka.wait("dan's groups", lambda: len(kafka.events(dan, ConversationCreated)) == 2)
    kafka.publish(
        ConversationMuteChanged.new(
            tenant_id=TENANT,
            actor=actor(dan),
            payload=ConversationMuteChangedPayload(conversation_id=quiet, muted=True),
        ),
    )
    # The mute travels on another topic than the messages: wait until it is applied.
    kafka.wait("dan's mute", lambda: kafka.events(dan, ConversationMuteChanged))
    kafka.publish(*(sent(eve, loud, name(f"loud-{i}")) for i in range(4)))
    kafka.publish(*(sent(eve, quiet, name(f"quiet-{i}")) for i in range(3)))
    kafka.wait("dan's seven messages", lambda: len(kafka.events(dan, MessageSent)) == 7)
    jobs = kafka.wait("dan's push job", lambda: [p for p in kafka.pushes() if p.user_id == dan])
    time.sleep(1.0)  # nothing more may come
    jobs = [p for p in kafka.pushes() if p.user_id in (dan, eve)]
    # One push for the burst in the loud conversation (the collapse window is 30 s), none for
    # the muted one, none to the sender.
    assert [(j.user_id, j.conversation_id, j.conversation_seq) for j in jobs] == [(dan, loud, 1)]
    assert jobs[0].merged_count == 1
    assert kafka.user_state(dan).conversations[loud].merged_since_push == 3
    assert kafka.user_state(dan).conversations[quiet].unread == 3  # muted, still unread


def test_a_squatted_direct_id_and_an_actorless_delete_are_refused_and_delivery_goes_on(
    kafka: Kafka, flow_worker: Worker
) -> None:
    name = ids("admission")
    ann, ben, mallory = name("ann"), name("ben"), name("mallory")
    dm = direct_conversation_id(TENANT, ann, ben)
    team = name("team")
    # Mallory creates a group under ann and ben's direct conversation id, and someone writes an
    # actor-less delete of ann's team straight to the conversation input.
    squat = created(mallory, dm, ConversationKind.GROUP, ann, ben)
    orphan_delete = ConversationDeleted.new(
        tenant_id=TENANT, payload=ConversationDeletedPayload(conversation_id=team)
    )
    kafka.publish(created(ann, team, ConversationKind.GROUP, ben), squat, orphan_delete)
    kafka.publish(created(ann, dm, ConversationKind.DIRECT, ben))
    messages = [sent(ann, dm, name("dm-1")), sent(ben, team, name("team-1"))]
    kafka.publish(*messages)

    kafka.wait("ben's two messages", lambda: len(kafka.events(ben, MessageSent)) == 2)
    # The pair has its own direct conversation, and the team still stands (two conversations,
    # so no order between them).
    assert {event.event_id for event in kafka.events(ben, MessageSent)} == {
        message.event_id for message in messages
    }
    assert {event.payload.conversation_id for event in kafka.events(ben, ConversationCreated)} == {
        dm,
        team,
    }
    assert not kafka.events(ben, ConversationDeleted)
    (refusal,) = kafka.wait("mallory's refusal", lambda: kafka.events(mallory, CommandRejected))
    assert (refusal.payload.command_event_id, refusal.payload.reason) == (
        squat.event_id,
        "conversation-id-reserved",
    )
    dead = [
        parse_event(value or b"")
        for _key, value in kafka.records(kafka.catalog.messages_in.dead_letter or "")
    ]
    assert orphan_delete.event_id in {event.event_id for event in dead}
    assert flow_worker.starts == 1
    assert flow_worker.process is not None and flow_worker.process.poll() is None
