"""What one socket write of a fan-out costs an ingress node, against the raw floor.

A large group's event is one socket write per connected member device on each node (thousands
per message), so the CPU of one such write bounds how many devices a node serves. This
benchmark holds ``--sockets`` WebSockets on one uvicorn server with the gateway's protocol
(``ingress/wsprotocol.py``) in this process, their reading ends drained by a child process, and
hands ``--messages`` events to every socket, measuring this process's CPU per socket write:

* ``gateway``: the gateway's path, ``Connection.enqueue`` of a frame framed once, each socket's
  waiting frames written in one call per loop step (``ingress/connection.py``);
* ``asgi_send``: the path before it, one ASGI ``websocket.send`` per frame and socket from a task
  per socket (wsproto frames each one, one ``send()`` system call each);
* ``raw``: the floor, ``socket.send`` of the same bytes on plain connected TCP sockets, in a loop.

Run with ``python -m bench.fanout``; results go to docs/bench/fanout.json.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import selectors
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import uvicorn
from starlette.types import Receive, Scope, Send

from bench.common import LOOPBACK, REPO_ROOT, Progress, machine_facts, now_iso, run_main
from bench.common import write_results as write_section
from core.settings import Settings
from ingress.connection import Connection, ConnectionHub, Principal
from ingress.wsprotocol import WIRE_EXTENSION, gateway_ws_protocol, text_frame
from schemas.events import Platform

RESULTS_PATH = REPO_ROOT / "docs" / "bench" / "fanout.json"
#: A pause between messages, so that each message's writes are one batch (as a group's are).
PAUSE_SECONDS = 0.002
_UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__)
    parser.add_argument("--sockets", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--frame-bytes", type=int, default=460, help="an event frame's size")
    parser.add_argument("--output", type=str, default=str(RESULTS_PATH))
    return parser.parse_args(argv)


def drain(sockets: list[socket.socket]) -> None:
    """The devices: read and drop everything (a child process)."""
    selector = selectors.DefaultSelector()
    for sock in sockets:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    while True:
        for key, _events in selector.select(1.0):
            try:
                if not key.fileobj.recv(1 << 20):  # type: ignore[union-attr]
                    selector.unregister(key.fileobj)
            except BlockingIOError:
                pass


def start_drainer(sockets: list[socket.socket]) -> multiprocessing.process.BaseProcess:
    process = multiprocessing.get_context("fork").Process(target=drain, args=(sockets,))
    process.daemon = True
    process.start()
    for sock in sockets:  # the child holds them now
        sock.close()
    return process


async def cpu_per_write(
    targets: int, messages: int, write_all: Callable[[], None], done: Callable[[], bool]
) -> float:
    """This process's CPU µs per socket write: ``write_all`` once per message, then until
    ``done``."""
    started = time.process_time()
    for _ in range(messages):
        write_all()
        await asyncio.sleep(PAUSE_SECONDS)
    while not done():  # noqa: ASYNC110 (polled, as the state has no event to wait on)
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.05)
    # The pauses themselves cost a little CPU (a loop wake-up each): counted, as a node's too.
    return (time.process_time() - started) * 1e6 / (targets * messages)


class Server:
    """A uvicorn server with the gateway's protocol whose app keeps each socket's ASGI send."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.sockets: list[tuple[Send, Any]] = []
        self.ready = asyncio.Event()

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await receive()
        await send({"type": "websocket.accept"})
        self.sockets.append((send, scope["extensions"][WIRE_EXTENSION]["wire"]))
        if len(self.sockets) == self.expected:
            self.ready.set()
        while (await receive())["type"] != "websocket.disconnect":
            pass


