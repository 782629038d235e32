"""Running the ingress under uvicorn: ``imstream run ingress``.

uvicorn is configured for many idle sockets: the ``wsproto`` WebSocket implementation (about
30 KB per idle socket against 69 KB for ``websockets-sansio`` and 144 KB for ``websockets``),
no per-message deflate (its compression contexts cost hundreds of KB per socket), no
WebSocket-level ping (the protocol has its own ``ping`` and idle timeout), and a hard frame limit
of ``HARD_LIMIT_FACTOR`` times ``max_frame_bytes`` (larger frames close the socket with 1009;
frames between the two limits get ``frame-too-large`` and the socket stays open).

SIGTERM and SIGINT drain gracefully (see ``ingress/app.py``) and the process then exits with
status 0; a second SIGINT stops at once.

Once the socket listens and ``/readyz`` first holds (Kafka answers, live delivery is assigned),
the node logs ``READY_MESSAGE`` and writes its ready file (``core/readiness.py``): what
``imstream up`` waits for before it says "up".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Final

import uvicorn

from core.readiness import ReadyFile
from ingress.app import IngressApp, create_app
from ingress.gateway import HARD_LIMIT_FACTOR, WEBSOCKET_PATH
from ingress.wsprotocol import gateway_ws_protocol
from pipelines.settings import Settings

_log = logging.getLogger(__name__)

READY_MESSAGE: Final = "ingress ready"
#: How often a starting node asks its gateway whether it is ready yet.
READY_POLL_SECONDS: Final = 0.1

#: Pending connections the kernel queues while the loop is busy (a reconnect storm after
#: another node drained); capped by ``net.core.somaxconn``.
BACKLOG: Final = 4096


class IngressStartError(RuntimeError):
    """The ingress cannot start; the message says what to do."""


class IngressServer(uvicorn.Server):
    """uvicorn's server, but a signal ends it with a clean exit after the drain.

    uvicorn re-raises a caught SIGTERM/SIGINT once it has shut down, which would end a drained,
    healthy process with "killed by signal"; an orchestrator then reports a failure.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        #: Logged once the socket accepts connections.
        self.listening_message: str | None = None
        #: Announced once the socket accepts connections and the gateway is ready.
        self.ready_file = ReadyFile(None)
        self._announcing: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.listening_message:
            _log.info("%s", self.listening_message)
        app = self.config.app
        if self.started and isinstance(app, IngressApp):
            self._announcing = asyncio.get_running_loop().create_task(
                self._announce_when_ready(app)
            )

    async def _announce_when_ready(self, app: IngressApp) -> None:
        while not self.should_exit:
            readiness = await app.gateway.readiness()
            if readiness.ready:
                detail = f"node {app.gateway.node_id}"
                _log.info("%s: %s", READY_MESSAGE, detail)
                self.ready_file.announce(detail)
                return
            await asyncio.sleep(READY_POLL_SECONDS)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


def build_server(settings: Settings, app: IngressApp | None = None) -> IngressServer:
    """A uvicorn server for the ingress app (not yet listening)."""
    ingress = settings.ingress
    config = uvicorn.Config(
        app or create_app(settings),
        host=ingress.host,
        port=ingress.port,
        ws=gateway_ws_protocol(ingress.close_timeout_seconds),
        ws_max_size=HARD_LIMIT_FACTOR * ingress.max_frame_bytes,
        ws_per_message_deflate=False,
        ws_ping_interval=None,
        ws_ping_timeout=None,
        lifespan="on",
        log_config=None,
        access_log=False,
        backlog=BACKLOG,
        timeout_graceful_shutdown=math.ceil(ingress.shutdown_flush_timeout_seconds),
    )
    return IngressServer(config)


def bind(host: str, port: int) -> socket.socket:
    """A bound listening socket, or an operator-readable error (port in use, bad host)."""
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        raise IngressStartError(
            f"[bad-host] IM_INGRESS__HOST={host!r} does not resolve: {error}"
        ) from error
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise IngressStartError(
            f"[port-in-use] cannot listen on {host}:{port}: {error.strerror}. Stop the process "
            f"holding it (`ss -ltnp 'sport = :{port}'` shows it) or set IM_INGRESS__PORT"
        ) from error
    sock.set_inheritable(True)
    return sock


async def serve(settings: Settings) -> None:
    """Run the ingress until SIGTERM/SIGINT, then drain; raises ``IngressStartError``."""
    ingress = settings.ingress
    try:
        server = build_server(settings)
        # Users' searches are signed with the service key: a placeholder stops the node now.
        settings.real_secret(settings.service_auth.secret, "IM_SERVICE_AUTH__SECRET")
    except ValueError as error:
        raise IngressStartError(f"[settings-invalid] {error}") from error
    sock = bind(ingress.host, ingress.port)
    server.listening_message = (
        f"ingress node {ingress.node_id} listening on ws://{ingress.host}:{ingress.port}"
        f"{WEBSOCKET_PATH} (REST and OpenAPI at http://{ingress.host}:{ingress.port}/docs)"
    )
    server.ready_file = ReadyFile(settings.ready_file)
    try:
        await server.serve(sockets=[sock])
    finally:
        server.ready_file.withdraw()
    if not server.started:
        raise IngressStartError("[start-failed] the ingress did not start; see the log above")
