"""The WebSocket door, against a real ingress process and the real Kafka.

Every command gets exactly one reply, and a command that publishes is answered only once its
event is committed in Kafka: each test reads the topic's end offset right after the reply and
finds the event there, in the topic and partition the catalog routes it to.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from schemas.events import direct_conversation_id, message_event_id
from schemas.topics import conversation_key, user_key
from tests.ingress.support import (
    COMMAND_EVENT_TYPES,
    TENANT,
    Gateway,
    JsonObject,
    close_code,
    end_offset,
    hello,
    open_device,
    read_records,
    receive,
    request,
    unique,
)

MESSAGE_ID = str(uuid.uuid4())
Build = Callable[[str, str], JsonObject]


@dataclass(frozen=True)
class Case:
    """A command: its fields and its event's payload (both from user and conversation), the
    topic (catalog role) and the key kind the event is routed by."""

    command_type: str
    fields: Build
    topic_role: str
    key_kind: str
    payload: Build


COMMANDS: list[Case] = [
    Case(
        "send",
        lambda _, c: {
            "conversation_id": c,
            "client_msg_id": "m-1",
            "body": {"type": "text", "text": "hello 👋"},
        },
        "messages_in",
        "conversation",
        lambda _, c: {
            "conversation_id": c,
            "client_msg_id": "m-1",
            "body": {"type": "text", "text": "hello 👋"},
            "conversation_seq": None,
        },
    ),
    Case(
        "recall",
        lambda _, c: {"conversation_id": c, "message_id": MESSAGE_ID},
        "messages_in",
        "conversation",
        lambda _, c: {"conversation_id": c, "message_id": MESSAGE_ID, "conversation_seq": None},
    ),
    Case(
        "edit",
        lambda _, c: {
            "conversation_id": c,
            "message_id": MESSAGE_ID,
            "body": {"type": "custom", "kind": "card", "data": {"title": "x"}},
        },
        "messages_in",
        "conversation",
        lambda _, c: {
            "conversation_id": c,
            "message_id": MESSAGE_ID,
            "body": {"type": "custom", "kind": "card", "data": {"title": "x"}},
            "conversation_seq": None,
        },
    ),
    Case(
        "read",
        lambda _, c: {"conversation_id": c, "conversation_seq": 7},
        "messages_in",
        "conversation",
        lambda _, c: {"conversation_id": c, "conversation_seq": 7},
    ),
    Case(
        "typing",
        lambda _, c: {"conversation_id": c, "active": True},
        "typing_in",
        "conversation",
        lambda _, c: {"conversation_id": c, "active": True},
    ),
    Case(
        "mute",
        lambda _, c: {"conversation_id": c, "muted": True, "muted_until": "2030-01-01T00:00:00Z"},
        "user_state_in",
        "user",
        lambda _, c: {"conversation_id": c, "muted": True, "muted_until": "2030-01-01T00:00:00Z"},
    ),
    Case(
        "push_settings",
        lambda _, c: {
            "muted": True,
            "muted_until": "2030-01-01T00:00:00Z",
            "quiet_hours": {"start": "22:00", "end": "07:00", "time_zone": "Europe/Berlin"},
            "locale": "de-AT",
        },
        "user_state_in",
        "user",
        lambda _, c: {
            "muted": True,
            "muted_until": "2030-01-01T00:00:00Z",
            "quiet_hours": {"start": "22:00", "end": "07:00", "time_zone": "Europe/Berlin"},
            "locale": "de-AT",
        },
    ),
    Case(
        "clear_badge",
        lambda _, c: {"conversation_id": c},
        "user_state_in",
        "user",
        lambda _, c: {"conversation_id": c},
    ),
    Case(
        "conversation.create",
        lambda _, c: {"conversation_id": c, "kind": "group", "members": ["bob"], "name": "Team"},
        "messages_in",
        "conversation",
        lambda u, c: {
            "conversation_id": c,
            "kind": "group",
            "members": [u, "bob"],
            "owner_id": u,
            "name": "Team",
        },
    ),
    Case(
        "conversation.rename",
        lambda _, c: {"conversation_id": c, "name": "Renamed"},
        "messages_in",
        "conversation",
        lambda _, c: {"conversation_id": c, "name": "Renamed"},
    ),
    Case(
        "conversation.add_member",
        lambda _, c: {"conversation_id": c, "user_id": "erin", "role": "admin"},
        "messages_in",
        "conversation",
        # The group's name and the seq the member joins at are the sequencer's to set.
        lambda _, c: {
            "conversation_id": c,
            "user_id": "erin",
            "role": "admin",
            "name": None,
            "last_seq": None,
        },
    ),
    Case(
        "conversation.remove_member",
        lambda _, c: {"conversation_id": c, "user_id": "erin"},
        "messages_in",
        "conversation",
        # The seq the former member reads up to is the sequencer's to set.
        lambda _, c: {"conversation_id": c, "user_id": "erin", "last_seq": None},
    ),
    Case(
        "conversation.change_role",
        lambda _, c: {"conversation_id": c, "user_id": "bob", "role": "owner"},
        "messages_in",
        "conversation",
        lambda _, c: {"conversation_id": c, "user_id": "bob", "role": "owner"},
    ),
    Case(
        "conversation.leave",
        lambda _, c: {"conversation_id": c},
        "messages_in",
        "conversation",
        lambda u, c: {"conversation_id": c, "user_id": u, "last_seq": None},
    ),
    Case(
        "conversation.delete",
        lambda _, c: {"conversation_id": c},
        "messages_in",
        "conversation",
        lambda _, c: {"conversation_id": c},
    ),
]


@pytest.mark.parametrize("case", COMMANDS, ids=[case.command_type for case in COMMANDS])
async def test_each_command_is_answered_once_its_event_is_in_kafka(
    gateway: Gateway, case: Case
) -> None:
    user, conversation = unique("user"), unique("conv")
    command_type = case.command_type
    topic = getattr(gateway.catalog, case.topic_role).name
    key = (
        conversation_key(TENANT, conversation)
        if case.key_kind == "conversation"
        else user_key(TENANT, user)
    )
    partition, before = await asyncio.to_thread(end_offset, gateway.settings, topic, key)
    socket_, _ = await open_device(gateway, user)

    reply = await request(
        socket_, {"type": command_type, "id": "req-1", **case.fields(user, conversation)}
    )

    # Asked right after the reply: the event is already committed (below the end offset).
    _, after = await asyncio.to_thread(end_offset, gateway.settings, topic, key)
    assert after == before + 1
    [(record_key, event)] = await asyncio.to_thread(
        read_records, gateway.settings, topic, partition, before, 1
    )
    assert record_key == key
    assert event["type"] == COMMAND_EVENT_TYPES[command_type]
    assert event["tenant_id"] == TENANT
    assert event["actor"] == {"user_id": user, "device_id": "phone"}
    assert event["payload"] == case.payload(user, conversation)
    if command_type == "send":
        assert reply == {
            "type": "accepted",
            "id": "req-1",
            "conversation_id": conversation,
            "client_msg_id": "m-1",
            "event_id": message_event_id(TENANT, user, "m-1"),
        }
        assert event["event_id"] == reply["event_id"]
    elif command_type == "conversation.create":
        assert reply == {"type": "ok", "id": "req-1", "conversation_id": conversation}
    else:
        assert reply == {"type": "ok", "id": "req-1", "conversation_id": None}
    await socket_.close()


def send(request_id: str, conversation: str, client_msg_id: str, text: str = "hi") -> JsonObject:
    return {
        "type": "send",
        "id": request_id,
        "conversation_id": conversation,
        "client_msg_id": client_msg_id,
        "body": {"type": "text", "text": text},
    }


async def test_a_retried_send_keeps_its_message_id(gateway: Gateway) -> None:
    user, conversation = unique("user"), unique("conv")
    socket_, _ = await open_device(gateway, user)
    first = await request(socket_, send("a", conversation, "m-7"))
    retry = await request(socket_, send("b", conversation, "m-7"))
    other = await request(socket_, send("c", conversation, "m-8"))
    assert first["type"] == retry["type"] == other["type"] == "accepted"
    assert first["event_id"] == retry["event_id"] == message_event_id(TENANT, user, "m-7")
    assert other["event_id"] != first["event_id"]


async def test_pipelined_sends_are_answered_by_id_and_written_in_order(gateway: Gateway) -> None:
    user, conversation = unique("user"), unique("conv")
    topic = gateway.catalog.messages_in.name
    key = conversation_key(TENANT, conversation)
    partition, before = await asyncio.to_thread(end_offset, gateway.settings, topic, key)
    socket_, _ = await open_device(gateway, user)
    count = 40
    for index in range(count):
        await socket_.send(json.dumps(send(f"r{index}", conversation, f"m{index}")))
    replies = [await receive(socket_) for _ in range(count)]

    assert sorted(reply["id"] for reply in replies) == sorted(f"r{index}" for index in range(count))
    assert {reply["type"] for reply in replies} == {"accepted"}
    records = await asyncio.to_thread(
        read_records, gateway.settings, topic, partition, before, count
    )
    assert [event["payload"]["client_msg_id"] for _, event in records] == [
        f"m{index}" for index in range(count)
    ]


async def test_both_members_get_the_same_direct_conversation(gateway: Gateway) -> None:
    alice, bob = unique("alice"), unique("bob")
    alice_socket, _ = await open_device(gateway, alice)
    bob_socket, _ = await open_device(gateway, bob)
    create = {"type": "conversation.create", "id": "c1", "kind": "direct"}
    from_alice = await request(alice_socket, {**create, "members": [bob]})
    from_bob = await request(bob_socket, {**create, "members": [alice]})
    expected = direct_conversation_id(TENANT, alice, bob)
    assert from_alice == from_bob == {"type": "ok", "id": "c1", "conversation_id": expected}
    named = {**create, "members": [bob], "conversation_id": expected}
    naming_it = await request(alice_socket, named)
    assert naming_it["conversation_id"] == expected


async def test_a_group_without_an_id_gets_a_new_one_each_time(gateway: Gateway) -> None:
    socket_, _ = await open_device(gateway, unique("user"))
    create = {"type": "conversation.create", "kind": "group", "members": ["bob", "carol"]}
    first = await request(socket_, {**create, "id": "g1"})
    second = await request(socket_, {**create, "id": "g2"})
    assert first["type"] == second["type"] == "ok"
    assert first["conversation_id"] != second["conversation_id"]
    assert str(uuid.UUID(first["conversation_id"])) == first["conversation_id"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        pytest.param({"kind": "group", "members": ["SELF", "bob"]}, "members", id="self-listed"),
        pytest.param({"kind": "direct", "members": ["SELF"]}, "members", id="direct-with-self"),
        pytest.param(
            {"kind": "direct", "members": ["bob"], "conversation_id": "my-own-id"},
            "conversation_id",
            id="direct-with-chosen-id",
        ),
    ],
)
async def test_conversation_create_refusals_name_the_field(
    gateway: Gateway, fields: dict[str, Any], field: str
) -> None:
    user = unique("user")
    members = [user if member == "SELF" else member for member in fields["members"]]
    socket_, _ = await open_device(gateway, user)
    reply = await request(
        socket_, {"type": "conversation.create", "id": "c9", **fields, "members": members}
    )
    assert reply["type"] == "error"
    assert (reply["code"], reply["field"], reply["id"]) == ("schema-invalid", field, "c9")
    assert (await request(socket_, {"type": "ping", "id": "p"}))["type"] == "pong"


async def test_commands_answered_without_kafka(gateway: Gateway) -> None:
    socket_, _ = await open_device(gateway, unique("user"))
    assert await request(socket_, {"type": "ping", "id": "p1"}) == {"type": "pong", "id": "p1"}
    assert await request(socket_, {"type": "ack", "id": "a1", "sync_id": 12}) == {
        "type": "ok",
        "id": "a1",
        "conversation_id": None,
    }
    # A new user's queue is empty: nothing after the cursor, and the cursor stays.
    sync = await request(socket_, {"type": "sync", "id": "s1", "cursor": 12, "limit": 50})
    assert (sync["type"], sync["id"], sync["events"], sync["has_more"], sync["next_cursor"]) == (
        "sync_page",
        "s1",
        [],
        False,
        12,
    )
    again = await request(socket_, hello(gateway.settings, "whoever", "phone"))
    assert (again["type"], again["code"], again["field"]) == ("error", "schema-invalid", "type")


async def test_presence_follows_the_connection(gateway: Gateway) -> None:
    user = unique("user")
    topic = gateway.catalog.presence.name
    key = user_key(TENANT, user)
    partition, before = await asyncio.to_thread(end_offset, gateway.settings, topic, key)

    first, hello_ok = await open_device(gateway, user, "phone")
    expires_at = datetime.fromisoformat(hello_ok.pop("token_expires_at"))
    assert timedelta(minutes=55) < expires_at - datetime.now(UTC) <= timedelta(hours=1)
    assert hello_ok == {
        "type": "hello_ok",
        "id": "hello-1",
        "tenant_id": TENANT,
        "user_id": user,
        "device_id": "phone",
        "node_id": gateway.node_id,
        "idle_timeout_ms": 60_000,
        "max_frame_bytes": 65_536,
    }
    # A second connection of the device takes over; the first is told so and not reconnected.
    second, _ = await open_device(gateway, user, "phone")
    assert await close_code(first) == 4011
    assert (await request(second, {"type": "ping", "id": "p"}))["type"] == "pong"
    await second.close()

    records = await asyncio.to_thread(
        read_records, gateway.settings, topic, partition, before, 3, key=key
    )
    events = [event for _, event in records]
    assert [event["type"] for event in events] == [
        "device.connected",
        "device.connected",
        "device.disconnected",
    ]
    first_id, second_id, gone_id = (event["payload"]["connection_id"] for event in events)
    assert first_id != second_id == gone_id
    assert {event["payload"]["node_id"] for event in events} == {gateway.node_id}
    # Keyed by the user; the payload names the device.
    assert {(e["payload"]["user_id"], e["payload"]["device_id"]) for e in events} == {
        (user, "phone")
    }
    assert events[0]["payload"]["platform"] == "android"
