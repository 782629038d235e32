"""Acceptance of the delivery contract as clients see it, on the system as ``imstream up`` runs it
(two ingress nodes, the stream worker and both sinks, real processes under the supervisor), with
SDK clients whose devices are spread over both nodes: group chat and membership changes reach
every member's devices, two devices of a user converge, a device offline during 1,000
messages gets each of them exactly once, in order, when it comes back, and one that comes back
while the serving store lags behind live delivery waits for the store rather than skip ahead.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Awaitable, Callable
from pathlib import Path

from client.sdk import FileCursorStore
from schemas import frames as fr
from schemas.events import (
    ConversationCreated,
    ConversationMemberAdded,
    ConversationMemberRemoved,
    ConversationMuteChanged,
    ConversationRenamed,
    Event,
    ReceiptRead,
    TypingChanged,
)
from tests.ingress.support import unique
from tests.pipelines.support import Device, Running, wait_all

MEMBERSHIP = (ConversationRenamed, ConversationMemberAdded, ConversationMemberRemoved)


async def eventually(
    condition: Callable[[], Awaitable[bool]],
    within: float,
    what: str,
    seen: Callable[[], object] = lambda: None,
) -> None:
    """Until the (async) condition holds: the serving store follows the queues shortly after.
    ``seen`` says what was last observed, for the failure message."""
    deadline = asyncio.get_running_loop().time() + within
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {within:g} s waiting for {what}: {seen()}")
        await asyncio.sleep(0.2)


def strictly_increasing(values: list[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(values))


def membership_changes(device: Device, conversation_id: str) -> list[Event]:
    return [
        item.event
        for item in device.received
        if isinstance(item.event, MEMBERSHIP)
        and item.event.payload.conversation_id == conversation_id
    ]


def assert_membership_changes_seen(
    group: str, *, members: list[Device], newcomers: list[Device], added: str, removed: str
) -> None:
    """The group renamed to "plans, v2", ``added`` added, ``removed`` removed: each change
    once, in order, on the devices of the members then (the removed one included); the
    newcomers' devices see the changes from their own addition on."""
    for device in members:
        changes = membership_changes(device, group)
        assert [type(e) for e in changes] == list(MEMBERSHIP), (device.user, changes)
    for device in newcomers:
        changes = membership_changes(device, group)
        assert [type(e) for e in changes] == list(MEMBERSHIP[1:]), changes
    for device in members + newcomers:
        renamed_events = device.events(ConversationRenamed, group)
        added_events = device.events(ConversationMemberAdded, group)
        removed_events = device.events(ConversationMemberRemoved, group)
        assert [e.payload.name for e in renamed_events] == (
            [] if device.user == added else ["plans, v2"]
        )
        assert [e.payload.user_id for e in added_events] == [added]
        assert [e.payload.name for e in added_events] == ["plans, v2"]  # for the newcomer's list
        assert [e.payload.user_id for e in removed_events] == [removed]


