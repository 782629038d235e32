"""The system as ``imstream up`` runs it — two ingress nodes, the stream worker and the CQL sink
under the supervisor — with SDK clients on different nodes, while processes are killed with
SIGKILL and restarted by the supervisor. Afterwards the delivery contract holds as a client sees
it: every message once, in order, on every device, and the timeline complete.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cassandra.cluster import Session
from confluent_kafka.admin import AdminClient

from ingress.client import Client, Received
from pipelines.settings import Settings
from pipelines.stack.manager import LocalStack
from pipelines.supervisor import ChildSpec, Supervisor
from schemas.events import MessageSent
from tests.ingress.support import (
    TENANT,
    create_topics,
    delete_topics,
    free_port,
    migrated_keyspace,
    token,
    unique,
)


class Running:
    def __init__(self, supervisor: Supervisor, ports: list[int], settings: Settings) -> None:
        self.supervisor = supervisor
        self.ports = ports
        self.settings = settings

    def url(self, node: int) -> str:
        return f"ws://127.0.0.1:{self.ports[node]}/v1/ws"

    def kill(self, name: str) -> int:
        (child,) = [c for c in self.supervisor.children if c.name == name]
        assert child.pid is not None, f"{name} is not running"
        os.kill(child.pid, signal.SIGKILL)
        return child.pid


@pytest.fixture(scope="module")
def system(
    local_stack: LocalStack,
    settings: Settings,
    kafka_admin: AdminClient,
    cql_session: Session,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Running]:
    prefixed = create_topics(kafka_admin, settings, unique("t-up") + ".")
    logs = tmp_path_factory.mktemp("up")
    with migrated_keyspace(prefixed, cql_session) as keyspace:
        common = {
            "IM_KAFKA__TOPIC_PREFIX": prefixed.kafka.topic_prefix,
            "IM_CQL__KEYSPACE": keyspace,
            "IM_STREAMS__SESSION_TIMEOUT_SECONDS": "6",
            "IM_STREAMS__INSTANCE_ID": unique("worker"),
            "IM_INGRESS__RATE_LIMIT_PER_SECOND": "100000",
            "IM_INGRESS__RATE_LIMIT_BURST": "100000",
        }
        ports = [free_port(), free_port()]
        specs = [
            ChildSpec("stream-worker", "stream-worker", common),
            *(
                ChildSpec(
                    f"ingress-{i + 1}",
                    "ingress",
                    {**common, "IM_INGRESS__PORT": str(port), "IM_INGRESS__NODE_ID": unique("n")},
                )
                for i, port in enumerate(ports)
            ),
            ChildSpec("cql-sink", "cql-sink", common),
        ]
        lines: list[str] = []
        supervisor = Supervisor(specs, Path(logs) / "logs", report=lines.append)
        stop = threading.Event()

        def supervise() -> None:
            while not stop.wait(0.5):
                supervisor.check()

        supervisor.start_all()
        thread = threading.Thread(target=supervise, daemon=True)
        thread.start()
        try:
            yield Running(supervisor, ports, prefixed)
        finally:
            stop.set()
            thread.join()
            supervisor.stop_all(30)
            delete_topics(kafka_admin, prefixed)


async def messages_of(client: Client, count: int, within: float) -> list[Received]:
    got: list[Received] = []

    async def take() -> None:
        async for item in client.events():
            if isinstance(item.event, MessageSent):
                got.append(item)
                if len(got) == count:
                    return

    await asyncio.wait_for(take(), within)
    return got


async def test_every_message_once_in_order_on_every_device_while_processes_are_killed(
    system: Running,
) -> None:
    ann, ben = unique("ann"), unique("ben")

    def device(user: str, name: str, node: int) -> Client:
        return Client(
            system.url(node),
            tenant_id=TENANT,
            device_id=name,
            token=token(system.settings, user),
            request_timeout=20,
        )

    # Connecting waits until the ingress nodes answer (they may still be starting).
    async with device(ann, "phone", 0) as sender, device(ben, "phone", 1) as receiver:
        conversation = await sender.create_conversation([ben], kind="direct")
        count = 300
        accepted: list[str] = []

        async def send_all() -> None:
            for index in range(count):
                reply = await sender.send(conversation, f"m{index}", client_msg_id=f"cm{index}")
                accepted.append(reply.event_id)
                await asyncio.sleep(0.01)

        sending = asyncio.create_task(send_all())
        await asyncio.sleep(1.0)
        system.kill("stream-worker")
        await asyncio.sleep(3.0)
        system.kill("cql-sink")
        await sending
        received = await messages_of(receiver, count, within=180)
        assert [r.event.event_id for r in received] == accepted
        sync_ids = [r.sync_id or 0 for r in received]
        assert sync_ids == sorted(set(sync_ids))
        seqs = [
            r.event.payload.conversation_seq for r in received if isinstance(r.event, MessageSent)
        ]
        assert seqs == list(range(1, count + 1))

        # A second device of ann, on the other node, syncing from nothing: all of it, once.
        async with device(ann, "laptop", 1) as laptop:
            mine = await messages_of(laptop, count, within=120)
        assert [r.event.event_id for r in mine] == accepted

        # The timeline is complete once the restarted sink caught up.
        for _ in range(300):
            page = await receiver.history(conversation, limit=1)
            if page.entries and page.entries[-1].seq == count:
                break
            await asyncio.sleep(0.2)
        assert page.entries[-1].seq == count
    restarts = {c.name: c.restarts for c in system.supervisor.children}
    assert restarts["stream-worker"] >= 1 and restarts["cql-sink"] >= 1
