"""Admission (issue 15, item 4): only users the tenant knows — who signed in at least once — may
be named in a create or an add, so a create naming 999 invented users costs one refusal instead
of 11 MB of sync records and state for phantom users; everyone else's delivery goes on.

The worker here runs the default (``IM_STREAMS__MEMBER_ADMISSION=known``); the other stream
tests run ``open`` because their users never sign in.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.settings import Settings
from schemas.events import (
    Actor,
    CommandRejected,
    ConversationCreated,
    ConversationCreatedPayload,
    ConversationKind,
    ConversationMemberAdded,
    ConversationMemberAddedPayload,
    DeviceConnected,
    DevicePresencePayload,
    Event,
    MessageSent,
    Platform,
    SyncRecord,
    message_event_id,
)
from schemas.topics import topic_catalog, user_key
from tests.streams.support import (
    TENANT,
    Worker,
    message,
    produce_routed,
    read_records,
    wait_for_sync,
    worker_environment,
)

PHANTOMS = 998


@pytest.fixture
def admitting_worker(stream_settings: Settings, tmp_path: Path) -> Iterator[Worker]:
    environment = worker_environment(stream_settings, member_admission="known")
    process = Worker(environment, tmp_path / "stream-worker.log")
    yield process
    process.stop()


def signs_in(user: str) -> DeviceConnected:
    return DeviceConnected.new(
        tenant_id=TENANT,
        payload=DevicePresencePayload(
            user_id=user,
            device_id=f"{user}-phone",
            platform=Platform.IOS,
            node_id="ingress-1",
            connection_id=f"{user}-conn",
        ),
    )


def group(conversation_id: str, creator: str, members: list[str]) -> ConversationCreated:
    return ConversationCreated.new(
        tenant_id=TENANT,
        actor=Actor(user_id=creator),
        event_id=message_event_id(TENANT, creator, f"create-{conversation_id}"),
        payload=ConversationCreatedPayload(
            conversation_id=conversation_id,
            kind=ConversationKind.GROUP,
            members=[creator, *members],
            owner_id=creator,
        ),
    )


def add(conversation_id: str, actor: str, user: str) -> ConversationMemberAdded:
    return ConversationMemberAdded.new(
        tenant_id=TENANT,
        actor=Actor(user_id=actor),
        payload=ConversationMemberAddedPayload(conversation_id=conversation_id, user_id=user),
    )


def test_only_users_the_tenant_knows_may_be_named_as_members(
    admitting_worker: Worker, stream_settings: Settings
) -> None:
    catalog = topic_catalog(stream_settings)
    admitting_worker.start()
    produce_routed(stream_settings, [signs_in("ann"), signs_in("bob")])
    known = {user_key(TENANT, user) for user in ("ann", "bob")}
    deadline = time.monotonic() + 60
    while not known <= {r.key for r in read_records(stream_settings, catalog.known_users.name)}:
        assert time.monotonic() < deadline, "the first sign-ins were not announced"

    phantoms = [f"phantom-{n}" for n in range(PHANTOMS)]
    events: list[Event] = [
        group("flood", "mallory", ["ann", *phantoms]),
        group("team", "ann", ["bob"]),
        *(message("ann", "team", f"hello-{n}") for n in range(5)),
        add("team", "ann", "carl"),
    ]
    produce_routed(stream_settings, events)
    queues = wait_for_sync(stream_settings, catalog, 1 + 6 * 2 + 1, timeout=120)
    # The flood: one refusal, to mallory; nothing for ann or any phantom.
    (refusal,) = [record.event for record in queues["mallory"].values()]
    assert isinstance(refusal, CommandRejected)
    assert (refusal.payload.reason, refusal.payload.command_type) == (
        "unknown-user",
        "conversation.created",
    )
    assert not any(user.startswith("phantom-") for user in queues)
    # The team's delivery went on; adding carl, who never signed in, is refused.
    for user in ("ann", "bob"):
        events_of = [queues[user][sync_id].event for sync_id in sorted(queues[user])]
        sent = [e.event_id for e in events_of if isinstance(e, MessageSent)]
        assert sent == [message("ann", "team", f"hello-{n}").event_id for n in range(5)], user
    last = queues["ann"][max(queues["ann"])].event
    assert isinstance(last, CommandRejected) and last.payload.reason == "unknown-user"

    # Once carl signs in he may be added: he gets the membership and the next message.
    produce_routed(stream_settings, [signs_in("carl")])
    deadline = time.monotonic() + 60
    while user_key(TENANT, "carl") not in {
        r.key for r in read_records(stream_settings, catalog.known_users.name)
    }:
        assert time.monotonic() < deadline, "carl's sign-in was not announced"
    time.sleep(1.0)  # the conversation processor reads the known users between its batches
    produce_routed(stream_settings, [add("team", "ann", "carl"), message("ann", "team", "after")])
    deadline = time.monotonic() + 60
    while True:
        queues = wait_for_sync(stream_settings, catalog, 0, timeout=60)
        carl: list[SyncRecord] = [queues["carl"][s] for s in sorted(queues.get("carl", {}))]
        if len(carl) >= 2:
            break
        assert time.monotonic() < deadline, "carl was not added"
    assert [record.event.type for record in carl] == ["conversation.member_added", "message.sent"]
    assert admitting_worker.starts == 1 and admitting_worker.process is not None
    assert admitting_worker.process.poll() is None
