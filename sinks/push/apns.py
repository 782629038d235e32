"""The APNs sender: aioapns over HTTP/2 and TLS, token-based authentication (a .p8 key, ES256).

One connection pool per APNs environment (production, sandbox), created on first use; each app
(bundle id, the APNs topic) belongs to the environment the settings give it. Every request
carries ``apns-push-type: alert``, the conversation as ``apns-collapse-id`` and ``thread-id``,
the user's unread total as the badge, an expiry, and priority 10 — or 5 with the passive
interruption level and no sound in the user's quiet hours.

How aioapns is used, and why it is subclassed (aioapns 4.0):

- **Host, port and CA.** aioapns connects to the host and port class attributes of its protocol
  class and has no parameter for them. Its pool's ``create_connection`` is the documented
  extension point (abstract in the base pool), so :class:`_ApnsPool` overrides it to connect to
  a configured ``host:port`` (Apple's by default); the CA comes through aioapns's own
  ``ssl_context`` parameter, with ALPN ``h2`` as Apple asks.
- **One attempt per call.** aioapns's ``send_notification`` re-sends on another connection and
  sleeps a second after a failed connect. :meth:`_ApnsPool.send_once` makes exactly one attempt,
  so that the dispatcher's backoff, breaker and outcome records see every attempt.
- **Abandoned requests.** aioapns sets a result on every request's future unconditionally; a
  request the dispatcher stopped waiting for (its timeout) would raise ``InvalidStateError``
  inside ``data_received`` when the late answer came, and that kills the connection with every
  other request on it. :class:`_ApnsConnection` resets such a stream and forgets it instead.
- **Bookkeeping.** aioapns never forgets the stream of a successful request and never returns
  received bytes to the HTTP/2 flow-control window (after 64 KiB of error bodies the server
  could send nothing more); answers are also resolved at the end of their stream rather than per
  data frame, so a body in several frames, or none, still completes its request. The
  Retry-After header, which aioapns drops, is kept.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections import defaultdict
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# aioapns, not httpx: APNs is HTTP/2 only, with aioapns's JWT provider tokens and stream errors.
from aioapns.common import NotificationRequest, NotificationResult, PushType
from aioapns.connection import (
    APNsBaseClientProtocol,
    APNsDevelopmentClientProtocol,
    APNsKeyConnectionPool,
    APNsProductionClientProtocol,
    APNsTLSClientProtocol,
    AuthorizationHeaderProvider,
    JWTAuthorizationHeaderProvider,
)
from aioapns.exceptions import ConnectionClosed
from aioapns.exceptions import ConnectionError as AioapnsConnectionError
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from h2.errors import ErrorCodes
from h2.exceptions import FlowControlError, H2Error, NoAvailableStreamIDError

from core.push_settings import ApnsEnvironment, PushProviderSettings
from schemas.events import PushProvider
from sinks.push.errors import LocalReason, PushConfigError
from sinks.push.notification import PushNotification, PushTarget
from sinks.push.outcome import OutcomeKind, ProviderReply, parse_retry_after

log = logging.getLogger(__name__)

PRIORITY_IMMEDIATE = 10
#: "Send based on power considerations": what quiet hours use.
PRIORITY_POWER_CONSIDERATE = 5

APPLE_HOSTS: Mapping[ApnsEnvironment, str] = {
    ApnsEnvironment.PRODUCTION: APNsProductionClientProtocol.APNS_SERVER,
    ApnsEnvironment.SANDBOX: APNsDevelopmentClientProtocol.APNS_SERVER,
}
APPLE_PORT = APNsTLSClientProtocol.APNS_PORT

#: 400 reasons that mean the token itself is bad (410 always does).
INVALID_TOKEN_REASONS = frozenset({"BadDeviceToken"})


class _ConnectionFailedError(Exception):
    """No connection to APNs, or it broke before the answer."""


class _ApnsConnection(APNsTLSClientProtocol):
    """One HTTP/2 connection to APNs (see the module docstring for what differs from aioapns)."""

    def __init__(
        self,
        server_name: str,
        apns_topic: str,
        loop: asyncio.AbstractEventLoop,
        on_connection_lost: Any,
        auth_provider: AuthorizationHeaderProvider,
    ) -> None:
        super().__init__(apns_topic, loop, on_connection_lost, auth_provider)
        # aioapns sends its class attribute as the ``host`` header; this connection's host.
        self.APNS_SERVER = server_name
        self.retry_after: dict[str, str] = {}
        self._bodies: defaultdict[int, bytearray] = defaultdict(bytearray)

    async def send_notification(self, request: NotificationRequest) -> NotificationResult:
        try:
            return await super().send_notification(request)
        except asyncio.CancelledError:
            self._abandon(request.notification_id)
            raise

    def on_response_received(self, headers: dict[bytes, bytes]) -> None:
        notification_id = headers.get(b"apns-id", b"").decode()
        if notification_id not in self.requests:
            return  # abandoned: nobody waits for it
        if retry_after := headers.get(b"retry-after"):
            self.retry_after[notification_id] = retry_after.decode()
        super().on_response_received(headers)

    def on_data_received(self, data: bytes, stream_id: int) -> None:
        self.conn.acknowledge_received_data(len(data), stream_id)
        if stream_id in self.request_streams:
            self._bodies[stream_id] += data

    def on_stream_ended(self, stream_id: int) -> None:
        notification_id = self.request_streams.pop(stream_id, None)
        body = bytes(self._bodies.pop(stream_id, b""))
        if notification_id is not None:
            status = self.request_statuses.pop(notification_id, None)
            future = self.requests.pop(notification_id, None)
            if status is not None and future is not None and not future.done():
                reason, timestamp = _error_body(body)
                future.set_result(NotificationResult(notification_id, status, reason, timestamp))
        super().on_stream_ended(stream_id)

    def connection_lost(self, exc: Exception | None) -> None:
        for notification_id, future in list(self.requests.items()):
            if future.done():
                del self.requests[notification_id]
        super().connection_lost(exc)

    def _abandon(self, notification_id: str) -> None:
        self.requests.pop(notification_id, None)
        self.request_statuses.pop(notification_id, None)
        self.retry_after.pop(notification_id, None)
        for stream_id, owner in list(self.request_streams.items()):
            if owner != notification_id:
                continue
            del self.request_streams[stream_id]
            self._bodies.pop(stream_id, None)
            try:
                self.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
            except H2Error:
                return  # already closed: its channel went back when it ended
            self.free_channels.release()
            if self.transport is not None and not self.transport.is_closing():
                self.flush()


def _error_body(body: bytes) -> tuple[str | None, int | None]:
    """APNs's ``{"reason": …, "timestamp": …}``; nothing when the body is absent or not that."""
    try:
        data = json.loads(body) if body else {}
    except ValueError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    reason = data.get("reason")
    timestamp = data.get("timestamp")
    return (
        reason if isinstance(reason, str) else None,
        timestamp if isinstance(timestamp, int) else None,
    )


