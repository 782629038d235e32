"""The throughput load generator: one process driving a share of the benchmark's connections.

Each connection authenticates (``hello`` → ``hello_ok``), then keeps ``window`` sends outstanding:
a new ``send`` goes out as soon as a reply (``accepted`` or ``error``) frees a slot. The latency of
a send is the time from writing its frame to reading its reply; only replies read inside the
measurement window count. The parent process (bench/ingress_throughput.py) starts several of
these with ``multiprocessing`` so that the client side is not what limits the server on a small
machine, and talks to each over a pipe:

    worker → parent   ("ready", connected)  once every connection has had its hello_ok
    parent → worker   ("go", Window)         when to start, stop sending and give up waiting
    worker → parent   ("done", LoadResult)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import SynchronizedArray
from typing import Any

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from core.auth import issue_token
from core.settings import Settings
from schemas.events import Platform, TextBody
from schemas.frames import Hello, HelloOk, Send, encode_client_frame, parse_server_frame

#: Stand-ins in the encoded send frame, replaced per send (valid ids, so the template validates).
_REQUEST_ID_MARK = "R3QU3ST.M4RK"
_CLIENT_MSG_ID_MARK = "CL13NT.M5G.M4RK"
#: Replies are read as plain data (msgspec: a fraction of json.loads's CPU per frame).
decode_json = msgspec.json.Decoder().decode


@dataclass(frozen=True, slots=True)
class Credentials:
    """How the load generator mints tokens the server accepts (development HS256 tokens)."""

    secret: str
    issuer: str
    audience: str

    @classmethod
    def of(cls, settings: Settings) -> Credentials:
        """The client token settings of the system under test (``IM_AUTH__*``)."""
        auth = settings.auth
        return cls(auth.jwt_secret.get_secret_value(), auth.jwt_issuer, auth.jwt_audience)

    def token(self, *, user_id: str, tenant_id: str, device_id: str) -> str:
        """A token for one user's device, as the identity service would sign it."""
        return issue_token(
            self.secret,
            user_id=user_id,
            tenant_id=tenant_id,
            issuer=self.issuer,
            audience=self.audience,
            device_id=device_id,
        )


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """What one worker process does: connections ``first..first+count-1`` of the run."""

    worker: int
    url: str
    tenant_id: str
    first_connection: int
    connections: int
    window: int
    body_text: str
    run_tag: str
    credentials: Credentials
    connect_concurrency: int = 64


@dataclass(frozen=True, slots=True)
class Window:
    """Monotonic-clock instants (shared by processes on Linux) that frame one measurement."""

    start_at: float
    measure_from: float
    measure_until: float
    drain_until: float


@dataclass(slots=True)
class LoadResult:
    worker: int
    connected: int = 0
    sent: int = 0
    accepted_total: int = 0
    accepted_in_window: int = 0
    unanswered: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    closed_by_server: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    failure: str | None = None


def identities(index: int) -> tuple[str, str, str]:
    """The user, device and conversation of connection ``index``: one of each per connection."""
    return f"user-{index}", f"device-{index}", f"conv-{index}"


def send_template(conversation_id: str, body_text: str) -> str:
    """The text of a ``send`` frame with marks where the request and client message ids go."""
    frame = Send(
        id=_REQUEST_ID_MARK,
        conversation_id=conversation_id,
        client_msg_id=_CLIENT_MSG_ID_MARK,
        body=TextBody(text=body_text),
    )
    return encode_client_frame(frame)


async def open_connection(
    url: str, tenant_id: str, index: int, credentials: Credentials, *, compression: str | None
) -> tuple[ClientConnection, HelloOk | None]:
    """Connect and authenticate connection ``index``; the reply is ``None`` if it was no
    ``hello_ok`` the benchmark understands (the bare calibration server answers tersely)."""
    user_id, device_id, _ = identities(index)
    token = credentials.token(user_id=user_id, tenant_id=tenant_id, device_id=device_id)
    hello = Hello(
        id="hello", token=token, tenant_id=tenant_id, device_id=device_id, platform=Platform.WEB
    )
    websocket = await connect(
        url,
        compression=compression,
        ping_interval=None,  # the application's ping frame keeps connections alive instead
        proxy=None,
        open_timeout=60,
        close_timeout=5,
    )
    await websocket.send(encode_client_frame(hello))
    reply = await asyncio.wait_for(websocket.recv(), timeout=60)
    data = json.loads(reply)
    if data.get("type") != "hello_ok":
        await websocket.close()
        raise ConnectionRefusedError(f"hello was answered with {reply[:300]!r}")
    if "node_id" not in data:
        return websocket, None
    frame = parse_server_frame(reply)
    return websocket, frame if isinstance(frame, HelloOk) else None


