"""The idle-connection client: one process that opens, holds and closes many connections.

Every connection authenticates (``hello`` → ``hello_ok``) and then stays idle but for an
application ``ping`` every ``ping_interval`` seconds (spread evenly, so the server sees a steady
trickle rather than bursts), under the idle timeout the server announced in ``hello_ok``. A reader
task per connection drains the pongs and notices a connection the server closed. The parent
(bench/ingress_idle.py) drives it over a pipe:

    parent → client   ("open", first_index, count)   client → parent   ("opened", OpenReport)
    parent → client   ("check",)                     client → parent   ("alive", count)
    parent → client   ("close",)                     client → parent   ("closed", count)
    parent → client   ("exit",)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from bench.loadgen import Credentials, open_connection
from schemas.frames import Ping, encode_client_frame

#: How often the pinger wakes up; each wake-up pings the connections whose turn it is.
_TICK_SECONDS = 0.5


@dataclass(frozen=True, slots=True)
class IdlePlan:
    url: str
    tenant_id: str
    credentials: Credentials
    offer_deflate: bool
    concurrency: int = 100
    max_ping_interval: float = 20.0


@dataclass(slots=True)
class OpenReport:
    opened: int = 0
    failed: int = 0
    seconds: float = 0.0
    deflate_negotiated: int = 0
    idle_timeout_ms: int | None = None
    first_errors: list[str] = field(default_factory=list)


class IdleClient:
    def __init__(self, plan: IdlePlan, opened_counter: Synchronized[int]) -> None:
        self._plan = plan
        self._opened_counter = opened_counter
        self._connections: list[ClientConnection] = []
        self._readers: list[asyncio.Task[None]] = []
        self._closed_by_server: Counter[str] = Counter()
        self._ping_interval = plan.max_ping_interval

    async def open(self, first_index: int, count: int) -> OpenReport:
        report = OpenReport()
        gate = asyncio.Semaphore(self._plan.concurrency)
        began = time.monotonic()

        async def open_one(index: int) -> None:
            async with gate:
                try:
                    websocket, hello_ok = await open_connection(
                        self._plan.url,
                        self._plan.tenant_id,
                        index,
                        self._plan.credentials,
                        compression="deflate" if self._plan.offer_deflate else None,
                    )
                except (OSError, InvalidHandshake, ConnectionClosed, TimeoutError) as error:
                    report.failed += 1
                    if len(report.first_errors) < 5:
                        report.first_errors.append(repr(error))
                    return
            response = websocket.response
            if response is not None and "permessage-deflate" in response.headers.get(
                "Sec-WebSocket-Extensions", ""
            ):
                report.deflate_negotiated += 1
            if hello_ok is not None and report.idle_timeout_ms is None:
                report.idle_timeout_ms = hello_ok.idle_timeout_ms
                self._ping_interval = min(
                    self._plan.max_ping_interval, hello_ok.idle_timeout_ms / 1000 / 3
                )
            self._connections.append(websocket)
            self._readers.append(asyncio.create_task(self._drain(websocket)))
            report.opened += 1
            self._opened_counter.value = len(self._connections)

        await asyncio.gather(
            *(open_one(index) for index in range(first_index, first_index + count))
        )
        report.seconds = time.monotonic() - began
        return report

    async def _drain(self, websocket: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for _ in websocket:
                pass
        self._closed_by_server[str(websocket.close_code)] += 1

    async def ping_forever(self) -> None:
        """Ping each connection once per interval, a slice of them every tick."""
        ping = encode_client_frame(Ping(id="ping"))
        tick = 0
        while True:
            await asyncio.sleep(_TICK_SECONDS)
            slices = max(1, round(self._ping_interval / _TICK_SECONDS))
            for websocket in self._connections[tick % slices :: slices]:
                with contextlib.suppress(ConnectionClosed):
                    await websocket.send(ping)
            tick += 1

    def alive(self) -> int:
        return sum(not reader.done() for reader in self._readers)

    async def close(self) -> int:
        gate = asyncio.Semaphore(self._plan.concurrency)

        async def close_one(websocket: ClientConnection) -> None:
            async with gate:
                await websocket.close()

        count = len(self._connections)
        await asyncio.gather(*(close_one(websocket) for websocket in self._connections))
        for reader in self._readers:
            reader.cancel()
        self._connections.clear()
        self._readers.clear()
        self._opened_counter.value = 0
        return count


async def _serve(plan: IdlePlan, pipe: Connection, opened_counter: Synchronized[int]) -> None:
    loop = asyncio.get_running_loop()
    client = IdleClient(plan, opened_counter)
    pinger = asyncio.create_task(client.ping_forever())
    try:
        while True:
            command = await loop.run_in_executor(None, pipe.recv)
            if command[0] == "open":
                pipe.send(("opened", await client.open(command[1], command[2])))
            elif command[0] == "check":
                pipe.send(("alive", client.alive()))
            elif command[0] == "close":
                pipe.send(("closed", await client.close()))
            else:
                return
    finally:
        pinger.cancel()
        await client.close()


def run_client(plan: IdlePlan, pipe: Connection, opened_counter: Synchronized[int]) -> None:
    """The client process's entry point (a ``multiprocessing`` target)."""
    try:
        asyncio.run(_serve(plan, pipe, opened_counter))
    except Exception as error:
        pipe.send(("failed", repr(error)))
    finally:
        pipe.close()
