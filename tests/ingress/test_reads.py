"""Reads through the ingress, from the serving store the real pipeline fills.

The module runs the whole path on its own topics and keyspace: ``imstream run ingress``,
``imstream run stream-worker`` and ``imstream run cql-sink`` as processes. Clients send over the
WebSocket; the stream stage sequences and fans out; the sink writes the store; the same clients
then read it back over the WebSocket and REST — a device offline for 10,000 events catches up by
paging, history pages, the conversation list of two devices, who-read, and membership checks.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from confluent_kafka import Producer

from core.connections import kafka_producer_config
from core.settings import Settings
from ingress.reads import MAX_PAGE_BYTES
from schemas.events import (
    Actor,
    ConversationSummary,
    MessageSent,
    MessageSentPayload,
    SyncRecord,
    TextBody,
    message_event_id,
)
from schemas.topics import topic_catalog, user_key
from tests.ingress.support import (
    TENANT,
    Gateway,
    JsonObject,
    open_device,
    receive,
    token,
    unique,
)


async def read(socket_: Any, frame: JsonObject) -> JsonObject:
    """Send ``frame`` and return its reply, skipping the live ``event`` frames that arrive on the
    socket meanwhile."""
    await socket_.send(json.dumps(frame))
    while True:
        reply = await receive(socket_)
        if reply.get("type") == "event":
            continue
        assert reply.get("id") == frame["id"], reply
        return reply


async def eventually(what: str, check: Any, within: float = 60.0) -> Any:
    """Repeat an async check until it returns something truthy."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.3)


def publish_sync_entries(
    settings: Settings, user: str, count: int, *, text_bytes: int = 0
) -> list[str]:
    """``count`` entries of ``user``'s queue, as the user processor writes them; their ids.
    ``text_bytes`` pads each message's text to about that size."""
    catalog = topic_catalog(settings)
    producer = Producer(kafka_producer_config(settings, **{"enable.idempotence": True}))
    sender = unique("sender")
    conversation = unique("conv")
    ids = []
    for sync_id in range(1, count + 1):
        event = MessageSent.new(
            tenant_id=TENANT,
            actor=Actor(user_id=sender, device_id="phone"),
            event_id=message_event_id(TENANT, sender, f"m{sync_id}"),
            payload=MessageSentPayload(
                conversation_id=conversation,
                client_msg_id=f"m{sync_id}",
                body=TextBody(text=f"message {sync_id} ".ljust(text_bytes, "x")),
                conversation_seq=sync_id,
            ),
        )
        record = SyncRecord(
            tenant_id=TENANT,
            user_id=user,
            sync_id=sync_id,
            event=event,
            conversation=ConversationSummary(
                conversation_id=conversation, last_seq=sync_id, read_seq=0, unread=sync_id
            ),
        )
        producer.produce(
            catalog.sync_events.name,
            key=user_key(TENANT, user),
            value=record.model_dump_json().encode(),
        )
        if sync_id % 1000 == 0:
            producer.poll(0)
        ids.append(event.event_id)
    assert producer.flush(60) == 0
    return ids


async def test_a_device_offline_for_10000_events_catches_up_by_paging(
    pipeline: Gateway, ingress_settings: Settings
) -> None:
    user = unique("offline")
    expected = publish_sync_entries(ingress_settings, user, 10_000)
    socket_, _ = await open_device(pipeline, user, "tablet")
    # The sink writes while the device pages; it keeps paging from its cursor until it holds
    # everything, and must never see an entry twice or out of order.
    received: list[tuple[int, str]] = []
    cursor, pages = 0, 0
    deadline = time.monotonic() + 120
    while len(received) < len(expected):
        assert time.monotonic() < deadline, f"only {len(received)} events after 120 s"
        page = await read(
            socket_, {"type": "sync", "id": f"s{pages}", "cursor": cursor, "limit": 500}
        )
        pages += 1
        assert page["type"] == "sync_page", page
        assert not page["expired"]
        received.extend((e["sync_id"], e["event"]["event_id"]) for e in page["events"])
        cursor = page["next_cursor"]
        if not page["has_more"]:
            await asyncio.sleep(0.2)
    assert [sync_id for sync_id, _ in received] == list(range(1, 10_001))
    assert [event_id for _, event_id in received] == expected
    assert pages >= 20
    final = await read(socket_, {"type": "sync", "id": "last", "cursor": cursor})
    assert (final["events"], final["has_more"], final["next_cursor"]) == ([], False, 10_000)
    await socket_.close()


async def test_a_page_of_large_messages_ends_early_within_its_byte_budget(
    pipeline: Gateway, ingress_settings: Settings
) -> None:
    """Before: a page carried up to its limit whatever the bodies' size (a history page of 200
    entries of 32 KiB bodies was tens of MB in one frame, held per socket)."""
    user = unique("big")
    expected = publish_sync_entries(ingress_settings, user, 60, text_bytes=30_000)
    socket_, _ = await open_device(pipeline, user, "tablet")

    async def stored() -> bool:  # the last entry is in the store, so all are (one partition)
        page = await read(socket_, {"type": "sync", "id": "probe", "cursor": 59})
        return bool(page["events"])

    await eventually("the 60 entries in the store", stored)
    received: list[str] = []
    sizes: list[int] = []
    cursor, pages = 0, 0
    while len(received) < len(expected):
        assert pages < 10, f"only {len(received)} events after {pages} pages"
        await socket_.send(json.dumps({"type": "sync", "id": f"s{pages}", "cursor": cursor}))
        while True:
            raw = await socket_.recv()
            page = json.loads(raw)
            if page.get("type") != "event":
                break
        pages += 1
        sizes.append(len(raw))
        received.extend(e["event"]["event_id"] for e in page["events"])
        cursor = page["next_cursor"]
        assert page["has_more"] == (len(received) < len(expected))
    assert received == expected
    assert max(sizes) < MAX_PAGE_BYTES + 64 * 1024  # the budget, and the frame around it
    assert pages >= 3
    await socket_.close()


