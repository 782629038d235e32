"""Running the ingress under uvicorn: ``imstream run ingress``.

uvicorn is configured for many idle sockets: the ``wsproto`` WebSocket implementation (about
30 KB per idle socket against 69 KB for ``websockets-sansio`` and 144 KB for ``websockets``),
no per-message deflate (its compression contexts cost hundreds of KB per socket), no
WebSocket-level ping (the protocol has its own ``ping`` and idle timeout), and a hard frame limit
of ``HARD_LIMIT_FACTOR`` times ``max_frame_bytes`` (larger frames close the socket with 1009;
frames between the two limits get ``frame-too-large`` and the socket stays open).

With ``IM_INGRESS__TLS_CERT_PATH`` and ``IM_INGRESS__TLS_KEY_PATH`` the node serves https and
wss only, TLS 1.3 at least; the gateway's frames, written straight to the transport
(``ingress/wsprotocol.py``), then go through asyncio's TLS transport the same way.

SIGTERM and SIGINT drain gracefully (see ``ingress/app.py``) and the process then exits with
status 0; a second SIGINT stops at once. A node that cannot recover on its own (a fatal producer
error, a dead live-delivery thread: ``Gateway.failure``) is unready at once, drains the same way
and exits with status 70, so that its supervisor (``imstream up``, compose's restart policy)
starts a fresh one; before, it stayed up as a zombie that accepted sockets and delivered nothing.

A second, internal listener (``IM_INGRESS__INTERNAL_HOST``:``IM_INGRESS__INTERNAL_PORT``, the
loopback by default) serves ``/metrics``, the API documentation and the health checks
(``ingress.app.create_internal_app``); it starts and stops with the client listener.

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
from fastapi import FastAPI

from core.readiness import ReadyFile
from core.settings import Settings
from core.tls import server_context, uvicorn_tls_options
from ingress.app import IngressApp, create_app
from ingress.gateway import HARD_LIMIT_FACTOR
from ingress.wsprotocol import gateway_ws_protocol

_log = logging.getLogger(__name__)

READY_MESSAGE: Final = "ingress ready"
#: How often a starting node asks its gateway whether it is ready yet.
READY_POLL_SECONDS: Final = 0.1
#: How often a running node checks that it can still work (``Gateway.failure``).
WATCH_SECONDS: Final = 1.0
#: The exit status of a node that stopped because it could not recover (as the stream worker's).
FAILED_EXIT_CODE: Final = 70

#: Pending connections the kernel queues while the loop is busy (a reconnect storm after
#: another node drained); capped by ``net.core.somaxconn``.
BACKLOG: Final = 4096


class IngressStartError(RuntimeError):
    """The ingress cannot start; the message says what to do."""


class IngressFailedError(RuntimeError):
    """The ingress stopped because it could not recover (``Gateway.failure``); restart it."""


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
        #: Why the node stopped on its own, if it did (``_watch``).
        self.failure: str | None = None
        self._announcing: asyncio.Task[None] | None = None
        self._watching: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.listening_message:
            _log.info("%s", self.listening_message)
        app = self.config.app
        if self.started and isinstance(app, IngressApp):
            self._announcing = asyncio.get_running_loop().create_task(
                self._announce_when_ready(app)
            )
            self._watching = asyncio.get_running_loop().create_task(self._watch(app))

    async def _watch(self, app: IngressApp) -> None:
        """Stop the server (a drain) once the gateway cannot recover; ``serve`` then raises."""
        while not self.should_exit:
            failure = app.gateway.failure()
            if failure is not None:
                node = app.gateway.node_id
                _log.error("ingress node %s cannot recover (%s); exiting", node, failure)
                self.failure = failure
                self.ready_file.withdraw()
                self.should_exit = True
                return
            await asyncio.sleep(WATCH_SECONDS)

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


class InternalServer(uvicorn.Server):
    """The internal listener: no signal handling of its own (the client listener's server
    drains on SIGTERM and then stops this one)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def build_internal_server(settings: Settings, app: FastAPI) -> InternalServer:
    """A uvicorn server for the internal app (not yet listening)."""
    config = uvicorn.Config(
        app,
        host=settings.ingress.internal_host,
        port=settings.ingress.internal_port,
        lifespan="off",
        log_config=None,
        access_log=False,
    )
    return InternalServer(config)


def build_server(settings: Settings, app: IngressApp | None = None) -> IngressServer:
    """A uvicorn server for the ingress app (not yet listening); with a certificate it serves
    https and wss only, TLS 1.3 at least (``core/tls.py``). Raises ``TlsSettingsError`` when the
    certificate or key cannot be loaded."""
    ingress = settings.ingress
    tls = None
    if ingress.tls_cert_path is not None and ingress.tls_key_path is not None:
        tls = server_context(ingress.tls_cert_path, ingress.tls_key_path)
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
        **uvicorn_tls_options(tls),
    )
    return IngressServer(config)


def bind(host: str, port: int, *, setting: str = "IM_INGRESS__PORT") -> socket.socket:
    """A bound listening socket, or an operator-readable error (port in use, bad host)."""
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        raise IngressStartError(
            f"[bad-host] {setting.replace('PORT', 'HOST')}={host!r} does not resolve: {error}"
        ) from error
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise IngressStartError(
            f"[port-in-use] cannot listen on {host}:{port}: {error.strerror}. Stop the process "
            f"holding it (`ss -ltnp 'sport = :{port}'` shows it) or set {setting}"
        ) from error
    sock.set_inheritable(True)
    return sock