async def test_group_chat_and_its_membership_changes_reach_every_device_of_every_member(
    system: Running,
) -> None:
    ann, ben, cat, dan, eve = (unique(name) for name in ("ann", "ben", "cat", "dan", "eve"))
    async with contextlib.AsyncExitStack() as stack:
        devices: dict[str, list[Device]] = {}
        for user in (ann, ben, cat, dan, eve):
            devices[user] = [
                await stack.enter_async_context(Device(system, user, "phone", 0)),
                await stack.enter_async_context(Device(system, user, "laptop", 1)),
            ]

        def of(*users: str) -> list[Device]:
            return [device for user in users for device in devices[user]]

        phone, laptop = devices[ann]
        assert phone.client.hello is not None and laptop.client.hello is not None
        assert phone.client.hello.node_id != laptop.client.hello.node_id
        owner = phone.client
        group = await owner.create_conversation([ben, cat, dan], name="plans")
        await wait_all(
            of(ann, ben, cat, dan),
            lambda d: len(d.events(ConversationCreated, group)) == 1,
            30,
            "the group",
        )

        # Every member sends at the same time, from one node or the other: every device of
        # every member gets every message once, all in the same order, the conversation's.
        async def send_from(device: Device, count: int) -> list[str]:
            return [
                (await device.client.send(group, f"{device.user} {i}")).event_id
                for i in range(count)
            ]

        senders = [devices[ann][0], devices[ben][1], devices[cat][0], devices[dan][1]]
        sent = await asyncio.gather(*(send_from(device, 10) for device in senders))
        first = sum(len(ids) for ids in sent)
        members = of(ann, ben, cat, dan)
        await wait_all(members, lambda d: len(d.messages(group)) >= first, 60, "the messages")
        order = phone.message_ids(group)
        assert sorted(order) == sorted(i for ids in sent for i in ids)
        for ids in sent:  # each sender's messages in the order they were accepted
            assert [i for i in order if i in ids] == ids
        for device in members:
            assert device.message_ids(group) == order, (device.user, device.name)
            seqs = [m.payload.conversation_seq for m in device.messages(group)]
            assert seqs == list(range(1, first + 1))
            assert strictly_increasing(device.sync_ids())
        assert not any(d.messages(group) for d in of(eve))

        # Rename, add eve, remove dan: each change once, in order, on every device of everyone
        # who was a member when it happened (the removed member is told too).
        await owner.rename(group, "plans, v2")
        await owner.add_member(group, eve)
        await owner.remove_member(group, dan)
        await wait_all(
            of(ann, ben, cat, dan, eve),
            lambda d: bool(d.events(ConversationMemberRemoved, group)),
            30,
            "dan's removal",
        )
        assert_membership_changes_seen(
            group, members=of(ann, ben, cat, dan), newcomers=of(eve), added=eve, removed=dan
        )

        # Messages after the changes reach the members now — eve, not dan.
        later_senders = [devices[ann][1], devices[ben][0], devices[eve][1]]
        later = await asyncio.gather(*(send_from(device, 5) for device in later_senders))
        total = first + sum(len(ids) for ids in later)
        remaining = of(ann, ben, cat)
        await wait_all(remaining, lambda d: len(d.messages(group)) >= total, 60, "later ones")
        order_later = phone.message_ids(group)[first:]
        assert sorted(order_later) == sorted(i for ids in later for i in ids)
        for device in remaining:
            assert device.message_ids(group) == order + order_later, (device.user, device.name)
        await wait_all(
            of(eve), lambda d: len(d.messages(group)) >= len(order_later), 60, "eve's messages"
        )
        for device in of(eve):
            assert device.message_ids(group) == order_later  # nothing from before she joined
            seqs = [m.payload.conversation_seq for m in device.messages(group)]
            assert seqs == list(range(first + 1, total + 1))

        # dan gets nothing more of the group: a direct message sent after every later message
        # was delivered comes after anything of the group in his queue, and a device shows its
        # queue in order, so once his devices have it they would have shown such a message.
        direct = await owner.create_conversation([dan], kind="direct")
        fence = await owner.send(direct, "still there?")
        await wait_all(
            of(dan), lambda d: fence.event_id in d.message_ids(direct), 30, "the direct message"
        )
        for device in of(dan):
            assert device.message_ids(group) == order
            assert strictly_increasing(device.sync_ids())

        # The serving store agrees: the group's new name and last seq in every remaining
        # member's list, and dan reads the group's history up to his removal, nothing after.
        lists: dict[str, tuple[str | None, int] | None] = {}

        async def listed() -> bool:
            for user in (ann, ben, cat, eve, dan):
                page = await devices[user][1].client.conversations()
                lists[user] = next(
                    (
                        (c.name, c.last_seq)
                        for c in page.conversations
                        if c.conversation_id == group
                    ),
                    None,
                )
            wanted = ("plans, v2", total)
            return lists[dan] is None and all(lists[u] == wanted for u in (ann, ben, cat, eve))

        await eventually(listed, 30, "every member's conversation list", lambda: lists)

        dans = await devices[dan][1].client.history(group, limit=fr.MAX_HISTORY_LIMIT)
        assert [entry.event.event_id for entry in dans.entries] == order
        assert dans.has_more is False