async def test_history_conversation_lists_and_who_read_after_a_chat(
    pipeline: Gateway,
) -> None:
    ann, ben, eve = unique("ann"), unique("ben"), unique("eve")
    ann_phone, _ = await open_device(pipeline, ann, "phone")
    ann_laptop, _ = await open_device(pipeline, ann, "laptop")
    ben_phone, _ = await open_device(pipeline, ben, "phone")
    created = await read(
        ann_phone, {"type": "conversation.create", "id": "c", "kind": "direct", "members": [ben]}
    )
    conversation = created["conversation_id"]
    for index, text in enumerate(["first", "second", "third"]):
        reply = await read(
            ann_phone,
            {
                "type": "send",
                "id": f"m{index}",
                "conversation_id": conversation,
                "client_msg_id": f"cm{index}",
                "body": {"type": "text", "text": text},
            },
        )
        assert reply["type"] == "accepted", reply

    async def ben_sees_three() -> JsonObject | None:
        page = await read(
            ben_phone, {"type": "history", "id": "h", "conversation_id": conversation}
        )
        return page if len(page.get("entries", [])) == 3 else None

    history = await eventually("ben's history", ben_sees_three)
    assert [e["seq"] for e in history["entries"]] == [1, 2, 3]
    assert [e["event"]["payload"]["body"]["text"] for e in history["entries"]] == [
        "first",
        "second",
        "third",
    ]
    assert history["has_more"] is False
    newest = await read(
        ben_phone,
        {"type": "history", "id": "h2", "conversation_id": conversation, "limit": 2},
    )
    assert ([e["seq"] for e in newest["entries"]], newest["has_more"]) == ([2, 3], True)
    older = await read(
        ben_phone,
        {"type": "history", "id": "h3", "conversation_id": conversation, "before_seq": 2},
    )
    assert ([e["seq"] for e in older["entries"]], older["has_more"]) == ([1], False)
    after = await read(
        ben_phone,
        {"type": "history", "id": "h4", "conversation_id": conversation, "after_seq": 1},
    )
    assert ([e["seq"] for e in after["entries"]], after["has_more"]) == ([2, 3], False)

    await read(
        ben_phone,
        {"type": "read", "id": "r", "conversation_id": conversation, "conversation_seq": 2},
    )

    async def ben_list() -> JsonObject | None:
        listed = await read(ben_phone, {"type": "conversations", "id": "l"})
        items = listed["conversations"]
        return listed if items and items[0]["read_seq"] == 2 else None

    listed = await eventually("ben's read in his list", ben_list)
    (item,) = listed["conversations"]
    assert (item["conversation_id"], item["kind"], item["last_seq"]) == (conversation, "direct", 3)
    assert (item["read_seq"], item["unread"], item["last_preview"]) == (2, 1, "third")
    assert item["last_sender_id"] == ann

    # Both of ann's devices read the same list: her own messages are read, nothing unread.
    for device in (ann_phone, ann_laptop):

        async def anns_list(socket_: Any = device) -> JsonObject | None:
            listed = await read(socket_, {"type": "conversations", "id": "l"})
            items = listed["conversations"]
            return listed if items and items[0]["last_seq"] == 3 else None

        mine = await eventually("ann's list", anns_list)
        (entry,) = mine["conversations"]
        assert (entry["conversation_id"], entry["unread"], entry["read_seq"]) == (
            conversation,
            0,
            3,
        )

    async def who_read_two() -> JsonObject | None:
        answer = await read(
            ann_phone, {"type": "who_read", "id": "w", "conversation_id": conversation, "seq": 2}
        )
        return answer if answer.get("readers") else None

    readers = await eventually("who-read", who_read_two)
    assert [(r["user_id"], r["read_seq"]) for r in readers["readers"]] == [(ben, 2)]
    none_yet = await read(
        ann_phone, {"type": "who_read", "id": "w3", "conversation_id": conversation, "seq": 3}
    )
    assert none_yet["readers"] == []

    # Members only; the same over REST.
    eve_socket, _ = await open_device(pipeline, eve, "phone")
    refused = await read(
        eve_socket, {"type": "history", "id": "x", "conversation_id": conversation}
    )
    assert (refused["type"], refused["code"]) == ("error", "forbidden")
    headers = {"Authorization": f"Bearer {token(pipeline.settings, ben)}", "X-Device-Id": "web"}
    status, _, raw = pipeline.request(
        "GET", f"/v1/tenants/{TENANT}/conversations/{conversation}/messages?limit=2", None, headers
    )
    page = json.loads(raw)
    assert (status, [e["seq"] for e in page["entries"]], page["has_more"]) == (200, [2, 3], True)
    status, _, raw = pipeline.request("GET", f"/v1/tenants/{TENANT}/conversations", None, headers)
    assert (status, json.loads(raw)["conversations"][0]["unread"]) == (200, 1)
    status, _, raw = pipeline.request(
        "GET",
        f"/v1/tenants/{TENANT}/conversations/{conversation}/messages/2/read-by",
        None,
        {"Authorization": f"Bearer {token(pipeline.settings, eve)}", "X-Device-Id": "web"},
    )
    assert (status, json.loads(raw)["code"]) == (403, "forbidden")
    status, _, raw = pipeline.request(
        "GET", f"/v1/tenants/{TENANT}/sync?cursor=0&limit=1000", None, headers
    )
    assert (status, json.loads(raw)["field"]) == (422, "limit")
    for socket_ in (ann_phone, ann_laptop, ben_phone, eve_socket):
        await socket_.close()
