"""The Python client SDK: one device of one user, over the public WebSocket protocol.

    async with Client("ws://127.0.0.1:8080/v1/ws", tenant_id="acme", device_id="phone",
                      token=my_token, platform="ios") as client:
        accepted = await client.send("dm-…", "hello")        # re-sent until accepted
        async for item in client.events():                     # each stored event exactly once
            print(item.sync_id, item.event.type)
            client.ack(item.sync_id)                           # or ack=True in Client(...)

What it guarantees to its user (docs/protocol.md, "The delivery contract, as a client sees it"):

- **Each stored event once, in ``sync_id`` order.** Live events and sync pages may overlap; the
  client keeps the highest ``sync_id`` it has surfaced (its cursor) and drops anything at or
  below it. A live event that skips ahead is held back while the client syncs the gap from the
  store, again and again (at most ``gap_poll`` seconds apart) until the store has caught up: a
  sync runs to the head of the user's queue in the store, so it fills the gap as soon as the
  store holds what came before (or shows that nothing does: sync ids may have gaps). While the
  store lags — a sink restarting — held events show late, never ahead of the ones before them:
  showing one would skip those for good. Ephemeral events (typing, duplicate answers) have no
  ``sync_id`` and are surfaced as they come.
- **Resume.** Start from a stored cursor (``cursor=``, or ``cursor_store=`` to load and save it);
  on every (re)connect the client syncs from its cursor, once more ``settle_sync`` seconds later
  (live delivery is best effort: an event can reach the queue without a live push while the
  stream stage has not yet seen the device's new connection), and then every ``sync_interval``
  seconds in which no live event arrived; large groups' history likewise (docs/protocol.md,
  "Large groups").
- **Sends are retried until accepted**, with the same ``client_msg_id`` (generated if not given),
  through ``unavailable``, ``rate-limited`` and lost connections: the server makes a re-send
  harmless (one message per ``(sender, client_msg_id)``).
- **Other commands** (``read``, ``typing``, ``mute``, ``create_conversation`` and the
  conversation commands ``rename``, ``add_member``, ``remove_member``, ``change_role``,
  ``leave``) are retried the same way until answered ``ok``, which means *recorded*, not
  *allowed*: the stream stage checks membership and roles, and a refused command reaches the
  user's devices as a ``command.rejected`` event. Only sends are deduplicated: a command
  re-sent after its reply was lost may apply twice (two renames) or be refused the second time
  (``already-a-member``; ``conversation-exists`` for a group, whose id is chosen once, before
  the first attempt, so that it is still created once).
- **Push tokens**: ``register_push_token`` registers the device's APNs or FCM token over the
  REST API of the same ingress, with no connection needed (a device that stays offline is the
  one pushes are for).
- **Acks are coalesced**: the cursor store is saved at once, the server gets one ``ack`` with the
  highest sync id every ``ack_interval`` seconds at most, 5 s by default, and nothing waits for
  its ``ok`` (the server's ack is advisory, the cursor is what resuming relies on). An ack per
  event would double a busy device's frames and spend its command rate limit, and at 0.5 s a
  device getting two events a second still acked nearly every one.
- **Large groups** (read diffusion: docs/protocol.md, "Large groups"): their messages, recalls
  and edits are not in the sync queue. They come live as events without a ``sync_id``
  (:attr:`Received.group`), each once and in seq order per conversation: the client keeps the
  highest seq it surfaced per group (:attr:`Client.group_seqs`, in memory) and reads a gap — or,
  at every (re)connect, whatever a large group of the conversation list holds past that seq (past
  the read position for a group this client has not followed yet) — from the conversation's
  history, as it does for the sync queue.
- **Tokens**: with a token callable (``token=`` an async function) the client asks it again for
  every reconnect, and at four fifths of a token's remaining life for a ``refresh_token`` on the
  open socket, which the server closes at its token's expiry otherwise (4003). With a fixed
  token string the client ends with :class:`ClientClosedError` at that close.
- **TLS**: a ``wss://`` URL is verified against the system's trust store, or the CA bundle
  given as ``ca_file`` (a private CA), or a whole ``ssl`` context; TLS 1.3 at least, as the
  ingress serves it. A certificate that does not verify stops the client
  (:class:`ClientClosedError`): reconnecting would not change it.
- **Reconnects** with exponential backoff and jitter after a lost connection, a drain (4010) or a
  slow-consumer close (4009); it does not reconnect after ``replaced`` (4011) or an
  authentication close (4001-4005; 4003 with a token callable is reconnected with a fresh
  token): :class:`ClientClosedError` says why.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import ssl as ssl_module
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from core.backoff import Backoff
from core.tls import client_context
from schemas import frames as fr
from schemas.errors import CloseCode, ErrorCode
from schemas.events import (
    Event,
    MessageBody,
    MessageEdited,
    MessageRecalled,
    MessageSent,
    PushProvider,
    Role,
    TextBody,
    parse_event,
)

_log = logging.getLogger(__name__)

TokenSource = str | Callable[[], Awaitable[str]]
_NO_RECONNECT = {
    CloseCode.REPLACED,
    CloseCode.AUTH_REQUIRED,
    CloseCode.TOKEN_INVALID,
    CloseCode.TENANT_MISMATCH,
    CloseCode.TOKEN_REVOKED,
}


class ClientClosedError(Exception):
    """The client stopped for good: closed by its user, replaced by a newer connection of the
    same device, or refused authentication. ``code`` is the close code, if any."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class CommandError(Exception):
    """The server answered a command with an ``error`` frame that retrying will not fix."""

    def __init__(self, frame: fr.ErrorFrame) -> None:
        super().__init__(f"{frame.code}: {frame.message}")
        self.frame = frame


