"""The serving store's read side: history pages, sync pages, conversation lists, who-read.

The ingress answers clients' reads from here; the CQL sink (``sinks.cql.sink``) writes the
tables (``sinks/cql/migrations``, docs/storage.md). Every query reads one partition, and pages
walk the bucketed partitions in order:

- timelines are bucketed by ``seq // timeline_bucket_size`` and seqs are dense (every sequenced
  entry takes the next one), so a page that runs out of a bucket continues in the neighbouring
  bucket, and an empty bucket is the end of the conversation;
- sync queues are bucketed by ``sync_id // sync_bucket_size``; sync ids may have gaps, so a page
  continues up to the bucket of the user's head (``sync_heads``), not to the first empty bucket.
  The sink moves a user's head only once every entry up to it is written, and pages stop at the
  head: a device never pages past an entry that is still on its way.

Read access (docs/storage.md, "Read access") is decided from facts the CQL sink writes at
``LOCAL_QUORUM`` before anything sequenced after them, and read here at ``LOCAL_QUORUM``: a
member gone (``former_members``: the history up to the departure), a deleted conversation, a
recalled message (``recalled_messages``: its body and its edits' are withheld).

The driver's futures are bridged to asyncio; a store that cannot reach the cluster raises
:class:`StoreUnavailableError` and the ingress answers ``unavailable`` with a retry hint.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from cassandra.cluster import ResponseFuture, Session
from cassandra.query import PreparedStatement

from core.settings import Settings
from schemas.errors import SchemaError
from schemas.events import MessageEdited, MessageSent, parse_event
from sinks.cql.crypto import (
    DataKey,
    KeyRing,
    MasterKeyMismatchError,
    key_id_of,
    key_ring,
    open_event,
    open_text,
    preview_context,
    sync_context,
    timeline_context,
)
from sinks.cql.rules import ACCESS_CONSISTENCY, RECALLED_PREVIEW, preview

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Empty sync buckets a page walks over before it declares the cursor's entries expired.
MAX_EMPTY_SYNC_BUCKETS = 64


class StoreUnavailableError(Exception):
    """The CQL cluster did not answer (timeout, unavailable, no host): retry later."""


class CursorExpiredError(Exception):
    """The sync queue no longer holds entries after this cursor (they outlived the retention);
    ``head`` is the queue's newest sync id, where a rebuilt device resumes."""

    def __init__(self, head: int, message: str) -> None:
        super().__init__(message)
        self.head = head


@dataclass(frozen=True, slots=True)
class ReadAccess:
    """What a user may read of a conversation: the whole timeline (``until_seq`` None), or,
    having been removed or left, the entries up to ``until_seq``."""

    until_seq: int | None = None


@dataclass(frozen=True, slots=True)
class TimelineRow:
    seq: int
    entry_type: str
    #: The message the entry is or concerns (a recall's or an edit's target).
    message_id: str | None
    event: str
    """The sequenced event's JSON, as on ``im.messages.sequenced``."""
    recalled: bool
    recalled_seq: int | None
    edited_event: str | None
    edited_seq: int | None


@dataclass(frozen=True, slots=True)
class TimelinePage:
    rows: list[TimelineRow]
    """Ascending by seq."""
    has_more: bool


@dataclass(frozen=True, slots=True)
class SyncRow:
    sync_id: int
    event: str


@dataclass(frozen=True, slots=True)
class SyncQueuePage:
    rows: list[SyncRow]
    has_more: bool
    next_cursor: int


@dataclass(frozen=True, slots=True)
class ConversationRow:
    conversation_id: str
    kind: str | None
    name: str | None
    role: str | None
    last_seq: int
    last_message_id: str | None
    last_sender_id: str | None
    last_preview: str | None
    last_activity_at: datetime | None
    read_seq: int
    unread: int
    muted: bool
    muted_until: datetime | None
    pinned: bool
    #: A large group (read diffusion): read through :meth:`ServingStore.conversations`, its
    #: last seq, unread count, name and last message are the conversation's own.
    large: bool = False


@dataclass(frozen=True, slots=True)
class ReaderRow:
    user_id: str
    read_seq: int
    read_at: datetime | None


