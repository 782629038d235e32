"""How frames reach a socket: framed once, and everything a socket has waiting in one write.

A large group's event goes to thousands of sockets: it is framed once for all of them
(:func:`text_frame`, checked here against wsproto's own framing), and each socket gets what it has
waiting in one write, however many frames were queued for it in one step of the loop. A socket
whose buffers are full gets nothing until they drain, then everything that piled up in one write,
and a reader stalled past the limit is closed as a slow consumer without anyone waiting for it.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from wsproto.frame_protocol import FrameProtocol

from bench.lean_ws import LeanSocket, open_lean
from ingress.connection import Connection, ConnectionHub, Principal
from ingress.wsprotocol import text_frame
from schemas.errors import CloseCode
from schemas.events import Platform
from tests.ingress.support import Gateway, hello, payloads, unique, wait_until


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65_535, 65_536, 70_000])
def test_a_text_frame_is_byte_for_byte_what_wsproto_frames(size: int) -> None:
    text = ("é" + "x" * size)[:size] if size else ""
    ours = text_frame(text)
    theirs = FrameProtocol(client=False, extensions=[]).send_data(text, fin=True)
    assert ours == theirs
    assert payloads(ours) == [text]


class RecordingWire:
    """A socket's writing end as the connection sees it: what was written, in how many calls."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.paused = False
        self.open = True
        self._drained = asyncio.Event()
        self._drained.set()

    def write_frames(self, data: bytes) -> bool:
        if not self.open:
            return False
        self.writes.append(data)
        return True

    @property
    def write_paused(self) -> bool:
        return self.paused

    async def wait_writable(self) -> None:
        await self._drained.wait()

    def pause(self) -> None:
        self.paused = True
        self._drained.clear()

    def resume(self) -> None:
        self.paused = False
        self._drained.set()


class Closes:
    def __init__(self) -> None:
        self.codes: list[CloseCode] = []


async def _noop_send(_message: object) -> None:
    return None


def connection(
    wire: RecordingWire,
    closes: Closes,
    *,
    max_frames: int = 4,
    max_bytes: int = 8 * 1024 * 1024,
    stall_seconds: float = 0.05,
) -> Connection:
    hub = ConnectionHub(
        max_frames=max_frames,
        max_bytes=max_bytes,
        stall_seconds=stall_seconds,
        frame_sent=lambda _type: None,
        closed=closes.codes.append,
    )
    return Connection(
        hub,
        _noop_send,
        Principal("acme", "ann", "phone"),
        Platform.WEB,
        "c1",
        wire=wire,
        sync_cursor=0,
        now=0.0,
    )


async def test_frames_queued_in_one_step_reach_the_socket_in_one_write() -> None:
    wire, closes = RecordingWire(), Closes()
    conn = connection(wire, closes)
    for n in range(3):
        assert conn.enqueue(text_frame(f"event {n}"), "event")
    assert wire.writes == []  # nothing is written while the batch is still being handed out
    await asyncio.sleep(0)
    assert len(wire.writes) == 1
    assert payloads(wire.writes[0]) == ["event 0", "event 1", "event 2"]
    assert conn.queued == 0
    conn.enqueue(text_frame("event 3"), "event")
    await asyncio.sleep(0)
    assert [payloads(data) for data in wire.writes] == [
        ["event 0", "event 1", "event 2"],
        ["event 3"],
    ]


async def test_a_full_socket_gets_what_piled_up_in_one_write_once_it_drains() -> None:
    wire, closes = RecordingWire(), Closes()
    conn = connection(wire, closes, max_frames=100)
    wire.pause()
    for n in range(5):
        conn.enqueue(text_frame(f"event {n}"), "event")
        await asyncio.sleep(0)
    assert wire.writes == []
    assert conn.queued == 5
    wire.resume()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert [payloads(data) for data in wire.writes] == [[f"event {n}" for n in range(5)]]
    assert conn.queued == 0
    assert closes.codes == []


async def test_a_stalled_reader_is_closed_and_its_frames_dropped() -> None:
    wire, closes = RecordingWire(), Closes()
    conn = connection(wire, closes, max_frames=4)
    wire.pause()
    for n in range(4):
        conn.enqueue(text_frame(f"event {n}"), "event")
    await asyncio.sleep(0.1)  # past the stall limit, the socket still full
    assert not conn.enqueue(text_frame("one more"), "event")
    assert closes.codes == [CloseCode.SLOW_CONSUMER]
    assert conn.queued == 0
    wire.resume()
    await asyncio.sleep(0)
    assert wire.writes == []


async def test_a_socket_that_went_away_drops_its_frames() -> None:
    wire, closes = RecordingWire(), Closes()
    conn = connection(wire, closes)
    wire.open = False
    conn.enqueue(text_frame("lost with the socket"), "event")
    await asyncio.sleep(0)
    assert conn.closing
    assert not conn.enqueue(text_frame("after"), "event")


async def test_the_benchmarks_lean_device_socket_reads_every_frame_however_it_is_cut() -> None:
    """bench/lean_ws.py stands in for thousands of devices in bench/large_group.py, which counts
    every message each gets: its parser must give back exactly the frames written, whatever
    their sizes and however the reads cut them."""
    texts = ["", "a", "é" * 70, "x" * 125, "y" * 126, "z" * 70_000, '{"type":"event"}']
    wire = b"".join(text_frame(text) for text in texts)
    for cut in (1, 2, 3, 7, 1000, len(wire)):
        got: list[bytes] = []
        socket = LeanSocket(got.append, lambda _code: None, b"key")
        socket._handshake.set_result(None)
        for start in range(0, len(wire), cut):
            socket.data_received(wire[start : start + cut])
        assert [payload.decode() for payload in got] == texts
        assert not socket._buffer


async def test_the_lean_device_socket_talks_to_the_gateway(gateway: Gateway) -> None:
    got: list[dict[str, object]] = []
    closed: list[int | None] = []
    socket = await open_lean(gateway.ws, lambda p: got.append(json.loads(p)), closed.append)
    socket.send_text(json.dumps(hello(gateway.settings, unique("lean"), "d1")))
    socket.send_text(json.dumps({"type": "ping", "id": "p1"}))
    await wait_until(lambda: len(got) >= 2, what="hello_ok and pong")
    assert [frame["type"] for frame in got] == ["hello_ok", "pong"]
    socket.close()
    await wait_until(lambda: socket.is_closed, what="the socket closed")
    assert closed == [None]


async def test_a_reader_that_leaves_too_many_bytes_unread_is_closed_however_slowly_it_reads() -> (
    None
):
    """Before: only the frame count (256) bounded a socket, and only while the reader was
    stalled for 2 s: one draining a large frame now and then held gigabytes."""
    wire, closes = RecordingWire(), Closes()
    # Never stalled for a minute: only the bytes can close it.
    conn = connection(wire, closes, max_frames=1000, max_bytes=100_000, stall_seconds=60.0)
    # A burst while the socket takes it is written at the end of the step, whatever its size.
    for _ in range(5):
        assert conn.enqueue(text_frame("x" * 40_000), "history_page")
    await asyncio.sleep(0)
    assert len(wire.writes) == 1 and closes.codes == []
    wire.pause()
    conn.enqueue(text_frame("y" * 40_000), "history_page")
    await asyncio.sleep(0)  # the writer now waits for the socket to drain
    assert conn.enqueue(text_frame("y" * 40_000), "history_page")
    assert not conn.enqueue(text_frame("y" * 40_000), "history_page")
    assert closes.codes == [CloseCode.SLOW_CONSUMER]
    assert conn.queued == 0
