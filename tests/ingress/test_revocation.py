"""Revocation and forced logout, on two real ingress nodes following the real revocation topic.

Before, nothing could revoke a token: a stolen one stayed good until its ``exp``, on every node,
and a socket using it stayed open.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection

from core.settings import Settings
from pipelines.revoke import publish_revocation, revocation
from tests.ingress.support import (
    TENANT,
    Gateway,
    assert_upgrade_refused,
    close_code,
    hello,
    open_socket,
    receive,
    request,
    run_imstream,
    start_gateway,
    unique,
    wait_for,
)
from tests.ingress.support import token as client_token

#: Commands per second no test here reaches.
UNLIMITED = {"rate_limit_per_second": 100_000.0, "rate_limit_burst": 100_000.0}


@pytest.fixture(scope="module")
def nodes(
    ingress_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Gateway]]:
    """Two ingress nodes on this module's topics."""
    logs = tmp_path_factory.mktemp("nodes")
    running = [start_gateway(ingress_settings, logs, ingress=UNLIMITED) for _ in range(2)]
    yield running
    for node in running:
        assert node.stop() == 0, node.log()


def signed(
    settings: Settings,
    user: str,
    *,
    jti: str | None = None,
    device: str | None = None,
    ttl: timedelta = timedelta(hours=1),
) -> str:
    return client_token(settings, user, jti=jti, device=device, ttl=ttl)


async def connected(node: Gateway, user: str, device: str, token: str) -> ClientConnection:
    socket_ = await open_socket(node)
    reply = await request(socket_, hello(node.settings, user, device, token_text=token))
    assert reply["type"] == "hello_ok", reply
    return socket_


async def refused_hello(node: Gateway, user: str, device: str, token: str) -> tuple[str, int]:
    """The error code and close code a ``hello`` with ``token`` gets."""
    socket_ = await open_socket(node)
    reply = await request(socket_, hello(node.settings, user, device, token_text=token))
    return str(reply.get("code", reply["type"])), await close_code(socket_)


def rest_status(node: Gateway, token: str) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"}
    status, _, raw = node.request(
        "POST", f"/v1/tenants/{TENANT}/commands", {"type": "ping", "id": "p"}, headers
    )
    return status, json.loads(raw).get("code", json.loads(raw)["type"])


async def still_open(socket_: ClientConnection) -> bool:
    return await request(socket_, {"type": "ping", "id": "p"}) == {"type": "pong", "id": "p"}