class ServingStore:
    """Reads for the ingress. Create with :meth:`connect`; every method is a coroutine."""

    def __init__(
        self,
        session: Session,
        settings: Settings,
        keyspace: str | None = None,
        keys: KeyRing | None = None,
    ) -> None:
        """Every value sealed by the CQL sink is opened here, with the tenants' data keys of the
        anchor keyspace (``keys``, default: from ``settings``): the rows handed out hold
        plaintext, or withheld bodies where a key was forgotten (``sinks/cql/crypto.py``)."""
        self.session = session
        self.keys = keys or key_ring(session, settings)
        self.timeline_bucket = settings.sinks.timeline_bucket_size
        self.sync_bucket = settings.sinks.sync_bucket_size
        keyspace = keyspace or settings.cql.keyspace
        self.keyspace = keyspace
        prepare = session.prepare
        self._timeline_before = prepare(
            f"SELECT seq, entry_type, message_id, event, recalled, recalled_seq, edited_event, "
            f"edited_seq FROM {keyspace}.timeline WHERE tenant_id = ? AND conversation_id = ? "
            f"AND bucket = ? AND seq < ? ORDER BY seq DESC LIMIT ?"
        )
        self._timeline_after = prepare(
            f"SELECT seq, entry_type, message_id, event, recalled, recalled_seq, edited_event, "
            f"edited_seq FROM {keyspace}.timeline WHERE tenant_id = ? AND conversation_id = ? "
            f"AND bucket = ? AND seq > ? ORDER BY seq ASC LIMIT ?"
        )
        self._sync = prepare(
            f"SELECT sync_id, event FROM {keyspace}.sync_queue WHERE tenant_id = ? "
            f"AND user_id = ? AND bucket = ? AND sync_id > ? ORDER BY sync_id ASC LIMIT ?"
        )
        self._head = prepare(
            f"SELECT last_sync_id FROM {keyspace}.sync_heads WHERE tenant_id = ? AND user_id = ?"
        )
        self._conversations = prepare(
            f"SELECT conversation_id, kind, name, role, member, last_seq, last_message_id, "
            f"last_sender_id, last_preview, last_activity_at, read_seq, unread, muted, "
            f"muted_until, pinned, large FROM {keyspace}.user_conversations "
            f"WHERE tenant_id = ? AND user_id = ?"
        )
        self._conversation = prepare(
            f"SELECT name, deleted FROM {keyspace}.conversations "
            f"WHERE tenant_id = ? AND conversation_id = ?"
        )
        self._member = prepare(
            f"SELECT role FROM {keyspace}.members WHERE tenant_id = ? AND conversation_id = ? "
            f"AND user_id = ?"
        )
        self._readers = prepare(
            f"SELECT user_id, read_seq, read_at FROM {keyspace}.read_positions "
            f"WHERE tenant_id = ? AND conversation_id = ?"
        )
        self._former = prepare(
            f"SELECT until_seq FROM {keyspace}.former_members WHERE tenant_id = ? "
            f"AND conversation_id = ? AND user_id = ?"
        )
        self._recalled = prepare(
            f"SELECT message_id FROM {keyspace}.recalled_messages WHERE tenant_id = ? "
            f"AND conversation_id = ? AND message_id IN ?"
        )
        self._outcome = prepare(
            f"SELECT outcome FROM {keyspace}.command_outcomes WHERE tenant_id = ? "
            f"AND command_event_id = ?"
        )
        for statement in (
            self._member,
            self._conversation,
            self._former,
            self._recalled,
            self._outcome,
        ):
            statement.consistency_level = ACCESS_CONSISTENCY

    async def is_member(self, tenant_id: str, conversation_id: str, user_id: str) -> bool:
        """Whether the user is a current member of a conversation that is not deleted."""
        access = await self.read_access(tenant_id, conversation_id, user_id)
        return access is not None and access.until_seq is None

    async def read_access(
        self, tenant_id: str, conversation_id: str, user_id: str
    ) -> ReadAccess | None:
        """What ``user_id`` may read of the conversation; None: nothing (never a member, or the
        conversation is deleted)."""
        member, conversation, former = await asyncio.gather(
            self._run(self._member, (tenant_id, conversation_id, user_id)),
            self._run(self._conversation, (tenant_id, conversation_id)),
            self._run(self._former, (tenant_id, conversation_id, user_id)),
        )
        if conversation and conversation[0].deleted:
            return None
        if member:
            return ReadAccess()
        if former and former[0].until_seq is not None:
            return ReadAccess(until_seq=int(former[0].until_seq))
        return None

    async def deleted(self, tenant_id: str, conversation_id: str) -> bool:
        """Whether the conversation was deleted."""
        rows = await self._run(self._conversation, (tenant_id, conversation_id))
        return bool(rows and rows[0].deleted)

    async def recalled(
        self, tenant_id: str, conversation_id: str, message_ids: Collection[str]
    ) -> set[str]:
        """Which of ``message_ids`` (of one conversation) were recalled: one partition read."""
        if not message_ids:
            return set()
        rows = await self._run(self._recalled, (tenant_id, conversation_id, sorted(message_ids)))
        return {str(row.message_id) for row in rows}

    async def command_outcome(self, tenant_id: str, command_event_id: str) -> str | None:
        """``applied`` or ``rejected`` once the store holds an access-reducing command's
        outcome (its facts first), else None."""
        rows = await self._run(self._outcome, (tenant_id, command_event_id))
        return str(rows[0].outcome) if rows else None

    async def history(
        self,
        tenant_id: str,
        conversation_id: str,
        *,
        before: int | None,
        after: int | None,
        limit: int,
        last_seq_hint: int = 0,
    ) -> TimelinePage:
        """Up to ``limit`` entries with seq < ``before`` (the newest of them), or with seq >
        ``after`` (the oldest of them); the latest entries when neither is given
        (``last_seq_hint``, e.g. the reader's conversation-list entry, saves the search for the
        end of the timeline)."""
        if after is not None:
            return await self._history_after(tenant_id, conversation_id, after, limit)
        if before is None:
            before = await self._end_of_timeline(tenant_id, conversation_id, last_seq_hint) + 1
        rows: list[TimelineRow] = []
        bucket = max(0, before - 1) // self.timeline_bucket
        while bucket >= 0 and len(rows) < limit:
            found = await self._run(
                self._timeline_before,
                (tenant_id, conversation_id, bucket, before, limit - len(rows)),
            )
            rows.extend(_timeline_row(row) for row in found)
            bucket -= 1
        rows.reverse()
        oldest = rows[0].seq if rows else before
        rows = await self._open_timeline(tenant_id, conversation_id, rows)
        return TimelinePage(rows=rows, has_more=oldest > 1)

    async def _history_after(
        self, tenant_id: str, conversation_id: str, after: int, limit: int
    ) -> TimelinePage:
        rows: list[TimelineRow] = []
        bucket = (after + 1) // self.timeline_bucket
        while len(rows) < limit:
            found = await self._run(
                self._timeline_after,
                (tenant_id, conversation_id, bucket, after, limit - len(rows) + 1),
            )
            if not found:
                break  # seqs are dense: an empty bucket ends the timeline
            rows.extend(_timeline_row(row) for row in found)
            bucket += 1
        has_more = len(rows) > limit
        if not has_more and rows:
            # The page may end exactly at a bucket's end: look one entry further.
            last = rows[-1].seq
            following = await self._run(
                self._timeline_after,
                (tenant_id, conversation_id, (last + 1) // self.timeline_bucket, last, 1),
            )
            has_more = bool(following)
        rows = await self._open_timeline(tenant_id, conversation_id, rows[:limit])
        return TimelinePage(rows=rows, has_more=has_more)

    async def _end_of_timeline(self, tenant_id: str, conversation_id: str, hint: int) -> int:
        """The conversation's last seq: the highest row of the last non-empty bucket, searched
        from the hint's bucket up (or down, should the hint be past the end)."""

        async def highest(bucket: int) -> int | None:
            found = await self._run(
                self._timeline_before,
                (tenant_id, conversation_id, bucket, (bucket + 1) * self.timeline_bucket, 1),
            )
            return int(found[0].seq) if found else None

        bucket = max(0, hint) // self.timeline_bucket
        last = await highest(bucket)
        while last is None and bucket > 0:
            bucket -= 1
            last = await highest(bucket)
        if last is None:
            return 0
        while (following := await highest(bucket + 1)) is not None:
            last, bucket = following, bucket + 1
        return last

    async def sync(self, tenant_id: str, user_id: str, *, cursor: int, limit: int) -> SyncQueuePage:
        """The user's queue entries after ``cursor``, oldest first."""
        heads = await self._run(self._head, (tenant_id, user_id))
        head = int(heads[0].last_sync_id) if heads and heads[0].last_sync_id else 0
        if head <= cursor:
            return SyncQueuePage(rows=[], has_more=False, next_cursor=cursor)
        rows: list[SyncRow] = []
        bucket = (cursor + 1) // self.sync_bucket
        last_bucket = head // self.sync_bucket
        empty = 0
        while bucket <= last_bucket and len(rows) < limit:
            after = rows[-1].sync_id if rows else cursor
            found = await self._run(
                self._sync, (tenant_id, user_id, bucket, after, limit - len(rows))
            )
            if found:
                empty = 0
                # Only up to the head: the sink moves the head after every entry up to it is
                # written, so a page never skips an entry that is still being written.
                rows.extend(
                    SyncRow(sync_id=int(r.sync_id), event=r.event)
                    for r in found
                    if int(r.sync_id) <= head
                )
            else:
                empty += 1
                if not rows and empty >= MAX_EMPTY_SYNC_BUCKETS:
                    raise CursorExpiredError(
                        head,
                        f"no sync entries after {cursor} in {empty} buckets although the queue "
                        f"reaches {head}: they expired; resync from the conversation list",
                    )
            bucket += 1
        if not rows:
            raise CursorExpiredError(
                head,
                f"the queue reaches {head} but holds no entry after {cursor}: the entries "
                "expired; resync from the conversation list",
            )
        next_cursor = rows[-1].sync_id
        opened = []
        for row in rows:
            key = await self._key(tenant_id, row.event)
            context = sync_context(tenant_id, user_id, row.sync_id)
            opened.append(replace(row, event=open_event(key, context, row.event)))
        return SyncQueuePage(rows=opened, has_more=next_cursor < head, next_cursor=next_cursor)

    async def conversations(
        self, tenant_id: str, user_id: str, *, limit: int
    ) -> list[ConversationRow]:
        """The user's conversations (those the user is a member of), latest activity first."""
        found = await self._run(self._conversations, (tenant_id, user_id))
        rows = []
        for found_row in found:
            if found_row.member is False:
                continue
            row = _conversation_row(found_row)
            if row.last_preview is not None:
                key = await self._key(tenant_id, row.last_preview)
                context = preview_context(tenant_id, user_id, row.conversation_id)
                row = replace(row, last_preview=open_text(key, context, row.last_preview))
            rows.append(row)
        large = [row for row in rows if row.large]
        if large:
            heads = await asyncio.gather(*(self._large_group(tenant_id, row) for row in large))
            current = {row.conversation_id: row for row in heads if row is not None}
            rows = [
                current[row.conversation_id] if row.large else row
                for row in rows
                if not row.large or row.conversation_id in current
            ]
        rows.sort(key=lambda r: (r.last_activity_at or _EPOCH, r.conversation_id), reverse=True)
        return rows[:limit]

    async def _large_group(self, tenant_id: str, row: ConversationRow) -> ConversationRow | None:
        """A large group's list entry brought up to date from the conversation: its messages
        do not reach the members' queues, so the row has the user's own last entry only. The
        unread count adds what came after both the row's last seq and the read position (recalls
        and edits included: the row cannot tell them apart). None for a deleted group (its
        members are not told one by one either)."""
        conversation = await self._run(self._conversation, (tenant_id, row.conversation_id))
        if conversation and conversation[0].deleted:
            return None
        name = conversation[0].name if conversation else row.name
        page = await self.history(
            tenant_id,
            row.conversation_id,
            before=None,
            after=None,
            limit=1,
            last_seq_hint=row.last_seq,
        )
        latest = page.rows[-1] if page.rows else None
        if latest is None or latest.seq <= row.last_seq:
            return replace(row, name=name)
        seen = max(row.last_seq, row.read_seq)
        updated = replace(
            row,
            name=name,
            last_seq=latest.seq,
            unread=row.unread + max(0, latest.seq - seen),
        )
        if latest.entry_type != "message.sent":
            return updated
        try:
            event = parse_event(latest.event)
        except SchemaError:
            return updated
        if not isinstance(event, MessageSent):
            return updated
        body = event.payload.body
        if latest.edited_event is not None:
            with contextlib.suppress(SchemaError):
                edited = parse_event(latest.edited_event)
                if isinstance(edited, MessageEdited):
                    body = edited.payload.body
        return replace(
            updated,
            last_message_id=event.event_id,
            last_sender_id=event.actor.user_id,
            last_preview=RECALLED_PREVIEW if latest.recalled else preview(body),
            last_activity_at=event.occurred_at,
        )

    async def who_read(self, tenant_id: str, conversation_id: str, seq: int) -> list[ReaderRow]:
        """Members whose read position is at or past ``seq``."""
        found = await self._run(self._readers, (tenant_id, conversation_id))
        readers = [
            ReaderRow(user_id=row.user_id, read_seq=int(row.read_seq), read_at=_utc(row.read_at))
            for row in found
            if row.read_seq is not None and row.read_seq >= seq
        ]
        return sorted(readers, key=lambda r: (r.read_at or _EPOCH, r.user_id))

    async def _open_timeline(
        self, tenant_id: str, conversation_id: str, rows: list[TimelineRow]
    ) -> list[TimelineRow]:
        opened = []
        for row in rows:
            key = await self._key(tenant_id, row.event)
            event = open_event(
                key, timeline_context(tenant_id, conversation_id, row.seq, "event"), row.event
            )
            edited = row.edited_event
            if edited is not None:
                context = timeline_context(tenant_id, conversation_id, row.seq, "edited_event")
                edited = open_event(await self._key(tenant_id, edited), context, edited)
            opened.append(replace(row, event=event, edited_event=edited))
        return opened

    async def _key(self, tenant_id: str, value: str | None) -> DataKey | None:
        """The key ``value`` was sealed with (None for plaintext, or a forgotten key): from the
        cache, else read on a thread (the driver's synchronous call stays off the loop)."""
        key_id = key_id_of(value)
        if key_id is None:
            return None
        found, key = self.keys.find_cached(tenant_id, key_id)
        if found:
            return key
        try:
            return await asyncio.to_thread(self.keys.find, tenant_id, key_id)
        except MasterKeyMismatchError:
            raise
        except Exception as error:  # a timeout, no host: like any other read
            raise StoreUnavailableError(f"{type(error).__name__}: {error}") from error

    async def _run(self, statement: PreparedStatement, values: Sequence[Any]) -> list[Any]:
        """Execute on the driver's threads; resolve on this event loop."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[Any]] = loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if done.done():
                return
            if error is not None:
                done.set_exception(StoreUnavailableError(f"{type(error).__name__}: {error}"))
            else:
                done.set_result(result)

        try:
            future: ResponseFuture = self.session.execute_async(statement, values)
        except Exception as error:  # e.g. NoHostAvailable raised at once
            raise StoreUnavailableError(f"{type(error).__name__}: {error}") from error
        rows: list[Any] = []

        def on_page(page: list[Any]) -> None:
            rows.extend(page)
            if future.has_more_pages:
                future.start_fetching_next_page()
            else:
                loop.call_soon_threadsafe(settle, rows, None)

        def on_error(error: BaseException) -> None:
            loop.call_soon_threadsafe(settle, None, error)

        future.add_callbacks(on_page, on_error)
        return await done


def _utc(value: datetime | None) -> datetime | None:
    """The driver returns CQL timestamps as naive datetimes in UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _timeline_row(row: Any) -> TimelineRow:
    return TimelineRow(
        seq=int(row.seq),
        entry_type=row.entry_type,
        message_id=row.message_id,
        event=row.event,
        recalled=bool(row.recalled),
        recalled_seq=row.recalled_seq,
        edited_event=row.edited_event,
        edited_seq=row.edited_seq,
    )


def _conversation_row(row: Any) -> ConversationRow:
    return ConversationRow(
        conversation_id=row.conversation_id,
        kind=row.kind,
        name=row.name,
        role=row.role,
        last_seq=int(row.last_seq or 0),
        last_message_id=row.last_message_id,
        last_sender_id=row.last_sender_id,
        last_preview=row.last_preview,
        last_activity_at=_utc(row.last_activity_at),
        read_seq=int(row.read_seq or 0),
        unread=int(row.unread or 0),
        muted=bool(row.muted),
        muted_until=_utc(row.muted_until),
        pinned=bool(row.pinned),
        large=bool(row.large),
    )
