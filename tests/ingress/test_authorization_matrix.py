"""The ingress's authorization matrix, checked cell by cell against a running pipeline.

The rows are built from what the ingress serves: every route of the app's route table and every
client frame type of the protocol. Each row must have an explicit rule in ``ROUTE_RULES`` or
``FRAME_RULES``: a new route or frame without one fails ``test_every_door_has_a_rule`` before it
can ship unlocked. The columns are the principals a hostile internet brings:

- ``anonymous``: no credential at all;
- ``user``: a user of the tenant who is not in the conversation the request names;
- ``member``: a member of that conversation;
- ``other-tenant``: a genuine client token of another tenant, presented for this one;
- ``analyst`` and ``operator``: genuine staff tokens (the staff issuer, audience and key,
  ``IM_STAFF_AUTH__*``, with the ``analyst`` role of another tenant and the ``operator`` role):
  staff authority is never client authority, so the client door refuses them as it refuses a
  forgery. (The staff door, the ClickHouse sink's API, has its matrix in
  tests/sinks/test_clickhouse_access.py.)

A rule says what each principal gets (``expected``): the test asserts that cell on the system,
so a door that starts letting someone in (or locks out whom it should serve) fails here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from core.principals import StaffRole
from core.settings import Settings
from ingress.app import create_app
from schemas import events as ev
from schemas import frames as fr
from schemas.errors import CloseCode, ErrorCode
from tests.ingress.support import (
    COMMAND_EVENT_TYPES,
    TENANT,
    Gateway,
    JsonObject,
    hello,
    open_device,
    open_socket,
    receive,
    request,
    token,
    unique,
    wait_until,
)
from tests.schemas.samples import sample_client_frames
from tests.sinks.staff_support import staff_token


class Who(StrEnum):
    ANONYMOUS = "anonymous"
    USER = "user"
    MEMBER = "member"
    OTHER_TENANT = "other-tenant"
    ANALYST = "analyst"
    OPERATOR = "operator"


class Rule(StrEnum):
    #: Anyone, no credential: liveness and readiness probes.
    PUBLIC = "public"
    #: Any signed-in user of the tenant, within their own scope (their queue, their list, the
    #: conversations they create, the commands they send).
    CLIENT = "client"
    #: Members of the conversation the request names; a user who is not one is refused at once.
    MEMBER_READ = "member-read"
    #: Members of the conversation; the ingress accepts the command durably and the
    #: conversation's sequencer refuses a non-member (``command.rejected``, ``not-a-member``) in
    #: the sender's own queue, before anything reaches a member.
    MEMBER_WRITE = "member-write"
    #: The WebSocket's ``hello``: the gate every other frame sits behind.
    GATE = "gate"


#: Every route of the client port, by method and path template. (Metrics and the API's
#: documents are on the internal listener only: tests/ingress/test_rest.py.)
ROUTE_RULES: dict[tuple[str, str], Rule] = {
    ("GET", "/healthz"): Rule.PUBLIC,
    ("GET", "/readyz"): Rule.PUBLIC,
    ("POST", "/v1/tenants/{tenant_id}/commands"): Rule.CLIENT,
    ("PUT", "/v1/tenants/{tenant_id}/devices/{device_id}/push-token"): Rule.CLIENT,
    ("DELETE", "/v1/tenants/{tenant_id}/devices/{device_id}/push-token"): Rule.CLIENT,
    ("GET", "/v1/tenants/{tenant_id}/sync"): Rule.CLIENT,
    ("GET", "/v1/tenants/{tenant_id}/conversations"): Rule.CLIENT,
    ("GET", "/v1/tenants/{tenant_id}/search"): Rule.CLIENT,
    ("GET", "/v1/tenants/{tenant_id}/conversations/{conversation_id}/messages"): Rule.MEMBER_READ,
    (
        "GET",
        "/v1/tenants/{tenant_id}/conversations/{conversation_id}/messages/{seq}/read-by",
    ): Rule.MEMBER_READ,
}

#: Every client frame type of the WebSocket protocol.
FRAME_RULES: dict[str, Rule] = {
    "hello": Rule.GATE,
    "ping": Rule.CLIENT,
    "ack": Rule.CLIENT,
    "sync": Rule.CLIENT,
    "conversations": Rule.CLIENT,
    "refresh_token": Rule.CLIENT,
    "push_settings": Rule.CLIENT,
    "conversation.create": Rule.CLIENT,
    "history": Rule.MEMBER_READ,
    "who_read": Rule.MEMBER_READ,
    "send": Rule.MEMBER_WRITE,
    "recall": Rule.MEMBER_WRITE,
    "edit": Rule.MEMBER_WRITE,
    "read": Rule.MEMBER_WRITE,
    "typing": Rule.MEMBER_WRITE,
    "mute": Rule.MEMBER_WRITE,
    "clear_badge": Rule.MEMBER_WRITE,
    "conversation.rename": Rule.MEMBER_WRITE,
    "conversation.add_member": Rule.MEMBER_WRITE,
    "conversation.remove_member": Rule.MEMBER_WRITE,
    "conversation.change_role": Rule.MEMBER_WRITE,
    "conversation.leave": Rule.MEMBER_WRITE,
    "conversation.delete": Rule.MEMBER_WRITE,
}

#: What a refused credential gets, on either door: (error code, WebSocket close code).
REFUSED: dict[Who, tuple[ErrorCode, CloseCode]] = {
    Who.ANONYMOUS: (ErrorCode.AUTH_REQUIRED, CloseCode.AUTH_REQUIRED),
    Who.OTHER_TENANT: (ErrorCode.TENANT_MISMATCH, CloseCode.TENANT_MISMATCH),
    Who.ANALYST: (ErrorCode.TOKEN_INVALID, CloseCode.TOKEN_INVALID),
    Who.OPERATOR: (ErrorCode.TOKEN_INVALID, CloseCode.TOKEN_INVALID),
}
#: Codes that mean "who you are does not let you in": an allowed cell never gets one.
AUTHORIZATION_CODES = {
    ErrorCode.AUTH_REQUIRED,
    ErrorCode.TOKEN_INVALID,
    ErrorCode.TOKEN_EXPIRED,
    ErrorCode.TENANT_MISMATCH,
    ErrorCode.FORBIDDEN,
}


def client_routes(settings: Settings) -> set[tuple[str, str]]:
    """(method, path) of every route the client port serves, flattened out of included routers
    (``HEAD`` is GET's shadow)."""
    app = create_app(settings)

    def flat(routes: list[Any], prefix: str = "") -> Iterator[tuple[str, str]]:
        for route in routes:
            included = getattr(route, "original_router", None)
            if included is not None:
                yield from flat(included.routes, prefix + route.include_context.prefix)
                continue
            for method in getattr(route, "methods", None) or ["WEBSOCKET"]:
                if method != "HEAD":
                    yield method, prefix + route.path

    return set(flat(list(app.router.routes)))


def test_every_door_has_a_rule(settings: Settings) -> None:
    """A route or frame type added without an explicit rule fails here (and a rule left for a
    door that is gone, too)."""
    assert client_routes(settings) == set(ROUTE_RULES)
    assert set(fr.CLIENT_FRAME_TYPES) == set(FRAME_RULES)


# -- the system under test --------------------------------------------------------------------


@dataclass
class World:
    """A group with an owner and a member, a user of the tenant outside it, and the tokens of
    every principal."""

    gateway: Gateway
    owner: str
    member: str
    outsider: str
    conversation_id: str
    tokens: dict[Who, str | None]


@pytest.fixture(scope="module")
def world(pipeline: Gateway) -> World:
    settings = pipeline.settings
    owner, member, outsider = unique("owner"), unique("member"), unique("outsider")

    async def create() -> str:
        socket_, _ = await open_device(pipeline, owner)
        async with socket_:
            reply = await request(
                socket_,
                {
                    "type": "conversation.create",
                    "id": "create",
                    "kind": "group",
                    "name": "matrix",
                    "members": [member],
                },
            )
            assert reply["type"] == "ok", reply
            conversation_id: str = reply["conversation_id"]
            # A first message, so that history and read-by have a row to serve.
            sent = await request(
                socket_,
                {
                    "type": "send",
                    "id": "first",
                    "conversation_id": conversation_id,
                    "client_msg_id": "first",
                    "body": {"type": "text", "text": "hello"},
                },
            )
            assert sent["type"] == "accepted", sent
        return conversation_id

    conversation_id = asyncio.run(create())
    member_token = token(settings, member)

    def member_reads() -> bool:
        status, _, body = pipeline.request(
            "GET",
            f"/v1/tenants/{TENANT}/conversations/{conversation_id}/messages",
            headers={"Authorization": f"Bearer {member_token}"},
        )
        return status == 200 and len(json.loads(body)["entries"]) == 1

    wait_until_sync(member_reads, what="the member to read the group's first message")
    return World(
        gateway=pipeline,
        owner=owner,
        member=member,
        outsider=outsider,
        conversation_id=conversation_id,
        tokens={
            Who.ANONYMOUS: None,
            Who.USER: token(settings, outsider),
            Who.MEMBER: member_token,
            Who.OTHER_TENANT: token(settings, outsider, tenant=unique("tenant")),
            Who.ANALYST: staff_token(StaffRole.ANALYST, tenant=unique("tenant"), settings=settings),
            Who.OPERATOR: staff_token(StaffRole.OPERATOR, settings=settings),
        },
    )


def wait_until_sync(condition: Any, *, what: str, timeout: float = 60.0) -> None:
    asyncio.run(wait_until(condition, within=timeout, what=what))


# -- the REST door ----------------------------------------------------------------------------


def rest_call(world: World, method: str, template: str, who: Who) -> tuple[int, ErrorCode | None]:
    """One request of ``who`` to the route, with a valid body where it takes one: the status and
    the error code, if it is an error."""
    path = template.format(
        tenant_id=TENANT,
        device_id="phone",
        conversation_id=world.conversation_id,
        seq=1,
    )
    body: JsonObject | None = None
    if method == "POST":
        body = {
            "type": "conversation.create",
            "id": "rest",
            "kind": "group",
            "name": "rest",
            "members": [world.owner],
        }
    elif method == "PUT":
        body = {"provider": "fcm", "token": "f" * 64, "app_id": "dev.imstream.app"}
    headers = {"X-Device-Id": "phone"}
    credential = world.tokens[who]
    if credential is not None:
        headers["Authorization"] = f"Bearer {credential}"
    status, _, reply = world.gateway.request(method, path, body, headers)
    try:
        frame = json.loads(reply)
    except ValueError:
        return status, None
    if isinstance(frame, dict) and frame.get("type") == "error":
        return status, ErrorCode(frame["code"])
    return status, None


@pytest.mark.parametrize("who", list(Who))
def test_rest_cells(world: World, who: Who) -> None:
    failures = []
    for (method, template), rule in sorted(ROUTE_RULES.items()):
        status, code = rest_call(world, method, template, who)
        cell = f"{method} {template} as {who}: {status} {code}"
        if rule is Rule.PUBLIC:
            if status != 200:
                failures.append(cell)
        elif who in REFUSED:
            expected = REFUSED[who][0]
            if code != expected or status != expected.http_status:
                failures.append(f"{cell} (expected {expected})")
        elif rule is Rule.MEMBER_READ and who is Who.USER:
            if code != ErrorCode.FORBIDDEN:
                failures.append(f"{cell} (expected forbidden)")
        elif code in AUTHORIZATION_CODES:
            failures.append(f"{cell} (expected to be let in)")
    assert not failures, "\n".join(failures)


# -- the WebSocket door -----------------------------------------------------------------------


def frame_for(world: World, frame_type: str, who: Who) -> JsonObject:
    """A valid frame of this type aimed at the world's group, with fresh ids."""
    sample = sample_client_frames()[frame_type]
    frame: JsonObject = json.loads(fr.encode_client_frame(sample))
    frame["id"] = f"{frame_type}-{uuid.uuid4().hex[:8]}"
    if "conversation_id" in frame:
        frame["conversation_id"] = world.conversation_id
    if "client_msg_id" in frame:
        frame["client_msg_id"] = uuid.uuid4().hex
    if frame_type in ("recall", "edit"):
        frame["message_id"] = ev.message_event_id(TENANT, world.owner, "first")
    if frame_type in ("who_read", "read"):
        frame[("seq" if frame_type == "who_read" else "conversation_seq")] = 1
    if frame_type == "history":
        frame.pop("before_seq", None)
    if frame_type == "sync":
        frame["cursor"] = 0
    if frame_type == "ack":
        frame["sync_id"] = 0
    if frame_type == "conversation.create":
        frame.pop("conversation_id", None)
        frame["members"] = [world.owner]
    if frame_type in ("conversation.add_member", "conversation.remove_member"):
        frame["user_id"] = unique("newbie")
    if frame_type == "conversation.change_role":
        frame["user_id"] = world.owner
    if frame_type == "refresh_token":
        user = world.member if who is Who.MEMBER else world.outsider
        frame["token"] = token(world.gateway.settings, user)
    if frame_type == "hello":
        frame = hello(world.gateway.settings, world.outsider, "phone")
    return frame


async def refused_at_the_gate(world: World, frame_type: str, who: Who) -> str | None:
    """``who`` cannot get past hello, so the frame is never answered: what went wrong, if
    anything."""
    expected_code, expected_close = REFUSED[who]
    frame = frame_for(world, frame_type, who)
    socket_ = await open_socket(world.gateway)
    async with socket_:
        if who is Who.ANONYMOUS:
            if frame_type == "hello":
                frame["token"] = "not-a-token"
                expected_code, expected_close = ErrorCode.TOKEN_INVALID, CloseCode.TOKEN_INVALID
            await socket_.send(json.dumps(frame))
        else:
            credential = world.tokens[who]
            assert credential is not None
            greeting = hello(world.gateway.settings, world.outsider, "phone", token_text=credential)
            await socket_.send(json.dumps(greeting))
            if frame_type != "hello":
                # Closed already, maybe: then the frame never got in.
                with contextlib.suppress(ConnectionClosed):
                    await socket_.send(json.dumps(frame))
        replies: list[JsonObject] = []
        try:
            while True:
                replies.append(await receive(socket_, within=20))
        except ConnectionClosed as closed:
            close = closed.rcvd.code if closed.rcvd is not None else 1006
    codes = [reply.get("code") for reply in replies]
    if codes != [expected_code.value] or close != expected_close:
        return f"{frame_type} as {who}: got {replies} and close {close}"
    return None


@pytest.mark.parametrize("who", list(REFUSED))
def test_frames_of_refused_principals(world: World, who: Who) -> None:
    async def cells() -> list[str | None]:
        return [await refused_at_the_gate(world, name, who) for name in sorted(FRAME_RULES)]

    failures = [failure for failure in asyncio.run(cells()) if failure is not None]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("who", [Who.USER, Who.MEMBER])
def test_frames_of_the_tenant(world: World, who: Who) -> None:
    """A user of the tenant gets their own scope and is refused every conversation they are not
    in (reads at once, writes by the sequencer); a member gets the conversation."""
    user = world.member if who is Who.MEMBER else world.outsider
    # The destructive commands go last, so that the member is still one for the others.
    last = ("conversation.leave", "conversation.delete")
    order = sorted(FRAME_RULES, key=lambda name: (name in last, name))

    async def cells() -> list[str]:
        failures: list[str] = []
        socket_, _ = await open_device(world.gateway, user, unique("device"))
        async with socket_:
            written: set[str] = set()
            meanwhile: list[JsonObject] = []
            for frame_type in order:
                rule = FRAME_RULES[frame_type]
                frame = frame_for(world, frame_type, who)
                await socket_.send(json.dumps(frame))
                reply = await answer_to(socket_, frame["id"], meanwhile)
                cell = f"{frame_type} as {who}: {reply}"
                code = reply.get("code")
                if rule is Rule.GATE:
                    # A second hello on an open socket is refused as out of place, not let in.
                    if code != ErrorCode.SCHEMA_INVALID:
                        failures.append(cell)
                elif rule is Rule.MEMBER_READ and who is Who.USER:
                    if code != ErrorCode.FORBIDDEN:
                        failures.append(f"{cell} (expected forbidden)")
                elif reply.get("type") == "error":
                    failures.append(f"{cell} (expected to be let in)")
                elif rule is Rule.MEMBER_WRITE:
                    written.add(frame_type)
            rejected = await rejections(socket_, world, who, written, meanwhile)
        if who is Who.USER:
            missing = written - set(rejected)
            wrong = {t: reason for t, reason in rejected.items() if reason != "not-a-member"}
            if missing or wrong:
                failures.append(f"not refused as not-a-member: {sorted(missing)} {wrong}")
        else:
            refused = {t for t, reason in rejected.items() if reason == "not-a-member"}
            if refused:
                failures.append(f"a member refused as not-a-member: {sorted(refused)}")
        return failures

    failures = asyncio.run(cells())
    assert not failures, "\n".join(failures)


async def answer_to(
    socket_: ClientConnection, request_id: str, meanwhile: list[JsonObject]
) -> JsonObject:
    """The reply to ``request_id``; frames delivered meanwhile are kept in ``meanwhile``."""
    while True:
        frame = await receive(socket_, within=20)
        if frame.get("id") == request_id:
            return frame
        meanwhile.append(frame)


async def rejections(
    socket_: ClientConnection,
    world: World,
    who: Who,
    written: set[str],
    meanwhile: list[JsonObject],
) -> dict[str, str]:
    """Frame type -> reason of each ``command.rejected`` of the group that reached this user's
    queue for the frame types in ``written``: all of them for a non-member, else until the queue
    is quiet for a few seconds."""
    found: dict[str, str] = {}
    by_event = {COMMAND_EVENT_TYPES[name]: name for name in written}
    waiting = who is Who.USER
    while not waiting or set(found) < written:
        try:
            frame = meanwhile.pop(0) if meanwhile else await receive(socket_, 30 if waiting else 3)
        except TimeoutError:
            if not waiting:
                break
            raise AssertionError(f"rejections seen {found} of {sorted(written)}") from None
        event = frame.get("event") or {}
        if event.get("type") != "command.rejected":
            continue
        payload = event["payload"]
        if payload.get("conversation_id") != world.conversation_id:
            continue
        name = by_event.get(payload["command_type"], payload["command_type"])
        found[name] = payload["reason"]
    return found
