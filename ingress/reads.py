"""Clients' reads, answered from the serving store: sync, history, the conversation list, who-read.

Both doors use it (the WebSocket's ``sync``/``history``/``conversations``/``who_read`` frames and
the REST ``GET`` routes). Authorization: a user syncs only their own queue (the principal's);
reads a conversation's history as a current member, or, having been removed or left, up to the
departure; reads who-read only as a current member; and never reads a deleted conversation.
Bodies are withheld (``withheld``) wherever they would be served after their message was
recalled or their conversation deleted: history entries, and sync pages. The facts behind this
are in the store before the command that made them is answered (:meth:`Reads.settled`,
docs/storage.md "Read access").

The CQL session is opened in the background at start and re-tried until the cluster answers; until
then, and whenever a query fails, a read answers ``unavailable`` with a retry hint — a read is
always safe to repeat. Writes (sends) never depend on the store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final, Literal, TypeGuard, TypeVar

from cassandra.cluster import Cluster
from pydantic import ValidationError

from core.connections import cql_cluster
from core.settings import Settings
from ingress.connection import Principal
from schemas import frames as fr
from schemas.errors import ErrorCode
from schemas.events import Event, MessageEdited, MessageSent, parse_event
from sinks.cql.rules import withheld
from sinks.cql.serving import serving_keyspace
from sinks.cql.store import (
    ConversationRow,
    CursorExpiredError,
    ServingStore,
    StoreUnavailableError,
    TimelinePage,
    TimelineRow,
)

_log = logging.getLogger(__name__)
R = TypeVar("R")

ReadFrame = fr.Sync | fr.History | fr.Conversations | fr.WhoRead
READ_FRAMES: Final = (fr.Sync, fr.History, fr.Conversations, fr.WhoRead)
#: How long a client should wait before repeating a read the store could not answer.
RETRY_AFTER_MS: Final = 1000
#: The stored events a ``sync_page`` or ``history_page`` carries, in bytes: a page of 200
#: entries of 32 KiB bodies (each perhaps with an edit) was tens of MB in one frame. A page over
#: it ends early with ``has_more``; it always carries at least one entry. Half of the 1 MiB
#: frames common WebSocket clients accept by default (the Python ``websockets`` library's).
MAX_PAGE_BYTES: Final = 512 * 1024
_CONNECT_RETRY_SECONDS: Final = 5.0
#: The timeline entries that carry a body.
_BODY_ENTRIES: Final = ("message.sent", "message.edited")
#: How often :meth:`Reads.settled` asks the store, at first and at most.
_SETTLE_FIRST_SECONDS: Final = 0.02
_SETTLE_MAX_SECONDS: Final = 0.2
#: Commands waiting for their outcome at once on a node: each asks the store up to five times a
#: second, so a flood of removes (the rate limits let a user send ~40 a second) must not turn
#: into a flood of reads. One over it is answered at once as not yet in effect.
MAX_SETTLING: Final = 1024


def is_reading(frame: fr.ClientFrame) -> TypeGuard[ReadFrame]:
    return isinstance(frame, READ_FRAMES)


class Reads:
    """The read side of one ingress node."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store: ServingStore | None = None
        self._cluster: Cluster | None = None
        self._connecting: asyncio.Task[None] | None = None
        self.max_settling = MAX_SETTLING
        #: Commands in :meth:`settled` now.
        self.settling = 0

    def start(self) -> None:
        """Connect in the background; reads answer ``unavailable`` until connected."""
        self._connecting = asyncio.get_running_loop().create_task(self._connect())

    async def stop(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._cluster is not None:
            await asyncio.to_thread(self._cluster.shutdown)

    @property
    def connected(self) -> bool:
        return self.store is not None

    async def _connect(self) -> None:
        while True:
            cluster = cql_cluster(self.settings)
            try:
                session = await asyncio.to_thread(cluster.connect)
                keyspace = await asyncio.to_thread(
                    serving_keyspace, session, self.settings.cql.keyspace
                )
                store = await asyncio.to_thread(ServingStore, session, self.settings, keyspace)
                # A master key that wraps none of the tenants' keys would serve every body as
                # withheld: reads stay unavailable, and the log says why, until it is fixed.
                await asyncio.to_thread(store.keys.check_master_key)
                self.store = store
            except Exception as error:  # the driver raises several kinds; all mean "not yet"
                _log.warning(
                    "serving store not reachable (%s); reads answer unavailable, retrying in %gs",
                    error,
                    _CONNECT_RETRY_SECONDS,
                )
                await asyncio.to_thread(cluster.shutdown)
                await asyncio.sleep(_CONNECT_RETRY_SECONDS)
                continue
            self._cluster = cluster
            _log.info("serving store connected (keyspace %s)", self.store.keyspace)
            return

    async def settled(self, tenant_id: str, command_event_id: str, seconds: float) -> bool:
        """Wait until the store holds the outcome of an access-reducing command (remove, leave,
        delete, recall): applied with its facts, or rejected. False if it does not within
        ``seconds`` (the stream stage or the CQL sink is behind, the store is down), and at once
        while ``max_settling`` commands wait already."""
        if self.settling >= self.max_settling:
            return False
        self.settling += 1
        try:
            return await self._settled(tenant_id, command_event_id, seconds)
        finally:
            self.settling -= 1

    async def _settled(self, tenant_id: str, command_event_id: str, seconds: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        delay = _SETTLE_FIRST_SECONDS
        while True:
            store = self.store
            if store is not None:
                try:
                    async with asyncio.timeout_at(deadline):
                        if await store.command_outcome(tenant_id, command_event_id) is not None:
                            return True
                except (StoreUnavailableError, TimeoutError) as error:
                    _log.debug("outcome of %s not readable yet: %r", command_event_id, error)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, _SETTLE_MAX_SECONDS)

    async def answer(self, principal: Principal, frame: ReadFrame) -> fr.ServerFrame:
        """The reply to one read; never raises."""
        store = self.store
        if store is None:
            return unavailable(frame.id, "the serving store is not connected yet")
        try:
            match frame:
                case fr.Sync():
                    return await self._sync(store, principal, frame)
                case fr.History():
                    return await self._history(store, principal, frame)
                case fr.Conversations():
                    return await self._conversations(store, principal, frame)
                case fr.WhoRead():
                    return await self._who_read(store, principal, frame)
        except StoreUnavailableError as error:
            _log.warning("a %s read failed: %s", frame.type, error)
            return unavailable(frame.id, f"the serving store did not answer ({error})")
        except Exception:
            _log.exception("unexpected error answering a %s", frame.type)
            return fr.ErrorFrame(id=frame.id, code=ErrorCode.INTERNAL, message="unexpected error")

    async def _sync(self, store: ServingStore, principal: Principal, frame: fr.Sync) -> fr.SyncPage:
        try:
            page = await store.sync(
                principal.tenant_id, principal.user_id, cursor=frame.cursor, limit=frame.limit
            )
        except CursorExpiredError as expired:
            return fr.SyncPage(
                id=frame.id, events=[], has_more=False, next_cursor=expired.head, expired=True
            )
        rows, cut = _within_budget(page.rows, lambda row: len(row.event), keep="first")
        events = []
        for row in rows:
            try:
                events.append(fr.SyncedEvent(sync_id=row.sync_id, event=parse_event(row.event)))
            except Exception:
                # A row the store holds but this build cannot read: skip it, say so loudly.
                _log.exception("sync entry %d of %s unreadable", row.sync_id, principal.user_id)
        events = await _withhold_synced(store, principal.tenant_id, events)
        if cut:
            return fr.SyncPage(
                id=frame.id, events=events, has_more=True, next_cursor=rows[-1].sync_id
            )
        return fr.SyncPage(
            id=frame.id, events=events, has_more=page.has_more, next_cursor=page.next_cursor
        )

    async def _history(
        self, store: ServingStore, principal: Principal, frame: fr.History
    ) -> fr.HistoryPage | fr.ErrorFrame:
        tenant, conversation = principal.tenant_id, frame.conversation_id
        access = await store.read_access(tenant, conversation, principal.user_id)
        if access is None:
            return _not_a_member(frame.id, conversation)
        until = access.until_seq
        if until is None:
            page = await store.history(
                tenant,
                conversation,
                before=frame.before_seq,
                after=frame.after_seq,
                limit=frame.limit,
            )
        else:
            page = await _history_until(store, tenant, conversation, frame, until)
        # Scrolling forward keeps the oldest entries (the next page follows on from the last),
        # back or the latest keeps the newest (the next page is before the first).
        rows, cut = _within_budget(
            page.rows,
            lambda row: len(row.event) + len(row.edited_event or ""),
            keep="first" if frame.after_seq is not None else "last",
        )
        recalled = await store.recalled(
            tenant,
            conversation,
            {row.message_id for row in rows if row.message_id and row.entry_type in _BODY_ENTRIES},
        )
        return fr.HistoryPage(
            id=frame.id,
            conversation_id=conversation,
            entries=[_entry(row, recalled) for row in rows],
            has_more=page.has_more or cut,
        )

    async def _conversations(
        self, store: ServingStore, principal: Principal, frame: fr.Conversations
    ) -> fr.ConversationList:
        rows = await store.conversations(principal.tenant_id, principal.user_id, limit=frame.limit)
        items = []
        for row in rows:
            try:
                items.append(_item(row))
            except ValidationError:
                _log.exception(
                    "conversation %s of %s unreadable", row.conversation_id, principal.user_id
                )
        return fr.ConversationList(id=frame.id, conversations=items)

    async def _who_read(
        self, store: ServingStore, principal: Principal, frame: fr.WhoRead
    ) -> fr.ReadBy | fr.ErrorFrame:
        # Current members only (a former member's position in who-read is no longer theirs).
        if not await store.is_member(principal.tenant_id, frame.conversation_id, principal.user_id):
            return _not_a_member(frame.id, frame.conversation_id)
        readers = await store.who_read(principal.tenant_id, frame.conversation_id, frame.seq)
        return fr.ReadBy(
            id=frame.id,
            conversation_id=frame.conversation_id,
            seq=frame.seq,
            readers=[
                fr.Reader(user_id=r.user_id, read_seq=r.read_seq, read_at=r.read_at)
                for r in readers
            ],
        )


def _within_budget(
    rows: list[R], size: Callable[[R], int], *, keep: Literal["first", "last"]
) -> tuple[list[R], bool]:
    """The ``rows`` a page carries within ``MAX_PAGE_BYTES`` (at least one), from the start or
    from the end, and whether any were left out."""
    ordered = rows if keep == "first" else rows[::-1]
    kept: list[R] = []
    total = 0
    for row in ordered:
        total += size(row)
        if kept and total > MAX_PAGE_BYTES:
            break
        kept.append(row)
    cut = len(kept) < len(rows)
    return (kept if keep == "first" else kept[::-1]), cut


async def _history_until(
    store: ServingStore, tenant_id: str, conversation_id: str, frame: fr.History, until: int
) -> TimelinePage:
    """A former member's page: the entries up to ``until`` (the departure), none after."""
    if frame.after_seq is not None:
        if frame.after_seq >= until:
            return TimelinePage(rows=[], has_more=False)
        page = await store.history(
            tenant_id, conversation_id, before=None, after=frame.after_seq, limit=frame.limit
        )
        rows = [row for row in page.rows if row.seq <= until]
        ends = len(rows) < len(page.rows) or (bool(rows) and rows[-1].seq >= until)
        return TimelinePage(rows=rows, has_more=page.has_more and not ends)
    before = until + 1 if frame.before_seq is None else min(frame.before_seq, until + 1)
    return await store.history(
        tenant_id, conversation_id, before=before, after=None, limit=frame.limit
    )


def _entry(row: TimelineRow, recalled: set[str]) -> fr.TimelineEntry:
    event = parse_event(row.event)
    if row.message_id in recalled and row.entry_type in _BODY_ENTRIES:
        # Recalled: the store's row may not show it yet, the body never goes out again.
        return fr.TimelineEntry(
            seq=row.seq, event=withheld(event), recalled=row.entry_type == "message.sent"
        )
    return fr.TimelineEntry(
        seq=row.seq,
        event=event,
        recalled=row.recalled,
        edited=parse_event(row.edited_event) if row.edited_event else None,
    )


async def _withhold_synced(
    store: ServingStore, tenant_id: str, events: list[fr.SyncedEvent]
) -> list[fr.SyncedEvent]:
    """``events`` with the bodies of recalled messages (and their edits) and of deleted
    conversations withheld: one recall and one deletion lookup per conversation with bodies on
    the page, all at once."""
    by_conversation: dict[str, set[str]] = {}
    for synced in events:
        body = _body_of(synced.event)
        if body is not None:
            by_conversation.setdefault(body[0], set()).add(body[1])
    if not by_conversation:
        return events
    conversations = list(by_conversation)
    recalls, deletions = await asyncio.gather(
        asyncio.gather(*(store.recalled(tenant_id, c, by_conversation[c]) for c in conversations)),
        asyncio.gather(*(store.deleted(tenant_id, c) for c in conversations)),
    )
    recalled = {message for found in recalls for message in found}
    deleted = {c for c, gone in zip(conversations, deletions, strict=True) if gone}
    kept = []
    for synced in events:
        body = _body_of(synced.event)
        if body is not None and (body[0] in deleted or body[1] in recalled):
            kept.append(fr.SyncedEvent(sync_id=synced.sync_id, event=withheld(synced.event)))
        else:
            kept.append(synced)
    return kept


def _body_of(event: Event) -> tuple[str, str] | None:
    """(conversation, message id) of an event that carries a body, else None."""
    if isinstance(event, MessageSent):
        return event.payload.conversation_id, event.event_id
    if isinstance(event, MessageEdited):
        return event.payload.conversation_id, event.payload.message_id
    return None


def _item(row: ConversationRow) -> fr.ConversationItem:
    return fr.ConversationItem.model_validate(
        {
            "conversation_id": row.conversation_id,
            "kind": row.kind,
            "name": row.name,
            "role": row.role,
            "last_seq": row.last_seq,
            "read_seq": row.read_seq,
            "unread": row.unread,
            "muted": row.muted,
            "muted_until": row.muted_until,
            "pinned": row.pinned,
            "last_message_id": row.last_message_id,
            "last_sender_id": row.last_sender_id,
            "last_preview": row.last_preview,
            "last_activity_at": row.last_activity_at,
            "large": row.large,
        }
    )


def unavailable(request_id: str, why: str, repeat: str = "the read") -> fr.ErrorFrame:
    """The ``unavailable`` answer to a read (or a search) the client may repeat, and when."""
    return fr.ErrorFrame(
        id=request_id,
        code=ErrorCode.UNAVAILABLE,
        message=f"{why}; {repeat} is safe to repeat",
        retry_after_ms=RETRY_AFTER_MS,
    )


def _not_a_member(request_id: str, conversation_id: str) -> fr.ErrorFrame:
    return fr.ErrorFrame(
        id=request_id,
        code=ErrorCode.FORBIDDEN,
        message=f"only members read conversation {conversation_id}",
    )
