"""Bad input over a real socket: each kind gets its stable error code (and the request id and
field path when they can be known) and the connection keeps working, or, past the hard limits
of the WebSocket layer, the socket is closed with the RFC 6455 code."""

from __future__ import annotations

import json
from typing import Any

import pytest

from schemas.events import MAX_BODY_BYTES
from tests.ingress.support import (
    Gateway,
    JsonObject,
    close_code,
    open_device,
    open_socket,
    request,
    unique,
)
from tests.schemas.samples import send_frame


def send(**changes: Any) -> JsonObject:
    """A ``send`` frame; a change to None leaves that field out."""
    return {key: value for key, value in send_frame(**changes).items() if value is not None}


def push_settings(
    *, start: str = "22:00", end: str = "07:00", time_zone: str = "Europe/Berlin"
) -> JsonObject:
    return {
        "type": "push_settings",
        "id": "req-1",
        "quiet_hours": {"start": start, "end": end, "time_zone": time_zone},
    }


SOFT_LIMIT = 64 * 1024


def nested(depth: int) -> JsonObject:
    value: JsonObject = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"in": value}
    return value


#: (frame as sent, error code, field, request id echoed)
BAD_FRAMES: dict[str, tuple[str | bytes, str, str | None, str | None]] = {
    "malformed json": ('{"type": "ping", "id": ', "malformed-json", None, None),
    "not an object": ("[1, 2, 3]", "schema-invalid", None, None),
    "unknown type": ('{"type": "teleport", "id": "t1"}', "unknown-type", "type", "t1"),
    "missing type": ('{"id": "t2"}', "schema-invalid", "type", "t2"),
    "missing field": (json.dumps(send(body=None)), "schema-invalid", "body", "req-1"),
    "empty text": (
        json.dumps(send(body={"type": "text", "text": ""})),
        "schema-invalid",
        "body.text",
        "req-1",
    ),
    "bad id pattern": (
        json.dumps(send(conversation_id="has space")),
        "schema-invalid",
        "conversation_id",
        "req-1",
    ),
    "unknown body type": (
        json.dumps(send(body={"type": "hologram"})),
        "schema-invalid",
        "body.type",
        "req-1",
    ),
    "wrong value type": (
        '{"type": "read", "id": "r1", "conversation_id": "c", "conversation_seq": "seven"}',
        "schema-invalid",
        "conversation_seq",
        "r1",
    ),
    "push settings in an unknown time zone": (
        json.dumps(push_settings(time_zone="Atlantis/Lost_City")),
        "schema-invalid",
        "quiet_hours.time_zone",
        "req-1",
    ),
    "push settings with a time out of range": (
        json.dumps(push_settings(start="24:30")),
        "schema-invalid",
        "quiet_hours.start",
        "req-1",
    ),
    "push settings with a malformed locale": (
        json.dumps({**push_settings(), "locale": "en_US.UTF-8"}),
        "schema-invalid",
        "locale",
        "req-1",
    ),
    "text body over the body limit": (
        json.dumps(send(body={"type": "text", "text": "x" * (MAX_BODY_BYTES + 1)})),
        "body-too-large",
        "body.text",
        "req-1",
    ),
    "custom body over the body limit": (
        json.dumps(
            send(body={"type": "custom", "kind": "blob", "data": {"x": "y" * MAX_BODY_BYTES}})
        ),
        "body-too-large",
        "body.data",
        "req-1",
    ),
    "frame over the soft limit": (
        # Fewer characters than the limit, more bytes: the limit is in UTF-8 bytes.
        json.dumps(
            send(id="big", body={"type": "text", "text": "é" * (SOFT_LIMIT // 2)}),
            ensure_ascii=False,
        ),
        "frame-too-large",
        None,
        "big",
    ),
    "binary frame, not UTF-8": (b'{"type": "ping", "id": "\xff\xfe"}', "invalid-utf8", None, None),
    "binary frame over the soft limit": (b"x" * (SOFT_LIMIT + 1), "frame-too-large", None, None),
    # Before: "internal" (a RecursionError in the error path).
    "nested 1,100 deep": (
        '{"type": "ping", "id": "p", "x": ' + "[" * 1100 + "]" * 1100 + "}",
        "malformed-json",
        None,
        None,
    ),
    "nested 30,000 deep": ("[" * 30_000 + "]" * 30_000, "malformed-json", None, None),
    # Before: accepted, then "unavailable" with a driver error and a retry hint, for ever.
    "history past the store's seqs": (
        '{"type": "history", "id": "h", "conversation_id": "c", "before_seq": 9007199254740992}',
        "schema-invalid",
        "before_seq",
        "h",
    ),
    # Before: accepted and stored.
    "an integer of 4,300 digits in a custom body": (
        '{"type": "send", "id": "req-1", "conversation_id": "c-1", "client_msg_id": "m-1", '
        '"body": {"type": "custom", "kind": "n", "data": {"n": ' + "9" * 4300 + "}}}",
        "schema-invalid",
        "body.data",
        "req-1",
    ),
    "a custom body nested past its depth": (
        json.dumps(send(body={"type": "custom", "kind": "n", "data": nested(40)})),
        "schema-invalid",
        "body.data",
        "req-1",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FRAMES))
async def test_bad_frame_gets_its_error_and_the_socket_goes_on(gateway: Gateway, case: str) -> None:
    raw, code, field, request_id = BAD_FRAMES[case]
    socket_, _ = await open_device(gateway, unique("user"))
    reply = await request(socket_, raw)
    assert reply["type"] == "error"
    assert (reply["code"], reply["field"], reply["id"]) == (code, field, request_id)
    assert reply["message"]
    # Exactly one reply: the next frame received answers the next command.
    assert await request(socket_, {"type": "ping", "id": "after"}) == {
        "type": "pong",
        "id": "after",
    }


async def test_errors_are_counted_by_code(gateway: Gateway) -> None:
    before = gateway.metric("imstream_ingress_errors_total", code="unknown-type")
    socket_, _ = await open_device(gateway, unique("user"))
    await request(socket_, '{"type": "teleport", "id": "t"}')
    assert gateway.metric("imstream_ingress_errors_total", code="unknown-type") == before + 1


async def test_a_binary_frame_of_utf8_json_is_a_frame(gateway: Gateway) -> None:
    socket_, _ = await open_device(gateway, unique("user"))
    assert await request(socket_, b'{"type": "ping", "id": "bin"}') == {"type": "pong", "id": "bin"}


async def test_a_deep_first_frame_is_refused_with_its_error_not_a_dropped_connection(
    gateway: Gateway,
) -> None:
    """Before: json.loads raised RecursionError before authentication, the connection was dropped
    without a word and the node logged a traceback per connection."""
    socket_ = await open_socket(gateway)
    reply = await request(socket_, "[" * 5000 + "]" * 5000)
    assert (reply["type"], reply["code"]) == ("error", "malformed-json")
    assert await close_code(socket_) == 4001
    assert "RecursionError" not in gateway.log()


async def test_a_frame_over_the_hard_limit_closes_with_1009(gateway: Gateway) -> None:
    socket_, _ = await open_device(gateway, unique("user"))
    await socket_.send("x" * (4 * SOFT_LIMIT + 1))
    assert await close_code(socket_) == 1009


async def test_a_text_frame_of_invalid_utf8_closes_with_1007(gateway: Gateway) -> None:
    socket_, _ = await open_device(gateway, unique("user"))
    await socket_.send(b'{"type": "ping", "id": "\xff"}', text=True)
    assert await close_code(socket_) == 1007
