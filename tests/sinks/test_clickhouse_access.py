"""Who may call which route of the ClickHouse sink's API (port 8091), checked on a served app.

The matrix is built from the app's own route table: a route added without a row in
:data:`EXPECTED` fails ``test_every_route_has_an_explicit_rule``, and the gate refuses it to
everyone meanwhile (``test_a_route_without_a_rule_is_refused_to_everyone``). Each cell is a real
request over HTTP to the app on real chDB.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from clickhouse_connect.driver.client import Client
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import SecretStr

from analytics.access import ROUTE_ACCESS, Access
from analytics.api import AnalyticsServer
from analytics.jobs import OperatorJobs
from analytics.operator_api import install_operator_api
from analytics.queries import Analytics
from core.auth import issue_token
from core.principals import StaffRole, staff_authenticator
from core.settings import (
    AuthSettings,
    Profile,
    ServiceAuthSettings,
    Settings,
    StaffAuthSettings,
)
from schemas.events import SYSTEM_TENANT
from schemas.topics import topic_catalog
from sinks.clickhouse.store import ClickHouseStore
from tests.sinks.staff_support import service_headers, serving, staff_app, staff_token

TENANT_A, TENANT_B = "tenant-a", "tenant-b"
BODY_LIMIT = 64 * 1024

#: Every route of the app and who may call it; a new route needs a row here.
EXPECTED: dict[tuple[str, str], Access] = {
    ("GET", "/healthz"): Access.PUBLIC,
    ("GET", "/openapi.json"): Access.READ,
    ("GET", "/docs"): Access.READ,
    ("GET", "/docs/oauth2-redirect"): Access.READ,
    ("GET", "/redoc"): Access.READ,
    ("GET", "/v1/analytics"): Access.READ,
    ("GET", "/v1/analytics/{name}"): Access.READ,
    ("GET", "/dashboards"): Access.READ,
    ("GET", "/dashboards/{name}"): Access.READ,
    ("GET", "/dashboards/{name}/data"): Access.READ,
    ("GET", "/v1/quality/datasets"): Access.READ,
    ("GET", "/v1/quality/datasets/{name}"): Access.READ,
    ("GET", "/v1/search"): Access.READ,
    ("POST", "/v1/search/scoped"): Access.INGRESS,
    ("POST", "/v1/operator/replays"): Access.OPERATOR,
    ("POST", "/v1/operator/rebuilds"): Access.OPERATOR,
    ("GET", "/v1/operator/jobs/{job_id}"): Access.OPERATOR,
    ("DELETE", "/v1/operator/jobs/{job_id}"): Access.OPERATOR,
}


@dataclass(frozen=True)
class Call:
    """A harmless request to a route (nothing is started or written), and its answer when
    the caller may call it."""

    path: str
    query: dict[str, str]
    body: Any = None
    allowed: int = 200


_WINDOW = {"from": "2026-03-01T00:00:00Z", "to": "2026-03-02T00:00:00Z"}
#: The conversation log's topic, as the catalog names it (default settings).
SEQUENCED = topic_catalog(Settings()).messages_sequenced.name
CALLS: dict[tuple[str, str], Call] = {
    ("GET", "/healthz"): Call("/healthz", {}),
    ("GET", "/openapi.json"): Call("/openapi.json", {}),
    ("GET", "/docs"): Call("/docs", {}),
    ("GET", "/docs/oauth2-redirect"): Call("/docs/oauth2-redirect", {}),
    ("GET", "/redoc"): Call("/redoc", {}),
    ("GET", "/v1/analytics"): Call("/v1/analytics", {}),
    ("GET", "/v1/analytics/{name}"): Call("/v1/analytics/messages_per_minute", _WINDOW),
    ("GET", "/dashboards"): Call("/dashboards", {}, allowed=200),
    ("GET", "/dashboards/{name}"): Call("/dashboards/delivery", _WINDOW),
    ("GET", "/dashboards/{name}/data"): Call("/dashboards/delivery/data", _WINDOW),
    ("GET", "/v1/quality/datasets"): Call("/v1/quality/datasets", {}),
    ("GET", "/v1/quality/datasets/{name}"): Call(
        "/v1/quality/datasets/conversation_log", {"topic": SEQUENCED, "limit": "5"}
    ),
    ("GET", "/v1/search"): Call("/v1/search", {"q": "quick", "tenant": TENANT_A}),
    ("POST", "/v1/search/scoped"): Call("/v1/search/scoped", {}, {"q": "quick", "scope": []}),
    # Invalid bodies: an operator gets 400 and no job starts.
    ("POST", "/v1/operator/replays"): Call("/v1/operator/replays", {}, {}, allowed=400),
    ("POST", "/v1/operator/rebuilds"): Call("/v1/operator/rebuilds", {}, {}, allowed=400),
    ("GET", "/v1/operator/jobs/{job_id}"): Call("/v1/operator/jobs/nope", {}, allowed=404),
    ("DELETE", "/v1/operator/jobs/{job_id}"): Call("/v1/operator/jobs/nope", {}, allowed=404),
}


def _client_token(roles: list[str], tenant: str) -> str:
    """A genuine client token (the clients' key, issuer and audience)."""
    auth = Settings().auth
    return issue_token(
        auth.jwt_secret.get_secret_value(),
        user_id="someone",
        tenant_id=tenant,
        issuer=auth.jwt_issuer,
        audience=auth.jwt_audience,
        roles=roles,
    )


def principals() -> dict[str, str | None]:
    """The callers, by name: their token (None: anonymous). Minted when called, not at import:
    a whole test run outlasts the tokens' lifetimes (the ingress's is 60 s)."""
    return {
        "anonymous": None,
        "client-user": _client_token([], TENANT_A),
        # A client token claiming every staff role, for the system tenant: still a client token.
        "client-claiming-staff": _client_token(
            ["operator", "platform-analyst", "analyst", "ingress"], SYSTEM_TENANT
        ),
        "analyst-a": staff_token(StaffRole.ANALYST, tenant=TENANT_A),
        "platform-analyst": staff_token(StaffRole.PLATFORM_ANALYST),
        "operator": staff_token(StaffRole.OPERATOR),
        "ingress": service_headers(TENANT_A)["Authorization"].removeprefix("Bearer "),
        # A staff token may not speak for the ingress.
        "staff-claiming-ingress": staff_token(StaffRole.INGRESS),
    }


#: Who may call a route of each rule; the others get 401 (not staff) or 403 (not this).
MAY_CALL = {
    Access.PUBLIC: set(principals()),
    Access.READ: {"analyst-a", "platform-analyst", "operator"},
    Access.OPERATOR: {"operator"},
    Access.INGRESS: {"ingress"},
}
NOT_STAFF = {"anonymous", "client-user", "client-claiming-staff"}


def app_routes(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path template) of every route the app serves, from its own tables."""
    found: set[tuple[str, str]] = set()

    def walk(routes: Any) -> None:
        for route in routes:
            if hasattr(route, "effective_route_contexts"):  # an included router (FastAPI)
                for context in route.effective_route_contexts():
                    original = context.original_route
                    for method in getattr(original, "methods", None) or ():
                        found.add((method, context.path))
            elif hasattr(route, "routes"):
                walk(route.routes)
            else:
                for method in getattr(route, "methods", None) or ():
                    found.add((method, route.path))

    walk(app.routes)
    for path, operations in app.openapi()["paths"].items():
        found.update((method.upper(), path) for method in operations)
    return {(method, path) for method, path in found if method != "HEAD"}


@pytest.fixture
def store(clickhouse: Client, clickhouse_database: str, settings: Settings) -> Iterator[Any]:
    store = ClickHouseStore(clickhouse, clickhouse_database, owns_client=False)
    store.apply_schema(topic_catalog(settings))
    yield store
    store.close()


def full_app(store: ClickHouseStore, settings: Settings) -> FastAPI:
    app = staff_app(Analytics(store), settings, max_body_bytes=BODY_LIMIT)
    install_operator_api(app, OperatorJobs(settings, store, topic_catalog(settings)))
    return app


@pytest.fixture
def served(store: ClickHouseStore, settings: Settings) -> Iterator[tuple[FastAPI, str]]:
    app = full_app(store, settings)
    with serving(app) as url:
        yield app, url


def call(
    base: str,
    method: str,
    path: str,
    token: str | None,
    *,
    query: dict[str, str] | None = None,
    body: Any = None,
) -> tuple[int, Any]:
    address = f"{base}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    response = httpx.request(method, address, content=data, headers=headers, timeout=30)
    raw, status = response.content, response.status_code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def test_every_route_has_an_explicit_rule(store: ClickHouseStore, settings: Settings) -> None:
    """A route added without a row in EXPECTED (and in the gate's table) fails here."""
    routes = app_routes(full_app(store, settings))
    assert routes == set(EXPECTED), (
        f"routes without an expected rule: {sorted(routes - set(EXPECTED))}; "
        f"rules of no route: {sorted(set(EXPECTED) - routes)}"
    )
    assert set(CALLS) == set(EXPECTED)
    for (_method, path), access in EXPECTED.items():
        assert ROUTE_ACCESS[path] is access, path
    assert set(ROUTE_ACCESS) == {path for _method, path in EXPECTED}


def test_every_route_answers_each_principal_as_its_rule_says(
    served: tuple[FastAPI, str],
) -> None:
    _app, base = served
    wrong: list[str] = []
    for (method, template), access in EXPECTED.items():
        example = CALLS[(method, template)]
        for name, token in principals().items():
            status, body = call(
                base, method, example.path, token, query=example.query, body=example.body
            )
            if name in MAY_CALL[access]:
                expected = example.allowed
            elif name in NOT_STAFF:
                expected = 401
            else:
                expected = 403
            if status != expected:
                wrong.append(
                    f"{name} {method} {example.path}: {status} not {expected} {body!r:.200}"
                )
            elif expected in {401, 403}:
                assert body["code"] == ("unauthorized" if expected == 401 else "forbidden")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    ("path", "query"),
    [
        ("/v1/analytics/messages_per_minute", _WINDOW),
        ("/dashboards/delivery/data", _WINDOW),
        ("/dashboards/delivery", _WINDOW),
        ("/v1/quality/datasets/conversation_log", {"topic": SEQUENCED}),
        ("/v1/search", {"q": "quick"}),
    ],
)
def test_an_analyst_reads_its_own_tenant_only(
    served: tuple[FastAPI, str], path: str, query: dict[str, str]
) -> None:
    _app, base = served
    analyst = principals()["analyst-a"]
    status, body = call(base, "GET", path, analyst, query={**query, "tenant": TENANT_A})
    assert status == 200, body
    status, body = call(base, "GET", path, analyst, query={**query, "tenant": TENANT_B})
    assert (status, body["code"]) == (403, "forbidden"), body
    # Absent, or empty ("every tenant" for the others): the analyst's own.
    for tenant in ({}, {"tenant": ""}):
        status, body = call(base, "GET", path, analyst, query={**query, **tenant})
        assert status == 200, body
        if isinstance(body, dict) and "tenant" in body:
            assert body["tenant"] == TENANT_A
    # A platform analyst reads any tenant.
    status, body = call(
        base, "GET", path, principals()["platform-analyst"], query={**query, "tenant": TENANT_B}
    )
    assert status == 200, body


def test_an_analysts_dashboard_leaves_out_the_panels_of_every_tenant(
    served: tuple[FastAPI, str],
) -> None:
    _app, base = served
    mine = call(base, "GET", "/dashboards/delivery/data", principals()["analyst-a"], query=_WINDOW)[
        1
    ]
    everyone = call(
        base, "GET", "/dashboards/delivery/data", principals()["platform-analyst"], query=_WINDOW
    )[1]
    assert mine["tenant"] == TENANT_A
    assert 0 < len(mine["panels"]) < len(everyone["panels"])
    _status, html = call(
        base, "GET", "/dashboards/delivery", principals()["analyst-a"], query=_WINDOW
    )
    assert f"<option value='{TENANT_B}'" not in html and TENANT_A in html


def test_a_forged_scoped_search_is_refused(served: tuple[FastAPI, str]) -> None:
    """POST /v1/search/scoped searches the tenant of the ingress's token, never the body's."""
    _app, base = served
    scoped = "/v1/search/scoped"
    body = {"q": "quick", "scope": []}
    forged = {**body, "tenant": TENANT_B}
    assert call(base, "POST", scoped, None, body=forged)[0] == 401
    assert call(base, "POST", scoped, principals()["client-user"], body=forged)[0] == 401
    assert call(base, "POST", scoped, principals()["client-claiming-staff"], body=forged)[0] == 401
    assert call(base, "POST", scoped, principals()["platform-analyst"], body=forged)[0] == 403
    assert call(base, "POST", scoped, principals()["staff-claiming-ingress"], body=forged)[0] == 403
    # The ingress's token for tenant A, the body naming tenant B.
    status, answer = call(base, "POST", scoped, principals()["ingress"], body=forged)
    assert (status, answer["code"]) == (403, "forbidden"), answer
    # A service token signed with another key (the staff key) for the ingress's issuer.
    service = Settings().service_auth
    impostor = issue_token(
        Settings().staff_auth.secret.get_secret_value(),
        user_id="u",
        tenant_id=TENANT_B,
        issuer=service.issuer,
        audience=service.audience,
        roles=["ingress"],
    )
    assert call(base, "POST", scoped, impostor, body=body)[0] == 401
    # The genuine search: the token's tenant.
    status, answer = call(base, "POST", scoped, principals()["ingress"], body=body)
    assert (status, answer["tenant"]) == (200, TENANT_A), answer
    status, answer = call(
        base, "POST", scoped, principals()["ingress"], body={**body, "tenant": TENANT_A}
    )
    assert (status, answer["tenant"]) == (200, TENANT_A), answer


def test_a_route_without_a_rule_is_refused_to_everyone(
    store: ClickHouseStore, settings: Settings
) -> None:
    app = full_app(store, settings)

    @app.get("/v1/new-door")
    async def new_door() -> JSONResponse:
        return JSONResponse({"secrets": "all of them"})

    server = AnalyticsServer(app, "127.0.0.1", 0)
    server.start()
    try:
        for name, token in principals().items():
            status, _ = call(server.url, "GET", "/v1/new-door", token)
            assert status == (401 if name in NOT_STAFF else 403), name
    finally:
        server.stop()
    assert ("GET", "/v1/new-door") in app_routes(app) - set(EXPECTED)


def test_the_browser_login_sets_a_cookie_that_only_reads(served: tuple[FastAPI, str]) -> None:
    _app, base = served
    token = principals()["operator"]
    assert token is not None
    address = f"{base}/dashboards/delivery?{urllib.parse.urlencode({**_WINDOW, 'token': token})}"

    # httpx does not follow the redirect: its answer is looked at.
    redirected = httpx.get(address, timeout=30)
    assert redirected.status_code == 303
    location = redirected.headers["Location"]
    assert "token=" not in location and location.startswith("/dashboards/delivery?")
    cookie = redirected.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
    session = cookie.split(";", 1)[0]
    page = httpx.get(f"{base}{location}", headers={"Cookie": session}, timeout=30)
    assert page.status_code == 200
    # The cookie opens no POST route: no cross-site form can start a replay with it.
    refused = httpx.post(
        f"{base}/v1/operator/replays",
        content=b"{}",
        headers={"Cookie": session, "Content-Type": "application/json"},
        timeout=30,
    )
    assert refused.status_code == 401
    # A bad token in the address is refused, not turned into a cookie.
    status, _ = call(base, "GET", "/dashboards/delivery", None, query={"token": "forged"})
    assert status == 401


# -- bodies bounded before they are read --


def _raw_request(base: str, head: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=30)
    connection.sendall(head.encode())
    return connection


def _answer(connection: socket.socket) -> str:
    connection.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace")


@pytest.mark.parametrize("who", ["anonymous", "ingress", "operator"])
def test_a_200_mib_body_is_refused_from_its_content_length_unread(
    served: tuple[FastAPI, str], who: str
) -> None:
    """Only the headers are sent: an answer at once means nothing waited for the body."""
    _app, base = served
    path = "/v1/operator/replays" if who == "operator" else "/v1/search/scoped"
    token = principals()[who]
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {200 * 1024 * 1024}\r\n"
        + (f"Authorization: Bearer {token}\r\n" if token else "")
        + "\r\n"
    )
    connection = _raw_request(base, head)
    try:
        began = time.monotonic()
        answer = _answer(connection)
        assert answer.startswith("HTTP/1.1 413"), answer[:300]
        assert time.monotonic() - began < 10
    finally:
        connection.close()


