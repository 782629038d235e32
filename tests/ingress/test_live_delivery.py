"""Live delivery: a record written to the live-delivery topic for this node reaches exactly the
addressed sockets, and poison or foreign records never stop the consumer."""

from __future__ import annotations

import asyncio
import json

from confluent_kafka import Producer
from websockets.asyncio.client import ClientConnection

from core.connections import kafka_producer_config
from schemas import events as ev
from schemas.topics import gateway_key, partition_for_key
from tests.ingress.support import (
    TENANT,
    Gateway,
    JsonObject,
    open_device,
    receive,
    request,
    unique,
    wait_for,
)


def message(user: str, text: str) -> ev.MessageSent:
    return ev.MessageSent.new(
        tenant_id=TENANT,
        actor=ev.Actor(user_id="sender", device_id="desk"),
        event_id=ev.message_event_id(TENANT, "sender", text),
        payload=ev.MessageSentPayload(
            conversation_id=f"c-{user}",
            client_msg_id=text,
            body=ev.TextBody(text=text),
            conversation_seq=3,
        ),
    )


def delivery(
    gateway: Gateway,
    user: str,
    event: ev.Event,
    *,
    devices: list[str] | None,
    sync_id: int | None = 5,
    tenant: str = TENANT,
) -> bytes:
    return ev.encode_live_delivery(
        ev.LiveDelivery(
            node_id=gateway.node_id,
            tenant_id=tenant,
            user_id=user,
            device_ids=devices,
            sync_id=sync_id,
            event=event,
        )
    )


def write(gateway: Gateway, *records: tuple[bytes, bytes]) -> None:
    """Write (key, value) records to the live-delivery topic, placed by key like a router's."""
    producer = Producer(kafka_producer_config(gateway.settings))
    for key, value in records:
        producer.produce(gateway.catalog.live_delivery.name, key=key, value=value)
    assert producer.flush(20) == 0


async def assert_nothing_pending(socket_: ClientConnection) -> None:
    """The next frame is the reply to a ping: no event was queued before it."""
    assert await request(socket_, {"type": "ping", "id": "quiet"}) == {
        "type": "pong",
        "id": "quiet",
    }


def event_frame(raw: JsonObject) -> tuple[int | None, JsonObject]:
    assert raw["type"] == "event", raw
    return raw["sync_id"], raw["event"]


async def test_an_event_reaches_the_addressed_device_only(gateway: Gateway) -> None:
    user, other = unique("user"), unique("other")
    phone, _ = await open_device(gateway, user, "phone")
    tablet, _ = await open_device(gateway, user, "tablet")
    stranger, _ = await open_device(gateway, other, "phone")
    event = message(user, "for-the-phone")

    record = delivery(gateway, user, event, devices=["phone"])
    await asyncio.to_thread(write, gateway, (gateway_key(gateway.node_id), record))

    sync_id, received = event_frame(await receive(phone))
    assert sync_id == 5
    assert received == json.loads(ev.encode_event(event))
    await assert_nothing_pending(tablet)
    await assert_nothing_pending(stranger)


async def test_an_event_for_all_devices_reaches_each_of_them(gateway: Gateway) -> None:
    user = unique("user")
    sockets = [(await open_device(gateway, user, device))[0] for device in ("phone", "tablet")]
    other_tenant, _ = await open_device(gateway, user, "phone", tenant="globex")
    event = ev.TypingChanged.new(
        tenant_id=TENANT,
        actor=ev.Actor(user_id="sender"),
        payload=ev.TypingChangedPayload(conversation_id="c-1", active=True),
    )
    record = delivery(gateway, user, event, devices=None, sync_id=None)
    await asyncio.to_thread(write, gateway, (gateway_key(gateway.node_id), record))

    for socket_ in sockets:
        sync_id, received = event_frame(await receive(socket_))
        assert sync_id is None  # ephemeral: nothing to ack
        assert received["type"] == "typing.changed"
    await assert_nothing_pending(other_tenant)


async def test_poison_and_foreign_records_are_skipped_and_counted(gateway: Gateway) -> None:
    user = unique("user")
    socket_, _ = await open_device(gateway, user, "phone")
    key = gateway_key(gateway.node_id)
    partitions = gateway.catalog.live_delivery.partitions
    # Another node whose records share this node's partition, so that this node reads them.
    neighbour = next(
        name
        for name in (f"node-{index}" for index in range(10_000))
        if name != gateway.node_id
        and partition_for_key(gateway_key(name), partitions) == partition_for_key(key, partitions)
    )
    foreign = ev.encode_live_delivery(
        ev.LiveDelivery(
            node_id=neighbour, tenant_id=TENANT, user_id=user, event=message(user, "not-here")
        )
    )
    poison_before = gateway.metric("imstream_ingress_live_records_total", outcome="poison")
    foreign_before = gateway.metric("imstream_ingress_live_records_total", outcome="other-node")
    good = message(user, "after-the-poison")

    await asyncio.to_thread(
        write,
        gateway,
        (key, b"\x00 not json"),
        (key, b'{"node_id": "x", "event": {"type": "message.sent"}}'),
        (key, foreign),  # the key says this node, the record says another
        (gateway_key(neighbour), foreign),
        (key, delivery(gateway, user, good, devices=["phone"])),
    )

    _, received = event_frame(await receive(socket_))
    assert received["event_id"] == good.event_id
    await assert_nothing_pending(socket_)
    wait_for(
        lambda: (
            gateway.metric("imstream_ingress_live_records_total", outcome="poison")
            == poison_before + 2
        ),
        what="two poison records counted",
    )
    assert (
        gateway.metric("imstream_ingress_live_records_total", outcome="other-node")
        == foreign_before + 2
    )