class CursorStore(Protocol):
    """Where a device keeps its sync cursor between runs."""

    def load(self) -> int: ...

    def save(self, cursor: int) -> None: ...


class FileCursorStore:
    """A cursor in a small file (written atomically)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> int:
        try:
            return int(self.path.read_text().strip() or 0)
        except FileNotFoundError:
            return 0

    def save(self, cursor: int) -> None:
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(str(cursor))
        temporary.replace(self.path)


def default_backoff() -> Backoff:
    """The client's retry waits: full jitter under 0.2 s doubling up to 10 s (many devices that
    lost the same server must not come back at the same instant)."""
    return Backoff(0.2, 10.0, "full")


def token_expiry(token: str) -> datetime | None:
    """The ``exp`` of a JWT the client holds (read, not verified: the server verifies it)."""
    try:
        segment = token.split(".")[1]
        payload = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
        return datetime.fromtimestamp(float(payload["exp"]), UTC)
    except (IndexError, KeyError, TypeError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class Received:
    """An event surfaced to the user: ``sync_id`` None for ephemeral events."""

    sync_id: int | None
    event: Event
    live: bool
    """Pushed as it happened (True) or fetched by a sync (False)."""
    group: bool = False
    """A large group's message, recall or edit: not in the sync queue, surfaced once per
    conversation seq (live, or read from the conversation's history)."""


class Client:
    """One device's connection; see the module docstring. Use as an async context manager."""

    def __init__(
        self,
        url: str,
        *,
        tenant_id: str,
        device_id: str,
        token: TokenSource,
        platform: str = "web",
        cursor: int = 0,
        cursor_store: CursorStore | None = None,
        ack: bool = True,
        backoff: Backoff | None = None,
        sync_page: int = fr.MAX_SYNC_LIMIT,
        gap_poll: float = 2.0,
        settle_sync: float = 2.0,
        sync_interval: float = 30.0,
        ack_interval: float = 5.0,
        request_timeout: float = 30.0,
        ca_file: Path | None = None,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        self.url = url
        #: The TLS of a wss:// URL (and of the REST calls on its https:// twin).
        self.ssl: ssl_module.SSLContext | None = None
        if urllib.parse.urlsplit(url).scheme == "wss":
            self.ssl = ssl or client_context(ca_file)
        #: Read with ``delay(attempt)`` only: commands retry concurrently, each with its count.
        self.backoff = backoff or default_backoff()
        self.tenant_id = tenant_id
        self.device_id = device_id
        self.platform = platform
        self.ack_automatically = ack
        self.sync_page = sync_page
        self.gap_poll = gap_poll
        self.settle_sync = settle_sync
        self.sync_interval = sync_interval
        self.ack_interval = ack_interval
        self.request_timeout = request_timeout
        self._token = token
        self._cursor_store = cursor_store
        self.cursor = cursor_store.load() if cursor_store is not None else cursor
        self.hello: fr.HelloOk | None = None
        self.reconnects = 0
        self.duplicates_dropped = 0
        self._socket: ClientConnection | None = None
        self._connected = asyncio.Event()
        self._pending: dict[str, asyncio.Future[fr.ServerFrame]] = {}
        self._events: asyncio.Queue[Received | BaseException] = asyncio.Queue()
        self._held: dict[int, Received] = {}
        self._syncing = asyncio.Lock()
        self._runner: asyncio.Task[None] | None = None
        self._filling: asyncio.Task[None] | None = None
        self._closed: ClientClosedError | None = None
        self._acked = self.cursor
        #: The highest sync id told to the server, and the pending coalesced ``ack``.
        self._acked_to_server = self.cursor
        self._ack_task: asyncio.Task[None] | None = None
        self._ack_count = 0
        #: ``loop.time()`` of the last live event that followed on from the cursor.
        self._live_at = 0.0
        #: Large groups: the highest conversation seq surfaced, per conversation.
        self.group_seqs: dict[str, int] = {}
        #: ``loop.time()`` of the last live group event that followed on from its seq.
        self._group_live_at = 0.0
        self._group_held: dict[str, dict[int, Received]] = {}
        self._group_filling: dict[str, asyncio.Task[None]] = {}

    # -- lifecycle --

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(
        self,
        _type: type[BaseException] | None,
        _error: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect (with retries), say hello, sync from the cursor; returns once connected."""
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self._run())
        waiter = asyncio.ensure_future(self._connected.wait())
        done, _ = await asyncio.wait({waiter, self._runner}, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            raise self._closed or ClientClosedError("the client stopped before connecting")

    async def close(self) -> None:
        """Close the connection for good; pending commands fail with ClientClosedError."""
        self._stop(ClientClosedError("closed by the client"))
        if self._socket is not None:
            await self._socket.close()
        for task in (self._filling, self._ack_task, *self._group_filling.values()):
            if task is not None:
                task.cancel()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, ClientClosedError):
                await self._runner

    # -- what the user reads --

    async def events(self) -> AsyncIterator[Received]:
        """Every event, stored ones exactly once in ``sync_id`` order; ends when closed.

        With ``ack=True`` an event counts as held once the loop asks for the next one: the
        cursor store is saved and the server acknowledged then, not before.
        """
        held: int | None = None
        while True:
            if held is not None and self.ack_automatically:
                self.ack(held)
            item = await self._events.get()
            if isinstance(item, BaseException):
                self._events.put_nowait(item)  # every iterator sees the end
                if isinstance(item, ClientClosedError) and item.code is None:
                    return
                raise item
            yield item
            held = item.sync_id if item.sync_id is not None else held

    def ack(self, sync_id: int) -> None:
        """The device holds every event up to ``sync_id``: save the cursor (if there is a store)
        and tell the server (best effort; the cursor is what resuming relies on)."""
        if sync_id <= self._acked:
            return
        self._acked = sync_id
        if self._cursor_store is not None:
            self._cursor_store.save(sync_id)
        if self._ack_task is None or self._ack_task.done():
            self._ack_task = asyncio.get_running_loop().create_task(self._ack_later())

    async def _ack_later(self) -> None:
        """One ``ack`` frame per ``ack_interval`` at most, with the highest sync id by then: an
        ack per event would double a busy device's frames and spend its command rate limit."""
        await asyncio.sleep(self.ack_interval)
        sync_id = self._acked
        if sync_id <= self._acked_to_server or not self._connected.is_set():
            return
        self._acked_to_server = sync_id
        # Nothing waits for the ``ok``: the ack is advisory (a lost one costs nothing), and a
        # request per ack (a future, a timeout, the reply parsed) was a tenth of a busy
        # client's time.
        socket_ = self._socket
        if socket_ is not None:
            frame = {"type": "ack", "id": f"ack-{self._ack_count}", "sync_id": sync_id}
            self._ack_count += 1
            with contextlib.suppress(ConnectionClosed, OSError):
                await socket_.send(fr.encode_json(frame), text=True)

    # -- commands --

    async def send(
        self,
        conversation_id: str,
        body: str | MessageBody,
        *,
        client_msg_id: str | None = None,
    ) -> fr.Accepted:
        """Send a message; re-sent with the same ``client_msg_id`` until accepted."""
        message_body = TextBody(text=body) if isinstance(body, str) else body
        frame = {
            "type": "send",
            "conversation_id": conversation_id,
            "client_msg_id": client_msg_id or uuid.uuid4().hex,
            "body": message_body.model_dump(mode="json"),
        }
        reply = await self._until_answered(frame)
        assert isinstance(reply, fr.Accepted)
        return reply

    async def read(self, conversation_id: str, seq: int) -> None:
        await self._until_answered(
            {"type": "read", "conversation_id": conversation_id, "conversation_seq": seq}
        )

    async def typing(self, conversation_id: str, *, active: bool = True) -> None:
        await self._until_answered(
            {"type": "typing", "conversation_id": conversation_id, "active": active}
        )

    async def create_conversation(
        self,
        members: list[str],
        *,
        kind: str = "group",
        name: str | None = None,
        conversation_id: str | None = None,
    ) -> str:
        """Create a conversation (a retry with the same id is harmless); returns its id."""
        frame: dict[str, Any] = {
            "type": "conversation.create",
            "kind": kind,
            "members": members,
            "conversation_id": conversation_id or (None if kind == "direct" else uuid.uuid4().hex),
        }
        if name is not None:
            frame["name"] = name
        reply = await self._until_answered(frame)
        assert isinstance(reply, fr.Ok) and reply.conversation_id is not None
        return reply.conversation_id

    async def rename(self, conversation_id: str, name: str) -> None:
        """Rename a group (owners and admins; the stream stage rejects anyone else)."""
        await self._until_answered(
            {"type": "conversation.rename", "conversation_id": conversation_id, "name": name}
        )

    async def add_member(
        self, conversation_id: str, user_id: str, *, role: Role = Role.MEMBER
    ) -> None:
        await self._until_answered(
            {
                "type": "conversation.add_member",
                "conversation_id": conversation_id,
                "user_id": user_id,
                "role": Role(role).value,
            }
        )

    async def remove_member(self, conversation_id: str, user_id: str) -> None:
        """Remove someone else from a group (leaving is :meth:`leave`)."""
        await self._until_answered(
            {
                "type": "conversation.remove_member",
                "conversation_id": conversation_id,
                "user_id": user_id,
            }
        )

    async def change_role(self, conversation_id: str, user_id: str, role: Role) -> None:
        await self._until_answered(
            {
                "type": "conversation.change_role",
                "conversation_id": conversation_id,
                "user_id": user_id,
                "role": Role(role).value,
            }
        )

    async def leave(self, conversation_id: str) -> None:
        await self._until_answered(
            {"type": "conversation.leave", "conversation_id": conversation_id}
        )

    async def mute(
        self, conversation_id: str, *, muted: bool = True, until: datetime | None = None
    ) -> None:
        """Mute (or unmute) a conversation's notifications for every device of the user;
        ``until`` ends the mute at that time (aware datetime), None mutes until unmuted."""
        await self._until_answered(
            {
                "type": "mute",
                "conversation_id": conversation_id,
                "muted": muted,
                "muted_until": until.isoformat() if until is not None else None,
            }
        )

    async def push_settings(
        self,
        *,
        muted: bool = False,
        muted_until: datetime | None = None,
        quiet_hours: tuple[str, str, str] | None = None,
        locale: str | None = None,
    ) -> None:
        """Set all of the user's push preferences at once, for every device: ``muted`` (until
        ``muted_until``, an aware datetime, or until unmuted), ``quiet_hours`` as
        ``(start, end, time_zone)`` (``("22:00", "07:00", "Europe/Berlin")``: pushes arrive
        without sound inside it), ``locale`` (BCP 47, e.g. ``de-AT``; None: English). What is
        left out goes back to its default."""
        await self._until_answered(
            {
                "type": "push_settings",
                "muted": muted,
                "muted_until": muted_until.isoformat() if muted_until is not None else None,
                "quiet_hours": (
                    None
                    if quiet_hours is None
                    else dict(zip(("start", "end", "time_zone"), quiet_hours, strict=True))
                ),
                "locale": locale,
            }
        )

    async def history(
        self,
        conversation_id: str,
        *,
        before_seq: int | None = None,
        after_seq: int | None = None,
        limit: int = fr.DEFAULT_HISTORY_LIMIT,
    ) -> fr.HistoryPage:
        reply = await self._until_answered(
            {
                "type": "history",
                "conversation_id": conversation_id,
                "before_seq": before_seq,
                "after_seq": after_seq,
                "limit": limit,
            }
        )
        assert isinstance(reply, fr.HistoryPage)
        return reply

    async def conversations(
        self, limit: int = fr.DEFAULT_CONVERSATIONS_LIMIT
    ) -> fr.ConversationList:
        reply = await self._until_answered({"type": "conversations", "limit": limit})
        assert isinstance(reply, fr.ConversationList)
        return reply

    async def who_read(self, conversation_id: str, seq: int) -> fr.ReadBy:
        reply = await self._until_answered(
            {"type": "who_read", "conversation_id": conversation_id, "seq": seq}
        )
        assert isinstance(reply, fr.ReadBy)
        return reply

    async def register_push_token(
        self,
        provider: PushProvider | str,
        token: str,
        app_id: str | None = None,
        *,
        proof: str | None = None,
        attempts: int = 5,
    ) -> None:
        """Register this device's APNs or FCM token, so that the user gets pushes while no
        device of theirs is connected. ``app_id`` (the APNs bundle id or the FCM application
        id) must be one of the tenant's configured apps; None: the tenant's default app.
        ``proof``: the ``imstream_token_challenge`` of a silent push whose
        ``imstream_device_id`` is this device, echoed — how a device takes a token that a
        device of another user holds (docs/protocol.md "Push tokens").

        Over the REST API (``PUT …/devices/{device_id}/push-token``) on the ingress this client
        connects to, so it works without :meth:`connect`: a device that stays offline can
        register. Returns once Kafka holds the registration; ``unavailable``, ``rate-limited``
        and connection errors are retried (``attempts`` in all, with the client's backoff),
        other refusals raise :class:`CommandError`."""
        fields = {"provider": PushProvider(provider).value, "token": token}
        if app_id is not None:
            fields["app_id"] = app_id
        if proof is not None:
            fields["proof"] = proof
        body = json.dumps(fields).encode()
        path = f"/v1/tenants/{self.tenant_id}/devices/{self.device_id}/push-token"
        for attempt in range(1, attempts + 1):
            headers = {
                "Authorization": f"Bearer {await self._token_text()}",
                "Content-Type": "application/json",
                "X-Device-Id": self.device_id,
            }
            try:
                status, raw = await self._rest("PUT", path, body, headers)
            except OSError:
                if attempt == attempts:
                    raise
                await asyncio.sleep(self.backoff.delay(attempt))
                continue
            reply = fr.parse_server_frame(raw)
            if isinstance(reply, fr.Ok):
                return
            if not isinstance(reply, fr.ErrorFrame):
                raise ValueError(f"unexpected {reply.type!r} reply (HTTP {status})")
            retryable = reply.code in (ErrorCode.UNAVAILABLE, ErrorCode.RATE_LIMITED)
            if not retryable or attempt == attempts:
                raise CommandError(reply)
            wait = (reply.retry_after_ms or 0) / 1000
            await asyncio.sleep(max(wait, self.backoff.delay(attempt)))

    def _rest_url(self, path: str) -> str:
        """``path`` on the ingress of the WebSocket URL (``ws`` → ``http``, ``wss`` → ``https``)."""
        parts = urllib.parse.urlsplit(self.url)
        scheme = "https" if parts.scheme == "wss" else "http"
        return urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))

    async def _rest(
        self, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        """One REST request to the ingress: the status and the body, errors included. No
        answer (refused, reset, timed out) raises ``ConnectionError``, an ``OSError``."""
        url = self._rest_url(path)
        try:
            async with httpx.AsyncClient(
                verify=self.ssl or True, timeout=self.request_timeout
            ) as http:
                response = await http.request(method, url, content=body, headers=headers)
        except httpx.TransportError as error:
            raise ConnectionError(f"{method} {url}: {error}") from error
        return response.status_code, response.content

    async def sync(self) -> int:
        """Fetch the stored events after the cursor into :meth:`events`; the new cursor."""
        async with self._syncing:
            while True:
                reply = await self._until_answered(
                    {"type": "sync", "cursor": self.cursor, "limit": self.sync_page}
                )
                assert isinstance(reply, fr.SyncPage)
                if reply.expired:
                    _log.warning(
                        "the queue's entries after %d expired; resuming at %d (rebuild the "
                        "conversation list and timelines)",
                        self.cursor,
                        reply.next_cursor,
                    )
                    self._advance(reply.next_cursor)
                    self.ack(reply.next_cursor)
                    return self.cursor
                for synced in reply.events:
                    self._surface(Received(synced.sync_id, synced.event, live=False))
                if not reply.has_more:
                    return self.cursor

    # -- inside --

    async def _until_answered(self, fields: dict[str, Any]) -> fr.ServerFrame:
        """Send a command (one request id per attempt) until it gets a final answer."""
        attempt = 0
        while True:
            if self._closed is not None:
                raise self._closed
            frame = {
                "id": uuid.uuid4().hex[:16],
                **{k: v for k, v in fields.items() if v is not None},
            }
            try:
                reply = await self._request(frame)
            except (ConnectionClosed, OSError, TimeoutError):
                attempt += 1
                await self._pause(attempt)
                continue
            if isinstance(reply, fr.ErrorFrame):
                if reply.code in (ErrorCode.UNAVAILABLE, ErrorCode.RATE_LIMITED):
                    attempt += 1
                    wait = (reply.retry_after_ms or 0) / 1000
                    await asyncio.sleep(max(wait, self.backoff.delay(attempt)))
                    continue
                raise CommandError(reply)
            return reply

    async def _pause(self, attempt: int) -> None:
        await asyncio.sleep(self.backoff.delay(attempt))
        await self._wait_connected()

    async def _wait_connected(self) -> None:
        while not self._connected.is_set():
            if self._closed is not None:
                raise self._closed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), 1.0)

    async def _request(self, frame: dict[str, Any]) -> fr.ServerFrame:
        await self._wait_connected()
        socket_ = self._socket
        assert socket_ is not None
        answer: asyncio.Future[fr.ServerFrame] = asyncio.get_running_loop().create_future()
        self._pending[frame["id"]] = answer
        try:
            await socket_.send(fr.encode_json(frame), text=True)
            return await asyncio.wait_for(answer, self.request_timeout)
        finally:
            self._pending.pop(frame["id"], None)

    async def _fire(self, frame: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            await self._request(frame)

    async def _token_text(self) -> str:
        return self._token if isinstance(self._token, str) else await self._token()

    async def _run(self) -> None:
        """Connect, hello, read frames; reconnect with backoff until closed for good."""
        # This loop's own count (the policy may be shared): started over at every hello.
        reconnect = replace(self.backoff, attempts=0)
        while not self.stopped():
            try:
                async with connect(
                    self.url,
                    compression=None,
                    ping_interval=None,
                    open_timeout=20,
                    ssl=self.ssl,
                ) as socket_:
                    await socket_.send(
                        fr.encode_json(
                            {
                                "type": "hello",
                                "id": "hello",
                                "token": await self._token_text(),
                                "tenant_id": self.tenant_id,
                                "device_id": self.device_id,
                                "platform": self.platform,
                                "sync_cursor": self.cursor,
                            }
                        ),
                        text=True,
                    )
                    hello = fr.parse_server_frame(await asyncio.wait_for(socket_.recv(), 20))
                    if isinstance(hello, fr.ErrorFrame):
                        raise CommandError(hello)
                    assert isinstance(hello, fr.HelloOk)
                    self.hello = hello
                    self._socket = socket_
                    reconnect.reset()
                    self._connected.set()
                    loop = asyncio.get_running_loop()
                    tasks = [
                        loop.create_task(self._keepalive(hello)),
                        loop.create_task(self._resync(repeat=True)),
                    ]
                    if not isinstance(self._token, str) and hello.token_expires_at is not None:
                        tasks.append(loop.create_task(self._refresh(hello.token_expires_at)))
                    try:
                        async for raw in socket_:
                            self._on_frame(raw)
                    finally:
                        for task in tasks:
                            task.cancel()
                    code = socket_.close_code
            except ConnectionClosed as closed:
                code = closed.rcvd.code if closed.rcvd is not None else None
            except ssl_module.SSLCertVerificationError as error:
                self._stop(ClientClosedError(f"the server at {self.url} is not trusted: {error}"))
                return
            except (OSError, InvalidHandshake, TimeoutError) as error:
                _log.info("connecting to %s failed: %s", self.url, error)
                code = None
            except CommandError as error:
                self._stop(ClientClosedError(f"hello refused: {error}", None))
                return
            finally:
                self._connected.clear()
                self._socket = None
                for answer in self._pending.values():
                    if not answer.done():
                        answer.set_exception(ConnectionError("connection lost"))
            if self.stopped():
                return
            if code in _NO_RECONNECT or (
                code == CloseCode.TOKEN_EXPIRED and isinstance(self._token, str)
            ):
                self._stop(ClientClosedError(f"closed by the server with {code}", code))
                return
            self.reconnects += 1
            await asyncio.sleep(reconnect.next())

    async def _refresh(self, expires_at: datetime) -> None:
        """Renew the socket's token at four fifths of its remaining life, again and again (the
        server closes a socket whose token expired, 4003): with a token callable only."""
        while True:
            remaining = (expires_at - datetime.now(UTC)).total_seconds()
            await asyncio.sleep(max(1.0, remaining * 0.8))
            token = await self._token_text()
            frame = {"type": "refresh_token", "id": f"refresh-{uuid.uuid4().hex[:12]}"}
            try:
                reply = await self._request({**frame, "token": token})
            except (ClientClosedError, ConnectionError, TimeoutError):
                return  # the socket is going; the reconnect's hello carries a fresh token
            if isinstance(reply, fr.ErrorFrame):
                _log.warning("the token refresh was refused: %s", reply.message)
                return
            expires_at = token_expiry(token) or expires_at

    async def _keepalive(self, hello: fr.HelloOk) -> None:
        """A ping every half idle timeout, so the server never closes an idle client."""
        while True:
            await asyncio.sleep(hello.idle_timeout_ms / 2000)
            await self._fire({"type": "ping", "id": f"ping-{uuid.uuid4().hex[:12]}"})

    async def _resync(self, *, repeat: bool = False) -> None:
        """Sync from the cursor and release held live events; with ``repeat``, again after
        ``settle_sync`` and then every ``sync_interval`` seconds while connected: live delivery
        is best effort (an event for a device whose presence the stream stage has not seen yet
        goes only to its queue), so a quiet device still catches up. The repeat skips intervals
        in which live events arrived in order: a store read per device every few seconds is
        what thousands of connected devices would otherwise cost (measured in bench/e2e.py)."""
        loop = asyncio.get_running_loop()
        recent, group_recent, first = False, False, True
        while True:
            # While live events keep following on from the cursor nothing can be missing but
            # the newest ones, which the first quiet interval's sync fetches.
            if not recent or self._held:
                with contextlib.suppress(ClientClosedError, CommandError):
                    await self.sync()
                    self._release_ready()
                if self._held:
                    self._fill_gap()
            # Large groups likewise: a message sent while the socket was down may have missed
            # both the live path (the node learns the user's groups from the connect's answer)
            # and the first catch-up (the store lags), and on a quiet group no later event
            # shows the gap.
            if first or (self.group_seqs and not group_recent):
                with contextlib.suppress(ClientClosedError, CommandError):
                    await self._catch_up_groups()
            if not repeat:
                return
            pause = self.settle_sync if first else self.sync_interval
            first = False
            await asyncio.sleep(pause)
            recent = loop.time() - self._live_at < pause
            group_recent = loop.time() - self._group_live_at < pause

    def _on_frame(self, raw: str | bytes) -> None:
        """Route a frame by its head; parse (and validate) only what is handed on: an event
        frame's event, and a reply a request waits for."""
        try:
            head = fr.read_server_frame_head(raw)
            if head.type == "event" and head.event_json:
                if head.sync_id is not None and head.sync_id <= self.cursor:
                    self.duplicates_dropped += 1  # before parsing: nothing is handed on
                    return
                self._on_live(head.sync_id, parse_event(bytes(head.event_json)))
                return
            answer = self._pending.get(str(head.id))
            if answer is None or answer.done():
                return  # a reply nothing waits for (an ack's ok, a request timed out)
            frame = fr.parse_server_frame(raw)
        except ValueError as error:  # a frame type this client does not know: ignored
            _log.debug("ignored a server frame this client does not understand: %s", error)
            return
        answer.set_result(frame)

    def _on_live(self, sync_id: int | None, event: Event) -> None:
        if sync_id is None:
            entry = _group_entry(event)
            if entry is not None:
                self._on_group_entry(*entry, Received(None, event, live=True, group=True))
                return
            self._events.put_nowait(Received(None, event, live=True))
            return
        if sync_id <= self.cursor:
            self.duplicates_dropped += 1
            return
        if sync_id == self.cursor + 1 and not self._held:
            self._live_at = asyncio.get_running_loop().time()
            self._surface(Received(sync_id, event, live=True))
            return
        # Ahead of the cursor (or behind held ones): hold it until a sync fills what lies
        # between.
        self._held[sync_id] = Received(sync_id, event, live=True)
        self._release_ready()
        if self._held:
            self._fill_gap()

    # -- large groups --

    def _on_group_entry(self, conversation_id: str, seq: int, item: Received) -> None:
        known = self.group_seqs.get(conversation_id)
        if known is not None and seq <= known:
            self.duplicates_dropped += 1
            return
        held = self._group_held.setdefault(conversation_id, {})
        if known is not None and seq == known + 1 and not held:
            self._group_live_at = asyncio.get_running_loop().time()
            self._surface_group(conversation_id, seq, item)
            return
        # Ahead of what was surfaced, or a group not followed yet: held while the history
        # between is read.
        held[seq] = item
        self._fill_group(conversation_id)

    def _surface_group(self, conversation_id: str, seq: int, item: Received) -> None:
        self.group_seqs[conversation_id] = seq
        self._events.put_nowait(item)

    def _fill_group(self, conversation_id: str, start: int | None = None) -> None:
        """Read the group's history past what was surfaced (one task per group)."""
        task = self._group_filling.get(conversation_id)
        if task is None or task.done():
            self._group_filling[conversation_id] = asyncio.get_running_loop().create_task(
                self._fill_group_history(conversation_id, start)
            )

    async def _fill_group_history(self, conversation_id: str, start: int | None) -> None:
        """Surface the group's entries past the last surfaced seq (or ``start``, or the read
        position for a group not followed yet), then the held live ones that follow on; again,
        with a growing pause, while some are held (the store may lag behind live delivery)."""
        pause = 0.1
        with contextlib.suppress(ClientClosedError, CommandError):
            if conversation_id not in self.group_seqs:
                if start is None:
                    start = await self._group_start(conversation_id)
                self.group_seqs[conversation_id] = start
            while True:
                known = self.group_seqs[conversation_id]
                page = await self.history(
                    conversation_id, after_seq=known, limit=fr.MAX_HISTORY_LIMIT
                )
                for entry in page.entries:
                    if entry.seq > self.group_seqs[conversation_id]:
                        fetched = Received(None, entry.event, live=False, group=True)
                        self._surface_group(conversation_id, entry.seq, fetched)
                held = self._group_held.get(conversation_id, {})
                for seq in sorted(held):
                    current = self.group_seqs[conversation_id]
                    if seq <= current:
                        del held[seq]
                        self.duplicates_dropped += 1
                    elif seq == current + 1:
                        self._surface_group(conversation_id, seq, held.pop(seq))
                if page.has_more:
                    continue
                if not held:
                    return
                await asyncio.sleep(pause)
                pause = min(pause * 2, self.gap_poll)

    async def _group_start(self, conversation_id: str) -> int:
        """Where to start following a group: the read position the conversation list shows."""
        listed = await self.conversations(limit=fr.MAX_CONVERSATIONS_LIMIT)
        for item in listed.conversations:
            if item.conversation_id == conversation_id:
                return item.read_seq
        held = self._group_held.get(conversation_id)
        return min(held) - 1 if held else 0

    async def _catch_up_groups(self) -> None:
        """At a (re)connect: read what each large group of the list holds past the last seq
        surfaced (past the read position for a group not followed yet)."""
        listed = await self.conversations(limit=fr.MAX_CONVERSATIONS_LIMIT)
        for item in listed.conversations:
            if not item.large:
                continue
            # A group not followed yet is followed from its read position from now on, so that
            # the quiet intervals' catch-ups include it.
            known = self.group_seqs.setdefault(item.conversation_id, item.read_seq)
            if item.last_seq > known:
                self._fill_group(item.conversation_id, known)

    def _fill_gap(self) -> None:
        """Sync until the held live events follow on from the cursor (one task at a time)."""
        if self._filling is None or self._filling.done():
            self._filling = asyncio.get_running_loop().create_task(self._sync_until_filled())

    async def _sync_until_filled(self) -> None:
        """Sync, then surface the held events the cursor has reached; again, with a growing
        pause (at most ``gap_poll``), while some are held. No deadline: the store holds every
        stored event eventually, and a page runs to its head, so each round either fills the
        gap or finds the store still behind."""
        pause = 0.1
        with contextlib.suppress(ClientClosedError, CommandError):
            while self._held:
                await self.sync()
                self._release_ready()
                if self._held:
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, self.gap_poll)

    def _release_ready(self) -> None:
        """Surface the held live events that follow on from the cursor; drop those a sync
        surfaced already."""
        for sync_id in sorted(self._held):
            if sync_id > self.cursor + 1:
                return
            item = self._held.pop(sync_id)
            if sync_id > self.cursor:
                self._surface(item)
            else:
                self.duplicates_dropped += 1

    def _surface(self, item: Received) -> None:
        assert item.sync_id is not None
        if item.sync_id <= self.cursor:
            self.duplicates_dropped += 1
            return
        self._held.pop(item.sync_id, None)
        self._advance(item.sync_id)
        self._events.put_nowait(item)

    def _advance(self, cursor: int) -> None:
        """The dedupe mark: the highest sync id surfaced to :meth:`events`."""
        self.cursor = max(self.cursor, cursor)

    def stopped(self) -> bool:
        """Closed for good (by the user, or by the server with a code that forbids retrying)."""
        return self._closed is not None

    def _stop(self, reason: ClientClosedError) -> None:
        if self._closed is None:
            self._closed = reason
            self._events.put_nowait(reason)
        for answer in self._pending.values():
            if not answer.done():
                answer.set_exception(reason)


def _group_entry(event: Event) -> tuple[str, int] | None:
    """``(conversation, seq)`` of a large group's timeline entry delivered outside the queue."""
    if isinstance(event, MessageSent | MessageRecalled | MessageEdited):
        seq = event.payload.conversation_seq
        if seq is not None:
            return event.payload.conversation_id, seq
    return None
