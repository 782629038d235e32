"""The system as ``imstream up`` runs it — two ingress nodes, the stream worker, the CQL sink and
the ClickHouse sink under the supervisor — with SDK clients on different nodes, while processes
are killed with SIGKILL and restarted by the supervisor. Afterwards the delivery contract holds as
a client sees it: every message once, in order, on every device, the timeline complete, and the
audit holding every message exactly once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from schemas.events import message_event_id
from tests.ingress.support import unique, wait_until
from tests.pipelines.support import Device, Running, assert_audited_exactly_once, wait_all

COUNT = 300


async def send_all(sender: Device, conversation: str, accepted: list[str]) -> None:
    """COUNT messages, one after the other (each once accepted), with client_msg_ids cm0 …"""
    for index in range(COUNT):
        reply = await sender.client.send(conversation, f"m{index}", client_msg_id=f"cm{index}")
        accepted.append(reply.event_id)
        await asyncio.sleep(0.01)


def assert_every_message_once_in_order(
    device: Device, conversation: str, accepted: list[str]
) -> None:
    assert device.message_ids(conversation) == accepted, (device.user, device.name)
    seqs = [message.payload.conversation_seq for message in device.messages(conversation)]
    assert seqs == list(range(1, COUNT + 1))
    sync_ids = device.sync_ids()
    assert sync_ids == sorted(set(sync_ids))


async def test_every_message_once_in_order_while_the_worker_and_both_sinks_are_killed(
    system: Running,
) -> None:
    # A tenant of its own, so that the audit's answers are about this test's messages only.
    tenant = unique("crash")
    ann, ben = unique("ann"), unique("ben")
    async with (
        Device(system, ann, "phone", 0, tenant=tenant) as sender,
        Device(system, ben, "phone", 1, tenant=tenant) as receiver,
    ):
        conversation = await sender.client.create_conversation([ben], kind="direct")
        accepted: list[str] = []
        sending = asyncio.create_task(send_all(sender, conversation, accepted))

        def sent(count: int) -> Callable[[], bool]:
            return lambda: len(accepted) >= count

        # Each killed while messages are coming in.
        for victim, after in (("stream-worker", 50), ("clickhouse-sink", 100), ("cql-sink", 150)):
            await wait_until(sent(after), within=60)
            system.kill(victim)
        await sending
        assert accepted == [message_event_id(tenant, ann, f"cm{i}") for i in range(COUNT)]
        await receiver.wait(
            lambda d: len(d.messages(conversation)) >= COUNT, 180, f"{COUNT} messages"
        )
        assert_every_message_once_in_order(receiver, conversation, accepted)

        # A second device of ann, on the other node, syncing from nothing: all of it, once —
        # once the restarted CQL sink has caught up.
        async with Device(system, ann, "laptop", 1, tenant=tenant) as laptop:
            await laptop.wait(
                lambda d: len(d.messages(conversation)) >= COUNT, 120, f"{COUNT} messages"
            )
            await laptop.client.sync()
            await laptop.drained()
            assert_every_message_once_in_order(laptop, conversation, accepted)

        # The timeline is complete (the sink writes it from the conversation log, which it may
        # still be reading a little behind the sync queues).
        async def timeline_end() -> int:
            page = await receiver.client.history(conversation, limit=1)
            return page.entries[-1].seq if page.entries else 0

        deadline = asyncio.get_running_loop().time() + 60
        while (end := await timeline_end()) != COUNT:
            assert end < COUNT, f"the timeline ends at {end}, after the last message"
            assert asyncio.get_running_loop().time() < deadline, f"the timeline ends at {end}"
            await asyncio.sleep(0.2)
    restarts = system.restarts()
    assert restarts["stream-worker"] >= 1
    assert restarts["cql-sink"] >= 1 and restarts["clickhouse-sink"] >= 1
    await assert_audited_exactly_once(system, tenant, accepted, queues=2)


async def test_every_message_once_in_order_while_an_ingress_node_is_killed(
    system: Running,
) -> None:
    tenant = unique("crash")
    ann, ben = unique("ann"), unique("ben")
    async with (
        # The sender is on ingress-2, the node that is killed: its sends in flight are re-sent
        # with the same client_msg_id once it has reconnected to the restarted node.
        Device(system, ann, "phone", 1, tenant=tenant) as sender,
        Device(system, ann, "laptop", 0, tenant=tenant) as laptop,
        Device(system, ben, "phone", 0, tenant=tenant) as phone,
        Device(system, ben, "tablet", 1, tenant=tenant) as tablet,
    ):
        conversation = await sender.client.create_conversation([ben], kind="direct")
        accepted: list[str] = []
        sending = asyncio.create_task(send_all(sender, conversation, accepted))
        await wait_until(lambda: len(accepted) >= 100, within=60)
        system.kill("ingress-2")
        await sending
        # One message per client_msg_id, whatever reached Kafka before the node died.
        assert accepted == [message_event_id(tenant, ann, f"cm{i}") for i in range(COUNT)]
        assert sender.client.reconnects >= 1 and tablet.client.reconnects >= 1
        devices = [sender, laptop, phone, tablet]
        await wait_all(
            devices, lambda d: len(d.messages(conversation)) >= COUNT, 120, f"{COUNT} messages"
        )
        for device in devices:
            assert_every_message_once_in_order(device, conversation, accepted)
    assert system.restarts()["ingress-2"] >= 1
    await assert_audited_exactly_once(system, tenant, accepted, queues=2)
