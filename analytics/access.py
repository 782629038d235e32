"""The door of the ClickHouse sink's API (port 8091): a body limit, then a principal and a rule
for every route, before any route runs.

:class:`ApiGate` wraps the whole ASGI app, so nothing — a route, FastAPI's ``/docs``, a route
added later — is reached around it:

1. **Body limit**: a ``Content-Length`` over ``max_body_bytes`` is answered ``413
   body-too-large`` without reading a byte; a streamed (chunked) body is read only up to the
   limit, then refused the same way. No route ever holds more than the limit.
2. **Principal** (``core.principals``): every request but ``GET /healthz`` needs a
   staff or service token; ``401 unauthorized`` otherwise.
3. **Rule**: the :class:`Access` of the path template of :data:`ROUTE_ACCESS` the request's path
   matches. A path that matches none — an unknown one, or a route nobody wrote a rule for — is
   refused to everyone (``403``): a new route is closed until its rule is written
   (tests/sinks/test_clickhouse_access.py checks the table against the app's routes).
4. **Browsers**: a ``GET`` of a read route with ``?token=<staff token>`` is answered with a
   redirect that drops it and sets it as an HttpOnly, SameSite=Strict cookie, which ``GET``
   requests (only) may then use in place of the header: how a person opens the dashboards page
   (``imstream staff token --dashboards`` prints such an address).
5. **Tenant**: on the read routes an ``analyst`` reads the tenant of its token only: the
   ``tenant`` query parameter is set to it when absent, and another tenant is ``403
   forbidden``. The other principals' requests pass as they are.

The principal is left in ``request.state.principal`` for the routes (the operator's name in a
job, the tenant of a scoped search, the panels an analyst may see).
"""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import Final
from urllib.parse import parse_qsl, urlencode

from starlette.requests import Request, cookie_parser
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from core.bodies import declared_length, read_bounded, replayed
from core.principals import (
    StaffAuthenticator,
    StaffAuthError,
    StaffPrincipal,
    StaffRole,
    forbidden,
)

log = logging.getLogger(__name__)


class Access(StrEnum):
    """Who may call a route."""

    #: Anyone: liveness only, no data.
    PUBLIC = "public"
    #: Read-only staff: an ``analyst`` (its own tenant), a ``platform-analyst``, an ``operator``.
    READ = "read"
    #: ``operator`` only: jobs that write.
    OPERATOR = "operator"
    #: The ingress's service principal only (a user's search, the user's tenant from its token).
    INGRESS = "ingress"


_ROLES: Final = {
    Access.READ: frozenset({StaffRole.ANALYST, StaffRole.PLATFORM_ANALYST, StaffRole.OPERATOR}),
    Access.OPERATOR: frozenset({StaffRole.OPERATOR}),
    Access.INGRESS: frozenset({StaffRole.INGRESS}),
}

_SAFE: Final = frozenset({"GET", "HEAD"})
#: The query parameter that carries a browser's token once, and the cookie that keeps it.
LOGIN_PARAMETER: Final = "token"
COOKIE: Final = "imstream_staff"

#: Every route of the app, by its path, with its rule; all methods of a path share it.
ROUTE_ACCESS: Final[dict[str, Access]] = {
    "/healthz": Access.PUBLIC,
    "/openapi.json": Access.READ,
    "/docs": Access.READ,
    "/docs/oauth2-redirect": Access.READ,
    "/redoc": Access.READ,
    "/v1/analytics": Access.READ,
    "/v1/analytics/{name}": Access.READ,
    "/dashboards": Access.READ,
    "/dashboards/{name}": Access.READ,
    "/dashboards/{name}/data": Access.READ,
    "/v1/quality/datasets": Access.READ,
    "/v1/quality/datasets/{name}": Access.READ,
    "/v1/search": Access.READ,
    "/v1/search/scoped": Access.INGRESS,
    "/v1/operator/replays": Access.OPERATOR,
    "/v1/operator/rebuilds": Access.OPERATOR,
    "/v1/operator/jobs/{job_id}": Access.OPERATOR,
}


_PATTERNS: Final = [(template, compile_path(template)[0]) for template in ROUTE_ACCESS]


