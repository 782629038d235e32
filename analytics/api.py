"""The analytics HTTP endpoint of the process that owns the ClickHouse data path.

chDB allows one data path per process, so the ClickHouse sink process answers dashboards'
analytics queries for everyone else:

- ``GET /healthz`` — 200 while the sink loop runs, 503 once it stopped;
- ``GET /v1/analytics`` — the named queries, their columns and parameters;
- ``GET /v1/analytics/{name}?tenant=&from=&to=`` — the rows as JSON; errors as
  ``{"code", "message", "field"}`` with the code's status (``analytics.queries``);
- ``GET /dashboards``, ``/dashboards/{name}`` — the dashboards of ``dashboards/`` as charts
  (``analytics.dashboards_page``);
- ``GET /v1/quality/datasets[/{name}]`` — the data-quality datasets of ``imstream quality
  check`` (``analytics.quality_api``);
- ``GET /v1/search``, ``POST /v1/search/scoped`` — message search for analysts and, through the
  ingress, for users (``analytics.search_api``).

Every route but ``/healthz`` needs a staff or service token, and every route has an explicit
rule (``analytics.access``): operators, platform analysts (every tenant) and analysts (the
tenant of their token only) read; only operators start jobs; only the ingress asks users'
searches. Bodies are bounded before they are read.

The server is uvicorn in a thread of its own with its own event loop (``AnalyticsServer``): the
consumer loop keeps the main thread and its signal handlers, and queries reach ClickHouse through
threads of their own (the store's query pool, bounded in time and in waiting requests) without
blocking either, and never in the way of the audit inserts.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute

from analytics.access import ApiGate
from analytics.dashboards_page import DashboardPages, dashboards_router, error_page
from analytics.parameters import From, QueryModel, Tenant, To, once_each, refusal
from analytics.quality_api import quality_router
from analytics.queries import Analytics, NamedQuery, named_query, window
from analytics.search_api import router as search_router
from core.principals import StaffAuthenticator, StaffAuthError
from core.tls import uvicorn_tls_options
from schemas.errors import ApiError
from sinks.clickhouse.store import QueryBusyError

log = logging.getLogger(__name__)

#: The default of ``IM_SINKS__ANALYTICS_MAX_BODY_BYTES``.
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
START_TIMEOUT_SECONDS = 10.0
STOP_TIMEOUT_SECONDS = 10.0


class AnalyticsServerError(Exception):
    """The endpoint cannot serve (address in use, not started in time): what to fix."""


def _analytics(request: Request) -> Analytics:
    analytics = request.app.state.analytics
    assert isinstance(analytics, Analytics)
    return analytics


AnalyticsDep = Annotated[Analytics, Depends(_analytics)]
NamedQueryDep = Annotated[NamedQuery, Depends(named_query)]


class AnalyticsParameters(QueryModel):
    """``?tenant=&from=&to=`` of a named query (all optional)."""

    tenant: Tenant = None
    start: From = None
    end: To = None


def _answers_html(request: Request) -> bool:
    """Whether the request's route answers a page (the dashboards), so its errors do too."""
    route = request.scope.get("route")
    return isinstance(route, APIRoute) and route.response_class is HTMLResponse


async def _refused(request: Request, error: Exception) -> Response:
    """Every API error (analytics, search, quality, dashboards): ``{"code", "message",
    "field"}`` with the code's status, or the page saying so on a page's route."""
    assert isinstance(error, ApiError)
    if _answers_html(request):
        return error_page(error.code.http_status, str(error.code), error.message)
    return JSONResponse(error.body(), status_code=error.code.http_status)


async def _invalid(request: Request, error: Exception) -> Response:
    """A request FastAPI could not validate: a query string that does not fit its model is an
    API error (``analytics.parameters``); a body that does not fit its model (the operator
    API's) is ``invalid-request`` with every problem."""
    assert isinstance(error, RequestValidationError)
    problems = error.errors()
    if problems and problems[0].get("loc", ("",))[0] == "body":
        message = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}"
            for problem in problems
        )
        return JSONResponse({"code": "invalid-request", "message": message}, 400)
    return await _refused(request, refusal(request, error))


