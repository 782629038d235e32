"""Large groups through the real pipeline: two ingress nodes, the stream worker (threshold 3) and
the CQL sink, seen through the client SDK.

Read diffusion must be invisible to a member's app but for the ``group`` mark: every message once,
in seq order, live when connected and from history after a lost connection; the conversation list
right; membership changes taking effect at once on every node; and the switch back to write
diffusion (a member fewer than the threshold) continuing without a gap or a double.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from client.sdk import Client, Received
from core.settings import Settings
from schemas import events as ev
from schemas import frames as fr
from tests.ingress.conftest import Pipeline, running_pipeline
from tests.ingress.support import TENANT, Gateway, token, unique
from tests.streams.test_flows import Kafka

WITHIN = 60.0


@pytest.fixture(scope="module")
def pipeline(
    ingress_settings: Settings, serving_keyspace: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    logs = tmp_path_factory.mktemp("large-groups")
    with running_pipeline(
        ingress_settings,
        serving_keyspace,
        logs,
        streams={"large_group_threshold": "3"},
        nodes=2,
    ) as running:
        yield running


@pytest.fixture
def nodes(pipeline: Pipeline) -> list[Gateway]:
    return pipeline.gateways


def client(gateway: Gateway, user: str, **options: Any) -> Client:
    return Client(
        gateway.ws,
        tenant_id=TENANT,
        device_id="phone",
        token=options.pop("token", token(gateway.settings, user)),
        platform="android",
        settle_sync=0.5,
        **options,
    )


class Inbox:
    """Every message a client surfaces, collected in the background."""

    def __init__(self, source: Client) -> None:
        self.items: list[Received] = []
        self._task = asyncio.get_running_loop().create_task(self._collect(source))

    async def _collect(self, source: Client) -> None:
        async for item in source.events():
            if isinstance(item.event, ev.MessageSent):
                self.items.append(item)

    def texts(self) -> list[str]:
        return [item.event.payload.client_msg_id for item in self.items]  # type: ignore[union-attr]

    async def until(self, count: int) -> list[str]:
        for _ in range(int(WITHIN * 10)):
            if len(self.items) >= count:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)  # nothing more (a double) should follow
        return self.texts()

    def stop(self) -> None:
        self._task.cancel()


def gated_token(gateway: Gateway, user: str, gate: asyncio.Event) -> Callable[[], Awaitable[str]]:
    """A token provider whose second and later calls (the reconnects) wait for ``gate``."""
    calls = 0

    async def provide() -> str:
        nonlocal calls
        calls += 1
        if calls > 1:
            await gate.wait()
        return token(gateway.settings, user)

    return provide


async def send_all(sender: Client, conversation: str, texts: list[str]) -> None:
    for text in texts:
        await sender.send(conversation, text, client_msg_id=text)


async def test_a_large_group_reaches_members_on_both_nodes_once_in_order(
    nodes: list[Gateway], ingress_settings: Settings, tmp_path: Path
) -> None:
    first, second = nodes
    ann, ben, cat, dan, eve = (unique(name) for name in ("ann", "ben", "cat", "dan", "eve"))
    dan_gate = asyncio.Event()
    dan_token = gated_token(second, dan, dan_gate)
    async with (
        client(first, ann) as owner,
        client(first, ben) as ben_phone,
        client(second, cat) as cat_phone,
        client(second, dan, token=dan_token, sync_interval=2.0) as dan_phone,
        client(second, eve) as eve_phone,
    ):
        inboxes = {user: Inbox(c) for user, c in ((ben, ben_phone), (cat, cat_phone))}
        dan_inbox, eve_inbox = Inbox(dan_phone), Inbox(eve_phone)
        group = await owner.create_conversation([ben, cat, dan], kind="group", name="town")
        # Four members, above the threshold of 3: read diffusion from the start. The group
        # events reach the members live once the nodes have each connect's answer.
        await asyncio.sleep(2.0)
        batch = [f"{group}-m{index}" for index in range(5)]
        await send_all(owner, group, batch)
        for inbox in (*inboxes.values(), dan_inbox):
            assert await inbox.until(5) == batch
            assert all(item.group and item.sync_id is None for item in inbox.items)
            assert [item.event.payload.conversation_seq for item in inbox.items] == [  # type: ignore[union-attr]
                1,
                2,
                3,
                4,
                5,
            ]

        # A lost connection: what was sent meanwhile comes from history, once, in order. (The
        # reconnect waits until it was sent: a quick one would get it live.)
        assert dan_phone._socket is not None
        await dan_phone._socket.close()
        missed = [f"{group}-n{index}" for index in range(3)]
        await send_all(owner, group, missed)
        assert await inboxes[cat].until(8) == batch + missed
        dan_gate.set()
        assert await dan_inbox.until(8) == batch + missed
        assert any(not item.live for item in dan_inbox.items[5:])

        # Membership takes effect on every node at once: eve joins, dan is removed.
        await owner.add_member(group, eve)
        await owner.remove_member(group, dan)
        await asyncio.sleep(1.0)
        late = [f"{group}-late"]
        await send_all(owner, group, late)
        assert await eve_inbox.until(1) == late
        assert await inboxes[cat].until(9) == batch + missed + late
        assert dan_inbox.texts() == batch + missed  # nothing after the removal

        # The queue of the group's records: one per message whatever the group's size.
        kafka = Kafka(ingress_settings)
        records = [
            ev.GroupDelivery.model_validate_json(value or b"")
            for _key, value in kafka.records(kafka.catalog.group_delivery.name)
        ]
        messages = [
            r for r in records if r.conversation_id == group and r.event.type == "message.sent"
        ]
        assert len(messages) == 9
        addressed = [
            ev.InboxRecord.model_validate_json(value or b"")
            for _key, value in kafka.records(kafka.catalog.user_inbox.name)
        ]
        assert {
            r.user_id
            for r in addressed
            if r.conversation_id == group and r.event.type == "message.sent"
        } == {ann}

        # The conversation list: cat never read, then reads up to 5.
        item = await listed(cat_phone, group, lambda i: i.last_seq == 9)
        assert (item.large, item.unread, item.read_seq, item.name) == (True, 9, 0, "town")
        await cat_phone.read(group, 5)
        item = await listed(cat_phone, group, lambda i: i.read_seq == 5)
        assert (item.large, item.last_seq, item.unread) == (True, 9, 4)

        # eve leaves: three members, write diffusion again. The next message reaches the
        # members through their sync queues, and nobody gets anything twice.
        await eve_phone.leave(group)
        await asyncio.sleep(1.0)
        after = [f"{group}-small"]
        await send_all(owner, group, after)
        expected = batch + missed + late + after
        for inbox in inboxes.values():
            assert await inbox.until(10) == expected
            assert inbox.items[-1].sync_id is not None and not inbox.items[-1].group
        item = await listed(cat_phone, group, lambda i: i.last_seq == 10 and not i.large)
        assert (item.read_seq, item.unread) == (5, 5)
        for inbox in (*inboxes.values(), dan_inbox, eve_inbox):
            inbox.stop()


async def test_a_message_missed_while_away_reaches_the_device_once_the_store_has_it(
    pipeline: Pipeline,
) -> None:
    """A message sent while a member's socket was down misses the live path, and the first
    catch-up after the reconnect when the store lags behind: on a quiet group no later event
    would show the gap, so the client catches up again at its next quiet interval."""
    first, second = pipeline.gateways
    ann, ben, cat, dan = (unique(name) for name in ("ann", "ben", "cat", "dan"))
    reconnect = asyncio.Event()
    provider = gated_token(second, dan, reconnect)
    async with (
        client(first, ann) as owner,
        client(first, ben),
        client(second, cat) as cat_phone,
        client(second, dan, token=provider, sync_interval=2.0) as dan_phone,
    ):
        cat_inbox, dan_inbox = Inbox(cat_phone), Inbox(dan_phone)
        group = await owner.create_conversation([ben, cat, dan], kind="group", name="quiet")
        await asyncio.sleep(2.0)
        await send_all(owner, group, [f"{group}-before"])
        assert await dan_inbox.until(1) == [f"{group}-before"]

        pipeline.cql_sink.send_signal(signal.SIGSTOP)  # the store lags from here
        try:
            assert dan_phone._socket is not None
            await dan_phone._socket.close()
            away = f"{group}-away"
            await send_all(owner, group, [away])
            assert await cat_inbox.until(2) == [f"{group}-before", away]  # live, to the others
            assert not dan_phone._connected.is_set()  # held at its token
            reconnect.set()
            await dan_phone._wait_connected()
            await asyncio.sleep(1.5)  # the reconnect's catch-up and the settle one found nothing
            assert dan_inbox.texts() == [f"{group}-before"]
        finally:
            pipeline.cql_sink.send_signal(signal.SIGCONT)
        assert await dan_inbox.until(2) == [f"{group}-before", away]
        assert not dan_inbox.items[1].live
        cat_inbox.stop()
        dan_inbox.stop()


async def listed(
    source: Client, group: str, ready: Callable[[fr.ConversationItem], bool]
) -> fr.ConversationItem:
    """The group's entry in the conversation list, once ``ready`` holds for it."""
    for _ in range(int(WITHIN * 5)):
        page = await source.conversations()
        item = next((i for i in page.conversations if i.conversation_id == group), None)
        if item is not None and ready(item):
            return item
        await asyncio.sleep(0.2)
    raise AssertionError(f"{group}'s list entry never got there: {item}")
