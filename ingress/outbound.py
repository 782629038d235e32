"""A bounded outbound queue per connection: a slow reader loses its connection, nobody else waits.

Everything the gateway sends to a client (replies, live events, sync pages, pongs) is put into that
connection's queue without waiting, and one writer task per connection drains it to the socket. If
the client reads more slowly than events arrive, its queue fills up; the next frame marks the queue
*overflowed*, drops what it holds and calls ``on_overflow``, on which the gateway closes the
connection with the slow-consumer close code. The client reconnects and resumes from its sync
cursor, so nothing is lost: frames in this queue are only copies of what Kafka and the sync queue
already hold. Other connections never share a queue, a lock or a wait with this one.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

FrameT = TypeVar("FrameT")


class DepthGauge(Protocol):
    """Where queue depth goes; a ``prometheus_client.Gauge`` fits."""

    def inc(self, amount: float = 1) -> None: ...

    def dec(self, amount: float = 1) -> None: ...


class OutboundQueue(Generic[FrameT]):
    """At most ``max_frames`` frames waiting for one connection's socket, drained by :meth:`run`."""

    def __init__(
        self,
        send: Callable[[FrameT], Awaitable[None]],
        *,
        max_frames: int,
        on_overflow: Callable[[], object] | None = None,
        depth_gauge: DepthGauge | None = None,
    ) -> None:
        """``send`` writes one frame to the socket; ``depth_gauge`` is shared by all connections.

        ``on_overflow`` is called once, from :meth:`put_nowait`, when the queue overflows. The
        gateway closes the connection there: a writer stuck in ``send`` on a reader that stopped
        reading only returns once the socket is closed.
        """
        if max_frames < 1:
            raise ValueError("max_frames must be at least 1")
        self._send = send
        self._max_frames = max_frames
        self._on_overflow = on_overflow
        self._depth_gauge = depth_gauge
        self._frames: deque[FrameT] = deque()
        self._wakeup = asyncio.Event()
        self._closed = False
        self._overflowed = False

    @property
    def depth(self) -> int:
        """Frames waiting to be sent."""
        return len(self._frames)

    @property
    def overflowed(self) -> bool:
        """Whether the reader fell ``max_frames`` behind; the connection must then be closed."""
        return self._overflowed

    @property
    def closed(self) -> bool:
        """Whether the queue takes no more frames (closed, overflowed, or its writer stopped)."""
        return self._closed

    def put_nowait(self, frame: FrameT) -> bool:
        """Queue ``frame`` for sending; never waits.

        Returns ``False`` if the frame was dropped because the queue is closed or has just
        overflowed (see :attr:`overflowed`).
        """
        if self._closed:
            return False
        if len(self._frames) >= self._max_frames:
            self._overflowed = True
            self._discard()
            if self._on_overflow is not None:
                self._on_overflow()
            return False
        self._frames.append(frame)
        if self._depth_gauge is not None:
            self._depth_gauge.inc()
        self._wakeup.set()
        return True

    def close(self) -> None:
        """Take no more frames; :meth:`run` returns once the queued ones are sent."""
        self._closed = True
        self._wakeup.set()

    async def run(self) -> None:
        """Send queued frames in order until :meth:`close` (after draining) or an overflow.

        Exceptions from ``send`` (the socket went away) propagate. However the writer stops, the
        queue is closed and whatever is still queued is dropped.
        """
        frames = self._frames
        try:
            while True:
                if not frames:
                    if self._closed:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                frame = frames.popleft()
                if self._depth_gauge is not None:
                    self._depth_gauge.dec()
                await self._send(frame)
        finally:
            self._discard()

    def _discard(self) -> None:
        self._closed = True
        if self._depth_gauge is not None and self._frames:
            self._depth_gauge.dec(len(self._frames))
        self._frames.clear()
        self._wakeup.set()