class _ApnsPool(APNsKeyConnectionPool):
    """aioapns's token-authenticated pool, connecting to a given host and port."""

    def __init__(
        self,
        *,
        key: str,
        key_id: str,
        team_id: str,
        topic: str,
        host: str,
        port: int,
        max_connections: int,
        ssl_context: ssl.SSLContext,
    ) -> None:
        super().__init__(
            key=key,
            key_id=key_id,
            team_id=team_id,
            topic=topic,
            max_connections=max_connections,
            max_connection_attempts=1,
            ssl_context=ssl_context,
        )
        self._host = host
        self._port = port
        # One signed token per pool (aioapns signs one per connection); APNs accepts it for
        # an hour and aioapns renews it after 30 minutes.
        self._auth = JWTAuthorizationHeaderProvider(key=key, key_id=key_id, team_id=team_id)

    async def create_connection(self) -> APNsBaseClientProtocol:
        factory = partial(
            _ApnsConnection,
            self._host,
            self.apns_topic or "",
            self.loop,
            self.discard_connection,
            self._auth,
        )
        _, connection = await self.loop.create_connection(
            factory, host=self._host, port=self._port, ssl=self.ssl_context
        )
        return connection

    async def send_once(
        self, request: NotificationRequest
    ) -> tuple[NotificationResult, str | None]:
        """One attempt: the result and the Retry-After header, if any."""
        try:
            connection = await self.acquire()
        except AioapnsConnectionError as error:
            cause = error.__context__ or error
            raise _ConnectionFailedError(
                f"cannot connect to {self._host}:{self._port}: {cause}"
            ) from error
        try:
            result = await connection.send_notification(request)
        except NoAvailableStreamIDError as error:
            connection.close()
            raise _ConnectionFailedError("connection ran out of stream ids") from error
        except (ConnectionClosed, FlowControlError, H2Error, OSError) as error:
            raise _ConnectionFailedError(f"connection failed: {error!r}") from error
        retry_after = None
        if isinstance(connection, _ApnsConnection):
            retry_after = connection.retry_after.pop(request.notification_id, None)
        return result, retry_after