def principal_of(request: Request) -> StaffPrincipal:
    """The principal :class:`ApiGate` verified for this request."""
    principal = getattr(request.state, "principal", None)
    if not isinstance(principal, StaffPrincipal):  # only a route outside the gate gets here
        raise forbidden("no principal: the request did not pass the API's gate")
    return principal


class ApiGate:
    """The ASGI wrapper described in the module docstring, around ``app``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        authenticator: StaffAuthenticator,
        max_body_bytes: int,
    ) -> None:
        self.app = app
        self.authenticator = authenticator
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = declared_length(scope)
        if length is not None and length > self.max_body_bytes:
            await self._too_large(scope, receive, send)
            return
        try:
            login = self._login(scope)
            if login is not None:
                await login(scope, receive, send)
                return
            self._admit(scope)
        except StaffAuthError as error:
            await JSONResponse(error.body(), error.status)(scope, receive, send)
            return
        # The body is read here, up to the limit, so no route reads more however it parses.
        body = await read_bounded(receive, self.max_body_bytes)
        if body is None:
            await self._too_large(scope, receive, send)
            return
        await self.app(scope, replayed(body, receive), send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = {
            "code": "body-too-large",
            "message": f"the body is over the limit of {self.max_body_bytes} bytes",
            "field": None,
        }
        # Connection: close — the rest of the body is never read.
        response = JSONResponse(body, 413, headers={"Connection": "close"})
        await response(scope, receive, send)

    def _login(self, scope: Scope) -> Response | None:
        """A browser's way in to the read routes (the dashboards page): ``?token=`` once, which
        becomes an HttpOnly cookie (sent by ``GET`` requests only, so no form of another site
        can act with it) and is taken out of the address by a redirect."""
        if scope["method"] != "GET":
            return None
        items = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        token = next((value for name, value in items if name == LOGIN_PARAMETER), None)
        path = self._route_path(scope)
        if token is None or path is None or ROUTE_ACCESS[path] is not Access.READ:
            return None
        self.authenticator.authenticate(f"Bearer {token}")
        rest = urlencode([(name, value) for name, value in items if name != LOGIN_PARAMETER])
        response = RedirectResponse(scope["path"] + (f"?{rest}" if rest else ""), 303)
        response.set_cookie(
            COOKIE, token, httponly=True, samesite="strict", path="/", max_age=12 * 3600
        )
        return response

    def _admit(self, scope: Scope) -> None:
        """Authenticate and authorize the request, or raise :class:`StaffAuthError`."""
        path = self._route_path(scope)
        access = ROUTE_ACCESS.get(path) if path is not None else None
        if access is Access.PUBLIC:
            return
        authorization = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"cookie" and authorization is None and scope["method"] in _SAFE:
                token = cookie_parser(value.decode("latin-1")).get(COOKIE)
                authorization = f"Bearer {token}" if token else None
        principal = self.authenticator.authenticate(authorization)
        scope.setdefault("state", {})["principal"] = principal
        if access is None:
            # Not a route of the table: an unknown path, or a route nobody wrote a rule for.
            log.warning(
                "%s %s: no access rule in ROUTE_ACCESS; refused", scope["method"], scope["path"]
            )
            raise forbidden(f"{scope['path']} has no access rule")
        if principal.role not in _ROLES[access]:
            raise forbidden(f"{path} is for {access} principals; the token is {principal.role}")
        if access is Access.READ and not principal.all_tenants:
            scope["query_string"] = _own_tenant(scope.get("query_string", b""), principal)

    @staticmethod
    def _route_path(scope: Scope) -> str | None:
        """The path template of :data:`ROUTE_ACCESS` that the request's path matches, if any."""
        path = scope["path"]
        for template, pattern in _PATTERNS:
            if pattern.match(path):
                return template
        return None


def _own_tenant(query_string: bytes, principal: StaffPrincipal) -> bytes:
    """The query string with ``tenant`` set to the principal's own; another tenant refused."""
    items = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    for name, value in items:
        if name == "tenant" and value and value != principal.tenant:
            raise forbidden(
                f"an analyst of tenant {principal.tenant!r} reads that tenant only, not {value!r}"
            )
    kept = [(name, value) for name, value in items if name != "tenant"]
    return urlencode([*kept, ("tenant", principal.tenant)]).encode("latin-1")