async def gateway_paths(
    count: int, messages: int, frame: str, progress: Progress
) -> dict[str, float]:
    server = Server(count)
    config = uvicorn.Config(
        server.app,
        ws=gateway_ws_protocol(5.0),
        ws_per_message_deflate=False,
        ws_ping_interval=None,
        ws_ping_timeout=None,
        log_config=None,
        lifespan="on",
        interface="asgi3",
    )
    uv = uvicorn.Server(config)
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    port = listener.getsockname()[1]
    serving = asyncio.get_running_loop().create_task(uv.serve(sockets=[listener]))
    while not uv.started:  # noqa: ASYNC110 (uvicorn offers no event for it)
        await asyncio.sleep(0.01)
    progress.update(f"opening {count} WebSockets")
    clients = []
    for _ in range(count):
        client = socket.create_connection((LOOPBACK, port))
        client.sendall(_UPGRADE)
        clients.append(client)
    drainer = start_drainer(clients)
    await server.ready.wait()
    hub = ConnectionHub(
        max_frames=100_000, stall_seconds=60.0, frame_sent=lambda _t: None, closed=lambda _c: None
    )
    connections = [
        Connection(
            hub,
            send,
            Principal("bench", f"u{n}", "d1"),
            Platform.WEB,
            f"c{n}",
            wire=wire,
            sync_cursor=0,
            now=0.0,
        )
        for n, (send, wire) in enumerate(server.sockets)
    ]
    framed = text_frame(frame)
    await asyncio.sleep(0.5)
    progress.update("gateway path")
    gateway = await cpu_per_write(
        count,
        messages,
        lambda: enqueue_all(connections, framed),
        lambda: hub.queued_frames == 0,
    )
    pending: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()

    async def asgi_send(send: Send) -> None:
        await send({"type": "websocket.send", "text": frame})

    def asgi_send_all() -> None:
        for send, _wire in server.sockets:
            task = loop.create_task(asgi_send(send))
            pending.add(task)
            task.add_done_callback(pending.discard)

    progress.update("one ASGI send per frame")
    asgi = await cpu_per_write(count, messages, asgi_send_all, lambda: not pending)
    drainer.kill()
    uv.should_exit = True
    await serving
    return {"gateway": gateway, "asgi_send": asgi}


def enqueue_all(connections: list[Connection], framed: bytes) -> None:
    for connection in connections:
        connection.enqueue(framed, "event")


def raw_path(count: int, messages: int, frame: str) -> float:
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(count)
    port = listener.getsockname()[1]
    clients, servers = [], []
    for _ in range(count):
        clients.append(socket.create_connection((LOOPBACK, port)))
        servers.append(listener.accept()[0])
    drainer = start_drainer(clients)
    framed = text_frame(frame)
    started = time.process_time()
    for _ in range(messages):
        for sock in servers:
            sock.send(framed)
        time.sleep(PAUSE_SECONDS)
    cpu = (time.process_time() - started) * 1e6 / (count * messages)
    drainer.kill()
    for sock in servers:
        sock.close()
    listener.close()
    return cpu


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    progress = Progress()
    frame = (
        '{"type":"event","sync_id":null,"event":{"body":"'
        + "x" * max(0, options.frame_bytes - 50)
        + '"}}'
    )
    paths = asyncio.run(gateway_paths(options.sockets, options.messages, frame, progress))
    progress.update("raw socket.send")
    raw = raw_path(options.sockets, options.messages, frame)
    results = {
        "measured_at": now_iso(),
        "machine": machine_facts(Settings()),
        "sockets": options.sockets,
        "messages": options.messages,
        "frame_bytes": len(text_frame(frame)),
        "cpu_us_per_socket_write": {
            **{k: round(v, 2) for k, v in paths.items()},
            "raw": round(raw, 2),
        },
        "ratio_to_raw": {k: round(v / raw, 2) for k, v in paths.items()},
    }
    progress.done(
        f"{options.sockets} sockets x {options.messages} messages: CPU per socket write "
        f"gateway {paths['gateway']:.2f} us, one ASGI send per frame {paths['asgi_send']:.2f} us, "
        f"raw send {raw:.2f} us (gateway / raw = {paths['gateway'] / raw:.2f})"
    )
    write_section("fanout", results, Path(options.output))
    progress.done(f"wrote {options.output}")
    return 0


if __name__ == "__main__":
    run_main(main)