async def _drive(
    websocket: ClientConnection,
    template: str,
    plan: LoadPlan,
    window: Window,
    result: LoadResult,
) -> None:
    """Keep ``plan.window`` sends outstanding on one connection until the window ends."""
    sent_at: dict[str, float] = {}
    slots = asyncio.Semaphore(plan.window)
    monotonic = time.monotonic
    sending = True
    # Set once sending stopped and every send has its reply, or the connection closed.
    settled = asyncio.Event()

    async def read_replies() -> None:
        try:
            async for message in websocket:
                frame = decode_json(message)
                started = sent_at.pop(frame.get("id"), None)
                if started is not None:  # else a frame that answers no send (a pushed event)
                    _count_reply(frame, started, monotonic(), window, result)
                    slots.release()
                    if not sending and not sent_at:
                        settled.set()
        finally:
            settled.set()

    reader = asyncio.create_task(read_replies())
    sequence = 0
    try:
        while not reader.done():
            if not await _take_slot(slots, window.measure_until):
                break
            now = monotonic()
            if now >= window.measure_until:
                break
            sequence += 1
            request_id = str(sequence)
            frame = template.replace(_REQUEST_ID_MARK, request_id, 1).replace(
                _CLIENT_MSG_ID_MARK, f"{plan.run_tag}.{sequence}", 1
            )
            sent_at[request_id] = now
            await websocket.send(frame)
            result.sent += 1
        sending = False
        if not sent_at:
            settled.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, window.drain_until - monotonic())):
                await settled.wait()
    except ConnectionClosed:
        pass
    finally:
        result.unanswered += len(sent_at)
        if reader.done() and not reader.cancelled():
            _note_reader_end(websocket, reader, result)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
            await reader


def _count_reply(
    frame: dict[str, Any], started: float, now: float, window: Window, result: LoadResult
) -> None:
    """One send's reply: accepted (timed if inside the measured window), or an error."""
    kind = frame.get("type")
    if kind == "accepted":
        result.accepted_total += 1
        if window.measure_from <= now < window.measure_until:
            result.accepted_in_window += 1
            result.latencies.append(now - started)
    elif kind == "error":
        result.errors[str(frame.get("code"))] += 1
    else:
        result.errors[f"unexpected reply {kind}"] += 1


async def _take_slot(slots: asyncio.Semaphore, until: float) -> bool:
    """A free send slot, waiting for one at most until ``until``; ``False`` when none came."""
    if not slots.locked():
        await slots.acquire()
        return True
    remaining = until - time.monotonic()
    if remaining <= 0:
        return False
    try:
        async with asyncio.timeout(remaining):
            await slots.acquire()
    except TimeoutError:
        return False
    return True


def _note_reader_end(
    websocket: ClientConnection, reader: asyncio.Task[None], result: LoadResult
) -> None:
    """How the finished reply reader ended: the server closed the connection, or it failed."""
    error = reader.exception()
    if isinstance(error, ConnectionClosed) or error is None:
        code = websocket.close_code
        result.closed_by_server[str(code)] += 1
    else:
        result.failure = f"reader failed: {error!r}"


async def _open_all(plan: LoadPlan, result: LoadResult) -> list[ClientConnection]:
    gate = asyncio.Semaphore(plan.connect_concurrency)

    async def open_one(index: int) -> ClientConnection:
        async with gate:
            websocket, _ = await open_connection(
                plan.url, plan.tenant_id, index, plan.credentials, compression=None
            )
            return websocket

    indexes = range(plan.first_connection, plan.first_connection + plan.connections)
    websockets = await asyncio.gather(*(open_one(index) for index in indexes))
    result.connected = len(websockets)
    return list(websockets)


async def _report_progress(result: LoadResult, progress: SynchronizedArray[Any]) -> None:
    while True:
        progress[result.worker] = result.accepted_total
        await asyncio.sleep(0.25)


async def _run(plan: LoadPlan, pipe: Connection, progress: SynchronizedArray[Any]) -> LoadResult:
    loop = asyncio.get_running_loop()
    result = LoadResult(worker=plan.worker)
    try:
        websockets = await _open_all(plan, result)
    except (OSError, InvalidHandshake, ConnectionClosed, TimeoutError) as error:
        result.failure = f"could not open the connections: {error!r}"
        pipe.send(("failed", result))
        return result
    pipe.send(("ready", result.connected))
    command = await loop.run_in_executor(None, pipe.recv)
    if command[0] != "go":
        for websocket in websockets:
            await websocket.close()
        return result
    window: Window = command[1]
    reporter = asyncio.create_task(_report_progress(result, progress))
    templates = [
        send_template(identities(index)[2], plan.body_text)
        for index in range(plan.first_connection, plan.first_connection + plan.connections)
    ]
    await asyncio.sleep(max(0.0, window.start_at - time.monotonic()))
    await asyncio.gather(
        *(
            _drive(websocket, template, plan, window, result)
            for websocket, template in zip(websockets, templates, strict=True)
        )
    )
    reporter.cancel()
    progress[plan.worker] = result.accepted_total
    await asyncio.gather(*(websocket.close() for websocket in websockets))
    return result


def run_worker(plan: LoadPlan, pipe: Connection, progress: SynchronizedArray[Any]) -> None:
    """The worker process's entry point (a ``multiprocessing`` target)."""
    try:
        result = asyncio.run(_run(plan, pipe, progress))
    except Exception as error:
        result = LoadResult(worker=plan.worker, failure=f"worker failed: {error!r}")
    pipe.send(("done", result))
    pipe.close()