def analytics_app(
    analytics: Analytics,
    *,
    authenticator: StaffAuthenticator,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    healthy: Callable[[], bool] = lambda: True,
) -> FastAPI:
    """The analytics API over ``analytics``, behind the gate of ``analytics.access``
    (tokens verified by ``authenticator``, bodies up to ``max_body_bytes``); ``healthy`` says
    whether the sink still runs."""
    app = FastAPI(
        title="imstream analytics",
        version="1",
        description="Named, replay-safe analytics over the ClickHouse audit log "
        "(docs/analytics.md).",
    )
    app.state.analytics = analytics
    app.include_router(quality_router())

    @app.get("/healthz", summary="Liveness: 200 while the sink loop runs")
    async def healthz() -> JSONResponse:
        running = healthy()
        return JSONResponse(
            {"status": "ok" if running else "stopped"}, status_code=200 if running else 503
        )

    @app.get("/v1/analytics", summary="The named analytics queries")
    async def list_queries(service: AnalyticsDep) -> dict[str, Any]:
        return {"queries": service.describe()}

    @app.get(
        "/v1/analytics/{name}",
        summary="Run a named query: ?tenant=&from=&to= (RFC 3339 with an offset)",
        responses={
            400: {"description": "unknown-parameter or invalid-parameter"},
            404: {"description": "unknown-query"},
            503: {"description": "unavailable: ClickHouse did not answer"},
        },
        dependencies=[Depends(once_each)],
    )
    async def run_query(
        query: NamedQueryDep,
        asked: Annotated[AnalyticsParameters, Query()],
        service: AnalyticsDep,
    ) -> dict[str, Any]:
        now = datetime.now(UTC)
        return await service.run(
            query, window(query, asked.tenant, asked.start, asked.end, now=now)
        )

    async def busy(_request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, QueryBusyError)
        body = {"code": "busy", "message": str(error), "field": None}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    async def not_allowed(_request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StaffAuthError)
        return JSONResponse(error.body(), status_code=error.status)

    app.add_exception_handler(ApiError, _refused)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(QueryBusyError, busy)
    app.add_exception_handler(StaffAuthError, not_allowed)
    # Around every route, those added later (the operator API) and FastAPI's own (/docs) too.
    app.add_middleware(ApiGate, authenticator=authenticator, max_body_bytes=max_body_bytes)
    # The built-in dashboards page (GET /dashboards): dashboards/ drawn from the same store.
    app.include_router(dashboards_router(DashboardPages(analytics.store)))
    app.include_router(search_router)
    return app


class AnalyticsServer:
    """uvicorn serving ``app`` on ``host:port`` from a daemon thread.

    The socket is bound in the constructor, so an address in use is reported before anything
    starts (``AnalyticsServerError`` naming the settings to change); port 0 picks a free port
    (``port`` tells which).
    """

    def __init__(
        self, app: FastAPI, host: str, port: int, *, tls: ssl.SSLContext | None = None
    ) -> None:
        """``tls``: serve https only with this context (``core.tls.server_context``)."""
        try:
            family, kind, protocol, _, address = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )[0]
            self._socket = socket.socket(family, kind, protocol)
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.bind(address)
        except OSError as error:
            raise AnalyticsServerError(
                f"the analytics endpoint cannot listen on {host}:{port} ({error}); set "
                "IM_SINKS__ANALYTICS_HOST / IM_SINKS__ANALYTICS_PORT to a free address"
            ) from error
        self.host = host
        self.port = int(self._socket.getsockname()[1])
        self.scheme = "https" if tls is not None else "http"
        self._server = uvicorn.Server(
            uvicorn.Config(
                app, log_config=None, access_log=False, lifespan="off", **uvicorn_tls_options(tls)
            )
        )
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._socket]},
            name="analytics-http",
            daemon=True,
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def start(self) -> None:
        """Serve, and return once the server accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise AnalyticsServerError(
                    f"the analytics endpoint on {self.host}:{self.port} did not start"
                )
            time.sleep(0.02)
        log.info("analytics endpoint on %s", self.url)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(STOP_TIMEOUT_SECONDS)
        self._socket.close()
