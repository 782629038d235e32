"""The client SDK (``client.sdk``) against the real pipeline: ingress, stream worker, CQL sink.

What its user is promised: sends re-sent until accepted, every stored event surfaced exactly once
in ``sync_id`` order — across live delivery, syncs, a lost connection and a restart from a stored
cursor — and reads (history, conversation list, who-read) as typed pages.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

from client.sdk import Client, FileCursorStore, Received
from schemas import events as ev
from schemas.events import MessageSent, Role
from tests.ingress.support import TENANT, Gateway, token, unique


def client(gateway: Gateway, user: str, device: str, **options: object) -> Client:
    return Client(
        gateway.ws,
        tenant_id=TENANT,
        device_id=device,
        token=token(gateway.settings, user),
        platform="android",
        **options,  # type: ignore[arg-type]
    )


async def collect(
    source: Client, count: int, within: float = 60.0, kind: type = MessageSent
) -> list[Received]:
    """The next ``count`` surfaced events of ``kind`` (others are skipped)."""
    got: list[Received] = []

    async def take() -> None:
        async for item in source.events():
            if isinstance(item.event, kind):
                got.append(item)
                if len(got) == count:
                    return

    await asyncio.wait_for(take(), within)
    return got


async def test_each_event_once_in_order_across_live_a_lost_connection_and_a_restart(
    pipeline: Gateway, tmp_path: Path
) -> None:
    ann, ben = unique("ann"), unique("ben")
    cursor_file = tmp_path / "ben-tablet.cursor"
    async with (
        client(pipeline, ann, "phone") as sender,
        client(pipeline, ben, "phone") as receiver,
    ):
        conversation = await sender.create_conversation([ben], kind="direct")
        first = [await sender.send(conversation, f"m{i}") for i in range(15)]
        got = await collect(receiver, 15)
        assert [r.event.event_id for r in got] == [a.event_id for a in first]
        sync_ids = [r.sync_id or 0 for r in got]
        assert sync_ids == sorted(set(sync_ids))

        # The connection drops (the socket closes under the client): it reconnects, syncs from
        # its cursor and goes on without a duplicate.
        assert receiver._socket is not None
        await receiver._socket.close()
        second = [await sender.send(conversation, f"n{i}") for i in range(10)]
        more = await collect(receiver, 10)
        assert [r.event.event_id for r in more] == [a.event_id for a in second]
        assert receiver.reconnects >= 1
        assert more[0].sync_id is not None and got[-1].sync_id is not None
        assert more[0].sync_id > got[-1].sync_id

        # A second device of ben, starting from a stored cursor halfway through, gets exactly
        # the rest, each once. An event counts as held once the loop asks for the next one, so
        # restarted from the same store it gets only the last one again, which it never passed.
        store = FileCursorStore(cursor_file)
        store.save(got[7].sync_id or 0)
        async with client(pipeline, ben, "tablet", cursor_store=store) as tablet:
            rest = await collect(tablet, 17)
        expected = [a.event_id for a in first[8:]] + [a.event_id for a in second]
        assert [r.event.event_id for r in rest] == expected
        assert store.load() == rest[-2].sync_id
        async with client(
            pipeline, ben, "tablet", cursor_store=FileCursorStore(cursor_file)
        ) as again:
            (last,) = await collect(again, 1)
            assert last.event.event_id == rest[-1].event.event_id
            await again.sync()
            await asyncio.sleep(0.5)
            assert again._events.empty()

        # Reads through the SDK.
        async def caught_up() -> bool:
            page = await receiver.history(conversation)
            return len(page.entries) == 25

        for _ in range(100):
            if await caught_up():
                break
            await asyncio.sleep(0.2)
        latest = await receiver.history(conversation, limit=5)
        assert [e.seq for e in latest.entries] == [21, 22, 23, 24, 25] and latest.has_more
        await receiver.read(conversation, 25)
        for _ in range(100):
            listed = await receiver.conversations()
            if listed.conversations and listed.conversations[0].read_seq == 25:
                break
            await asyncio.sleep(0.2)
        (item,) = listed.conversations
        assert (item.conversation_id, item.unread, item.last_seq) == (conversation, 0, 25)
        for _ in range(100):
            readers = await sender.who_read(conversation, 25)
            if readers.readers:
                break
            await asyncio.sleep(0.2)
        assert [r.user_id for r in readers.readers] == [ben]


async def test_conversation_commands_reach_the_members_as_events(pipeline: Gateway) -> None:
    ann, ben, cat = unique("ann"), unique("ben"), unique("cat")
    async with (
        client(pipeline, ann, "phone") as owner,
        client(pipeline, ben, "phone") as member,
        client(pipeline, cat, "phone") as joiner,
    ):
        group = await owner.create_conversation([ben], name="team")
        await owner.rename(group, "team 2")
        await owner.add_member(group, cat, role=Role.ADMIN)
        await owner.change_role(group, ben, Role.ADMIN)
        await owner.remove_member(group, ben)
        await joiner.leave(group)
        # Recorded is not allowed: ben is no member any more, and hears why.
        await member.rename(group, "mine now")

        kinds = [
            ev.ConversationCreated,
            ev.ConversationRenamed,
            ev.ConversationMemberAdded,
            ev.ConversationMemberRoleChanged,
            ev.ConversationMemberRemoved,
            ev.ConversationLeft,
        ]
        seen = [r.event for r in await collect(owner, len(kinds), kind=ev.EventEnvelope)]
        assert [type(event) for event in seen] == kinds
        renamed, added, changed, removed, left = seen[1:]
        assert isinstance(renamed, ev.ConversationRenamed) and renamed.payload.name == "team 2"
        assert isinstance(added, ev.ConversationMemberAdded)
        assert (added.payload.user_id, added.payload.role) == (cat, Role.ADMIN)
        assert added.payload.name == "team 2"  # set by the sequencer for the new member
        assert isinstance(changed, ev.ConversationMemberRoleChanged)
        assert (changed.payload.user_id, changed.payload.role) == (ben, Role.ADMIN)
        assert isinstance(removed, ev.ConversationMemberRemoved) and removed.payload.user_id == ben
        assert isinstance(left, ev.ConversationLeft) and left.payload.user_id == cat
        # The new member's first event names the group (it saw neither creation nor rename).
        (joined,) = await collect(joiner, 1, kind=ev.ConversationMemberAdded)
        assert joined.event == added
        (rejected,) = await collect(member, 1, kind=ev.CommandRejected)
        assert isinstance(rejected.event, ev.CommandRejected)
        assert rejected.event.payload.command_type == "conversation.renamed"
        assert rejected.event.payload.reason == "not-a-member"

        # Mute: on every device of the user, in the conversation list.
        until = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
        await owner.mute(group, until=until)
        (muted,) = await collect(owner, 1, kind=ev.ConversationMuteChanged)
        assert isinstance(muted.event, ev.ConversationMuteChanged)
        assert (muted.event.payload.muted, muted.event.payload.muted_until) == (True, until)
        for _ in range(100):
            # The list is the CQL sink's: the mute event can be here before the list's row.
            items = (await owner.conversations()).conversations
            if items and items[0].muted:
                break
            await asyncio.sleep(0.2)
        (item,) = items
        assert (item.name, item.muted, item.muted_until) == ("team 2", True, until)
        await owner.mute(group, muted=False)
        (unmuted,) = await collect(owner, 1, kind=ev.ConversationMuteChanged)
        assert isinstance(unmuted.event, ev.ConversationMuteChanged)
        assert (unmuted.event.payload.muted, unmuted.event.payload.muted_until) == (False, None)

        # Push preferences: one command for all of them, seen by every device of the user.
        await owner.push_settings(quiet_hours=("22:00", "07:00", "Europe/Berlin"), locale="de-AT")
        (changed_push,) = await collect(owner, 1, kind=ev.UserPushSettingsChanged)
        assert isinstance(changed_push.event, ev.UserPushSettingsChanged)
        push = changed_push.event.payload
        assert (push.muted, push.locale) == (False, "de-AT")
        assert push.quiet_hours is not None
        assert (push.quiet_hours.start, push.quiet_hours.end) == ("22:00", "07:00")
        assert push.quiet_hours.time_zone == "Europe/Berlin"


async def test_acks_are_coalesced_sent_without_waiting_and_reach_the_node(
    pipeline: Gateway,
) -> None:
    ann, ben = unique("ann"), unique("ben")
    async with (
        client(pipeline, ann, "phone") as sender,
        client(pipeline, ben, "phone", ack_interval=0.2) as receiver,
    ):
        conversation = await sender.create_conversation([ben], kind="direct")
        await collect(receiver, 1, kind=ev.ConversationCreated)
        acks_before = await asyncio.to_thread(
            pipeline.metric, "imstream_ingress_frames_in_total", type="ack"
        )
        errors_before = await asyncio.to_thread(
            pipeline.metric, "imstream_ingress_frames_out_total", type="error"
        )
        for i in range(6):
            await sender.send(conversation, f"a{i}")
        got = await collect(receiver, 6)
        # Pushed live (a sync would also find them, so this is what shows the SDK reads the
        # event frames it is pushed).
        assert any(item.live for item in got)
        # events() acks an event once the loop asks for the next: the first five are held.
        held = got[-2].sync_id
        assert held is not None

        async def acks() -> float:
            return await asyncio.to_thread(
                pipeline.metric, "imstream_ingress_frames_in_total", type="ack"
            )

        for _ in range(100):
            if await acks() > acks_before and receiver._acked_to_server == held:
                break
            await asyncio.sleep(0.1)
        sent = await acks() - acks_before
        # Coalesced: far fewer acks than events (one per ack_interval at most), each answered
        # ok (not error) without a request waiting for it.
        assert 1 <= sent <= 3
        assert receiver._acked_to_server == held
        assert not receiver._pending
        errors = await asyncio.to_thread(
            pipeline.metric, "imstream_ingress_frames_out_total", type="error"
        )
        assert errors == errors_before
