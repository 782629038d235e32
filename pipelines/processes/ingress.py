"""The ``ingress`` process: one WebSocket/REST gateway node."""

from __future__ import annotations

import asyncio
import logging

import uvloop

from core.readiness import ReadyFile
from core.settings import Settings
from ingress.app import IngressApp, create_app, create_internal_app
from ingress.gateway import WEBSOCKET_PATH
from ingress.server import (
    FAILED_EXIT_CODE,
    IngressFailedError,
    IngressStartError,
    bind,
    build_internal_server,
    build_server,
)

log = logging.getLogger(__name__)


async def serve(settings: Settings, app: IngressApp | None = None) -> None:
    """Run the ingress until SIGTERM/SIGINT, then drain; raises ``IngressStartError``, or
    ``IngressFailedError`` once it stopped because it could not recover."""
    ingress = settings.ingress
    try:
        # The clients' key verifies every hello, and users' searches are signed with the service
        # key: a placeholder of either stops the node now.
        settings.check_client_key()
        settings.real_secret(settings.service_auth.secret, "IM_SERVICE_AUTH__SECRET")
        # Stored bodies are opened with the master key: a development or malformed one too.
        settings.master_key()
        settings.previous_master_key()
        app = app or create_app(settings)
        server = build_server(settings, app)
        internal = build_internal_server(settings, create_internal_app(app))
    except ValueError as error:
        raise IngressStartError(f"[settings-invalid] {error}") from error
    sock = bind(ingress.host, ingress.port)
    try:
        internal_sock = bind(
            ingress.internal_host, ingress.internal_port, setting="IM_INGRESS__INTERNAL_PORT"
        )
    except IngressStartError:
        sock.close()
        raise
    secure = "s" if ingress.tls_cert_path is not None else ""
    internal_url = f"http://{ingress.internal_host}:{ingress.internal_port}"
    server.listening_message = (
        f"ingress node {ingress.node_id} listening on ws{secure}://{ingress.host}:{ingress.port}"
        f"{WEBSOCKET_PATH}; metrics and API docs at {internal_url}/metrics and /docs"
    )
    server.ready_file = ReadyFile(settings.ready_file)
    serving_internal = asyncio.get_running_loop().create_task(
        internal.serve(sockets=[internal_sock])
    )
    try:
        await server.serve(sockets=[sock])
    finally:
        server.ready_file.withdraw()
        internal.should_exit = True
        await serving_internal
    if not server.started:
        raise IngressStartError("[start-failed] the ingress did not start; see the log above")
    if server.failure is not None:
        raise IngressFailedError(server.failure)


def main(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT on uvloop; returns the process exit code (1: it could not
    start, ``FAILED_EXIT_CODE``: it stopped because it could not recover)."""
    try:
        uvloop.run(serve(settings))
    except IngressStartError as error:
        log.error("%s", error)
        return 1
    except IngressFailedError as error:
        log.critical("the node stopped because it cannot recover: %s", error)
        return FAILED_EXIT_CODE
    return 0