def apns_request(notification: PushNotification, target: PushTarget) -> NotificationRequest:
    """The APNs request of a notification to a device whose token is ``target.token``."""
    if notification.challenge is not None:
        # A background push: nothing shown, the app woken to read the challenge.
        return NotificationRequest(
            device_token=target.token,
            message={"aps": {"content-available": 1}, **notification.data()},
            time_to_live=notification.ttl_seconds,
            priority=PRIORITY_POWER_CONSIDERATE,
            push_type=PushType.BACKGROUND,
            apns_topic=target.app_id,
        )
    alert: dict[str, str] = {"title": notification.title}
    if notification.body:
        alert["body"] = notification.body
    aps: dict[str, Any] = {
        "alert": alert,
        "badge": notification.badge,
        "thread-id": notification.thread_id,
        "interruption-level": "passive" if notification.quiet else "active",
    }
    if not notification.quiet:
        aps["sound"] = "default"
    return NotificationRequest(
        device_token=target.token,
        message={"aps": aps, **notification.data()},
        time_to_live=notification.ttl_seconds,
        priority=PRIORITY_POWER_CONSIDERATE if notification.quiet else PRIORITY_IMMEDIATE,
        collapse_key=notification.collapse_id,
        push_type=PushType.ALERT,
        apns_topic=target.app_id,
    )


def classify_apns(result: NotificationResult, retry_after: str | None) -> ProviderReply:
    """APNs's answer as an outcome: 200 sent; 410, and 400 BadDeviceToken, an invalid token;
    429 throttled and 5xx failed, both retried; any other status failed for good."""
    try:
        status = int(result.status)
    except ValueError:
        return ProviderReply(OutcomeKind.FAILED, LocalReason.INVALID_RESPONSE, retryable=True)
    if status == 200:
        return ProviderReply.sent(status, result.notification_id)
    reason = result.description or f"http-{status}"
    if status == 410 or (status == 400 and reason in INVALID_TOKEN_REASONS):
        invalid_since = (
            datetime.fromtimestamp(result.timestamp / 1000.0, UTC)
            if result.timestamp is not None
            else None
        )
        return ProviderReply(
            OutcomeKind.INVALID_TOKEN, reason, status_code=status, token_invalid_since=invalid_since
        )
    if status == 429:
        return ProviderReply(
            OutcomeKind.THROTTLED,
            reason,
            retryable=True,
            status_code=status,
            retry_after_seconds=parse_retry_after(retry_after),
        )
    if status >= 500:
        return ProviderReply(
            OutcomeKind.FAILED,
            reason,
            retryable=True,
            status_code=status,
            retry_after_seconds=parse_retry_after(retry_after),
        )
    return ProviderReply(OutcomeKind.FAILED, reason, status_code=status)


