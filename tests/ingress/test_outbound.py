"""Bounded outbound queues: a slow reader overflows alone; everyone else keeps receiving."""

from __future__ import annotations

import asyncio

import pytest

from ingress.metrics import IngressMetrics
from ingress.outbound import OutboundQueue


class Socket:
    """A client socket: records what was sent; a stalled one stops reading (send never returns)."""

    def __init__(self, *, stalled: bool = False) -> None:
        self.sent: list[str] = []
        self.reading = asyncio.Event()
        if not stalled:
            self.reading.set()

    async def send(self, frame: str) -> None:
        await self.reading.wait()
        self.sent.append(frame)


def queued_frames(metrics: IngressMetrics) -> float | None:
    return metrics.registry.get_sample_value("imstream_ingress_outbound_queued_frames")


async def test_frames_are_sent_in_order_and_drained_on_close() -> None:
    socket = Socket()
    outbound = OutboundQueue(socket.send, max_frames=100)
    for index in range(50):
        assert outbound.put_nowait(f"frame-{index}")
    assert outbound.depth == 50
    outbound.close()
    await asyncio.wait_for(outbound.run(), timeout=5)
    assert socket.sent == [f"frame-{index}" for index in range(50)]
    assert not outbound.overflowed
    assert not outbound.put_nowait("after close")


async def test_overflow_marks_only_the_slow_connection() -> None:
    metrics = IngressMetrics(process_metrics=False)
    slow, fast = Socket(stalled=True), Socket()
    overflows: list[str] = []
    slow_queue = OutboundQueue(
        slow.send,
        max_frames=8,
        on_overflow=lambda: overflows.append("slow"),
        depth_gauge=metrics.outbound_queued_frames,
    )
    fast_queue = OutboundQueue(
        fast.send,
        max_frames=8,
        on_overflow=lambda: overflows.append("fast"),
        depth_gauge=metrics.outbound_queued_frames,
    )
    writers = [asyncio.create_task(queue.run()) for queue in (slow_queue, fast_queue)]
    accepted_by_slow = []
    for index in range(100):
        accepted_by_slow.append(slow_queue.put_nowait(f"event-{index}"))
        assert fast_queue.put_nowait(f"event-{index}")
        await asyncio.sleep(0)  # events arrive over time; the writers get to run in between

    assert overflows == ["slow"]
    assert slow_queue.overflowed and slow_queue.closed
    # The stalled writer took one frame into its pending send, then 8 filled the queue.
    assert accepted_by_slow == [True] * 9 + [False] * 91
    assert not fast_queue.overflowed
    assert fast.sent == [f"event-{index}" for index in range(100)]
    assert queued_frames(metrics) == 0

    # The gateway closes the overflowed socket; its writer then ends without sending the rest.
    slow.reading.set()
    await asyncio.wait_for(writers[0], timeout=5)
    assert slow.sent == ["event-0"]
    fast_queue.close()
    await asyncio.wait_for(writers[1], timeout=5)


async def test_a_failing_socket_closes_its_queue_and_releases_the_gauge() -> None:
    metrics = IngressMetrics(process_metrics=False)

    async def broken_send(frame: str) -> None:
        raise ConnectionResetError("client went away")

    outbound = OutboundQueue(broken_send, max_frames=10, depth_gauge=metrics.outbound_queued_frames)
    for index in range(5):
        outbound.put_nowait(f"frame-{index}")
    assert queued_frames(metrics) == 5
    with pytest.raises(ConnectionResetError):
        await outbound.run()
    assert outbound.closed and not outbound.overflowed
    assert queued_frames(metrics) == 0
    assert not outbound.put_nowait("too late")


async def test_cancelled_writer_releases_the_gauge() -> None:
    metrics = IngressMetrics(process_metrics=False)
    socket = Socket(stalled=True)
    outbound = OutboundQueue(socket.send, max_frames=10, depth_gauge=metrics.outbound_queued_frames)
    writer = asyncio.create_task(outbound.run())
    for index in range(4):
        outbound.put_nowait(f"frame-{index}")
    await asyncio.sleep(0)
    assert queued_frames(metrics) == 3  # one frame is in the stalled send
    writer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writer
    assert queued_frames(metrics) == 0
    assert outbound.closed


def test_queue_needs_room_for_a_frame() -> None:
    with pytest.raises(ValueError, match="max_frames"):
        OutboundQueue(Socket().send, max_frames=0)
