"""The gateway: authenticates sockets, turns client commands into events, and delivers live ones.

One ``Gateway`` per ingress process, shared by the WebSocket endpoint (:meth:`serve_websocket`, a
plain ASGI handler) and the REST routes (:meth:`execute`). docs/protocol.md is the contract; this
module is its implementation.

Delivery guarantees
  * ``accepted`` (and ``ok`` for the other publishing commands) is sent only after
    :class:`~ingress.producer.DurableProducer` returned, i.e. after Kafka acknowledged the event
    with ``acks=all`` from an idempotent producer. Any failure answers ``error`` instead
    (``unavailable`` with ``retry_after_ms`` when Kafka did not acknowledge in time); the client
    retries with the same ids, and the stream processors deduplicate on them.
  * Events go where the topic catalog routes them (``TopicCatalog.route``), keyed by
    conversation (messages, conversation commands, read receipts, typing), by user (their own
    mute and badge, and their devices' presence) or by device (push tokens).
  * Presence (``device.connected`` / ``device.disconnected``, key ``tenant/user``, with this
    node's id) is at least once: published when a ``hello`` succeeds and when its socket
    closes; a connection replaced by a newer one of the same device publishes no disconnect.
    The node renews a lease for all its connections (``ingress/presence.py``), so a lost
    disconnect leaves a device online for at most ``IM_INGRESS__PRESENCE_LEASE_SECONDS``.
  * Live delivery is best effort (see ``ingress/live.py``); a device recovers by syncing.
  * Revocations (``ingress/revocations.py``) are read from the start of their topic before the
    node takes a connection, refuse revoked tokens at ``hello``, ``refresh_token`` and on REST
    (``token-revoked``), and close the open sockets they match (4005) as they arrive.

Concurrency: every socket's frames are handled on the event loop in the order they arrive.
Commands that publish run as tasks, so a client may pipeline them; each is handed to Kafka in
arrival order (the produce call happens before the task first waits) and answered, by ``id``,
when Kafka acknowledged it. Nothing blocks the loop: Kafka's clients run in their own threads.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from prometheus_client import Counter, Gauge
from pydantic import TypeAdapter, ValidationError
from starlette.types import Message, Receive, Scope, Send

from core.auth import AuthError, AuthErrorCode, Claims, TokenVerifier, read_public_key
from core.connections import kafka_config, kafka_producer_config
from core.settings import PLACEHOLDER_SECRETS, AuthSettings, Settings
from ingress.commands import PublishingCommand, event_for, is_publishing, reply_for
from ingress.connection import (
    Connection,
    ConnectionHub,
    ConnectionRegistry,
    Principal,
    Wire,
    truncate_reason,
)
from ingress.groups import GroupDeliveryConsumer, GroupFrame, GroupIndex, GroupMetrics
from ingress.live import LiveDeliveryConsumer, LiveFrame, LiveMetrics
from ingress.metrics import IngressMetrics
from ingress.presence import LeaseRenewer
from ingress.producer import DurableProducer, KafkaUnavailable, PublishRejectedError
from ingress.ratelimit import Limit, Refusal, ScopedLimiter, retry_after_ms
from ingress.reads import ReadFrame, Reads, is_reading
from ingress.revocations import RevocationList, RevocationReader, revokes
from ingress.wsprotocol import DRAIN_REASON, WIRE_EXTENSION, text_frame
from schemas import frames as fr
from schemas.errors import CloseCode, ErrorCode, SchemaError
from schemas.events import (
    Actor,
    DeviceConnected,
    DeviceDisconnected,
    DevicePresencePayload,
    Event,
    NodeId,
    RevocationScope,
    TokensRevoked,
    UserId,
    encode_event,
)
from schemas.topics import KeyKind, Topic, conversation_key, event_key, topic_catalog
from sinks.cql.rules import ACCESS_EVENT_TYPES

_log = logging.getLogger(__name__)

#: The WebSocket endpoint's path.
WEBSOCKET_PATH: Final = "/v1/ws"
#: Frames above ``max_frame_bytes`` get ``frame-too-large``; frames above this many times it
#: close the socket with 1009 (the WebSocket layer refuses to buffer them).
HARD_LIMIT_FACTOR: Final = 4
_AUTH_CLOSE_CODES: Final = {
    AuthErrorCode.TOKEN_INVALID: CloseCode.TOKEN_INVALID,
    AuthErrorCode.TOKEN_EXPIRED: CloseCode.TOKEN_EXPIRED,
    AuthErrorCode.TENANT_MISMATCH: CloseCode.TENANT_MISMATCH,
    AuthErrorCode.TOKEN_REVOKED: CloseCode.TOKEN_REVOKED,
}
_NODE_ID = TypeAdapter[str](NodeId)
_USER_ID = TypeAdapter[str](UserId)
#: What the frame-type metric labels may be: every frame type there is.
_FRAME_TYPES: Final = (*fr.CLIENT_FRAME_TYPES, *fr.SERVER_FRAME_TYPES)


class RefusalError(Exception):
    """A frame that cannot be answered with anything but this error frame (REST and sockets)."""

    def __init__(self, frame: fr.ErrorFrame) -> None:
        super().__init__(frame.message)
        self.frame = frame


@dataclass(frozen=True, slots=True)
class Readiness:
    """What ``/readyz`` reports."""

    kafka: bool
    live_delivery: bool
    draining: bool
    #: Reads only: sends never depend on the serving store, so it does not decide readiness.
    serving_store: bool = False
    #: The revocation topic was read up to its end at start-up (until then no token is let in).
    revocations: bool = False
    #: Why the node can never be ready again and is exiting to be restarted (``failure``).
    failed: str | None = None

    @property
    def ready(self) -> bool:
        return (
            self.kafka
            and self.live_delivery
            and self.revocations
            and not self.draining
            and self.failed is None
        )


def token_verifier(auth: AuthSettings) -> TokenVerifier:
    """The verifier the settings describe; a misconfiguration raises ``ValueError`` at start-up.

    With a JWKS, the development placeholder secret is not used as the single key: tokens
    without a ``kid`` then need a real secret (or RS256 public key) of their own.
    """
    public_key = read_public_key(auth.jwt_public_key_path, "IM_AUTH__JWT_PUBLIC_KEY_PATH")
    secret = auth.jwt_secret.get_secret_value() if auth.jwt_algorithm == "HS256" else None
    if (auth.jwks_path or auth.jwks_url) is not None and secret in PLACEHOLDER_SECRETS:
        secret = None
    return TokenVerifier(
        algorithm=auth.jwt_algorithm,
        secret=secret,
        public_key_pem=public_key,
        issuer=auth.jwt_issuer,
        audience=auth.jwt_audience,
        leeway_seconds=auth.jwt_leeway_seconds,
        max_lifetime=timedelta(seconds=auth.jwt_max_lifetime_seconds),
        jwks_path=auth.jwks_path,
        jwks_check_seconds=auth.jwks_check_seconds,
        jwks_url=auth.jwks_url,
        jwks_refresh_seconds=auth.jwks_refresh_seconds,
    )


def error_frame(
    code: ErrorCode,
    message: str,
    request_id: str | None = None,
    *,
    field: str | None = None,
    retry_after: int | None = None,
) -> fr.ErrorFrame:
    return fr.ErrorFrame(
        id=request_id, code=code, message=message, field=field, retry_after_ms=retry_after
    )


class Gateway:
    """Everything one ingress node does between its sockets and Kafka."""

    def __init__(self, settings: Settings, *, metrics: IngressMetrics | None = None) -> None:
        """Builds every client from ``settings``; nothing is contacted before :meth:`start`.

        Raises ``ValueError`` for a misconfiguration (JWT keys, node id) so that the process
        refuses to start rather than refusing every client.
        """
        ingress = settings.ingress
        self._token_leeway = settings.auth.jwt_leeway_seconds
        try:
            self.node_id: str = _NODE_ID.validate_python(ingress.node_id)
        except ValidationError:
            raise ValueError(
                f"IM_INGRESS__NODE_ID={ingress.node_id!r} is not a valid node id: 1-64 "
                "characters of A-Z a-z 0-9 . _ : @ + = -"
            ) from None
        #: This node's settings (limits, timeouts).
        self.ingress = ingress
        #: Where each tenant's pushes may go: a push token may name only these apps.
        self.push_apps = settings.push.apps_for
        self.max_frame_bytes = ingress.max_frame_bytes
        self.catalog = topic_catalog(settings)
        #: ``catalog.route``'s topic per event type, found once: route walks every topic (and
        #: the payload's missing attributes, through pydantic's slow path) for every command.
        self._inbound: dict[str, Topic] = {}
        self.verifier = token_verifier(settings.auth)
        self.metrics = metrics or IngressMetrics(frame_types=_FRAME_TYPES)
        self.closes = Counter(
            "imstream_ingress_closes",
            "WebSockets closed by the server, by close code name.",
            ["code"],
            registry=self.metrics.registry,
        )
        self.live_metrics = LiveMetrics(self.metrics.registry)
        client_id = f"{settings.kafka.client_id_prefix}-ingress-{self.node_id}"
        self.producer = DurableProducer(
            kafka_producer_config(settings, **{"client.id": client_id}),
            message_timeout_ms=ingress.kafka_message_timeout_ms,
            linger_ms=ingress.kafka_linger_ms,
            max_queued_messages=ingress.kafka_max_queued_messages,
            retry_after_ms=ingress.unavailable_retry_after_ms,
            latency_observer=self.metrics.produce_latency.observe,
        )
        self.metrics.kafka_queued_records.set_function(lambda: self.producer.queued)
        self.live = LiveDeliveryConsumer(
            kafka_config(settings, **{"client.id": f"{client_id}-live"}),
            topic=self.catalog.live_delivery.name,
            node_id=self.node_id,
            deliver=self.deliver,
            metrics=self.live_metrics,
        )
        self.lease = LeaseRenewer(
            self.producer,
            self.catalog.presence,
            node_id=self.node_id,
            renew_seconds=ingress.presence_renew_seconds,
            lease_seconds=ingress.presence_lease_seconds,
        )
        self.group_metrics = GroupMetrics(self.metrics.registry)
        #: The large groups of the users connected here (ingress/groups.py).
        self.group_index = GroupIndex()
        self.groups = GroupDeliveryConsumer(
            kafka_config(settings, **{"client.id": f"{client_id}-groups"}),
            topic=self.catalog.group_delivery.name,
            node_id=self.node_id,
            deliver=self.deliver_groups,
            metrics=self.group_metrics,
        )
        rate, burst = ingress.rate_limit_per_second, ingress.rate_limit_burst
        self.limiter = ScopedLimiter(
            [
                Limit("device", rate, burst),
                Limit(
                    "user",
                    ingress.user_rate_limit_per_second or 2 * rate,
                    ingress.user_rate_limit_burst or 2 * burst,
                ),
                Limit(
                    "tenant",
                    ingress.tenant_rate_limit_per_second or 500 * rate,
                    ingress.tenant_rate_limit_burst or 500 * burst,
                ),
            ],
            max_keys=ingress.rate_limit_max_keys,
        )
        auth = settings.auth
        #: The revocations in force (ingress/revocations.py), and the reader that fills them.
        self.revocations = RevocationList(
            timedelta(seconds=auth.jwt_max_lifetime_seconds + 3 * auth.jwt_leeway_seconds)
        )
        self.revocation_reader = RevocationReader(
            kafka_config(settings, **{"client.id": f"{client_id}-revocations"}),
            topic=self.catalog.revocations.name,
            node_id=self.node_id,
            deliver=self.apply_revocations,
            caught_up=self._revocations_read,
        )
        Gauge(
            "imstream_ingress_revocations",
            "Revocations in force on this node (each is dropped once every token it can match "
            "has expired).",
            registry=self.metrics.registry,
        ).set_function(lambda: len(self.revocations))
        self.reads = Reads(settings)
        self.registry = ConnectionRegistry()
        self.hub = ConnectionHub(
            max_frames=ingress.outbound_queue_frames,
            max_bytes=ingress.outbound_queue_bytes,
            stall_seconds=ingress.slow_consumer_seconds,
            frame_sent=self._frame_sent,
            closed=lambda code: self.closes.labels(code.name.lower().replace("_", "-")).inc(),
        )
        self.metrics.outbound_queued_frames.set_function(lambda: self.hub.queued_frames)
        self.draining = False
        self._handlers = 0
        #: Sockets accepted that have not been authenticated yet, by client address and in all.
        self._pending_by_address: dict[str, int] = {}
        self._pending_total = 0
        self._no_handlers = asyncio.Event()
        self._no_handlers.set()
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the producer, the live-delivery consumer and the idle sweeper.

        Kafka need not be reachable: sends then answer ``unavailable`` and ``/readyz`` says so.
        """
        await self.producer.start()
        self.revocation_reader.start()
        # First of all this node's records on each presence partition: its connects follow it.
        self.lease.start()
        self.live.start()
        self.groups.start()
        self.reads.start()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_idle())
        _log.info("ingress node %s started; live delivery from %s", self.node_id, self.live.topic)

    async def stop(self) -> None:
        """Drain: close every socket with server-draining (4010), let their handlers publish
        ``device.disconnected``, then flush the producer (bounded by the shutdown timeout)."""
        self.draining = True
        timeout = self.ingress.shutdown_flush_timeout_seconds
        for connection in self.registry:
            connection.close(CloseCode.SERVER_DRAINING, DRAIN_REASON)
        try:
            async with asyncio.timeout(timeout):
                await self._no_handlers.wait()
                while self.hub.tasks:  # a finishing task may have started another
                    await asyncio.wait(set(self.hub.tasks))
        except TimeoutError:
            _log.warning(
                "%d socket handler(s) and %d task(s) still running at the drain deadline",
                self._handlers,
                len(self.hub.tasks),
            )
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.lease.stop()
        await self.live.stop()
        await self.groups.stop()
        await self.revocation_reader.stop()
        await self.reads.stop()
        unacknowledged = await self.producer.close(timeout)
        _log.info(
            "ingress node %s drained (%d record(s) unacknowledged at shutdown)",
            self.node_id,
            unacknowledged,
        )

    def verify_token(
        self, token: str | None, tenant_id: str, device_id: str | None = None
    ) -> Claims:
        """The token's claims, or ``AuthError``; the ids it names must be valid ids, since they
        become event fields and Kafka keys, and the token must not be revoked (``device_id``:
        the device using it, when the token names none).

        Before the revocations were read at start-up, ``RefusalError`` (``unavailable``): the
        node cannot tell yet whether the token was revoked."""
        if not self.revocations.ready:
            raise RefusalError(self._not_ready())
        claims = self.verifier.verify(token, tenant_id)
        try:
            _USER_ID.validate_python(claims.user_id)
            if claims.device_id is not None:
                _USER_ID.validate_python(claims.device_id)
        except ValidationError:
            raise AuthError(
                AuthErrorCode.TOKEN_INVALID,
                "the token's 'sub' or 'did' is not a valid id (1-64 characters of "
                "A-Z a-z 0-9 . _ : @ + = -)",
            ) from None
        refusal = self.revocations.refusal(claims, device_id)
        if refusal is not None:
            raise AuthError(AuthErrorCode.TOKEN_REVOKED, refusal)
        return claims

    def _not_ready(self) -> fr.ErrorFrame:
        return error_frame(
            ErrorCode.UNAVAILABLE,
            "this node is starting: it has not read the token revocations yet; retry",
            retry_after=self.ingress.unavailable_retry_after_ms,
        )

    def _revocations_read(self) -> None:
        """On the loop, after the last batch of the start-up read was applied."""
        self.revocations.ready = True
        _log.info(
            "ingress node %s read the revocations: %d in force",
            self.node_id,
            len(self.revocations),
        )

    def apply_revocations(self, events: Sequence[TokensRevoked]) -> None:
        """Take in revocations read from the topic and close the sockets they revoke (on the
        loop)."""
        for event in events:
            if not self.revocations.add(event):
                continue  # past its horizon: it can match no valid token
            self._close_revoked(event)

    def _close_revoked(self, event: TokensRevoked) -> None:
        payload = event.payload
        if payload.scope is RevocationScope.TOKEN:
            connections = list(self.registry)
        else:
            assert payload.user_id is not None
            devices = self.registry.devices(event.tenant_id, payload.user_id)
            if payload.scope is RevocationScope.DEVICE:
                connections = [devices[payload.device_id]] if payload.device_id in devices else []
            else:
                connections = list(devices.values())
        why = f": {payload.reason}" if payload.reason else ""
        reason = f"the token was revoked (scope {payload.scope}){why}; sign in again"
        for connection in connections:
            if revokes(
                event,
                connection.principal.tenant_id,
                connection.token_id,
                connection.token_issued_at,
            ):
                connection.close(CloseCode.TOKEN_REVOKED, reason)

    async def readiness(self) -> Readiness:
        kafka = await self.producer.ready(self.ingress.readyz_timeout_seconds)
        return Readiness(
            kafka=kafka,
            live_delivery=self.live.assigned and self.groups.assigned,
            draining=self.draining,
            serving_store=self.reads.connected,
            # Read at start-up, and still followed (a reader stopped by a bug is not).
            revocations=self.revocations.ready and self.revocation_reader.assigned,
            failed=self.failure(),
        )

    def failure(self) -> str | None:
        """Why this node cannot recover on its own, or None: a fatal producer error (librdkafka
        refuses every record), or a dead live-, group-delivery or revocation thread (nothing
        reaches the sockets live, or revocations stop applying). Either makes it unready and,
        through the server's watch (``ingress/server.py``), exit with status 70 so that its
        supervisor restarts it."""
        fatal = self.producer.fatal_error
        if fatal is not None:
            return f"fatal Kafka producer error: {fatal.str()}"
        for reader in (self.live, self.groups, self.revocation_reader):
            if reader.dead:
                return f"the {reader.topic} consumer thread died"
        return None

    # -- the WebSocket endpoint ------------------------------------------------------------------

    async def serve_websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI handler of ``/v1/ws``: hello, then frames until the socket closes."""
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        wire: Wire | None = scope.get("extensions", {}).get(WIRE_EXTENSION, {}).get("wire")
        if wire is None:
            # Frames are written straight to the wire (ingress.wsprotocol): served by another
            # server than build_server's, the gateway cannot write them.
            _log.error("refused a WebSocket: no %s (not the ingress's server)", WIRE_EXTENSION)
            await send({"type": "websocket.close", "code": 1011})
            return
        address = str((scope.get("client") or ("unknown",))[0])
        refusal = self._pending_refusal(address)
        if refusal is None and not self.revocations.ready:
            refusal = self._not_ready()
        if refusal is not None:
            await self._refuse_handshake(send, refusal)
            return
        self._pending(address, +1)
        pending = True
        self._handlers += 1
        self._no_handlers.clear()
        try:
            await send({"type": "websocket.accept"})
            if self.draining:
                await self._refuse(send, None, CloseCode.SERVER_DRAINING, DRAIN_REASON)
                return
            connection = await self._authenticate(receive, send, wire)
            self._pending(address, -1)
            pending = False
            if connection is not None:
                await self._serve(connection, receive)
        finally:
            if pending:
                self._pending(address, -1)
            self._handlers -= 1
            if not self._handlers:
                self._no_handlers.set()

    def _pending(self, address: str, change: int) -> None:
        self._pending_total += change
        count = self._pending_by_address.get(address, 0) + change
        if count:
            self._pending_by_address[address] = count
        else:
            del self._pending_by_address[address]

    def _pending_refusal(self, address: str) -> fr.ErrorFrame | None:
        """Why a new socket from ``address`` is refused before its handshake completes: too many
        sockets that have not said ``hello`` yet, from that address or in all."""
        ingress = self.ingress
        if self._pending_by_address.get(address, 0) >= ingress.max_pending_sockets_per_address:
            limit, scope = ingress.max_pending_sockets_per_address, "from this address"
        elif self._pending_total >= ingress.max_pending_sockets:
            limit, scope = ingress.max_pending_sockets, "on this node"
        else:
            return None
        return error_frame(
            ErrorCode.RATE_LIMITED,
            f"{limit} sockets {scope} have not said hello yet; retry in a moment",
            retry_after=ingress.unavailable_retry_after_ms,
        )

    async def _refuse_handshake(self, send: Send, problem: fr.ErrorFrame) -> None:
        """Answer the upgrade request with 429 and the error frame, before accepting anything."""
        self.metrics.error(problem.code)
        body = problem.model_dump_json().encode()
        retry_after = math.ceil((problem.retry_after_ms or 0) / 1000)
        await send(
            {
                "type": "websocket.http.response.start",
                "status": problem.code.http_status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(retry_after).encode()),
                ],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})

    async def _authenticate(self, receive: Receive, send: Send, wire: Wire) -> Connection | None:
        """Wait for a valid ``hello``; register the connection, or refuse and close."""
        timeout = self.ingress.auth_timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                message = await receive()
        except TimeoutError:
            problem = error_frame(ErrorCode.AUTH_REQUIRED, f"no hello within {timeout:g} s")
            await self._refuse(send, problem, CloseCode.AUTH_REQUIRED)
            return None
        if message["type"] == "websocket.disconnect":
            return None
        try:
            hello = self._hello(message)
            claims = self.verify_token(hello.token, hello.tenant_id, hello.device_id)
        except RefusalError as refusal:
            await self._refuse(send, refusal.frame, CloseCode.AUTH_REQUIRED)
            return None
        except AuthError as error:
            problem = error_frame(ErrorCode(error.code.value), error.message, hello.id)
            await self._refuse(send, problem, _AUTH_CLOSE_CODES[error.code])
            return None
        if claims.device_id is not None and claims.device_id != hello.device_id:
            problem = error_frame(
                ErrorCode.TOKEN_INVALID,
                f"the token was issued to device {claims.device_id!r}, not {hello.device_id!r}",
                hello.id,
            )
            await self._refuse(send, problem, CloseCode.TOKEN_INVALID)
            return None
        if self.draining:
            await self._refuse(send, None, CloseCode.SERVER_DRAINING, DRAIN_REASON)
            return None
        principal = Principal(
            hello.tenant_id, claims.user_id, hello.device_id, tuple(sorted(claims.roles))
        )
        connection = Connection(
            self.hub,
            send,
            principal,
            hello.platform,
            secrets.token_hex(8),
            wire=wire,
            sync_cursor=hello.sync_cursor,
            now=asyncio.get_running_loop().time(),
        )
        self._hold_token(connection, claims)
        replaced = self.registry.register(connection, hello.device_id)
        if replaced is not None:
            replaced.replaced = True
            replaced.close(CloseCode.REPLACED, "a newer connection of this device took over")
        self._reply(
            connection,
            fr.HelloOk(
                id=hello.id,
                tenant_id=principal.tenant_id,
                user_id=principal.user_id,
                device_id=hello.device_id,
                node_id=self.node_id,
                idle_timeout_ms=round(self.ingress.idle_timeout_seconds * 1000),
                max_frame_bytes=self.max_frame_bytes,
                token_expires_at=claims.expires_at,
            ),
        )
        self.metrics.frame_in("hello")
        self.metrics.connections.inc()
        # Not awaited: hello_ok must not wait for Kafka. The produce call still happens before
        # this handler's first wait, so the disconnect (published later) follows it in Kafka.
        self.hub.spawn(self._publish_presence(connection, connected=True))
        return connection

    def _hello(self, message: Message) -> fr.Hello:
        """The first frame as a ``hello``, or a ``RefusalError`` saying why it is not one."""
        text = self._text(message, request_id_known=False)
        try:
            frame = fr.parse_client_frame(text)
        except SchemaError as error:
            raise RefusalError(fr.ErrorFrame.from_schema_error(error)) from None
        if not isinstance(frame, fr.Hello):
            raise RefusalError(
                error_frame(
                    ErrorCode.AUTH_REQUIRED,
                    f"the first frame must be hello, not {frame.type}",
                    frame.id,
                )
            )
        return frame

    async def _refuse(
        self,
        send: Send,
        problem: fr.ErrorFrame | None,
        code: CloseCode,
        reason: str | None = None,
    ) -> None:
        """Tell the client why (an ``error`` frame), then close with ``code``."""
        try:
            if problem is not None:
                self.metrics.error(problem.code)
                self.metrics.frame_out("error")
                await send({"type": "websocket.send", "text": problem.model_dump_json()})
            self.hub.closed(code)
            await send(
                {
                    "type": "websocket.close",
                    "code": int(code),
                    "reason": truncate_reason(reason or (problem.message if problem else "")),
                }
            )
        except OSError as error:  # the client left first
            _log.debug("refusal %s not delivered: %r", code, error)

    async def _serve(self, connection: Connection, receive: Receive) -> None:
        loop = asyncio.get_running_loop()
        device_id = connection.principal.device_id
        assert device_id is not None
        try:
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    break
                connection.last_frame_at = loop.time()
                if connection.closing:
                    continue
                try:
                    self._on_frame(connection, message)
                except Exception:
                    # A bug must cost one reply, never the socket or the node.
                    _log.exception("unexpected error handling a frame")
                    self._reply(
                        connection, error_frame(ErrorCode.INTERNAL, "unexpected server error")
                    )
        finally:
            connection.forget()
            self.metrics.connections.dec()
            self.registry.unregister(connection, device_id)
            principal = connection.principal
            if not self.registry.devices(principal.tenant_id, principal.user_id):
                self.group_index.forget(principal.tenant_id, principal.user_id)
        if not connection.replaced:
            await self._publish_presence(connection, connected=False)

    def _on_frame(self, connection: Connection, message: Message) -> None:
        """Answer one frame (exactly one reply); publishing commands answer from a task."""
        principal = connection.principal
        try:
            # Every frame costs a token, invalid ones too: a flood of garbage is still a flood.
            refusal = self.rate_limit(principal)
            if refusal is not None:
                raw = message.get("text") or message.get("bytes") or ""
                raise RefusalError(self.rate_limited(fr.request_id_of(raw), refusal))
            text = self._text(message, request_id_known=True)
            try:
                frame = fr.parse_client_frame(text)
            except SchemaError as error:
                raise RefusalError(fr.ErrorFrame.from_schema_error(error)) from None
        except RefusalError as refusal:
            self.metrics.frame_in("invalid")
            self._reply(connection, refusal.frame)
            return
        self.metrics.frame_in(frame.type)
        if is_publishing(frame):
            self.hub.spawn(self._publish_and_reply(connection, frame))
        elif is_reading(frame):
            self.hub.spawn(self._read_and_reply(connection, frame))
        else:
            self._reply(connection, self.answer_now(frame, connection))

    def _text(self, message: Message, *, request_id_known: bool) -> str:
        """The frame's text within the size limit, or a ``RefusalError``."""
        text: str | None = message.get("text")
        if text is None:
            data: bytes = message.get("bytes") or b""
            if len(data) > self.max_frame_bytes:
                raise RefusalError(self._too_large(len(data), data if request_id_known else None))
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError:
                raise RefusalError(
                    error_frame(ErrorCode.INVALID_UTF8, "the binary frame is not valid UTF-8")
                ) from None
        # A character is 1-4 bytes: only texts near the limit need encoding to be measured.
        if len(text) * 4 > self.max_frame_bytes:
            size = len(text) if len(text) > self.max_frame_bytes else len(text.encode())
            if size > self.max_frame_bytes:
                raise RefusalError(self._too_large(size, text if request_id_known else None))
        return text

    def _too_large(self, size: int, raw: str | bytes | None) -> fr.ErrorFrame:
        return error_frame(
            ErrorCode.FRAME_TOO_LARGE,
            f"the frame is at least {size} bytes; the limit is {self.max_frame_bytes} bytes",
            fr.request_id_of(raw) if raw is not None else None,
        )

    def _reply(self, connection: Connection, frame: fr.ServerFrame) -> None:
        if isinstance(frame, fr.ErrorFrame):
            self.metrics.error(frame.code)
        connection.enqueue(text_frame(frame.model_dump_json()), frame.type)

    def _frame_sent(self, frame_type: str) -> None:
        self.metrics.frame_out(frame_type)

    async def _publish_and_reply(self, connection: Connection, command: PublishingCommand) -> None:
        self._reply(connection, await self.publish_command(connection.principal, command))

    async def _read_and_reply(self, connection: Connection, frame: ReadFrame) -> None:
        self._reply(connection, await self.reads.answer(connection.principal, frame))

    async def _sweep_idle(self) -> None:
        """Close sockets that sent nothing for ``idle_timeout_seconds``, readers stalled for
        ``slow_consumer_seconds`` and sockets whose token expired (one task, no timers)."""
        idle = self.ingress.idle_timeout_seconds
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, idle / 4, self.ingress.slow_consumer_seconds / 2))
            now = loop.time()
            deadline = now - idle
            self.revocations.prune()
            for connection in self.registry:
                if connection.check_stalled(now) or connection.closing:
                    continue
                if connection.token_expires < now:
                    connection.close(
                        CloseCode.TOKEN_EXPIRED,
                        "the token expired; send refresh_token before it does, or reconnect "
                        "with a fresh one",
                    )
                elif connection.last_frame_at < deadline:
                    connection.close(CloseCode.IDLE_TIMEOUT, f"no frame for {idle:g} s")

    async def _publish_presence(self, connection: Connection, *, connected: bool) -> None:
        principal = connection.principal
        assert principal.device_id is not None
        payload = DevicePresencePayload(
            user_id=principal.user_id,
            device_id=principal.device_id,
            platform=connection.platform,
            node_id=self.node_id,
            connection_id=connection.connection_id,
        )
        actor = Actor(user_id=principal.user_id, device_id=principal.device_id)
        event: Event = (
            DeviceConnected.new(tenant_id=principal.tenant_id, payload=payload, actor=actor)
            if connected
            else DeviceDisconnected.new(tenant_id=principal.tenant_id, payload=payload)
        )
        try:
            await self._publish(event)
        except (KafkaUnavailable, PublishRejectedError) as error:
            _log.warning(
                "%s of %s/%s/%s not published: %s",
                event.type,
                principal.tenant_id,
                principal.user_id,
                principal.device_id,
                error,
            )
        except Exception:
            _log.exception("unexpected error publishing %s", event.type)

    # -- live delivery ------------------------------------------------------------------------

    def deliver(self, frames: Sequence[LiveFrame]) -> None:
        """Put live ``event`` frames into the addressed connections' queues (on the loop)."""
        outcomes = self.live_metrics.records
        for frame in frames:
            devices = self.registry.devices(frame.tenant_id, frame.user_id)
            if frame.groups is not None:
                # A connect's answer: the user's large groups, while the user is still here.
                if devices:
                    self.group_index.snapshot(frame.tenant_id, frame.user_id, frame.groups)
                continue
            targets = (
                list(devices.values())
                if frame.device_ids is None
                else [devices[device] for device in frame.device_ids if device in devices]
            )
            delivered = False
            for connection in targets:
                delivered |= connection.enqueue(frame.wire, "event")
            outcomes.labels("delivered" if delivered else "offline").inc()

    def deliver_groups(self, frames: Sequence[GroupFrame]) -> None:
        """Hand large groups' events to the member devices here (on the loop)."""
        outcomes = self.group_metrics.records
        for frame in frames:
            tenant_id = frame.tenant_id

            def connected(user_id: str, tenant_id: str = tenant_id) -> bool:
                return bool(self.registry.devices(tenant_id, user_id))

            delivered = False
            for user_id in self.group_index.apply(frame, connected):
                for connection in self.registry.devices(tenant_id, user_id).values():
                    delivered |= connection.enqueue(frame.wire, "event")
            outcomes.labels("delivered" if delivered else "none-here").inc()

    # -- commands, for both doors ----------------------------------------------------------------

    def answer_now(self, frame: fr.ClientFrame, connection: Connection | None) -> fr.ServerFrame:
        """The reply to a command that publishes nothing (``connection`` is None on REST)."""
        match frame:
            case fr.Ping():
                return fr.Pong(id=frame.id)
            case fr.Ack() if connection is not None:
                connection.acked_sync_id = max(connection.acked_sync_id, frame.sync_id)
                return fr.Ok(id=frame.id)
            case fr.Ack():
                return error_frame(
                    ErrorCode.SCHEMA_INVALID,
                    "ack acknowledges events received on a WebSocket; it has no meaning here",
                    frame.id,
                    field="type",
                )
            case fr.RefreshToken() if connection is not None:
                return self._refresh(connection, frame)
            case fr.RefreshToken():
                return error_frame(
                    ErrorCode.SCHEMA_INVALID,
                    "refresh_token renews a WebSocket's token; a REST request carries its own",
                    frame.id,
                    field="type",
                )
            case fr.Hello():
                return error_frame(
                    ErrorCode.SCHEMA_INVALID,
                    "hello is only valid as the first frame of a WebSocket connection",
                    frame.id,
                    field="type",
                )
        raise ValueError(f"{frame.type} is answered by publishing, not directly")

    def _refresh(self, connection: Connection, frame: fr.RefreshToken) -> fr.ServerFrame:
        """A fresh token for an open socket: the same user, and the same device binding."""
        principal = connection.principal
        try:
            claims = self.verify_token(frame.token, principal.tenant_id, principal.device_id)
        except AuthError as error:
            return error_frame(ErrorCode(error.code.value), error.message, frame.id, field="token")
        if claims.user_id != principal.user_id or claims.device_id not in (
            None,
            principal.device_id,
        ):
            return error_frame(
                ErrorCode.TOKEN_INVALID,
                "the token was issued to another user or device than this socket's",
                frame.id,
                field="token",
            )
        self._hold_token(connection, claims)
        return fr.Ok(id=frame.id)

    def _hold_token(self, connection: Connection, claims: Claims) -> None:
        """The socket now lives on this token: until its expiry, unless a revocation of it."""
        connection.token_expires = self._token_deadline(claims)
        connection.token_id = claims.token_id
        connection.token_issued_at = claims.issued_at

    def _token_deadline(self, claims: Claims) -> float:
        """``loop.time()`` at which ``claims``' token stops being valid (leeway included)."""
        remaining = (claims.expires_at - datetime.now(UTC)).total_seconds()
        return asyncio.get_running_loop().time() + remaining + self._token_leeway

    def rate_limit(self, principal: Principal) -> Refusal | None:
        """Spend one command of the principal's device, user and tenant: ``None`` if it may
        proceed, otherwise which limit refused it and for how long."""
        tenant, user = principal.tenant_id, principal.user_id
        keys = ((tenant, user, principal.device_id), (tenant, user), tenant)
        return self.limiter.try_acquire(keys)

    def rate_limited(self, request_id: str | None, refusal: Refusal) -> fr.ErrorFrame:
        wait_ms = retry_after_ms(refusal.wait_seconds)
        limit = refusal.limit
        return error_frame(
            ErrorCode.RATE_LIMITED,
            f"more than {limit.rate_per_second:g} commands per second (burst {limit.burst:g}) "
            f"from this {refusal.scope} on this node; retry in {wait_ms} ms",
            request_id,
            retry_after=wait_ms,
        )

    async def execute(self, principal: Principal, frame: fr.ClientFrame) -> fr.ServerFrame:
        """The one reply to ``frame`` sent by ``principal`` outside a socket (the REST door)."""
        if is_publishing(frame):
            return await self.publish_command(principal, frame)
        if is_reading(frame):
            return await self.reads.answer(principal, frame)
        return self.answer_now(frame, None)

    async def publish_command(
        self, principal: Principal, command: PublishingCommand
    ) -> fr.Accepted | fr.Ok | fr.ErrorFrame:
        """Publish the event ``command`` stands for; the reply only once Kafka acknowledged it."""
        try:
            event = event_for(command, principal)
        except SchemaError as error:
            return fr.ErrorFrame.from_schema_error(error)
        try:
            await self._publish(event)
        except KafkaUnavailable as error:
            return error_frame(
                ErrorCode.UNAVAILABLE,
                f"not accepted: {error}; retry with the same ids",
                command.id,
                retry_after=error.retry_after_ms,
            )
        except PublishRejectedError as error:
            _log.error("Kafka rejected a %s for good: %s", event.type, error)
            return error_frame(
                ErrorCode.INTERNAL,
                f"Kafka refused the command for good ({error.reason}); retrying will not help",
                command.id,
            )
        except Exception:
            _log.exception("unexpected error publishing a %s", event.type)
            return error_frame(ErrorCode.INTERNAL, "unexpected server error", command.id)
        wait = self.ingress.access_change_timeout_seconds
        # Answered once no read on any node serves what it takes away (ingress/reads.py).
        if (
            event.type in ACCESS_EVENT_TYPES
            and wait > 0
            and not await self.reads.settled(event.tenant_id, event.event_id, wait)
        ):
            return error_frame(
                ErrorCode.UNAVAILABLE,
                f"recorded, but not yet in effect for every read after {wait:g} s; "
                "repeating the command is harmless",
                command.id,
                retry_after=self.ingress.unavailable_retry_after_ms,
            )
        return reply_for(command, event)

    async def publish_event(self, event: Event) -> None:
        """Publish an event the REST door built itself (push tokens); raises on failure."""
        await self._publish(event)

    async def _publish(self, event: Event) -> None:
        topic, key = self._route(event)
        await self.producer.publish(topic.name, key, encode_event(event))

    def _route(self, event: Event) -> tuple[Topic, bytes]:
        """``catalog.route(event)``: the topic depends on the event's type only."""
        topic = self._inbound.get(event.type)
        if topic is None:
            topic, key = self.catalog.route(event)
            self._inbound[event.type] = topic
            return topic, key
        if topic.key is KeyKind.CONVERSATION:
            # event_key's first case, without asking the payload for fields it lacks.
            conversation_id: str | None = getattr(event.payload, "conversation_id", None)
            if conversation_id is not None:
                return topic, conversation_key(event.tenant_id, conversation_id)
        return topic, event_key(event, topic.key)


def describe(readiness: Readiness) -> dict[str, Any]:
    """``/readyz``'s body."""
    return {
        "ready": readiness.ready,
        "kafka": readiness.kafka,
        "live_delivery": readiness.live_delivery,
        "draining": readiness.draining,
        "serving_store": readiness.serving_store,
        "revocations": readiness.revocations,
        "failed": readiness.failed,
    }