@pytest.mark.parametrize("who", ["ingress", "operator"])
def test_a_chunked_body_is_refused_once_past_the_limit(
    served: tuple[FastAPI, str], who: str
) -> None:
    """A streamed body of up to 200 MiB: refused after about the limit, not read to its end."""
    _app, base = served
    path = "/v1/operator/replays" if who == "operator" else "/v1/search/scoped"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Transfer-Encoding: chunked\r\nAuthorization: Bearer {principals()[who]}\r\n\r\n"
    )
    connection = _raw_request(base, head)
    chunk = b"x" * (256 * 1024)
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent = 0
    try:
        connection.settimeout(0.05)
        answer = b""
        while sent < 200 * 1024 * 1024:
            try:
                connection.sendall(frame)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                break
            sent += len(chunk)
            try:
                answer = connection.recv(65536)
            except TimeoutError:
                continue
            break
        if not answer:
            answer = _answer(connection).encode()
        assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
        # The socket buffers hold a few MiB at most; the server stopped reading at the limit.
        assert sent < 32 * 1024 * 1024, sent
    finally:
        connection.close()


def test_the_staff_key_must_not_be_the_client_key() -> None:
    shared = SecretStr("the-same-secret-for-everyone-0123456789")
    with pytest.raises(ValueError, match="IM_STAFF_AUTH__SECRET equals IM_AUTH__JWT_SECRET"):
        Settings(auth=AuthSettings(jwt_secret=shared), staff_auth=StaffAuthSettings(secret=shared))
    with pytest.raises(ValueError, match="IM_SERVICE_AUTH__SECRET equals"):
        Settings(
            auth=AuthSettings(jwt_secret=shared), service_auth=ServiceAuthSettings(secret=shared)
        )
    with pytest.raises(ValueError, match="issuer of their own"):
        staff_authenticator(Settings(staff_auth=StaffAuthSettings(issuer="imstream")))
    real = AuthSettings(jwt_secret=SecretStr("x" * 40))
    with pytest.raises(ValueError, match="IM_STAFF_AUTH__SECRET still holds"):
        staff_authenticator(Settings(profile=Profile.PROD, auth=real))
