"""The REST door: the same commands and replies as the socket, push tokens, health, OpenAPI."""

from __future__ import annotations

import contextlib
import json
import socket
from datetime import timedelta
from typing import Any

import pytest

from client.sdk import Client, CommandError
from schemas.events import MAX_BODY_BYTES, message_event_id
from schemas.topics import conversation_key, device_key, user_key
from tests.ingress.support import (
    PUSH_APP,
    TENANT,
    Gateway,
    JsonObject,
    end_offset,
    read_records,
    token,
    unique,
)

COMMANDS = f"/v1/tenants/{TENANT}/commands"


def bearer(gateway: Gateway, user: str, **options: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(gateway.settings, user, **options)}"}


def post(
    gateway: Gateway, body: JsonObject | str | bytes, headers: dict[str, str], path: str = COMMANDS
) -> tuple[int, dict[str, str], JsonObject]:
    status, response_headers, raw = gateway.request("POST", path, body, headers)
    return status, dict(response_headers), json.loads(raw)


def send(conversation: str, client_msg_id: str = "m-1", text: str = "hi") -> JsonObject:
    return {
        "type": "send",
        "id": "r1",
        "conversation_id": conversation,
        "client_msg_id": client_msg_id,
        "body": {"type": "text", "text": text},
    }


def test_send_is_accepted_once_in_kafka(gateway: Gateway) -> None:
    user, conversation = unique("user"), unique("conv")
    topic = gateway.catalog.messages_in.name
    key = conversation_key(TENANT, conversation)
    partition, before = end_offset(gateway.settings, topic, key)
    headers = {**bearer(gateway, user), "X-Device-Id": "laptop"}

    status, _, reply = post(gateway, send(conversation), headers)

    assert status == 200
    assert reply == {
        "type": "accepted",
        "id": "r1",
        "conversation_id": conversation,
        "client_msg_id": "m-1",
        "event_id": message_event_id(TENANT, user, "m-1"),
    }
    assert end_offset(gateway.settings, topic, key)[1] == before + 1
    [(_, event)] = read_records(gateway.settings, topic, partition, before, 1)
    assert event["event_id"] == reply["event_id"]
    assert event["actor"] == {"user_id": user, "device_id": "laptop"}


def test_other_commands_answer_like_the_socket(gateway: Gateway) -> None:
    headers = bearer(gateway, unique("user"))
    status, _, created = post(
        gateway,
        {"type": "conversation.create", "id": "c1", "kind": "direct", "members": ["bob"]},
        headers,
    )
    assert (status, created["type"], created["id"]) == (200, "ok", "c1")
    assert created["conversation_id"].startswith("dm-")
    assert post(gateway, {"type": "ping", "id": "p"}, headers)[::2] == (
        200,
        {"type": "pong", "id": "p"},
    )
    status, _, sync = post(gateway, {"type": "sync", "id": "s", "cursor": 0}, headers)
    assert (status, sync) == (
        200,
        {
            "type": "sync_page",
            "id": "s",
            "events": [],
            "has_more": False,
            "next_cursor": 0,
            "expired": False,
        },
    )


def test_push_settings_are_recorded_on_the_user_state_topic_or_refused_clearly(
    gateway: Gateway,
) -> None:
    user = unique("user")
    headers = {**bearer(gateway, user), "X-Device-Id": "laptop"}
    topic = gateway.catalog.user_state_in.name
    key = user_key(TENANT, user)
    partition, before = end_offset(gateway.settings, topic, key)
    quiet_hours = {"start": "23:00", "end": "06:30", "time_zone": "America/Sao_Paulo"}
    settings: JsonObject = {
        "type": "push_settings",
        "id": "ps1",
        "quiet_hours": quiet_hours,
        "locale": "pt-BR",
    }

    status, _, reply = post(gateway, settings, headers)

    assert (status, reply) == (200, {"type": "ok", "id": "ps1", "conversation_id": None})
    [(record_key, event)] = read_records(gateway.settings, topic, partition, before, 1)
    assert record_key == key
    assert (event["type"], event["actor"]) == (
        "user.push_settings_changed",
        {"user_id": user, "device_id": "laptop"},
    )
    assert event["payload"] == {
        "muted": False,
        "muted_until": None,
        "quiet_hours": quiet_hours,
        "locale": "pt-BR",
    }
    bad_zone = {**settings, "quiet_hours": {**quiet_hours, "time_zone": "Brazil/Rio"}}
    status, _, refused = post(gateway, bad_zone, headers)
    assert (status, refused["code"], refused["field"], refused["id"]) == (
        422,
        "schema-invalid",
        "quiet_hours.time_zone",
        "ps1",
    )
    assert "unknown time zone 'Brazil/Rio'" in refused["message"]
    # Nothing was recorded for the refused command.
    assert end_offset(gateway.settings, topic, key)[1] == before + 1