async def test_two_devices_of_a_user_converge_and_the_sender_gets_the_read_receipt(
    system: Running,
) -> None:
    ann, ben = unique("ann"), unique("ben")
    async with (
        Device(system, ann, "phone", 0) as phone,
        Device(system, ann, "laptop", 1) as laptop,
        Device(system, ben, "phone", 1) as sender,
    ):
        conversation = await sender.client.create_conversation([ann], kind="direct")
        for index in range(10):
            await sender.client.send(conversation, f"m{index}")
        ann_devices = [phone, laptop]
        await wait_all(ann_devices, lambda d: len(d.messages(conversation)) == 10, 30, "10")

        listed: list[tuple[int, int, int, bool]] = []

        async def both_list(last_seq: int, read_seq: int, unread: int, muted: bool) -> bool:
            """Both devices list the conversation with these last seq, read seq, unread count
            and mute."""
            listed.clear()
            for device in ann_devices:
                page = await device.client.conversations()
                listed.extend(
                    (c.last_seq, c.read_seq, c.unread, c.muted)
                    for c in page.conversations
                    if c.conversation_id == conversation
                )
            return listed == [(last_seq, read_seq, unread, muted)] * 2

        def seen() -> object:
            return listed

        await eventually(lambda: both_list(10, 0, 10, False), 30, "10 unread on both", seen)

        # Reading on the phone moves the laptop's read position and both devices' unread count,
        # and reaches ben as a receipt: the same receipt.read event, told apart by its actor.
        await phone.client.read(conversation, 6)

        def has_receipt(device: Device) -> bool:
            return bool(device.events(ReceiptRead, conversation))

        await wait_all([phone, laptop, sender], has_receipt, 30, "the read receipt")
        for device in (phone, laptop, sender):
            (receipt,) = device.events(ReceiptRead, conversation)
            assert receipt.actor.user_id == ann
            assert receipt.payload.conversation_seq == 6
        await eventually(lambda: both_list(10, 6, 4, False), 30, "4 unread on both", seen)

        async def read_by_ann() -> bool:
            readers = await sender.client.who_read(conversation, 6)
            return [r.user_id for r in readers.readers] == [ann]

        await eventually(read_by_ann, 30, "who-read of seq 6")
        assert (await sender.client.who_read(conversation, 7)).readers == []

        # Muting on the laptop mutes the conversation for the phone too.
        await laptop.client.mute(conversation)
        await wait_all(
            ann_devices,
            lambda d: bool(d.events(ConversationMuteChanged, conversation)),
            30,
            "the mute",
        )
        await eventually(lambda: both_list(10, 6, 4, True), 30, "muted on both", seen)

        # A message after that and a read of everything on the laptop: both devices at 0.
        await sender.client.send(conversation, "one more")
        await wait_all(ann_devices, lambda d: len(d.messages(conversation)) == 11, 30, "11")
        await laptop.client.read(conversation, 11)
        await eventually(lambda: both_list(11, 11, 0, True), 30, "all read on both", seen)
        for device in ann_devices:
            assert strictly_increasing(device.sync_ids())
            assert len(set(device.message_ids(conversation))) == 11


