"""The stream worker as a real process against the real local Kafka."""

from __future__ import annotations

from pipelines.settings import Settings
from schemas.events import (
    Actor,
    ConversationCreated,
    ConversationCreatedPayload,
    ConversationKind,
    MessageSent,
    message_event_id,
)
from schemas.topics import topic_catalog
from tests.streams.support import TENANT, Worker, message, produce, wait_for_sync


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
