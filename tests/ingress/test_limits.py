"""Limits that protect the node: the per-device rate limit, the idle timeout, and the bounded
outbound queue that closes a slow reader without slowing anybody else."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from confluent_kafka import Producer
from websockets.asyncio.client import ClientConnection

from core.connections import kafka_producer_config
from core.settings import Settings
from schemas import events as ev
from schemas.topics import gateway_key
from tests.ingress.support import (
    TENANT,
    Gateway,
    assert_upgrade_refused,
    close_code,
    hello,
    open_device,
    open_socket,
    receive,
    request,
    start_gateway,
    token,
    unique,
    wait_until,
)

RATE, BURST, IDLE, QUEUE, CLOSE_TIMEOUT, STALL = 2.0, 5.0, 1.5, 8, 3.0, 1.0
PENDING = 4


@pytest.fixture(scope="module")
def tight(
    ingress_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    running = start_gateway(
        ingress_settings,
        tmp_path_factory.mktemp("tight"),
        ingress={
            "rate_limit_per_second": RATE,
            "rate_limit_burst": BURST,
            "idle_timeout_seconds": IDLE,
            "outbound_queue_frames": QUEUE,
            "close_timeout_seconds": CLOSE_TIMEOUT,
            "slow_consumer_seconds": STALL,
            "max_pending_sockets_per_address": PENDING,
        },
    )
    yield running
    assert running.stop() == 0, running.log()


async def test_a_device_over_its_rate_gets_rate_limited_with_a_retry_time(tight: Gateway) -> None:
    user = unique("user")
    socket_, _ = await open_device(tight, user)
    for index in range(12):
        await socket_.send(json.dumps({"type": "ping", "id": f"p{index}"}))
    replies = [await receive(socket_) for _ in range(12)]
    limited = [reply for reply in replies if reply["type"] == "error"]
    # The burst passes (plus what refilled meanwhile), the rest is refused.
    assert limited
    assert 12 - len(limited) >= BURST
    assert {reply["code"] for reply in limited} == {"rate-limited"}
    assert all(0 < reply["retry_after_ms"] <= 1000 / RATE for reply in limited)
    assert {reply["id"] for reply in limited} <= {f"p{index}" for index in range(12)}

    await asyncio.sleep(max(reply["retry_after_ms"] for reply in limited) / 1000)
    later = await request(socket_, {"type": "ping", "id": "later"})
    assert later == {"type": "pong", "id": "later"}
    # The limit is per device: another device of the same user is not affected.
    other, _ = await open_device(tight, user, "tablet")
    assert (await request(other, {"type": "ping", "id": "o"}))["type"] == "pong"


def test_the_rest_door_shares_the_rate_limit(tight: Gateway) -> None:
    headers = {"Authorization": f"Bearer {token(tight.settings, unique('user'))}"}
    statuses = []
    for index in range(12):
        status, response_headers, body = tight.request(
            "POST", f"/v1/tenants/{TENANT}/commands", {"type": "ping", "id": f"p{index}"}, headers
        )
        statuses.append(status)
        if status == 429:
            assert json.loads(body)["code"] == "rate-limited"
            assert int(response_headers["retry-after"]) >= 1
    assert statuses.count(200) >= BURST
    assert 429 in statuses


def test_rotating_the_device_id_does_not_escape_the_users_limit(tight: Gateway) -> None:
    """Before: the limit was per device id, which the client chooses: each new X-Device-Id was a
    fresh burst (999 of 1,000 requests passed instead of 40)."""
    headers = {"Authorization": f"Bearer {token(tight.settings, unique('user'))}"}
    passed, refusals = 0, []
    started = time.monotonic()
    for index in range(30):
        status, _, body = tight.request(
            "POST",
            f"/v1/tenants/{TENANT}/commands",
            {"type": "ping", "id": f"p{index}"},
            {**headers, "X-Device-Id": f"device-{index}"},
        )
        if status == 200:
            passed += 1
        else:
            refusals.append(json.loads(body))
    refilled = (time.monotonic() - started) * 2 * RATE
    # The user's burst (twice the device's) and what refilled meanwhile, not 30.
    assert 2 * BURST <= passed <= 2 * BURST + refilled + 1
    assert refusals
    assert {refusal["code"] for refusal in refusals} == {"rate-limited"}
    assert all("from this user" in refusal["message"] for refusal in refusals)


async def test_sockets_that_have_not_said_hello_are_bounded_per_address(tight: Gateway) -> None:
    """Before: any number of unauthenticated sockets per address, each held for the hello
    timeout. Now the one past the limit is answered 429 at the handshake, with the error."""
    waiting = [await open_socket(tight) for _ in range(PENDING)]
    await assert_upgrade_refused(tight, 429, "rate-limited")
    # A socket that says hello no longer counts: another may open.
    first = waiting[0]
    await first.send(json.dumps(hello(tight.settings, unique("user"), "phone")))
    assert (await receive(first))["type"] == "hello_ok"
    another = await open_socket(tight)
    for socket_ in (*waiting, another):
        await socket_.close()


async def test_a_silent_socket_is_closed_after_the_idle_timeout(tight: Gateway) -> None:
    silent, _ = await open_device(tight, unique("user"))
    talking, _ = await open_device(tight, unique("user"))
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def keep_talking() -> None:
        for index in range(1_000):
            # One frame every 0.5 s (within the rate limit) keeps a socket alive.
            await request(talking, {"type": "ping", "id": f"k{index}"})
            await asyncio.sleep(0.5)

    talker = asyncio.create_task(keep_talking())
    assert await close_code(silent) == 4008
    assert IDLE <= loop.time() - started < IDLE + 3
    await asyncio.sleep(IDLE)  # the talking one outlives the timeout
    assert not talker.done()
    talker.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await talker


def big_event(node_id: str, user: str, index: int) -> bytes:
    """A live-delivery record of about 30 KB."""
    event = ev.MessageSent.new(
        tenant_id=TENANT,
        actor=ev.Actor(user_id="sender"),
        payload=ev.MessageSentPayload(
            conversation_id="c-1",
            client_msg_id=f"m{index}",
            body=ev.TextBody(text="x" * 30_000),
        ),
    )
    return ev.encode_live_delivery(
        ev.LiveDelivery(node_id=node_id, tenant_id=TENANT, user_id=user, event=event)
    )


@contextlib.asynccontextmanager
async def reading_nothing(gateway: Gateway, user: str) -> AsyncIterator[ClientConnection]:
    """A device that stops reading after ``hello_ok`` (a small receive buffer, a 1-frame client
    queue) but keeps sending pings, so that only its reading is slow."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gateway.port))
    client = await open_socket(gateway, sock=sock, max_queue=1)
    await client.send(json.dumps(hello(gateway.settings, user, "phone")))
    assert (await receive(client))["type"] == "hello_ok"

    async def ping() -> None:
        while True:
            await asyncio.sleep(0.4)
            await client.send(json.dumps({"type": "ping", "id": "still-here"}))

    pinger = asyncio.create_task(ping())
    try:
        yield client
    finally:
        pinger.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pinger