async def test_a_device_offline_during_1000_messages_gets_each_once_in_order(
    system: Running, tmp_path: Path
) -> None:
    ann, ben = unique("ann"), unique("ben")
    store = FileCursorStore(tmp_path / "ben-tablet.cursor")
    async with Device(system, ann, "phone", 0) as sender:
        conversation = await sender.client.create_conversation([ben], kind="direct")
        before = [
            (await sender.client.send(conversation, f"before {i}")).event_id for i in range(5)
        ]
        async with Device(system, ben, "tablet", 1, cursor_store=store) as tablet:
            await tablet.wait(
                lambda d: len(d.messages(conversation)) == 5, 30, "the first messages"
            )
            assert tablet.message_ids(conversation) == before
            held = tablet.sync_ids()[-1]
            # The collecting loop asked for the next event: the last one counts as held.
            await tablet.wait(lambda _: store.load() == held, 10, "the cursor saved")

        # Offline: 1,000 messages.
        count = 1000
        accepted = [
            (await sender.client.send(conversation, f"m{i}")).event_id for i in range(count)
        ]

        tablet = Device(system, ben, "tablet", 1, cursor_store=store)
        assert tablet.client.cursor == held  # it resumes from the stored cursor
        async with tablet:
            await tablet.wait(
                lambda d: len(d.messages(conversation)) >= count, 120, f"{count} messages"
            )
            await tablet.client.sync()  # whatever else the queue holds, surfaced …
            await tablet.drained()  # … and recorded
            got = tablet.messages(conversation)
            assert [m.event_id for m in got] == accepted
            assert [m.payload.conversation_seq for m in got] == list(range(6, count + 6))
            sync_ids = tablet.sync_ids()
            assert sync_ids[0] > held and strictly_increasing(sync_ids)
        assert store.load() == sync_ids[-1]


async def test_a_device_back_while_the_serving_store_lags_waits_for_it_and_misses_nothing(
    system: Running, tmp_path: Path
) -> None:
    """Live events can run ahead of the store: a device that comes back while the CQL sink is
    down syncs nothing new, then gets the messages sent after it came back live, with a gap
    before them. It must hold them until the store fills the gap, however long that takes."""
    ann, ben = unique("ann"), unique("ben")
    store = FileCursorStore(tmp_path / "ben-phone.cursor")
    async with contextlib.AsyncExitStack() as stack:
        sender = await stack.enter_async_context(Device(system, ann, "phone", 0))
        # Another device of ben, online throughout, gets every message live.
        witness = await stack.enter_async_context(Device(system, ben, "laptop", 1))
        conversation = await sender.client.create_conversation([ben], kind="direct")
        async with Device(system, ben, "phone", 1, cursor_store=store) as phone:
            await sender.client.send(conversation, "before")
            await phone.wait(lambda d: len(d.messages(conversation)) == 1, 30, "the first one")

        with system.stopped("cql-sink"):
            offline = [
                (await sender.client.send(conversation, f"offline {i}")).event_id for i in range(5)
            ]
            # Routed before the phone is back (the witness has them): only in the queue.
            await witness.wait(
                lambda d: d.message_ids(conversation)[1:] == offline, 30, "the offline ones"
            )
            phone = await stack.enter_async_context(
                Device(system, ben, "phone", 0, cursor_store=store)
            )

            # Live delivery reaches the phone once the stream stage has seen it connect: typing
            # (ephemeral, never stored) shows when.
            def typing_seen(device: Device) -> bool:
                return any(isinstance(r.event, TypingChanged) for r in device.received)

            deadline = asyncio.get_running_loop().time() + 30
            while not typing_seen(phone):
                assert asyncio.get_running_loop().time() < deadline, "no live delivery"
                await sender.client.typing(conversation)
                await asyncio.sleep(0.2)
            online = [
                (await sender.client.send(conversation, f"online {i}")).event_id for i in range(5)
            ]
            await witness.wait(
                lambda d: d.message_ids(conversation)[6:] == online, 30, "the online ones"
            )
            # The store stays behind for a while — longer than the SDK once waited for a gap
            # to fill (2 s) before it showed what came after and lost what was missing.
            await asyncio.sleep(3.0)
            assert phone.messages(conversation) == [], "shown ahead of the ones before"

        # The sink is back: the store fills the gap, and the phone shows each one, in order.
        await phone.wait(
            lambda d: online[-1] in d.message_ids(conversation), 60, "the last message"
        )
        await phone.client.sync()
        await phone.drained()
        assert phone.message_ids(conversation) == offline + online
        assert strictly_increasing(phone.sync_ids())
