"""``imstream demo``: simulated users chatting through a running imstream, via the public protocol.

Every user is one device with the client SDK (``ingress.client``). The demo creates 1:1
conversations and groups, sends messages at a target rate for a while, waits for every member's
device to receive every message, and prints what happened: sent, accepted, delivered live,
delivered by sync, duplicates seen by clients (must be 0), lost (must be 0), and the send →
deliver latency. It exits 1 when anything was lost or doubled.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import uvloop

from ingress.auth import issue_token
from ingress.client import Client, Received
from pipelines.settings import Settings
from schemas.events import MessageSent


@dataclass(frozen=True)
class DemoOptions:
    url: str
    tenant: str = "demo"
    users: int = 20
    conversations: int = 10
    group_size: int = 5
    rate: float = 20.0
    duration: float = 30.0
    drain_timeout: float = 30.0
    seed: int = 1


@dataclass
class DemoResult:
    sent: int = 0
    accepted: int = 0
    expected: int = 0
    delivered_live: int = 0
    delivered_sync: int = 0
    duplicates: int = 0
    lost: int = 0
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def delivered(self) -> int:
        return self.delivered_live + self.delivered_sync

    def percentile_ms(self, fraction: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        index = min(len(ordered) - 1, max(0, int(fraction * len(ordered) + 0.5) - 1))
        return round(ordered[index] * 1000, 1)

    def lines(self) -> list[str]:
        p50, p95, p99 = (self.percentile_ms(f) for f in (0.50, 0.95, 0.99))
        return [
            f"sent                 {self.sent}",
            f"accepted             {self.accepted}",
            f"deliveries expected  {self.expected} (every member's device, sender included)",
            f"delivered live       {self.delivered_live}",
            f"delivered by sync    {self.delivered_sync}",
            f"duplicates seen      {self.duplicates}",
            f"lost                 {self.lost}",
            f"send→deliver latency p50 {p50} ms · p95 {p95} ms · p99 {p99} ms",
            f"duration             {self.seconds:.1f} s",
        ]


class _Tracker:
    """What every device received, against what was sent to it."""

    def __init__(self) -> None:
        self.sent_at: dict[str, float] = {}
        self.audience: dict[str, list[str]] = {}
        self.seen: dict[str, set[str]] = {}
        self.result = DemoResult()

    def on_accepted(self, event_id: str, members: list[str], sent_at: float) -> None:
        self.sent_at[event_id] = sent_at
        self.audience[event_id] = members
        self.result.accepted += 1
        self.result.expected += len(members)

    def on_received(self, user: str, item: Received) -> None:
        if not isinstance(item.event, MessageSent):
            return
        seen = self.seen.setdefault(user, set())
        if item.event.event_id in seen:
            self.result.duplicates += 1
            return
        seen.add(item.event.event_id)
        if item.live:
            self.result.delivered_live += 1
        else:
            self.result.delivered_sync += 1
        sent_at = self.sent_at.get(item.event.event_id)
        if sent_at is not None:
            self.result.latencies.append(time.monotonic() - sent_at)

    def missing(self) -> int:
        return sum(
            1
            for event_id, members in self.audience.items()
            for user in members
            if event_id not in self.seen.get(user, set())
        )


async def run_demo(
    settings: Settings, options: DemoOptions, progress: Callable[[str], None]
) -> DemoResult:
    rng = random.Random(options.seed)
    run = uuid.uuid4().hex[:6]
    users = [f"demo-{run}-u{i}" for i in range(options.users)]
    secret = settings.auth.jwt_secret.get_secret_value()

    def token(user: str) -> str:
        return issue_token(
            secret,
            user_id=user,
            tenant_id=options.tenant,
            issuer=settings.auth.jwt_issuer,
            audience=settings.auth.jwt_audience,
        )

    clients = {
        user: Client(options.url, tenant_id=options.tenant, device_id="demo", token=token(user))
        for user in users
    }
    tracker = _Tracker()
    started = time.monotonic()
    readers: list[asyncio.Task[None]] = []
    try:
        await asyncio.gather(*(client.connect() for client in clients.values()))
        progress(f"{len(clients)} users connected to {options.url}")

        async def read(user: str, client: Client) -> None:
            async for item in client.events():
                tracker.on_received(user, item)

        readers = [asyncio.create_task(read(u, c)) for u, c in clients.items()]
        conversations: list[tuple[str, list[str]]] = []
        for index in range(options.conversations):
            if index % 2 == 0 or options.group_size < 3:
                members = rng.sample(users, 2)
                kind = "direct"
            else:
                members = rng.sample(users, min(options.group_size, len(users)))
                kind = "group"
            owner = clients[members[0]]
            conversation_id = await owner.create_conversation(
                members[1:], kind=kind, name=None if kind == "direct" else f"group {index}"
            )
            conversations.append((conversation_id, members))
        progress(f"{len(conversations)} conversations created")

        interval = 1.0 / options.rate
        sending = asyncio.Semaphore(256)
        pending: set[asyncio.Task[None]] = set()

        async def send_one(conversation_id: str, members: list[str], sender: str) -> None:
            async with sending:
                sent_at = time.monotonic()
                accepted = await clients[sender].send(conversation_id, f"hello at {sent_at:.3f}")
                tracker.on_accepted(accepted.event_id, members, sent_at)

        begin = time.monotonic()
        next_at = begin
        last_report = begin
        while time.monotonic() - begin < options.duration:
            conversation_id, members = rng.choice(conversations)
            task = asyncio.create_task(send_one(conversation_id, members, rng.choice(members)))
            pending.add(task)
            task.add_done_callback(pending.discard)
            tracker.result.sent += 1
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if time.monotonic() - last_report >= 2.0:
                last_report = time.monotonic()
                result = tracker.result
                progress(
                    f"{last_report - begin:5.1f}s sent {result.sent} accepted {result.accepted} "
                    f"delivered {result.delivered}/{result.expected}"
                )
        await asyncio.gather(*pending)
        deadline = time.monotonic() + options.drain_timeout
        while tracker.missing() and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            missing = tracker.missing()
            if missing:
                # A device that missed a live event gets it by syncing.
                await asyncio.gather(*(client.sync() for client in clients.values()))
                progress(f"waiting for {missing} deliveries …")
        await asyncio.sleep(1.0)  # late duplicates would show here
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*(client.close() for client in clients.values()))
        for task in readers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    result = tracker.result
    result.lost = tracker.missing()
    result.seconds = time.monotonic() - started
    return result


def main_demo(
    settings: Settings,
    options: DemoOptions,
    *,
    echo: Callable[[str], None],
    progress: Callable[[str], None],
) -> int:
    """Run the demo, print its summary; 0 when nothing was lost or doubled."""
    result = uvloop.run(run_demo(settings, options, progress))
    for line in result.lines():
        echo(line)
    ok = result.lost == 0 and result.duplicates == 0
    echo("OK: nothing lost, nothing doubled" if ok else "FAILED: messages lost or doubled")
    return 0 if ok else 1
