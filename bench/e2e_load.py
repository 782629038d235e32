"""The end-to-end load generator: one process driving a share of the benchmark's users.

Every user is one device, one :class:`client.sdk.Client` (the public SDK) over a real
WebSocket. The users of a 1:1 pair are on different ingress nodes, so that every delivery crosses
nodes; a group's members alternate between the nodes. Senders and receivers of a conversation are
in the same process, so a delivery's latency is one clock's difference: from the moment the
sender's ``send`` is called to the moment the receiver's ``events()`` yields the message.

Sending is open loop: message ``k`` of a phase is due at ``start_at + k / rate``, whatever the
replies do. How late the generator itself was (``schedule lag``) is measured too, so that a phase
in which the generator, not the system, fell behind is recognised as such.

The parent (bench/e2e.py) talks to each worker over a pipe:

    worker → parent   ("ready", {"users": n, "conversations": n})  connected, conversations made
    parent → worker   ("phase", Phase)                               run one phase
    worker → parent   ("done", PhaseResult)
    parent → worker   ("stop",)
    worker → parent   ("failed", message)                            instead of any of the above
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import SynchronizedArray

import uvloop

from bench.loadgen import Credentials
from client.sdk import Client, CommandError
from schemas.events import MessageSent


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    worker: int
    urls: tuple[str, ...]
    tenant_id: str
    #: 1:1 conversations, as the two users' ids.
    pairs: tuple[tuple[str, str], ...]
    #: Group conversations, as their members' ids (the first one creates the group).
    groups: tuple[tuple[str, ...], ...]
    credentials: Credentials
    body_text: str
    run_tag: str


@dataclass(frozen=True, slots=True)
class Phase:
    """One load step; instants are ``time.monotonic()`` values (one clock for all processes)."""

    index: int
    kind: str  # "direct" or "group"
    #: Messages per second this worker sends.
    rate: float
    start_at: float
    measure_from: float
    measure_until: float
    #: Waiting for outstanding deliveries ends here at the latest.
    drain_until: float


@dataclass(slots=True)
class PhaseResult:
    worker: int
    scheduled: int = 0
    #: Sends whose due time fell in the measurement window, and what became of them.
    sent_in_window: int = 0
    accepted_in_window: int = 0
    accepted_total: int = 0
    #: Seconds, for sends due in the measurement window.
    accept_s: list[float] = field(default_factory=list)
    deliver_s: list[float] = field(default_factory=list)
    schedule_lag_s: list[float] = field(default_factory=list)
    #: Deliveries (message, receiving member) of sends due in the window.
    expected_in_window: int = 0
    #: Deliveries that happened inside the measurement window (whenever the send was due).
    delivered_during_window: int = 0
    delivered_live: int = 0
    delivered_by_sync: int = 0
    expected_total: int = 0
    delivered_total: int = 0
    duplicates: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    reconnects: int = 0
    failure: str | None = None

    @property
    def lost(self) -> int:
        return self.expected_total - self.delivered_total


@dataclass(slots=True)
class _Outstanding:
    sender: str
    due: float
    sent_at: float
    in_window: bool
    waiting: set[str]


class _Worker:
    def __init__(self, plan: WorkerPlan, counters: SynchronizedArray[int]) -> None:
        self.plan = plan
        self.counters = counters
        self.clients: dict[str, Client] = {}
        self.members: dict[str, tuple[str, ...]] = {}
        self.direct: list[str] = []
        self.group: list[str] = []
        self.outstanding: dict[str, _Outstanding] = {}
        self.seen: set[tuple[str, str]] = set()
        self.phase: Phase | None = None
        self.result = PhaseResult(plan.worker)
        self.readers: list[asyncio.Task[None]] = []

    def client(self, user: str, node: int) -> Client:
        plan = self.plan
        token = plan.credentials.token(user_id=user, tenant_id=plan.tenant_id, device_id="d1")
        return Client(
            plan.urls[node % len(plan.urls)],
            tenant_id=plan.tenant_id,
            device_id="d1",
            token=token,
            request_timeout=30,
        )

    async def connect(self) -> None:
        plan = self.plan
        nodes: dict[str, int] = {}
        for index, (first, second) in enumerate(plan.pairs):
            nodes[first] = index % 2
            nodes[second] = (index + 1) % 2
        for group in plan.groups:
            for index, member in enumerate(group):
                nodes.setdefault(member, index % 2)
        for user, node in nodes.items():
            self.clients[user] = self.client(user, node)
        semaphore = asyncio.Semaphore(32)

        async def connect_one(client: Client) -> None:
            async with semaphore:
                await client.connect()

        await asyncio.gather(*(connect_one(client) for client in self.clients.values()))
        for user, client in self.clients.items():
            self.readers.append(asyncio.create_task(self.read(user, client)))
        for first, second in plan.pairs:
            conversation = await self.clients[first].create_conversation([second], kind="direct")
            self.direct.append(conversation)
            self.members[conversation] = (first, second)
        for index, group in enumerate(plan.groups):
            conversation = await self.clients[group[0]].create_conversation(
                list(group[1:]), kind="group", name=f"bench group {plan.worker}.{index}"
            )
            self.group.append(conversation)
            self.members[conversation] = group

    async def read(self, user: str, client: Client) -> None:
        tag = self.plan.run_tag
        async for item in client.events():
            event = item.event
            if not isinstance(event, MessageSent):
                continue
            client_msg_id = event.payload.client_msg_id
            if not client_msg_id.startswith(tag):
                continue
            now = time.monotonic()
            if (client_msg_id, user) in self.seen:
                self.result.duplicates += 1
                continue
            self.seen.add((client_msg_id, user))
            record = self.outstanding.get(client_msg_id)
            if record is None or user not in record.waiting:
                continue  # the sender's own copy, or a message of an earlier phase
            record.waiting.discard(user)
            result = self.result
            result.delivered_total += 1
            self.counters[self.plan.worker] += 1
            if item.live:
                result.delivered_live += 1
            else:
                result.delivered_by_sync += 1
            phase = self.phase
            if phase is not None and phase.measure_from <= now < phase.measure_until:
                result.delivered_during_window += 1
            if record.in_window:
                result.deliver_s.append(now - record.sent_at)
            if not record.waiting:
                del self.outstanding[client_msg_id]

    async def run_phase(self, phase: Phase) -> PhaseResult:
        self.phase = phase
        self.result = result = PhaseResult(self.plan.worker)
        conversations = self.direct if phase.kind == "direct" else self.group
        total = int(phase.rate * (phase.measure_until - phase.start_at))
        tasks: set[asyncio.Task[None]] = set()
        for k in range(total):
            due = phase.start_at + k / phase.rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            conversation = conversations[k % len(conversations)]
            members = self.members[conversation]
            sender = members[(k // len(conversations)) % len(members)]
            in_window = phase.measure_from <= due < phase.measure_until
            client_msg_id = f"{self.plan.run_tag}.{phase.index}.{k}"
            task = asyncio.create_task(
                self.send_one(
                    conversation, sender, members, client_msg_id, due=due, in_window=in_window
                )
            )
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        result.scheduled = total
        # Polls two conditions and a deadline.
        while (self.outstanding or tasks) and time.monotonic() < phase.drain_until:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        for task in list(tasks):
            task.cancel()
        result.reconnects = sum(client.reconnects for client in self.clients.values())
        # What is still outstanding now is lost (or later than the drain allows).
        self.outstanding.clear()
        self.phase = None
        return result

    async def send_one(
        self,
        conversation: str,
        sender: str,
        members: tuple[str, ...],
        client_msg_id: str,
        *,
        due: float,
        in_window: bool,
    ) -> None:
        result = self.result
        sent_at = time.monotonic()
        waiting = set(members) - {sender}
        self.outstanding[client_msg_id] = _Outstanding(sender, due, sent_at, in_window, waiting)
        result.expected_total += len(waiting)
        if in_window:
            result.sent_in_window += 1
            result.expected_in_window += len(waiting)
            result.schedule_lag_s.append(sent_at - due)
        try:
            await self.clients[sender].send(
                conversation, self.plan.body_text, client_msg_id=client_msg_id
            )
        except CommandError as error:
            result.errors[str(error.frame.code)] += 1
            self.outstanding.pop(client_msg_id, None)
            result.expected_total -= len(waiting)
            return
        result.accepted_total += 1
        if in_window:
            result.accepted_in_window += 1
            result.accept_s.append(time.monotonic() - sent_at)

    async def close(self) -> None:
        for task in self.readers:
            task.cancel()
        await asyncio.gather(
            *(client.close() for client in self.clients.values()), return_exceptions=True
        )


async def _serve(plan: WorkerPlan, pipe: Connection, counters: SynchronizedArray[int]) -> None:
    worker = _Worker(plan, counters)
    loop = asyncio.get_running_loop()
    try:
        await worker.connect()
        pipe.send(("ready", {"users": len(worker.clients), "conversations": len(worker.members)}))
        while True:
            message = await loop.run_in_executor(None, pipe.recv)
            if message[0] == "stop":
                return
            pipe.send(("done", await worker.run_phase(message[1])))
    finally:
        with contextlib.suppress(Exception):
            await worker.close()


def run_worker(plan: WorkerPlan, pipe: Connection, counters: SynchronizedArray[int]) -> None:
    """The process entry point (``multiprocessing`` with the spawn context)."""
    try:
        uvloop.run(_serve(plan, pipe, counters))
    except Exception:  # reported to the parent, which stops the run with the message
        with contextlib.suppress(OSError):
            pipe.send(("failed", traceback.format_exc()))
    finally:
        pipe.close()