REFUSALS: dict[str, tuple[Any, int, str, str | None]] = {
    "malformed json": ('{"type": ', 400, "malformed-json", None),
    "unknown type": ({"type": "teleport", "id": "t"}, 400, "unknown-type", "type"),
    "schema violation": (
        {**send("c-1"), "body": {"type": "text"}},
        422,
        "schema-invalid",
        "body.text",
    ),
    "body too large": (
        send("c-1", text="x" * (MAX_BODY_BYTES + 1)),
        413,
        "body-too-large",
        "body.text",
    ),
    "frame too large": (send("c-1", text="x" * 70_000), 413, "frame-too-large", None),
    "invalid utf-8": (b'{"type": "ping", "id": "\xff"}', 400, "invalid-utf8", None),
    "hello": (
        {
            "type": "hello",
            "id": "h",
            "token": "t",
            "tenant_id": TENANT,
            "device_id": "d",
            "platform": "web",
        },
        422,
        "schema-invalid",
        "type",
    ),
    "ack": ({"type": "ack", "id": "a", "sync_id": 3}, 422, "schema-invalid", "type"),
    # Before: a RecursionError, answered with a plain-text 500.
    "nested 1,100 deep": (
        '{"type": "ping", "id": "p", "x": ' + "[" * 1100 + "]" * 1100 + "}",
        400,
        "malformed-json",
        None,
    ),
    # Before: accepted, then "unavailable" with the store's error (seqs are 32-bit there).
    "seq past the store": (
        {"type": "history", "id": "h", "conversation_id": "c-1", "after_seq": 2**53},
        422,
        "schema-invalid",
        "after_seq",
    ),
    "an integer of 4,300 digits": (
        '{"type": "sync", "id": "s", "cursor": ' + "9" * 4300 + "}",
        422,
        "schema-invalid",
        "cursor",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_commands_get_their_code_and_status(gateway: Gateway, case: str) -> None:
    body, expected_status, code, field = REFUSALS[case]
    status, _, reply = post(gateway, body, bearer(gateway, unique("user")))
    assert (status, reply["type"], reply["code"], reply["field"]) == (
        expected_status,
        "error",
        code,
        field,
    )


def test_the_auth_matrix(gateway: Gateway) -> None:
    user = unique("user")
    ping = {"type": "ping", "id": "p"}
    cases: list[tuple[dict[str, str], int, str]] = [
        ({}, 401, "auth-required"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, 401, "token-invalid"),
        ({"Authorization": "Bearer not.a.jwt"}, 401, "token-invalid"),
        (bearer(gateway, user, ttl=timedelta(hours=-1)), 401, "token-expired"),
        (bearer(gateway, user, tenant="globex"), 403, "tenant-mismatch"),
        ({**bearer(gateway, user, device="phone"), "X-Device-Id": "tablet"}, 403, "forbidden"),
    ]
    for headers, expected_status, code in cases:
        status, _, reply = post(gateway, ping, headers)
        assert (status, reply["code"]) == (expected_status, code), headers
    assert post(gateway, ping, bearer(gateway, user, device="phone"))[0] == 200


def test_a_malformed_tenant_in_the_path_is_refused(gateway: Gateway) -> None:
    status, _, reply = post(
        gateway, {"type": "ping", "id": "p"}, bearer(gateway, "u"), "/v1/tenants/a%20b/commands"
    )
    assert (status, reply["code"], reply["field"]) == (422, "schema-invalid", "tenant_id")


def test_push_tokens_are_registered_and_removed(gateway: Gateway) -> None:
    user = unique("user")
    topic = gateway.catalog.push_tokens.name
    key = device_key(TENANT, user, "phone")
    partition, before = end_offset(gateway.settings, topic, key)
    path = f"/v1/tenants/{TENANT}/devices/phone/push-token"
    body = {"provider": "apns", "token": "a" * 64, "app_id": PUSH_APP}
    headers = {**bearer(gateway, user, device="phone"), "X-Request-Id": "reg-1"}

    status, _, raw = gateway.request("PUT", path, body, headers)
    assert status == 200
    assert json.loads(raw) == {"type": "ok", "id": "reg-1", "conversation_id": None}
    status, _, raw = gateway.request("DELETE", path, body, headers)
    assert status == 200

    records = read_records(gateway.settings, topic, partition, before, 2)
    assert [record_key for record_key, _ in records] == [key, key]
    registered, removed = (event for _, event in records)
    assert registered["type"] == "push_token.registered"
    assert registered["payload"] == {"user_id": user, "device_id": "phone", "proof": None, **body}
    assert removed["type"] == "push_token.removed"
    assert removed["payload"]["reason"] == "client"


def test_a_push_token_gets_the_tenants_app_never_one_the_client_names(gateway: Gateway) -> None:
    """Where a push goes (the APNs topic) is the tenant's setting: a token naming another app —
    another tenant's bundle id, say — is refused; a token naming none gets the tenant's."""
    user = unique("user")
    topic = gateway.catalog.push_tokens.name
    key = device_key(TENANT, user, "phone")
    partition, before = end_offset(gateway.settings, topic, key)
    path = f"/v1/tenants/{TENANT}/devices/phone/push-token"
    headers = bearer(gateway, user, device="phone")
    foreign = {"provider": "apns", "token": "b" * 64, "app_id": "com.rival.messenger"}

    status, _, raw = gateway.request("PUT", path, foreign, headers)
    reply = json.loads(raw)
    assert (status, reply["code"], reply["field"]) == (403, "push-app-not-allowed", "app_id")
    assert "com.rival.messenger" in reply["message"]
    # The challenge a silent push brought, echoed: the push sink judges it.
    echo = {"provider": "apns", "token": "b" * 64, "proof": "1764230400.c2lnbmF0dXJl"}
    status, _, _ = gateway.request("PUT", path, echo, headers)
    assert status == 200

    ((_, registered),) = read_records(gateway.settings, topic, partition, before, 1)
    assert registered["payload"]["app_id"] == PUSH_APP
    assert registered["payload"]["token"] == "b" * 64
    assert registered["payload"]["proof"] == echo["proof"]


async def test_the_sdk_registers_for_the_tenants_app_and_echoes_a_challenge(
    gateway: Gateway,
) -> None:
    user = unique("user")
    topic = gateway.catalog.push_tokens.name
    partition, before = end_offset(gateway.settings, topic, device_key(TENANT, user, "phone"))
    sdk = Client(
        gateway.ws, tenant_id=TENANT, device_id="phone", token=token(gateway.settings, user)
    )
    with pytest.raises(CommandError) as refused:
        await sdk.register_push_token("apns", "c" * 64, "com.rival.messenger")
    assert refused.value.frame.code == "push-app-not-allowed"
    await sdk.register_push_token("apns", "c" * 64, proof="1764230400.c2lnbmF0dXJl")

    ((_, registered),) = read_records(gateway.settings, topic, partition, before, 1)
    assert registered["payload"]["app_id"] == PUSH_APP
    assert registered["payload"]["proof"] == "1764230400.c2lnbmF0dXJl"


PUSH_TOKEN_REFUSALS: dict[str, tuple[Any, str, int, str, str | None]] = {
    "other device": (
        {"provider": "apns", "token": "t", "app_id": "a"},
        "tablet",
        403,
        "forbidden",
        None,
    ),
    "missing token": ({"provider": "apns", "app_id": "a"}, "phone", 422, "schema-invalid", "token"),
    "unknown provider": (
        {"provider": "pager", "token": "t", "app_id": "a"},
        "phone",
        422,
        "schema-invalid",
        "provider",
    ),
    "malformed": ('{"provider": ', "phone", 400, "malformed-json", None),
}


@pytest.mark.parametrize("case", list(PUSH_TOKEN_REFUSALS))
def test_push_token_refusals(gateway: Gateway, case: str) -> None:
    body, device, status, code, field = PUSH_TOKEN_REFUSALS[case]
    headers = bearer(gateway, unique("user"), device="phone")
    got, _, raw = gateway.request(
        "PUT", f"/v1/tenants/{TENANT}/devices/{device}/push-token", body, headers
    )
    reply = json.loads(raw)
    assert (got, reply["code"], reply["field"]) == (status, code, field)


def raw_http(gateway: Gateway, head: str, body: bytes = b"", within: float = 10.0) -> bytes:
    """Write a request as given (headers need not match the body) and read the answer."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=within) as conn:
        conn.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        answer = b""
        with contextlib.suppress(TimeoutError):
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                answer += chunk
        return answer


def test_a_body_over_the_limit_is_refused_before_it_is_read(gateway: Gateway) -> None:
    """Before: the push-token route read and parsed a whole body before checking the token
    (a 200 MiB body was consumed). Now a declared length over the limit is refused unread, and
    a streamed body as soon as it passes the limit."""
    path = f"/v1/tenants/{TENANT}/devices/phone/push-token"
    answer = raw_http(
        gateway,
        f"PUT {path} HTTP/1.1\nHost: x\nContent-Type: application/json\n"
        f"Content-Length: {200 * 1024 * 1024}\n",
        b'{"provider": "apns", ',
    )
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 413")
    assert json.loads(body)["code"] == "frame-too-large"

    chunk = b"x" * 20_000
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5))
    answer = raw_http(
        gateway,
        f"PUT {path} HTTP/1.1\nHost: x\nContent-Type: application/json\n"
        "Transfer-Encoding: chunked\n",
        chunked,
    )
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 413")
    assert b"frame-too-large" in body


def test_what_fastapi_refuses_itself_is_answered_with_error_frames(gateway: Gateway) -> None:
    user = unique("user")
    path = f"/v1/tenants/{TENANT}/devices/phone/push-token"
    deep = '{"provider": ' + "[" * 5000 + "]" * 5000 + "}"
    status, _, raw = gateway.request("PUT", path, deep, bearer(gateway, user, device="phone"))
    assert (status, json.loads(raw)["code"]) == (400, "malformed-json")
    status, _, raw = gateway.request("GET", f"/v1/tenants/{TENANT}/nowhere")
    assert (status, json.loads(raw)["code"]) == (404, "not-found")
    assert "RecursionError" not in gateway.log()


def test_health_readiness_and_metrics(gateway: Gateway) -> None:
    status, _, raw = gateway.request("GET", "/healthz")
    assert (status, json.loads(raw)["node_id"]) == (200, gateway.node_id)
    status, _, raw = gateway.request("GET", "/readyz")
    assert (status, json.loads(raw)) == (
        200,
        {
            "ready": True,
            "kafka": True,
            "live_delivery": True,
            "draining": False,
            "serving_store": True,
            "revocations": True,
            "failed": None,
        },
    )
    post(gateway, send(unique("conv")), bearer(gateway, unique("user")))
    metrics = gateway.metrics()
    names = {name for name, _ in metrics}
    assert {
        "imstream_ingress_connections",
        "imstream_ingress_frames_in_total",
        "imstream_ingress_frames_out_total",
        "imstream_ingress_outbound_queued_frames",
        "imstream_ingress_kafka_queued_records",
        "process_resident_memory_bytes",
    } <= names
    assert metrics[("imstream_ingress_produce_latency_seconds_count", ())] >= 1
    assert metrics[("imstream_ingress_frames_out_total", (("type", "accepted"),))] >= 1


def test_metrics_and_api_docs_are_on_the_internal_listener_only(gateway: Gateway) -> None:
    """Anyone reaching the client port used to read the node's metrics and API description;
    they are now served on the internal listener (loopback by default), the client port
    answers not-found, and liveness and readiness stay on both (a load balancer's checks)."""
    for path in ("/metrics", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        status, _, raw = gateway.request("GET", path)
        assert (status, json.loads(raw)["code"]) == (404, "not-found"), path
        status, _, raw = gateway.request("GET", gateway.internal + path)
        assert status == (404 if path == "/docs/oauth2-redirect" else 200), path
    status, headers, raw = gateway.request("GET", gateway.internal + "/docs")
    assert headers["content-type"].startswith("text/html") and b"/openapi.json" in raw
    for path in ("/healthz", "/readyz"):
        assert gateway.request("GET", path)[0] == 200
        assert gateway.request("GET", gateway.internal + path)[0] == 200
    # Nothing else on the internal listener: no client route, no WebSocket.
    status, _, _ = gateway.request("GET", gateway.internal + f"/v1/tenants/{TENANT}/sync")
    assert status == 404


def test_openapi_documents_every_route(gateway: Gateway) -> None:
    status, _, raw = gateway.request("GET", gateway.internal + "/openapi.json")
    document = json.loads(raw)
    assert status == 200
    paths = {path: set(methods) for path, methods in document["paths"].items()}
    assert paths == {
        "/v1/tenants/{tenant_id}/commands": {"post"},
        "/v1/tenants/{tenant_id}/devices/{device_id}/push-token": {"put", "delete"},
        "/v1/tenants/{tenant_id}/sync": {"get"},
        "/v1/tenants/{tenant_id}/conversations": {"get"},
        "/v1/tenants/{tenant_id}/conversations/{conversation_id}/messages": {"get"},
        "/v1/tenants/{tenant_id}/conversations/{conversation_id}/messages/{seq}/read-by": {"get"},
        "/v1/tenants/{tenant_id}/search": {"get"},
        "/healthz": {"get"},
        "/readyz": {"get"},
    }
    command = document["paths"]["/v1/tenants/{tenant_id}/commands"]["post"]
    body = command["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/RestCommand"}
    schemas = document["components"]["schemas"]
    mapping = schemas["RestCommand"]["discriminator"]["mapping"]
    assert {"send", "conversation.create", "ping"} <= set(mapping)
    assert "hello" not in mapping
    for reference in mapping.values():
        assert reference.removeprefix("#/components/schemas/") in schemas
