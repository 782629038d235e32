"""The ingress's ASGI application: FastAPI for the REST API, the gateway for ``/v1/ws``.

``create_app(settings)`` builds everything from the settings; the lifespan starts the gateway
(Kafka producer, live-delivery consumer, idle sweeper) and, on shutdown, drains it: every socket
is closed with server-draining (4010), ``device.disconnected`` is published for each, and the
producer is flushed. ``ingress/server.py`` runs it under uvicorn.

The WebSocket endpoint is served by the gateway directly, ahead of FastAPI's routing and
middleware: they are built for short requests and cost about 12 KB more per idle socket (measured
with 2,000 sockets on uvicorn/wsproto), a third of the 40 KB per-connection budget.

A REST request's body is bounded before anything reads it as a whole: a ``Content-Length`` over
the frame limit (``IM_INGRESS__MAX_FRAME_BYTES``; a body carries what a frame carries) is refused
with ``frame-too-large`` (413) unread, and a streamed body is read only up to the limit. Before,
a route read and parsed a whole body before its token was even checked (200 MiB were consumed).
Errors FastAPI raises itself (an unparseable body, an unknown route) are answered with error
frames too, never its ``{"detail": …}``.

What is for operators only — ``/metrics``, the API documentation (``/docs``, ``/redoc``,
``/openapi.json``) — is served by a second app, ``create_internal_app``, on the internal listener
(``IM_INGRESS__INTERNAL_HOST``/``IM_INGRESS__INTERNAL_PORT``, the loopback by default); the
client port answers ``not-found`` (404) for them. Before, anyone reaching the client port read
the node's traffic and process metrics and the whole API description. ``/healthz`` and
``/readyz`` are on both: a load balancer checks the client port.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from core.bodies import declared_length, read_bounded, replayed
from core.settings import Settings
from ingress.gateway import WEBSOCKET_PATH, Gateway, RefusalError, error_frame
from ingress.routes import commands, devices, health, reads, search
from ingress.routes.replies import frame_response
from ingress.search import UserSearch
from schemas.errors import ErrorCode, field_path

DESCRIPTION = """\
The door clients use to write: the same commands as the WebSocket protocol (`/v1/ws`, see
docs/protocol.md), push-token registration, and health. Authenticate with
`Authorization: Bearer <JWT>`; the tenant is part of the path. Every reply body is a protocol
frame; errors are `error` frames whose `code` decides the status.
"""


class IngressApp(FastAPI):
    """FastAPI, except that ``/v1/ws`` goes straight to the gateway (see module docstring)."""

    gateway: Gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == WEBSOCKET_PATH:
            await self.gateway.serve_websocket(scope, receive, send)
            return
        if scope["type"] == "http":
            limit = self.gateway.max_frame_bytes
            body = await bounded_body(scope, receive, limit)
            if body is None:
                frame = error_frame(
                    ErrorCode.FRAME_TOO_LARGE, f"the body is over the limit of {limit} bytes"
                )
                await frame_response(self.gateway, frame)(scope, receive, send)
                return
            receive = replayed(body, receive)
        await super().__call__(scope, receive, send)


async def bounded_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The request's body, or ``None`` as soon as it is known to be over ``limit`` bytes (from
    ``Content-Length`` before reading anything, else while reading)."""
    length = declared_length(scope)
    if length is not None and (length < 0 or length > limit):
        return None
    return await read_bounded(receive, limit)


def create_app(settings: Settings, *, gateway: Gateway | None = None) -> IngressApp:
    """The ingress app for ``settings`` (``gateway`` may be given to share one with a test)."""
    gateway = gateway or Gateway(settings)

    @asynccontextmanager
    async def lifespan(running: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()
            # The search's connections to the ClickHouse owner (made on the first search).
            user_search = getattr(running.state, "user_search", None)
            if isinstance(user_search, UserSearch):
                await user_search.close()

    app = IngressApp(
        title="imstream ingress",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
        # On the internal listener only (create_internal_app).
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.gateway = gateway
    app.state.gateway = gateway
    app.include_router(commands.router)
    app.include_router(devices.router)
    app.include_router(reads.router)
    app.include_router(search.router)
    app.include_router(health.router)

    async def refused(_request: Request, error: Exception) -> Response:
        assert isinstance(error, RefusalError)
        return frame_response(gateway, error.frame)

    async def invalid(_request: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)
        problem = error.errors()[0]
        if problem.get("type") == "json_invalid":
            reason = problem.get("ctx", {}).get("error", problem.get("msg", ""))
            frame = error_frame(ErrorCode.MALFORMED_JSON, f"the body is not valid JSON: {reason}")
        else:
            # The location starts with where the value was: body, path, header or query.
            location = list(problem.get("loc", ()))[1:]
            frame = error_frame(
                ErrorCode.SCHEMA_INVALID,
                str(problem.get("msg", "invalid")),
                field=field_path(location, None) or None,
            )
        return frame_response(gateway, frame)

    async def http_error(_request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        if error.status_code == 400:
            # FastAPI's own parse of a JSON body failed without a position: nesting beyond
            # what its parser takes (RecursionError) or another decoder failure.
            deep = isinstance(error.__cause__, RecursionError)
            reason = "nested deeper than the parser takes" if deep else "it cannot be parsed"
            frame = error_frame(ErrorCode.MALFORMED_JSON, f"the body is not valid JSON: {reason}")
        elif error.status_code in (404, 405):
            frame = error_frame(ErrorCode.NOT_FOUND, f"no such route or method: {error.detail}")
        else:
            frame = error_frame(ErrorCode.INTERNAL, str(error.detail))
        return frame_response(gateway, frame)

    app.add_exception_handler(RefusalError, refused)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in commands.command_schemas().items():
                components.setdefault(name, definition)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def create_internal_app(app: IngressApp) -> FastAPI:
    """The internal listener's app: metrics, health and the client API's documentation, for
    operators and scrapers. It shares ``app``'s gateway and has no lifespan of its own (the
    client app starts and drains the gateway)."""
    internal = FastAPI(
        title="imstream ingress (internal)",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    internal.state.gateway = app.gateway
    internal.include_router(health.router)
    internal.include_router(health.internal_router)

    @internal.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @internal.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")

    @internal.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")

    return internal
