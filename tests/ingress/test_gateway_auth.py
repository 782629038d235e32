"""Who gets past ``hello``: the auth matrix over a real socket, each refusal with its close code.

A refused client gets one ``error`` frame saying why, then the close code, and nothing it sent
after its first frame is processed: the tests pipeline a ``send`` behind every refused hello and
check that Kafka never saw it.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import pytest

from schemas.topics import conversation_key
from tests.ingress.support import (
    TENANT,
    Gateway,
    close_code,
    end_offset,
    hello,
    open_socket,
    receive,
    token,
    unique,
)

OTHER_SECRET = "a-different-secret-that-is-long-enough-too"


def refused_hellos(gateway: Gateway, user: str) -> dict[str, tuple[Any, str, int]]:
    """What a client sends first, and the error code and close code it gets back."""
    settings = gateway.settings

    def with_token(text: str, **changes: Any) -> dict[str, Any]:
        return {**hello(settings, user, "phone", token_text=text), **changes}

    no_token = hello(settings, user, "phone")
    del no_token["token"]
    return {
        "no token": (no_token, "schema-invalid", 4001),
        "empty token": (with_token(""), "schema-invalid", 4001),
        "garbage token": (with_token("not.a.jwt"), "token-invalid", 4002),
        "forged token": (
            with_token(token(settings, user, secret=OTHER_SECRET)),
            "token-invalid",
            4002,
        ),
        "expired token": (
            with_token(token(settings, user, ttl=timedelta(hours=-1))),
            "token-expired",
            4003,
        ),
        "token of another tenant": (
            with_token(token(settings, user, tenant="globex")),
            "tenant-mismatch",
            4004,
        ),
        "token of another device": (
            with_token(token(settings, user, device="tablet")),
            "token-invalid",
            4002,
        ),
        "token naming an invalid user id": (
            with_token(token(settings, "not/an id")),
            "token-invalid",
            4002,
        ),
        "command before hello": ({"type": "ping", "id": "p1"}, "auth-required", 4001),
        "malformed first frame": ('{"type": "hello", ', "malformed-json", 4001),
        "unknown first frame": ({"type": "teleport", "id": "x"}, "unknown-type", 4001),
    }


CASES = [
    "no token",
    "empty token",
    "garbage token",
    "forged token",
    "expired token",
    "token of another tenant",
    "token of another device",
    "token naming an invalid user id",
    "command before hello",
    "malformed first frame",
    "unknown first frame",
]


@pytest.mark.parametrize("case", CASES)
async def test_refused_before_any_other_frame_is_processed(gateway: Gateway, case: str) -> None:
    user, conversation = unique("user"), unique("conv")
    first, error_code, expected_close = refused_hellos(gateway, user)[case]
    topic = gateway.catalog.messages_in.name
    key = conversation_key(TENANT, conversation)
    _, before = await asyncio.to_thread(end_offset, gateway.settings, topic, key)
    socket_ = await open_socket(gateway)
    await socket_.send(first if isinstance(first, str) else json.dumps(first))
    # Sent before the refusal arrives: it must never be published.
    await socket_.send(
        json.dumps(
            {
                "type": "send",
                "id": "s1",
                "conversation_id": conversation,
                "client_msg_id": "m-1",
                "body": {"type": "text", "text": "sneaky"},
            }
        )
    )
    error = await receive(socket_)
    assert (error["type"], error["code"]) == ("error", error_code)
    assert await close_code(socket_) == expected_close
    _, after = await asyncio.to_thread(end_offset, gateway.settings, topic, key)
    assert after == before


async def test_a_hello_with_a_known_id_is_echoed_in_the_refusal(gateway: Gateway) -> None:
    user = unique("user")
    socket_ = await open_socket(gateway)
    expired = token(gateway.settings, user, ttl=timedelta(hours=-1))
    await socket_.send(json.dumps({**hello(gateway.settings, user, "phone", token_text=expired)}))
    error = await receive(socket_)
    assert error["id"] == "hello-1"
    assert "expired" in error["message"]
    assert await close_code(socket_) == 4003


async def test_a_token_bound_to_the_device_is_accepted(gateway: Gateway) -> None:
    user = unique("user")
    socket_ = await open_socket(gateway)
    bound = token(gateway.settings, user, device="phone")
    await socket_.send(json.dumps(hello(gateway.settings, user, "phone", token_text=bound)))
    assert (await receive(socket_))["type"] == "hello_ok"


async def test_no_hello_in_time_closes_with_auth_required(gateway: Gateway) -> None:
    socket_ = await open_socket(gateway)
    loop = asyncio.get_running_loop()
    started = loop.time()
    error = await receive(socket_)
    assert (error["type"], error["code"]) == ("error", "auth-required")
    assert await close_code(socket_) == 4001
    timeout = gateway.settings.ingress.auth_timeout_seconds
    assert timeout * 0.9 <= loop.time() - started < timeout + 5