def write_events(gateway: Gateway, users: list[str], count: int) -> None:
    producer = Producer(kafka_producer_config(gateway.settings))
    key = gateway_key(gateway.node_id)
    for index in range(count):
        for user in users:
            record = big_event(gateway.node_id, user, index)
            producer.produce(gateway.catalog.live_delivery.name, key=key, value=record)
    assert producer.flush(30) == 0


async def test_a_slow_reader_is_closed_and_nobody_else_waits(tight: Gateway) -> None:
    slow_user, never_user, fast_user = unique("slow"), unique("never"), unique("fast")
    fast, _ = await open_device(tight, fast_user)
    count = 200  # 6 MB a reader: more than the socket buffers (up to 4 MB) hold
    async with (
        reading_nothing(tight, slow_user) as slow,
        reading_nothing(tight, never_user) as never,
    ):
        slow_closes = tight.metric("imstream_ingress_closes_total", code="slow-consumer")
        await asyncio.to_thread(write_events, tight, [slow_user, never_user, fast_user], count)

        # The fast reader gets every event, and answers, while the slow ones overflow.
        received = [await receive(fast) for _ in range(count)]
        assert [frame["event"]["payload"]["client_msg_id"] for frame in received] == [
            f"m{index}" for index in range(count)
        ]
        assert (await request(fast, {"type": "ping", "id": "f"}))["type"] == "pong"
        await wait_until(
            lambda: (
                tight.metric("imstream_ingress_closes_total", code="slow-consumer")
                >= slow_closes + 2
            ),
            what="both slow readers closed",
        )
        # The slow reader, reading again, gets what was on its way, then the close code.
        assert await close_code(slow) == 4009
        # The one that never reads again is cut off after the close timeout: its socket is
        # released on the node (uvicorn alone would wait for it forever).
        never_port = never.local_address[1]
        assert tight.holds_socket_of(never_port)
        await wait_until(
            lambda: not tight.holds_socket_of(never_port),
            within=CLOSE_TIMEOUT + 10,
            what="the unread socket to be reset",
        )
    assert tight.metric("imstream_ingress_outbound_queued_frames") == 0
