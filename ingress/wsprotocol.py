"""uvicorn's wsproto WebSocket protocol with the changes a gateway needs when closing.

The ingress runs on uvicorn's ``wsproto`` implementation (the leanest per idle connection, see
docs/protocol.md) and changes only how sockets are closed:

* **Closing never waits for the reader.** uvicorn's ``send`` waits until the transport's write
  buffer drains below its high-water mark before writing anything, the close frame included. A
  client that stopped reading would then keep its connection, and the gateway's close, forever.
  Here a close frame joins the write buffer at once, and a peer that has not answered it within
  ``close_timeout`` seconds (because it reads nothing) is cut off with a TCP reset.
* **A refused frame is explained.** A text frame of invalid UTF-8 (or another protocol
  violation) closes the socket with the RFC 6455 code (1007, 1002) in a close frame, where
  uvicorn would drop the connection without one.
* **Frames are written whole, many at a time.** The gateway frames each event once (a group event
  goes to thousands of sockets, :func:`text_frame`) and writes every frame a socket has waiting
  in one ``transport.write`` (one system call) through :meth:`GatewayWSProtocol.write_frames`,
  which the protocol offers the application as the ASGI scope extension ``imstream.wire``. One
  ASGI ``send`` per frame (a task step, wsproto's framing and a ``send()`` call for every frame
  and socket) was 22 µs per socket write; a large group's fan-out is thousands of them.
* **Shutdown drains with 4010.** When uvicorn shuts down it closes every WebSocket with 1012
  before the application's lifespan shutdown runs. Here the close code is server-draining (4010,
  "reconnect elsewhere"), which clients treat as "reconnect to another node and sync", and the
  application still sees a disconnect for each socket, so it publishes ``device.disconnected``.

uvicorn is pinned below 0.55 in pyproject.toml; tests/ingress exercises both behaviours.
"""

from __future__ import annotations

import contextlib
import struct
from typing import Any, ClassVar, Final

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.wsproto_impl import WSProtocol
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Request
from wsproto.utilities import LocalProtocolError

from schemas.errors import CloseCode

#: The close reason clients see on shutdown (at most 123 bytes: it travels in the close frame).
DRAIN_REASON = "server draining; reconnect elsewhere"

#: The ASGI scope extension under which the protocol offers itself as the socket's :class:`Wire`.
WIRE_EXTENSION: Final = "imstream.wire"

_FIN_TEXT: Final = 0x81  # FIN bit and opcode 1 (text)


def text_frame(text: str | bytes) -> bytes:
    """``text`` (or its UTF-8 bytes) as one WebSocket text frame from a server (RFC 6455 §5.2:
    unmasked, unfragmented, no extension: the ingress negotiates no per-message deflate)."""
    payload = text.encode() if isinstance(text, str) else text
    size = len(payload)
    if size < 126:
        return bytes((_FIN_TEXT, size)) + payload
    if size < 1 << 16:
        return struct.pack("!BBH", _FIN_TEXT, 126, size) + payload
    return struct.pack("!BBQ", _FIN_TEXT, 127, size) + payload


class GatewayWSProtocol(WSProtocol):
    """One WebSocket connection, as uvicorn's ``WSProtocol`` with a non-blocking close."""

    #: Seconds a peer gets to answer our close frame before the connection is reset.
    close_timeout_seconds: ClassVar[float] = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.close_timeout = self.close_timeout_seconds

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        # The application task has been created but not run: it sees the extension.
        self.scope["extensions"][WIRE_EXTENSION] = {"wire": self}

    # -- the Wire the gateway writes to --------------------------------------------------------

    def write_frames(self, data: bytes) -> bool:
        """Write whole frames (``text_frame`` output) now; ``False`` if the socket is closing.

        Never waits: asyncio's transport buffers what the socket does not take at once, and
        calls ``pause_writing`` above its high-water mark, after which the caller waits for
        :meth:`wait_writable` before writing more.
        """
        if (
            self.disconnected
            or self.close_sent
            or not self.handshake_complete
            or self.transport.is_closing()
        ):
            return False
        self.transport.write(data)
        return True

    @property
    def write_paused(self) -> bool:
        """Whether the transport's buffer is above its high-water mark (the peer reads slowly)."""
        return not self.writable.is_set()

    async def wait_writable(self) -> None:
        """Return once the transport's buffer has drained below its low-water mark."""
        await self.writable.wait()

    async def send(self, message: ASGISendEvent) -> None:
        if message["type"] != "websocket.close" or not self._may_close():
            await super().send(message)
            return
        code = message.get("code", 1000)
        reason = message.get("reason") or ""
        try:
            output = self.conn.send(CloseConnection(code=code, reason=reason))
        except LocalProtocolError as error:
            raise ClientDisconnected from error
        self.close_sent = True
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        if self.transport.is_closing():
            return
        self.transport.write(output)
        if self.read_paused:
            # Reading resumes so that the peer's answering close frame is seen.
            self.read_paused = False
            self.transport.resume_reading()
        # abort(), not close(): close() would wait for a reader that may never read again.
        self.close_timer = self.loop.call_later(self.close_timeout, self.transport.abort)

    def handle_close(self, event: CloseConnection) -> None:
        if not self.close_sent and self.conn.state is ConnectionState.OPEN:
            # wsproto reports a frame it cannot accept (a text frame of invalid UTF-8: 1007, a
            # protocol violation: 1002) as if the peer had closed with that code, and uvicorn
            # then drops the TCP connection without a word. Tell the peer why.
            with contextlib.suppress(LocalProtocolError):
                reason = event.reason or ""
                self.transport.write(self.conn.send(CloseConnection(event.code, reason[:100])))
        super().handle_close(event)

    def shutdown(self) -> None:
        if self.close_sent and self.transport.get_write_buffer_size():
            # Closing already, behind frames the peer does not read: a drain does not wait for
            # it (uvicorn's close() would, until its graceful-shutdown timeout).
            if self.close_timer is not None:
                self.close_timer.cancel()
                self.close_timer = None
            self.transport.abort()
            return
        if not self._may_close():
            super().shutdown()
            return
        self.stop_keepalive()
        self.close_sent = True
        code = int(CloseCode.SERVER_DRAINING)
        self.queue.put_nowait(
            {"type": "websocket.disconnect", "code": code, "reason": DRAIN_REASON}
        )
        # LocalProtocolError: the peer is already closing; there is nothing left to tell it.
        with contextlib.suppress(LocalProtocolError):
            self.transport.write(self.conn.send(CloseConnection(code=code, reason=DRAIN_REASON)))
        self.transport.close()
        if self.transport.get_write_buffer_size():
            # A reader that is behind gets the close timeout to catch up, then is cut off.
            self.close_timer = self.loop.call_later(self.close_timeout, self.transport.abort)

    def _may_close(self) -> bool:
        """Whether a close frame can still be sent: accepted, open, and not closing yet."""
        return (
            self.handshake_complete
            and not self.close_sent
            and not self.response_started
            and not self.disconnected
        )


def gateway_ws_protocol(close_timeout_seconds: float) -> type[GatewayWSProtocol]:
    """The protocol class to hand to uvicorn (``ws=``), with this node's close timeout."""
    return type(
        "GatewayWSProtocol",
        (GatewayWSProtocol,),
        {"close_timeout_seconds": close_timeout_seconds, "__module__": __name__},
    )
