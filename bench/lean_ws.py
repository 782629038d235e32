"""A WebSocket client socket that costs its process as little as possible per received frame.

The large-group benchmark holds thousands of member devices in two processes on the machine it
measures: every message is one frame read per device, and what the simulated devices spend is
CPU the system under test does not get (the devices of a real deployment are not on its
servers). A ``websockets`` client socket spent about 15 µs per frame (its parser, a queue and a
task switch per frame); this one parses the server's frames itself in ``data_received`` (server
frames are unmasked and, with no extension negotiated, plain RFC 6455 §5.2) and hands each text
frame's payload to a callback, several frames per read when the server wrote them together.

It speaks just enough of the protocol for a device: the opening handshake (checked, 101 with the
right ``Sec-WebSocket-Accept``), masked text frames out, text frames in, answering pings and
closes. Anything else from the server (a fragmented or binary frame) is a protocol error that
closes the socket with 1002: the gateway sends neither.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
from collections.abc import Callable
from typing import Final, cast
from urllib.parse import urlsplit

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_TEXT, _CLOSE, _PING, _PONG = 0x1, 0x8, 0x9, 0xA
_MAX_HEADER_BYTES: Final = 16_384


class HandshakeError(ConnectionError):
    """The server did not accept the WebSocket (its status line says why)."""


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """One client frame (RFC 6455: client frames are masked)."""
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
    mask = os.urandom(4)
    # XOR with the mask repeated, as one big-integer operation rather than a loop per byte.
    repeated = (mask * (size // 4 + 1))[:size]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(size, "big")
    return header + mask + body


class LeanSocket(asyncio.Protocol):
    """One device's socket: text frames in go to ``on_text``; the close code to ``on_close``."""

    def __init__(
        self,
        on_text: Callable[[bytes], None],
        on_close: Callable[[int | None], None],
        key: bytes,
    ) -> None:
        self._on_text = on_text
        self._on_close = on_close
        self._accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        self._buffer = bytearray()
        self._handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._transport: asyncio.Transport | None = None
        self.close_code: int | None = None
        self._closed = False

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if not self._handshake.done():
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > _MAX_HEADER_BYTES:
                    self._fail_handshake(HandshakeError("handshake response too long"))
                return
            head = bytes(buffer[:end])
            del buffer[: end + 4]
            status = head.split(b"\r\n", 1)[0]
            if not status.startswith(b"HTTP/1.1 101 ") or self._accept not in head:
                self._fail_handshake(HandshakeError(status.decode(errors="replace")))
                return
            self._handshake.set_result(None)
        self._frames()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._handshake.done():
            self._handshake.set_exception(exc or ConnectionError("closed during the handshake"))
        if not self._closed:
            self._closed = True
            self._on_close(self.close_code)

    # -- frames --------------------------------------------------------------------------------

    def _frames(self) -> None:
        buffer = self._buffer
        start, size = 0, len(buffer)
        while size - start >= 2:
            first, second = buffer[start], buffer[start + 1]
            length = second & 0x7F
            offset = start + 2
            if length == 126:
                if size - offset < 2:
                    break
                (length,) = struct.unpack_from("!H", buffer, offset)
                offset += 2
            elif length == 127:
                if size - offset < 8:
                    break
                (length,) = struct.unpack_from("!Q", buffer, offset)
                offset += 8
            if second & 0x80 or size - offset < length:
                if second & 0x80:  # a masked server frame is a protocol error
                    self._protocol_error()
                    return
                break
            payload = bytes(buffer[offset : offset + length])
            start = offset + length
            opcode = first & 0x0F
            if first & 0x80 and opcode == _TEXT:
                self._on_text(payload)
            elif opcode == _PING:
                self._write(masked_frame(_PONG, payload))
            elif opcode == _CLOSE:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                self._write(masked_frame(_CLOSE, payload[:2]))
                if self._transport is not None:
                    self._transport.close()
                del buffer[:start]
                return
            elif opcode != _PONG:
                self._protocol_error()
                return
        del buffer[:start]

    def _protocol_error(self) -> None:
        self.close_code = 1002
        self._write(masked_frame(_CLOSE, struct.pack("!H", 1002)))
        if self._transport is not None:
            self._transport.close()

    def _fail_handshake(self, error: Exception) -> None:
        self._handshake.set_exception(error)
        if self._transport is not None:
            self._transport.close()

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    # -- the device's side -------------------------------------------------------------------

    def send_text(self, text: str) -> None:
        """Write one text frame (never waits; a closed socket drops it)."""
        self._write(masked_frame(_TEXT, text.encode()))

    def close(self) -> None:
        """Close with 1000, then the TCP connection."""
        self._write(masked_frame(_CLOSE, struct.pack("!H", 1000)))
        if self._transport is not None:
            self._transport.close()

    @property
    def is_closed(self) -> bool:
        return self._closed


async def open_lean(
    url: str,
    on_text: Callable[[bytes], None],
    on_close: Callable[[int | None], None],
) -> LeanSocket:
    """Open a ``ws://`` URL; returns once the server accepted the WebSocket (the caller bounds
    how long that may take)."""
    parts = urlsplit(url)
    if parts.scheme != "ws" or parts.hostname is None:
        raise ValueError(f"not a ws:// URL: {url!r}")
    host, port = parts.hostname, parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    key = base64.b64encode(os.urandom(16))
    loop = asyncio.get_running_loop()
    _transport, protocol = await loop.create_connection(
        lambda: LeanSocket(on_text, on_close, key), host, port
    )
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    protocol._write(request)
    await protocol._handshake
    return protocol
