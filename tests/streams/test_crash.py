"""The crash test: 10,000+ messages through a worker process that is SIGKILLed at random moments.

A feeder publishes 1:1 and group messages (and client retries of some of them) while the worker
is killed with SIGKILL six times and restarted each time. Afterwards every topic is read back as
a ``read_committed`` consumer — what sinks, devices and the next stage see — and the delivery
contract is checked record by record, not merely "eventually present":

- exactly one sequenced message per ``(sender, client_msg_id)``, retries included;
- per conversation, ``seq`` runs 1, 2, 3 … in log order: strictly increasing, none used twice;
- each member's sync queue holds each message of the conversation exactly once, in seq order,
  with strictly increasing ``sync_id`` and no record repeated;
- each member's unread count (the user state the worker restores from) equals the number of
  messages from others after the member's own last message (sending reads up to it).
"""

from __future__ import annotations

import itertools
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

from core.settings import Settings
from schemas.events import (
    ConversationKind,
    Event,
    MessageSent,
    SyncRecord,
    parse_event,
)
from schemas.topics import TopicCatalog, topic_catalog
from streams.processors import USERS_TABLE, stored_user
from streams.runtime import decode_state
from streams.state import MemoryState
from tests.streams.support import (
    TENANT,
    Worker,
    conversation_created,
    created,
    direct_pairs,
    feeding,
    message,
    produce,
    read_records,
    wait_for_sync,
)

MESSAGES = 10_000
KILLS = 6
RETRY_EVERY = 37  # every 37th message is sent a second time, as a client retry would


@dataclass(frozen=True)
class Sent:
    """What the feeder sent, and where: what the checks read back after the run."""

    settings: Settings
    catalog: TopicCatalog
    members: dict[str, list[str]]
    """The members of each conversation."""
    sends: list[MessageSent]
    order: dict[str, int | None]
    """Each message's seq, by event id, as the worker sequenced it."""


def test_sigkilled_worker_keeps_every_message_exactly_once(
    worker: Worker, stream_settings: Settings
) -> None:
    catalog = topic_catalog(stream_settings)
    rng = random.Random(20261127)
    pairs = direct_pairs(30)
    members: dict[str, list[str]] = {cid: [a, b] for a, b, cid in pairs}
    group = ConversationKind.GROUP
    groups = [
        conversation_created(f"crash-g{i}", [f"g{i}-m{j}" for j in range(6)], group)
        for i in range(4)
    ]
    for created_group in groups:
        members[created_group.payload.conversation_id] = list(created_group.payload.members)
    conversations = sorted(members)
    sends: list[MessageSent] = []
    for index in range(MESSAGES):
        conversation_id = conversations[index % len(conversations)]
        sender = rng.choice(members[conversation_id])
        sends.append(message(sender, conversation_id, f"crash-{index}"))
    stream: list[Event] = []
    for index, send in enumerate(sends):
        stream.append(send)
        if index % RETRY_EVERY == 0:
            stream.append(send)  # the same event id again: a client's re-send
    produce(stream_settings, catalog, [*(created(a, b, cid) for a, b, cid in pairs), *groups])

    feeder = feeding(stream_settings, catalog, stream, batch=400, pause=0.3)
    worker.start()
    feeder.start()
    for _ in range(KILLS):
        time.sleep(rng.uniform(0.3, 2.5))
        worker.kill()
        worker.start()
    feeder.join()
    assert worker.starts == KILLS + 1

    expected_entries = sum(len(m) for m in members.values()) + sum(
        len(members[send.payload.conversation_id]) for send in sends
    )
    wait_for_sync(stream_settings, catalog, expected_entries, timeout=300)

    # Exactly one sequenced record per message, seqs 1, 2, 3 … per conversation in log order.
    sequenced = [
        parse_event(r.value or b"")
        for r in read_records(stream_settings, catalog.messages_sequenced.name)
    ]
    messages = [event for event in sequenced if isinstance(event, MessageSent)]
    assert_sequenced_once_in_order(messages, sends)
    order = {event.event_id: event.payload.conversation_seq for event in messages}
    sent = Sent(stream_settings, catalog, members, sends, order)
    assert_queues_in_order(sent)
    assert_unread_restored(sent)


def assert_sequenced_once_in_order(messages: list[MessageSent], sends: list[MessageSent]) -> None:
    """Exactly one sequenced record per message, seqs 1, 2, 3 … per conversation in log order."""
    per_message = Counter(event.event_id for event in messages)
    assert set(per_message) == {send.event_id for send in sends}
    assert max(per_message.values()) == 1, "a message was sequenced more than once"
    seqs: dict[str, list[int]] = defaultdict(list)
    for event in messages:
        seqs[event.payload.conversation_id].append(event.payload.conversation_seq or 0)
    for conversation_id, numbers in seqs.items():
        assert numbers == list(range(1, len(numbers) + 1)), conversation_id


def assert_queues_in_order(sent: Sent) -> None:
    """Each member's queue: every message once, in seq order, sync ids strictly increasing."""
    queues: dict[str, list[SyncRecord]] = defaultdict(list)
    for record in read_records(sent.settings, sent.catalog.sync_events.name):
        sync = SyncRecord.model_validate_json(record.value or b"")
        queues[sync.user_id].append(sync)
    for conversation_id, users in sent.members.items():
        wanted = [
            send.event_id for send in sent.sends if send.payload.conversation_id == conversation_id
        ]
        wanted.sort(key=lambda event_id: sent.order[event_id] or 0)
        for user in users:
            got = [
                s.event.event_id
                for s in queues[user]
                if isinstance(s.event, MessageSent)
                and s.event.payload.conversation_id == conversation_id
            ]
            assert got == wanted, f"{user} in {conversation_id}"
    for user, queue in queues.items():
        sync_ids = [s.sync_id for s in queue]
        assert all(a < b for a, b in itertools.pairwise(sync_ids)), user


def assert_unread_restored(sent: Sent) -> None:
    """Unread counts in the restored user state equal the messages from others."""
    states = MemoryState()
    for record in read_records(sent.settings, sent.catalog.user_state.name):
        states.put(USERS_TABLE, (record.key or b"").decode(), decode_state(record.value))
    for conversation_id, users in sent.members.items():
        log = sorted(
            (sent.order[send.event_id] or 0, send.actor.user_id if send.actor else "")
            for send in sent.sends
            if send.payload.conversation_id == conversation_id
        )
        for user in users:
            # Sending reads the conversation up to one's own message (docs/streams.md).
            own = [seq for seq, sender in log if sender == user]
            read_up_to = own[-1] if own else 0
            implied = sum(1 for seq, sender in log if sender != user and seq > read_up_to)
            state = stored_user(states, f"{TENANT}/{user}")
            assert state is not None, user
            assert state.conversations[conversation_id].unread == implied, user
