"""The connections one ingress node holds: who each one is, its outbound queue, and the registry.

Memory is the design constraint. A node holds tens of thousands of mostly idle connections and
the bar is 40 KB each, measured as process RSS, most of which uvicorn and wsproto take. So a
connection is one small object with ``__slots__``; its outbound queue (a deque) and its writer
task exist only while frames are waiting to be written, so an idle connection has neither; and
no timer is kept per connection (one sweeper task checks every connection's idle time).

Outbound queue: every frame sent after ``hello_ok`` (replies, live events), already framed for
the wire, is put into the connection's queue without waiting. A flush the hub schedules once per
loop step (:meth:`ConnectionHub.unflushed`) writes everything each touched socket has waiting in
one ``write`` — one system call per socket per batch of live records, not per frame, so a node
that falls behind catches up with fewer, larger writes. Only when the socket's buffers are full
does a writer task wait for them to drain, then write what piled up. A reader is slow when
at least ``max_frames`` frames wait while the writer has been stuck for ``stall_seconds`` on a
socket whose buffers are full (the peer does not read): its queued frames are dropped and the
connection is closed with slow-consumer (4009); so is one whose frames waiting behind full
buffers pass ``max_bytes`` (a reader that drains a frame now and then is never stalled for long,
while its queue of large frames grows). A socket thus holds at most ``max_bytes`` waiting, plus
what one loop step's batch put into the transport's buffer. The check runs when a frame is
queued and in the gateway's sweeper (:meth:`Connection.check_stalled`), so a reader is closed
even when nothing more is sent to it. A reader that merely lags for a moment — a burst larger
than the queue arriving while it reads a big frame — is not closed; the stall time bounds how
much a burst can queue. Other connections never share a queue, a lock or a wait with it.
Nothing is lost by dropping: queued events are copies of what the user's sync queue holds, and a
reply not delivered is recovered by re-sending the command with the same ids (sends are
idempotent by ``client_msg_id``).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from datetime import datetime
from typing import Any, Final, Protocol

from starlette.types import Send

from core.auth import LONG_AGO
from schemas.errors import CloseCode
from schemas.events import Platform

_log = logging.getLogger(__name__)

#: A close reason travels in the close frame, which holds at most 123 bytes of it.
MAX_CLOSE_REASON_BYTES: Final = 123


class Wire(Protocol):
    """The socket under a connection (``ingress.wsprotocol.GatewayWSProtocol``)."""

    def write_frames(self, data: bytes) -> bool:
        """Write whole frames now, never waiting; ``False`` if the socket is closing or gone."""
        ...

    @property
    def write_paused(self) -> bool:
        """Whether the socket's buffers are full (write no more until :meth:`wait_writable`)."""
        ...

    async def wait_writable(self) -> None:
        """Return once the socket's buffers have drained."""
        ...


class Principal:
    """Who sends a command: verified from the token (and, on a socket, the ``hello``)."""

    __slots__ = ("device_id", "roles", "tenant_id", "user_id")

    def __init__(
        self,
        tenant_id: str,
        user_id: str,
        device_id: str | None,
        roles: tuple[str, ...] = (),
    ) -> None:
        # Interned: thousands of connections of one tenant then share one string.
        self.tenant_id = sys.intern(tenant_id)
        self.user_id = user_id
        self.device_id = device_id
        self.roles = roles


