"""A fake APNs: HTTP/2 over TLS (ALPN h2) on 127.0.0.1, built on h2 directly.

It checks what Apple checks — the provider token (ES256 JWT with ``kid``, ``iss``, a fresh
``iat``), the topic, push type, priority, expiration, collapse id and payload — and answers as
APNs does: 200 with the ``apns-id``, or an error status with ``{"reason": …}`` (and a
``timestamp`` for 410). Answers per device token are scripted (:class:`~.script.Script`).
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import time
import uuid
from contextlib import suppress
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import H2Error, ProtocolError
from h2.settings import SettingCodes

from tests.sinks.push.fakes.script import FakeStats, Received, Reply, Script, wait_before_answering
from tests.sinks.push.fakes.tls import LocalPki

MAX_PAYLOAD_BYTES = 4096
PROVIDER_TOKEN_MAX_AGE_SECONDS = 3600
PUSH_TYPES = frozenset(
    {"alert", "background", "voip", "complication", "fileprovider", "mdm", "liveactivity"}
)
_HEX_TOKEN = re.compile(r"^[0-9a-fA-F]{16,200}$")


class FakeApns:
    def __init__(
        self,
        pki: LocalPki,
        *,
        team_id: str,
        key_id: str,
        public_key: EllipticCurvePublicKey,
        topics: frozenset[str],
    ) -> None:
        self.team_id = team_id
        self.key_id = key_id
        self.public_key = public_key
        self.topics = topics
        self.script = Script()
        self.stats = FakeStats()
        self.connections_accepted = 0
        self.alpn_protocols: list[str | None] = []
        self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ssl.load_cert_chain(pki.cert_file, pki.key_file)
        self._ssl.set_alpn_protocols(["h2"])
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), "127.0.0.1", 0, ssl=self._ssl
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.close()
        if self._server is not None:
            await self._server.wait_closed()

    def check(self, token: str, headers: dict[str, str], body: bytes) -> Reply | None:
        """The error APNs would answer a malformed or unauthorised request with, if any, in
        APNs' order: the provider token, then the request's headers, then its payload."""
        return (
            self._check_provider_token(headers)
            or self._check_headers(token, headers)
            or _check_payload(body)
        )

    def _check_provider_token(self, headers: dict[str, str]) -> Reply | None:
        authorization = headers.get("authorization", "")
        if not authorization.startswith("bearer "):
            return Reply(403, "MissingProviderToken")
        provider_token = authorization.removeprefix("bearer ")
        try:
            if jwt.get_unverified_header(provider_token).get("kid") != self.key_id:
                return Reply(403, "InvalidProviderToken")
            claims = jwt.decode(
                provider_token,
                self.public_key,
                algorithms=["ES256"],
                options={"require": ["iss", "iat"]},
            )
        except jwt.PyJWTError:
            return Reply(403, "InvalidProviderToken")
        if claims["iss"] != self.team_id:
            return Reply(403, "InvalidProviderToken")
        if time.time() - int(claims["iat"]) > PROVIDER_TOKEN_MAX_AGE_SECONDS:
            return Reply(403, "ExpiredProviderToken")
        return None

    def _check_headers(self, token: str, headers: dict[str, str]) -> Reply | None:
        if headers.get(":method") != "POST":
            return Reply(405, "MethodNotAllowed")
        if not _HEX_TOKEN.match(token):
            return Reply(400, "BadDeviceToken")
        topic = headers.get("apns-topic")
        if not topic:
            return Reply(400, "MissingTopic")
        if topic not in self.topics:
            return Reply(400, "TopicDisallowed")
        if headers.get("apns-push-type", "alert") not in PUSH_TYPES:
            return Reply(400, "InvalidPushType")
        if headers.get("apns-priority", "10") not in {"1", "5", "10"}:
            return Reply(400, "BadPriority")
        if not headers.get("apns-expiration", "0").isdigit():
            return Reply(400, "BadExpirationDate")
        if len(headers.get("apns-collapse-id", "").encode()) > 64:
            return Reply(400, "BadCollapseId")
        if "apns-id" in headers:
            try:
                uuid.UUID(headers["apns-id"])
            except ValueError:
                return Reply(400, "BadMessageId")
        return None


def _check_payload(body: bytes) -> Reply | None:
    if not body:
        return Reply(400, "PayloadEmpty")
    if len(body) > MAX_PAYLOAD_BYTES:
        return Reply(413, "PayloadTooLarge")
    try:
        payload = json.loads(body)
    except ValueError:
        return Reply(400, "BadPayload")
    if not isinstance(payload, dict) or not isinstance(payload.get("aps"), dict):
        return Reply(400, "BadPayload")
    return None


class _Connection(asyncio.Protocol):
    """One client connection: HTTP/2 server side, a task per request."""

    def __init__(self, fake: FakeApns) -> None:
        self.fake = fake
        self.conn = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        self.transport: asyncio.Transport | None = None
        self._requests: dict[int, tuple[dict[str, str], bytearray]] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._window_updated = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.fake._connections.add(self)
        self.fake.connections_accepted += 1
        ssl_object = transport.get_extra_info("ssl_object")
        self.fake.alpn_protocols.append(
            ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        )
        self.conn.initiate_connection()
        self.conn.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 1000})
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.fake._connections.discard(self)
        for task in self._tasks.values():
            task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except ProtocolError:
            self.close()
            return
        for event in events:
            if isinstance(event, RequestReceived) and event.stream_id is not None:
                headers = {str(name): str(value) for name, value in event.headers or ()}
                self._requests[event.stream_id] = (headers, bytearray())
            elif isinstance(event, DataReceived) and event.stream_id is not None:
                self._requests[event.stream_id][1].extend(event.data or b"")
                self.conn.acknowledge_received_data(
                    event.flow_controlled_length or 0, event.stream_id
                )
            elif isinstance(event, StreamEnded) and event.stream_id is not None:
                headers, body = self._requests.pop(event.stream_id)
                self._tasks[event.stream_id] = asyncio.get_running_loop().create_task(
                    self._answer(event.stream_id, headers, bytes(body))
                )
            elif isinstance(event, StreamReset) and event.stream_id is not None:
                self._requests.pop(event.stream_id, None)
                task = self._tasks.pop(event.stream_id, None)
                if task is not None:
                    task.cancel()
            elif isinstance(event, WindowUpdated | RemoteSettingsChanged):
                self._window_updated.set()
            elif isinstance(event, ConnectionTerminated):
                self.close()
        self._flush()

    async def _answer(self, stream_id: int, headers: dict[str, str], body: bytes) -> None:
        token = headers.get(":path", "").removeprefix("/3/device/")
        try:
            payload: dict[str, Any] = json.loads(body) if body else {}
        except ValueError:
            payload = {}
        stats = self.fake.stats
        stats.begin(Received(token, headers, payload, asyncio.get_running_loop().time()))
        reply = self.fake.check(token, headers, body) or self.fake.script.next(token)
        answered: Reply | None = None
        try:
            await wait_before_answering(reply)
            await self._respond(stream_id, headers.get("apns-id") or str(uuid.uuid4()), reply)
            answered = reply
        finally:
            stats.end(answered)
            self._tasks.pop(stream_id, None)

    async def _respond(self, stream_id: int, apns_id: str, reply: Reply) -> None:
        response_headers = [(":status", str(reply.status)), ("apns-id", apns_id)]
        if reply.retry_after is not None:
            response_headers.append(("retry-after", reply.retry_after))
        if reply.status == 200 or not reply.body:
            self.conn.send_headers(stream_id, response_headers, end_stream=True)
            self._flush()
            return
        error: dict[str, Any] = {"reason": reply.reason or "InternalServerError"}
        if reply.status == 410:
            error["timestamp"] = reply.timestamp_ms or int(time.time() * 1000)
        if reply.padding:
            error["padding"] = "x" * reply.padding
        data = json.dumps(error).encode()
        response_headers.append(("content-type", "application/json"))
        response_headers.append(("content-length", str(len(data))))
        self.conn.send_headers(stream_id, response_headers)
        await self._send_body(stream_id, data)

    async def _send_body(self, stream_id: int, data: bytes) -> None:
        """Send as HTTP/2 flow control allows: frame by frame, waiting for the client to
        open its window when it is full (a client that never does stalls here)."""
        while data:
            size = min(
                self.conn.local_flow_control_window(stream_id),
                self.conn.max_outbound_frame_size,
                len(data),
            )
            if size <= 0:
                self._window_updated.clear()
                await self._window_updated.wait()
                continue
            self.conn.send_data(stream_id, data[:size])
            data = data[size:]
            self._flush()
        self.conn.end_stream(stream_id)
        self._flush()

    def _flush(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.conn.data_to_send())

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            with suppress(H2Error):
                self.conn.close_connection()
                self._flush()
            self.transport.close()
