"""The stream worker as a real process against the real local Kafka."""

from __future__ import annotations

import re
import time

from core.settings import Settings
from schemas.events import (
    Actor,
    ConversationCreated,
    ConversationCreatedPayload,
    ConversationKind,
    MessageSent,
    SyncRecord,
    direct_conversation_id,
    message_event_id,
)
from schemas.topics import topic_catalog
from tests.streams.support import TENANT, Worker, created, message, produce, wait_for_sync


def test_the_worker_fans_a_group_out_to_every_members_sync_queue(
    worker: Worker, stream_settings: Settings
) -> None:
    catalog = topic_catalog(stream_settings)
    members = ["alice", "bob", "carol"]
    group = ConversationCreated.new(
        tenant_id=TENANT,
        actor=Actor(user_id="alice"),
        event_id=message_event_id(TENANT, "alice", "create-g1"),
        payload=ConversationCreatedPayload(
            conversation_id="g1", kind=ConversationKind.GROUP, members=members
        ),
    )
    sends = [message(members[index % 3], "g1", f"g{index}") for index in range(60)]
    stranger = message("mallory", "g1", "intrusion")
    worker.start()
    produce(stream_settings, catalog, [group, *sends, sends[5], stranger])
    queues = wait_for_sync(stream_settings, catalog, 3 * 61 + 1, timeout=120)
    expected = [send.event_id for send in sends]
    for user in members:
        queued = [queues[user][sync_id].event for sync_id in sorted(queues[user])]
        assert [e.event_id for e in queued if isinstance(e, MessageSent)] == expected
        assert sorted(queues[user]) == list(range(1, 62))
    (rejection,) = queues["mallory"].values()
    assert rejection.event.type == "command.rejected"


RESTORED = re.compile(
    r"restored (\d+) state records for partitions \[[0-9, ]*\] in [0-9.]+s "
    r"\(from (the beginning|the store's checkpoints)\)"
)


def restores_since(worker: Worker, offset: int) -> list[tuple[int, str]]:
    """``(records, from where)`` of each restore the worker logged after byte ``offset``."""
    text = worker.log_path.read_bytes()[offset:].decode(errors="replace")
    return [(int(count), where) for count, where in RESTORED.findall(text)]


def test_a_restarted_worker_reads_only_the_tail_of_its_state(
    worker: Worker, stream_settings: Settings
) -> None:
    catalog = topic_catalog(stream_settings)
    pairs = [
        (f"rs{n}", f"rs{n + 1}", direct_conversation_id(TENANT, f"rs{n}", f"rs{n + 1}"))
        for n in range(0, 40, 2)
    ]

    def round_of(name: str) -> list[MessageSent]:
        return [message(a, cid, f"{name}-{cid}-{i}") for a, _b, cid in pairs for i in range(5)]

    def wait_for(entries_per_user: int) -> dict[str, dict[int, SyncRecord]]:
        deadline = time.monotonic() + 120
        while True:
            queues = wait_for_sync(stream_settings, catalog, 0, timeout=120)
            mine = {user: queue for user, queue in queues.items() if user.startswith("rs")}
            if len(mine) == 40 and all(len(q) >= entries_per_user for q in mine.values()):
                return mine
            assert time.monotonic() < deadline, "the sync queues did not fill up in time"

    rounds = [round_of(name) for name in ("first", "second", "third")]
    worker.start()
    produce(stream_settings, catalog, [*(created(a, b, cid) for a, b, cid in pairs), *rounds[0]])
    wait_for(1 + 5)
    # A clean stop records the store's checkpoints: the restart reads nothing back.
    worker.stop()
    offset = worker.log_path.stat().st_size
    worker.start()
    assert restores_since(worker, offset) == [(0, "the store's checkpoints")] * 2
    produce(stream_settings, catalog, rounds[1])
    wait_for(1 + 10)
    # Killed: the restart reads the tail written since the last checkpoint, not everything.
    worker.kill()
    offset = worker.log_path.stat().st_size
    worker.start()
    restores = restores_since(worker, offset)
    assert [where for _count, where in restores] == ["the store's checkpoints"] * 2
    produce(stream_settings, catalog, rounds[2])
    queues = wait_for(1 + 15)
    for a, b, cid in pairs:
        sent = [m.event_id for r in rounds for m in r if m.payload.conversation_id == cid]
        for user in (a, b):
            queue = [queues[user][sync_id].event for sync_id in sorted(queues[user])]
            assert sorted(queues[user]) == list(range(1, 17)), user
            assert [e.event_id for e in queue if isinstance(e, MessageSent)] == sent, user