class ConnectionHub:
    """What all connections of a gateway share: limits, metrics hooks, and the close task set."""

    def __init__(
        self,
        *,
        max_frames: int,
        stall_seconds: float,
        frame_sent: Callable[[str], None],
        closed: Callable[[CloseCode], None],
        max_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.stall_seconds = stall_seconds
        self.frame_sent = frame_sent
        #: Frames waiting in every connection's outbound queue (a gauge reads it when scraped:
        #: a gauge update per frame was a tenth of a large group's fan-out).
        self.queued_frames = 0
        self.closed = closed
        self.tasks: set[asyncio.Task[None]] = set()
        #: Connections with frames queued since the last flush, and whether one is scheduled.
        self._unflushed: list[Connection] = []
        self._flush_scheduled = False

    def unflushed(self, connection: Connection) -> None:
        """``connection`` has frames to write: flush it once the current loop step is done.

        One loop callback for every connection a batch of live records touched (a callback per
        connection was a fifth of a large group's fan-out), run after the whole batch was
        handed out, so each socket gets its batch's frames in one write.
        """
        self._unflushed.append(connection)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        connections, self._unflushed = self._unflushed, []
        for connection in connections:
            try:
                connection.flush()
            except Exception:  # one broken socket must not keep the others' frames back
                _log.exception("flush of %s failed; closing it", connection.connection_id)
                connection.forget()

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run ``coroutine`` as a task the gateway holds on to (and awaits on shutdown)."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class Connection:
    """One authenticated WebSocket connection (after a successful ``hello``)."""

    __slots__ = (
        "_flush_scheduled",
        "_frames",
        "_hub",
        "_queued_bytes",
        "_send",
        "_send_started",
        "_wire",
        "_writer",
        "acked_sync_id",
        "closing",
        "connection_id",
        "last_frame_at",
        "platform",
        "principal",
        "replaced",
        "token_expires",
        "token_id",
        "token_issued_at",
    )

    def __init__(
        self,
        hub: ConnectionHub,
        send: Send,
        principal: Principal,
        platform: Platform,
        connection_id: str,
        *,
        wire: Wire,
        sync_cursor: int,
        now: float,
    ) -> None:
        self._hub = hub
        #: The ASGI send: only the close frame goes through it.
        self._send = send
        self._wire = wire
        self.principal = principal
        self.platform = platform
        self.connection_id = connection_id
        #: The highest sync id the device holds: its ``hello`` cursor, then its highest ``ack``.
        self.acked_sync_id = sync_cursor
        #: ``loop.time()`` of the last frame received; the sweeper closes idle connections.
        self.last_frame_at = now
        #: ``loop.time()`` past which the socket's token (with the leeway) is no longer valid;
        #: the sweeper closes the socket then, unless a ``refresh_token`` moved it.
        self.token_expires = float("inf")
        #: The socket's token's ``jti`` and ``iat`` (the latest ``refresh_token``'s), which a
        #: revocation read while the socket is open is matched against.
        self.token_id: str | None = None
        self.token_issued_at: datetime = LONG_AGO
        #: Set once a close was decided; nothing is queued or sent after it.
        self.closing = False
        #: Set when a newer connection of the same device took over (no disconnect presence).
        self.replaced = False
        self._frames: deque[bytes] | None = None
        self._queued_bytes = 0
        self._flush_scheduled = False
        #: Exists only while the socket's buffers are full and frames wait for them to drain.
        self._writer: asyncio.Task[None] | None = None
        #: ``loop.time()`` when the writer began waiting for the socket; ``None`` when not.
        self._send_started: float | None = None

    @property
    def queued(self) -> int:
        """Frames waiting to be written."""
        return len(self._frames) if self._frames is not None else 0

    def enqueue(self, frame: bytes, frame_type: str) -> bool:
        """Queue one frame (``text_frame`` output) for writing, never waiting; ``False`` if it
        was dropped.

        A frame is dropped when the connection is closing, or when the queue is full, which
        closes the connection as a slow consumer.
        """
        if self.closing:
            return False
        frames = self._frames
        if frames is None:
            frames = self._frames = deque()
        if len(frames) >= self._hub.max_frames and self.check_stalled():
            return False
        if self._writer is not None and self._queued_bytes + len(frame) > self._hub.max_bytes:
            # The socket's buffers are full and this reader has left more unread than a socket
            # may hold, however slowly it still reads. (Frames queued while the socket takes
            # them, a batch's burst, are written at the end of the loop step.)
            self.close(
                CloseCode.SLOW_CONSUMER,
                f"outbound queue over {self._hub.max_bytes} bytes; reconnect and sync",
            )
            return False
        frames.append(frame)
        self._queued_bytes += len(frame)
        hub = self._hub
        hub.queued_frames += 1
        hub.frame_sent(frame_type)
        if self._writer is None and not self._flush_scheduled:
            self._flush_scheduled = True
            hub.unflushed(self)
        return True

    def check_stalled(self, now: float | None = None) -> bool:
        """Close the connection as a slow consumer if its reader is stalled; ``True`` if closed.

        Stalled: ``max_frames`` or more frames wait and the writer has been waiting for the
        socket's full buffers to drain for at least ``stall_seconds``. Frames queued while the
        socket still takes them (a burst of live events in one batch, pipelined commands read in
        one chunk) never count.
        """
        started = self._send_started
        if self.closing or started is None or self.queued < self._hub.max_frames:
            return False
        if now is None:
            now = asyncio.get_running_loop().time()
        if now - started < self._hub.stall_seconds:
            return False
        self.close(
            CloseCode.SLOW_CONSUMER,
            f"outbound queue overflowed ({self._hub.max_frames} frames, no read for "
            f"{self._hub.stall_seconds:g} s); reconnect and sync",
        )
        return True

    def close(self, code: CloseCode, reason: str) -> None:
        """Close the socket with ``code``; frames not yet written are dropped (see module doc)."""
        if self.closing:
            return
        self.closing = True
        self._drop_frames()
        if self._writer is not None:
            # The writer may be stuck on a reader that stopped reading; the close must not wait.
            self._writer.cancel()
            self._writer = None
        self._hub.closed(code)
        self._hub.spawn(self._send_close(code, reason))

    def forget(self) -> None:
        """The socket is gone: drop queued frames and stop the writer."""
        self.closing = True
        self._drop_frames()
        if self._writer is not None:
            self._writer.cancel()
            self._writer = None

    async def _send_close(self, code: CloseCode, reason: str) -> None:
        try:
            await self._send(
                {"type": "websocket.close", "code": int(code), "reason": truncate_reason(reason)}
            )
        except Exception as error:  # the peer is already gone; nothing is left to close
            _log.debug("close %s of %s not sent: %r", code, self.connection_id, error)

    def flush(self) -> None:
        """Write every waiting frame in one call, or start the writer if the socket is full."""
        self._flush_scheduled = False
        if self.closing or self._writer is not None:
            return
        if self._wire.write_paused:
            self._writer = asyncio.get_running_loop().create_task(self._write())
        else:
            self._write_out()

    async def _write(self) -> None:
        """Wait for the socket's buffers to drain, write what waits, until nothing does."""
        loop = asyncio.get_running_loop()
        try:
            while self._frames and not self.closing:
                # Seen by check_stalled only while the socket does not take more.
                self._send_started = loop.time()
                await self._wire.wait_writable()
                self._send_started = None
                if not self.closing:
                    self._write_out()
        finally:
            self._send_started = None
            if self._writer is asyncio.current_task():
                self._writer = None

    def _write_out(self) -> None:
        frames = self._frames
        if not frames:
            return
        count = len(frames)
        data = frames[0] if count == 1 else b"".join(frames)
        # An idle connection keeps no deque (a few hundred bytes each).
        self._frames = None
        self._queued_bytes = 0
        self._hub.queued_frames -= count
        if not self._wire.write_frames(data):
            # The socket is closing or gone; its handler cleans up.
            _log.warning("write to %s dropped: the socket is closing", self.connection_id)
            self.forget()

    def _drop_frames(self) -> None:
        if self._frames:
            self._hub.queued_frames -= len(self._frames)
            self._frames.clear()
        self._frames = None
        self._queued_bytes = 0


def truncate_reason(reason: str) -> str:
    """``reason`` cut to what a close frame can carry, on a character boundary."""
    encoded = reason.encode()
    if len(encoded) <= MAX_CLOSE_REASON_BYTES:
        return reason
    return encoded[: MAX_CLOSE_REASON_BYTES - 3].decode(errors="ignore") + "..."


class ConnectionRegistry:
    """Every authenticated connection of this node: user → device → connection.

    One connection per device: registering a device's second connection returns the first,
    which the gateway closes as replaced.
    """

    def __init__(self) -> None:
        self._users: dict[tuple[str, str], dict[str, Connection]] = {}
        self._count = 0

    def register(self, connection: Connection, device_id: str) -> Connection | None:
        """Add ``connection``; returns the connection it replaced, if any."""
        principal = connection.principal
        devices = self._users.setdefault((principal.tenant_id, principal.user_id), {})
        replaced = devices.get(device_id)
        devices[device_id] = connection
        if replaced is None:
            self._count += 1
        return replaced

    def unregister(self, connection: Connection, device_id: str) -> bool:
        """Remove ``connection`` if it is still its device's current one."""
        key = (connection.principal.tenant_id, connection.principal.user_id)
        devices = self._users.get(key)
        if devices is None or devices.get(device_id) is not connection:
            return False
        del devices[device_id]
        if not devices:
            del self._users[key]
        self._count -= 1
        return True

    def devices(self, tenant_id: str, user_id: str) -> dict[str, Connection]:
        """The user's connections on this node by device id (empty if none)."""
        return self._users.get((tenant_id, user_id), {})

    def __iter__(self) -> Iterator[Connection]:
        for devices in list(self._users.values()):
            yield from list(devices.values())

    def __len__(self) -> int:
        return self._count