def revoke_cli(settings: Settings, *arguments: str) -> str:
    """``imstream revoke …`` as an operator runs it; its output."""
    done = run_imstream(
        "revoke",
        *arguments,
        "--operator",
        "ops-erin",
        variables={
            "IM_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
            "IM_KAFKA__TOPIC_PREFIX": settings.kafka.topic_prefix,
        },
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


async def closed_within(sockets: list[ClientConnection], within: float) -> list[int]:
    return list(await asyncio.gather(*(close_code(socket_, within) for socket_ in sockets)))


async def test_a_revoked_jti_closes_its_sockets_on_both_nodes_within_a_second(
    nodes: list[Gateway],
) -> None:
    first, second = nodes
    user, jti = unique("user"), unique("jti")
    token = signed(first.settings, user, jti=jti)
    sockets = [
        await connected(first, user, "phone", token),
        await connected(second, user, "laptop", token),
    ]
    # Another token of the same user is not revoked with it.
    other = await connected(second, user, "tablet", signed(first.settings, user))

    event = revocation(operator="ops-erin", tenant_id=TENANT, token_id=jti, reason="leaked")
    produced = await asyncio.to_thread(publish_revocation, first.settings, event)
    acknowledged = time.monotonic()
    assert await closed_within(sockets, within=5) == [4005, 4005]
    assert time.monotonic() - acknowledged < 1.0, produced
    assert await still_open(other)

    for node in nodes:
        assert await refused_hello(node, user, "phone", token) == ("token-revoked", 4005)
        assert rest_status(node, token) == (401, "token-revoked")
    # A refresh to the revoked token is refused too; the socket keeps its own token.
    reply = await request(other, {"type": "refresh_token", "id": "r", "token": token})
    assert (reply["code"], reply["field"]) == ("token-revoked", "token")
    assert await still_open(other)


async def test_a_jti_revoked_in_another_tenant_does_not_match(nodes: list[Gateway]) -> None:
    first, _ = nodes
    user, jti = unique("user"), unique("jti")
    token = signed(first.settings, user, jti=jti)
    event = revocation(operator="ops-erin", tenant_id="globex", token_id=jti)
    await asyncio.to_thread(publish_revocation, first.settings, event)
    await asyncio.sleep(1.0)
    socket_ = await connected(first, user, "phone", token)
    assert await still_open(socket_)


async def test_a_user_logged_out_is_closed_everywhere_and_signs_in_again(
    nodes: list[Gateway],
) -> None:
    first, second = nodes
    user, bystander = unique("user"), unique("user")
    phone_token, laptop_token = signed(first.settings, user), signed(first.settings, user)
    sockets = [
        await connected(first, user, "phone", phone_token),
        await connected(second, user, "laptop", laptop_token),
    ]
    untouched = await connected(first, bystander, "phone", signed(first.settings, bystander))

    said = await asyncio.to_thread(
        revoke_cli, first.settings, "--user", user, "--tenant", TENANT, "--reason", "offboarded"
    )
    assert f"revoked every token of user {user!r} in tenant {TENANT} issued before" in said
    assert await closed_within(sockets, within=5) == [4005, 4005]
    assert await still_open(untouched)
    for node in nodes:
        assert await refused_hello(node, user, "phone", phone_token) == ("token-revoked", 4005)
        assert rest_status(node, laptop_token) == (401, "token-revoked")

    # iat counts whole seconds: a token of the next second is issued after the logout.
    await asyncio.sleep(1.1)
    fresh = signed(first.settings, user)
    for node in nodes:
        assert await still_open(await connected(node, user, "phone", fresh))


async def test_a_device_logged_out_loses_its_sockets_and_only_its_own(
    nodes: list[Gateway],
) -> None:
    first, second = nodes
    user = unique("user")
    shared = signed(first.settings, user)  # a token without did, used by two devices
    bound = signed(first.settings, user, device="watch")
    phone = await connected(first, user, "phone", shared)
    laptop = await connected(second, user, "laptop", shared)
    watch = await connected(second, user, "watch", bound)

    said = await asyncio.to_thread(
        revoke_cli, first.settings, "--device", user, "phone", "--tenant", TENANT
    )
    assert f"every token used by device 'phone' of user {user!r}" in said
    assert await close_code(phone, within=5) == 4005
    assert await still_open(laptop)
    assert await still_open(watch)
    assert await refused_hello(second, user, "phone", shared) == ("token-revoked", 4005)
    status, _, raw = second.request(
        "POST",
        f"/v1/tenants/{TENANT}/commands",
        {"type": "ping", "id": "p"},
        {"Authorization": f"Bearer {shared}", "X-Device-Id": "phone"},
    )
    assert (status, json.loads(raw)["code"]) == (401, "token-revoked")

    said = await asyncio.to_thread(
        revoke_cli, first.settings, "--device", user, "watch", "--tenant", TENANT
    )
    assert await close_code(watch, within=5) == 4005
    assert await still_open(laptop)


async def test_a_node_started_after_a_revocation_refuses_the_token(
    nodes: list[Gateway], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The node reads the whole topic before it is ready; a restarted node that skipped the
    revocations written while it was down would let the token in again."""
    first, _ = nodes
    user, jti = unique("user"), unique("jti")
    token = signed(first.settings, user, jti=jti)
    await asyncio.to_thread(
        revoke_cli, first.settings, "--jti", jti, "--tenant", TENANT, "--reason", "stolen"
    )
    logged_out = unique("user")
    stale = signed(first.settings, logged_out, ttl=timedelta(minutes=5))  # issued before
    await asyncio.to_thread(revoke_cli, first.settings, "--user", logged_out, "--tenant", TENANT)
    late = await asyncio.to_thread(
        start_gateway,
        first.settings,
        tmp_path_factory.mktemp("late"),
        ingress=UNLIMITED,
    )
    try:
        status, _, raw = await asyncio.to_thread(late.request, "GET", "/readyz")
        assert (status, json.loads(raw)["revocations"]) == (200, True)
        assert await refused_hello(late, user, "phone", token) == ("token-revoked", 4005)
        assert rest_status(late, token) == (401, "token-revoked")
        assert rest_status(late, stale) == (401, "token-revoked")
        assert late.metric("imstream_ingress_revocations") >= 2
    finally:
        assert late.stop() == 0, late.log()


async def test_a_node_that_has_not_read_the_revocations_takes_no_connection(
    ingress_settings: Settings, tmp_path: Path
) -> None:
    """A node whose revocation topic cannot be read (here: it does not exist) never lets a
    token in: the upgrade and REST are answered 503 unavailable, and it is not ready. Before,
    a node accepted tokens as soon as it listened."""
    starting = start_gateway(
        ingress_settings,
        tmp_path,
        kafka={"topic_prefix": unique("t-missing") + "."},
        ingress=UNLIMITED,
        wait=Gateway.alive,
    )
    try:
        await assert_upgrade_refused(starting, 503, "unavailable")
        token = signed(starting.settings, unique("user"))
        assert rest_status(starting, token) == (503, "unavailable")
        status, _, raw = starting.request("GET", "/readyz")
        assert (status, json.loads(raw)["revocations"]) == (503, False)
    finally:
        assert starting.stop() == 0, starting.log()


def test_revocations_are_forgotten_once_no_token_they_match_is_valid(
    ingress_settings: Settings, tmp_path: Path
) -> None:
    """With a 2 s maximum lifetime, a revocation matters for 2 s: the node drops it then."""
    short = start_gateway(
        ingress_settings,
        tmp_path,
        ingress=UNLIMITED,
        auth={"jwt_max_lifetime_seconds": 2, "jwt_leeway_seconds": 0},
    )
    try:
        before = short.metric("imstream_ingress_revocations")
        revoke_cli(ingress_settings, "--user", unique("user"), "--tenant", TENANT)
        wait_for(
            lambda: short.metric("imstream_ingress_revocations") == before + 1,
            timeout=5,
            what="the revocation to be held",
        )
        wait_for(
            lambda: short.metric("imstream_ingress_revocations") == 0,
            timeout=6,
            what="every revocation to be dropped",
        )
    finally:
        assert short.stop() == 0, short.log()


async def test_a_socket_waiting_for_its_hello_sees_the_revocation(nodes: list[Gateway]) -> None:
    """A revocation that arrives between the socket's accept and its hello still counts."""
    first, _ = nodes
    user, jti = unique("user"), unique("jti")
    token = signed(first.settings, user, jti=jti)
    socket_ = await open_socket(first)
    await asyncio.to_thread(revoke_cli, first.settings, "--jti", jti, "--tenant", TENANT)
    await asyncio.sleep(1.0)
    await socket_.send(json.dumps(hello(first.settings, user, "phone", token_text=token)))
    assert (await receive(socket_))["code"] == "token-revoked"
    assert await close_code(socket_) == 4005
