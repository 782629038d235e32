"""A socket lives as long as its token: closed with 4003 at its expiry unless the client sent a
fresh one (``refresh_token``), which the SDK does by itself with a token callable.

Before, an open socket stayed authenticated forever after its token expired.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from websockets.asyncio.client import ClientConnection

from client.sdk import Client
from core.settings import Settings
from tests.ingress.support import (
    TENANT,
    Gateway,
    JsonObject,
    close_code,
    hello,
    open_socket,
    request,
    start_gateway,
    token,
    unique,
)

LIFETIME = timedelta(seconds=3)
#: JWT times are whole seconds: a token lives up to a second less than asked, and the SDK
#: refreshes at four fifths of what is left, so a longer lifetime leaves it a margin.
SDK_LIFETIME = timedelta(seconds=5)


@pytest.fixture(scope="module")
def strict(
    ingress_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """A gateway without leeway, so that expiry is exact to the sweeper's second."""
    running = start_gateway(
        ingress_settings,
        tmp_path_factory.mktemp("strict"),
        ingress={"rate_limit_per_second": 1000.0, "rate_limit_burst": 1000.0},
        auth={"jwt_leeway_seconds": 0},
    )
    yield running
    assert running.stop() == 0, running.log()


async def opened(
    gateway: Gateway, user: str, lifetime: timedelta
) -> tuple[ClientConnection, JsonObject]:
    socket_ = await open_socket(gateway)
    text = token(gateway.settings, user, ttl=lifetime)
    frame = hello(gateway.settings, user, "phone", token_text=text)
    reply = await request(socket_, frame)
    assert reply["type"] == "hello_ok", reply
    return socket_, reply


async def test_a_socket_is_closed_when_its_token_expires(strict: Gateway) -> None:
    user = unique("user")
    socket_, hello_ok = await opened(strict, user, LIFETIME)
    expires_at = datetime.fromisoformat(hello_ok["token_expires_at"])
    assert abs(expires_at - (datetime.now(UTC) + LIFETIME)) < timedelta(seconds=2)
    started = asyncio.get_running_loop().time()
    assert await close_code(socket_, within=10) == 4003
    assert asyncio.get_running_loop().time() - started < LIFETIME.total_seconds() + 2


async def test_a_refreshed_token_keeps_the_socket_open(strict: Gateway) -> None:
    user = unique("user")
    socket_, _ = await opened(strict, user, LIFETIME)
    fresh = token(strict.settings, user, ttl=timedelta(hours=1))
    reply = await request(socket_, {"type": "refresh_token", "id": "r1", "token": fresh})
    assert reply == {"type": "ok", "id": "r1", "conversation_id": None}
    await asyncio.sleep(LIFETIME.total_seconds() + 1.5)
    assert await request(socket_, {"type": "ping", "id": "p"}) == {"type": "pong", "id": "p"}


async def test_a_refresh_for_another_user_or_a_bad_token_is_refused(strict: Gateway) -> None:
    user = unique("user")
    socket_, _ = await opened(strict, user, timedelta(minutes=5))
    someone = token(strict.settings, unique("other"))
    reply = await request(socket_, {"type": "refresh_token", "id": "r1", "token": someone})
    assert (reply["code"], reply["field"], reply["id"]) == ("token-invalid", "token", "r1")
    reply = await request(socket_, {"type": "refresh_token", "id": "r2", "token": "not.a.jwt"})
    assert (reply["code"], reply["field"]) == ("token-invalid", "token")
    other_tenant = token(strict.settings, user, tenant="globex")
    reply = await request(socket_, {"type": "refresh_token", "id": "r3", "token": other_tenant})
    assert reply["code"] == "tenant-mismatch"


def test_refresh_token_means_nothing_over_rest(strict: Gateway) -> None:
    user = unique("user")
    headers = {"Authorization": f"Bearer {token(strict.settings, user)}"}
    body = {"type": "refresh_token", "id": "r", "token": token(strict.settings, user)}
    status, _, raw = strict.request("POST", f"/v1/tenants/{TENANT}/commands", body, headers)
    assert (status, json.loads(raw)["code"], json.loads(raw)["field"]) == (
        422,
        "schema-invalid",
        "type",
    )


async def test_the_sdk_refreshes_a_callable_token_and_stays_connected(strict: Gateway) -> None:
    user = unique("user")
    issued = 0

    async def fresh_token() -> str:
        nonlocal issued
        issued += 1
        return token(strict.settings, user, device="phone", ttl=SDK_LIFETIME)

    async with Client(
        strict.ws, tenant_id=TENANT, device_id="phone", token=fresh_token, platform="android"
    ) as client:
        await asyncio.sleep(2.5 * SDK_LIFETIME.total_seconds())
        assert client.reconnects == 0
        assert issued >= 3  # the hello's, then refreshes at four fifths of each lifetime
        assert client._connected.is_set()