class ApnsSender:
    """Sends notifications to APNs; one attempt per call (the dispatcher retries)."""

    provider = PushProvider.APNS

    def __init__(
        self,
        *,
        signing_key: str,
        key_id: str,
        team_id: str,
        default_topic: str | None = None,
        use_sandbox: bool = True,
        app_environments: Mapping[str, ApnsEnvironment] | None = None,
        host: str | None = None,
        ca_file: Path | None = None,
        max_connections: int = 2,
    ) -> None:
        """``signing_key`` is the .p8 key's PEM text; ``host`` a ``host:port`` replacing Apple's
        hosts (both environments); ``ca_file`` the CAs to trust instead of the system's."""
        _check_signing_key(signing_key)
        if not key_id or not team_id:
            raise PushConfigError("APNs needs the key id and the team id of its .p8 key")
        self._signing_key = signing_key
        self._key_id = key_id
        self._team_id = team_id
        self._default_topic = default_topic or ""
        self._default_environment = (
            ApnsEnvironment.SANDBOX if use_sandbox else ApnsEnvironment.PRODUCTION
        )
        self._app_environments = dict(app_environments or {})
        self._address_override = _host_port(host) if host else None
        self._ssl_context = _ssl_context(ca_file)
        self._max_connections = max_connections
        self._pools: dict[ApnsEnvironment, _ApnsPool] = {}

    @classmethod
    def from_settings(cls, settings: PushProviderSettings) -> ApnsSender:
        path = settings.apns_key_path
        if path is None:
            raise PushConfigError("APNs is not configured: set IM_PUSH__APNS_KEY_PATH (a .p8 key)")
        try:
            signing_key = path.read_text()
        except OSError as error:
            raise PushConfigError(
                f"cannot read the APNs key {path}: {error.strerror}; check IM_PUSH__APNS_KEY_PATH"
            ) from error
        return cls(
            signing_key=signing_key,
            key_id=settings.apns_key_id or "",
            team_id=settings.apns_team_id or "",
            default_topic=settings.apns_topic,
            use_sandbox=settings.apns_use_sandbox,
            app_environments=settings.apns_app_environments,
            host=settings.apns_host,
            ca_file=settings.apns_ca_file,
            max_connections=settings.apns_max_connections,
        )

    def environment_of(self, app_id: str) -> ApnsEnvironment:
        return self._app_environments.get(app_id, self._default_environment)

    async def send(self, notification: PushNotification, target: PushTarget) -> ProviderReply:
        request = apns_request(notification, target)
        pool = self._pool(self.environment_of(target.app_id))
        try:
            result, retry_after = await pool.send_once(request)
        except _ConnectionFailedError as error:
            log.info("APNs: %s", error)
            return ProviderReply(OutcomeKind.FAILED, LocalReason.CONNECTION_ERROR, retryable=True)
        return classify_apns(result, retry_after)

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def _pool(self, environment: ApnsEnvironment) -> _ApnsPool:
        pool = self._pools.get(environment)
        if pool is None:
            host, port = self._address_override or (APPLE_HOSTS[environment], APPLE_PORT)
            pool = _ApnsPool(
                key=self._signing_key,
                key_id=self._key_id,
                team_id=self._team_id,
                topic=self._default_topic,
                host=host,
                port=port,
                max_connections=self._max_connections,
                ssl_context=self._ssl_context,
            )
            self._pools[environment] = pool
        return pool


def _check_signing_key(pem: str) -> None:
    try:
        key = load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError) as error:
        raise PushConfigError(
            f"the APNs key is not an unencrypted PEM private key ({error}); "
            "use the .p8 file downloaded from the Apple developer account"
        ) from error
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise PushConfigError("the APNs key must be an EC P-256 key (a .p8 APNs auth key)")


def _host_port(value: str) -> tuple[str, int]:
    parts = urlsplit(f"//{value}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise PushConfigError(f"APNs host {value!r} is not host:port (e.g. 127.0.0.1:8443)")
    return parts.hostname, port


def _ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as error:
        raise PushConfigError(
            f"cannot load the APNs CA file {ca_file}: {error}; check IM_PUSH__APNS_CA_FILE"
        ) from error
    context.set_alpn_protocols(["h2"])
    return context
