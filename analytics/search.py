"""Full-text message search over the audit log (docs/analytics.md#search).

The table
    ``message_search`` holds one row per message event of the sequenced topic — ``message.sent``,
    ``message.edited``, ``message.recalled`` — written by a materialized view on every insert
    into ``audit_events`` (and once from the whole audit when the table is new). Its key is
    ``(tenant_id, kind, conversation_id, message_id, event_id)``: every copy of one event (a
    replay, a batch inserted again) has the same key and merges collapse them
    (``ReplacingMergeTree``); edits and recalls, a few percent of the rows, sit together.
    ``text_norm`` (lower-cased, runs of non letters/digits as one space) carries a skip index
    over its tokens (``SEARCH_INDEX``: ClickHouse's ``text`` index, chosen by bench/search.py).

A message's state
    is folded per message from all of its rows: the seq, sender and time of its
    ``message.sent``; the text of its latest sent-or-edited row (highest ``event_seq``, the seq
    the event itself took in the conversation); hidden once any ``message.recalled`` row exists.
    Copies of a row fold to the same state, so a replay never doubles a hit, merged or not.

A search
    asks the index for the newest candidate rows whose text matches (an edited message may
    match by its old text there), fetches the edit, recall and sent rows those messages still
    need (a narrow range of the key), folds them, and keeps the messages whose *latest* text
    matches, that are not recalled and that pass the filters — newest first, paged by an opaque
    cursor ``(sent_at, conversation_id, seq)`` (:class:`MessageSearch`). A user's search (through
    the ingress) is also limited to the ``(conversation, seq range)`` list the ingress
    authorized.

All values reach ClickHouse as bound parameters (``{name:Type}``); the SQL is fixed here.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final

from pydantic import BeforeValidator

from analytics.unavailable import answered
from schemas.search import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    MAX_SCOPE,
    SearchError,
    SearchErrorCode,
    SearchQuery,
    parse_query,
    snippet,
)
from sinks.clickhouse.schema import (
    MESSAGE_EDITED,
    MESSAGE_RECALLED,
    MESSAGE_SENT,
    SEARCH_TABLE,
    quote_identifier,
    sql_string,
)
from sinks.clickhouse.store import ClickHouseStore

log = logging.getLogger(__name__)

_ID = re.compile(r"^[A-Za-z0-9._:@+=-]{1,128}$")


@dataclass(frozen=True, slots=True)
class ScopeRange:
    """The seqs of one conversation a user may read: ``from_seq`` ≤ seq ≤ ``to_seq``."""

    conversation_id: str
    from_seq: int = 1
    to_seq: int | None = None


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a page ended: results continue strictly after this (newest-first) position."""

    sent_at_us: int
    conversation_id: str
    seq: int

    def encode(self) -> str:
        raw = json.dumps([self.sent_at_us, self.conversation_id, self.seq], separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            values = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
            sent_at_us, conversation_id, seq = values
            if not (
                isinstance(sent_at_us, int)
                and isinstance(conversation_id, str)
                and isinstance(seq, int)
                and seq >= 0
            ):
                raise ValueError("wrong types")
        except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
            raise SearchError(
                SearchErrorCode.INVALID_CURSOR,
                "the cursor is not one a search returned; start again without it",
                "cursor",
            ) from None
        return cls(sent_at_us, conversation_id, seq)


@dataclass(frozen=True, slots=True)
class SearchRequest:
    tenant: str
    query: SearchQuery
    start: datetime | None = None
    end: datetime | None = None
    conversation: str | None = None
    sender: str | None = None
    limit: int = DEFAULT_LIMIT
    cursor: Cursor | None = None
    #: A user's search: only these conversations and seqs (None: the analyst's whole tenant).
    scope: tuple[ScopeRange, ...] | None = None


@dataclass(frozen=True, slots=True)
class SearchHit:
    conversation_id: str
    seq: int
    message_id: str
    sender_id: str
    sent_at: datetime
    edited: bool
    snippet: str

    def json(self) -> dict[str, Any]:
        return {
            "conversation_id": self.conversation_id,
            "seq": self.seq,
            "message_id": self.message_id,
            "sender_id": self.sender_id,
            "sent_at": self.sent_at.isoformat().replace("+00:00", "Z"),
            "edited": self.edited,
            "snippet": self.snippet,
        }


@dataclass(frozen=True, slots=True)
class SearchPage:
    query: SearchQuery
    hits: list[SearchHit]
    next_cursor: str | None
    elapsed_ms: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def json(self) -> dict[str, Any]:
        return {
            "query": self.query.text,
            "words": list(self.query.words),
            "phrases": [" ".join(phrase) for phrase in self.query.phrases],
            "hits": [hit.json() for hit in self.hits],
            "next_cursor": self.next_cursor,
            "elapsed_ms": round(self.elapsed_ms, 3),
        }


def valid_identifier(value: str | None, name: str) -> str | None:
    """An id a search filters on (a tenant, conversation or sender): None when absent or
    empty; raises ValueError."""
    if not value:
        return None
    if not _ID.match(value):
        raise ValueError(f"{name} must be 1-128 characters of A-Z a-z 0-9 . _ : @ + = -")
    return value


#: :func:`valid_identifier` as a query parameter's validator (the parameter's name in the error).
identifier: Final = BeforeValidator(lambda value, info: valid_identifier(value, info.field_name))


def _identifier(value: str | None, name: str) -> str | None:
    try:
        return valid_identifier(value, name)
    except ValueError as error:
        raise SearchError(SearchErrorCode.INVALID_PARAMETER, str(error), name) from None


def parse_limit(value: str | int | None) -> int:
    if value is None or value == "":
        return DEFAULT_LIMIT
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise SearchError(
            SearchErrorCode.INVALID_PARAMETER, f"limit must be 1 to {MAX_LIMIT}", "limit"
        )
    return limit


def search_request(
    tenant: str,
    q: str | None,
    *,
    start: datetime | None,
    end: datetime | None,
    conversation: str | None,
    sender: str | None,
    limit: int,
    cursor: str | None,
) -> SearchRequest:
    """An analyst's search of ``tenant`` (its parameters each valid: ``analytics.search_api``);
    raises :class:`SearchError` for the query, the cursor, or ``from`` not before ``to``."""
    if start is not None and end is not None and start >= end:
        raise SearchError(SearchErrorCode.INVALID_PARAMETER, "from must be before to", "from")
    return SearchRequest(
        tenant=tenant,
        query=parse_query(q),
        start=start,
        end=end,
        conversation=conversation,
        sender=sender,
        limit=limit,
        cursor=Cursor.decode(cursor) if cursor else None,
    )


def scoped_request(body: dict[str, Any], tenant: str) -> SearchRequest:
    """A user's search as the ingress sends it (``POST /v1/search/scoped``): ``q``, ``limit``,
    ``cursor`` and ``scope``, a list of ``{conversation_id, from_seq, to_seq}``, in ``tenant`` —
    the caller's principal's, never the body's."""
    unknown = set(body) - {"q", "limit", "cursor", "scope"}
    if unknown:
        name = sorted(unknown)[0]
        raise SearchError(SearchErrorCode.UNKNOWN_PARAMETER, f"unknown field {name!r}", name)
    scope_items = body.get("scope")
    if not isinstance(scope_items, list) or len(scope_items) > MAX_SCOPE:
        raise SearchError(
            SearchErrorCode.INVALID_PARAMETER,
            f"scope must be a list of at most {MAX_SCOPE} conversation ranges",
            "scope",
        )
    scope = []
    for item in scope_items:
        try:
            conversation_id = _identifier(item["conversation_id"], "scope.conversation_id")
            from_seq = int(item.get("from_seq") or 1)
            to_seq = item.get("to_seq")
            scope.append(
                ScopeRange(
                    conversation_id=conversation_id or "",
                    from_seq=max(1, from_seq),
                    to_seq=None if to_seq is None else int(to_seq),
                )
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            raise SearchError(
                SearchErrorCode.INVALID_PARAMETER,
                "each scope item is {conversation_id, from_seq, to_seq} with integer seqs",
                "scope",
            ) from None
    cursor = _text(body.get("cursor"), "cursor")
    return SearchRequest(
        tenant=tenant,
        query=parse_query(_text(body.get("q"), "q")),
        limit=parse_limit(body.get("limit")),
        cursor=Cursor.decode(cursor) if cursor else None,
        scope=tuple(scope),
    )


def _text(value: Any, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise SearchError(SearchErrorCode.INVALID_PARAMETER, f"{name} must be a string", name)


# -- the query ----------------------------------------------------------------------------------

_COLUMNS = "conversation_id, message_id, kind, seq, event_seq, sender_id, occurred_at"
#: Candidate rows the first round asks for; each further round asks for eight times more.
FIRST_ROUND_ROWS: Final = 256
#: Past this many candidate rows a round asks for all of them.
MAX_ROUND_ROWS: Final = 200_000


@dataclass(frozen=True, slots=True)
class _Row:
    """A row without its text: what a fold needs (the texts are read for the page only)."""

    conversation_id: str
    message_id: str
    kind: str
    seq: int
    event_seq: int
    sender_id: str
    occurred_at: datetime


@dataclass(slots=True)
class _Message:
    """One message folded from its rows (any number of copies of each)."""

    sent: _Row | None = None
    latest: _Row | None = None
    edited: bool = False
    recalled: bool = False
    #: The ``event_seq`` of the rows whose text matches (the candidates).
    matching: set[int] = field(default_factory=set)

    def add(self, row: _Row, *, matches: bool) -> None:
        if row.kind == MESSAGE_RECALLED:
            self.recalled = True
            return
        if matches:
            self.matching.add(row.event_seq)
        if row.kind == MESSAGE_SENT:
            self.sent = row
        else:
            self.edited = True
        if self.latest is None or row.event_seq > self.latest.event_seq:
            self.latest = row

    @property
    def latest_matches(self) -> bool:
        """Whether the message's current text (its latest sent or edited row) matches."""
        return self.latest is not None and self.latest.event_seq in self.matching


def candidates_sql(
    database: str,
    request: SearchRequest,
    *,
    rows: int | None,
    table: str = SEARCH_TABLE,
    operator: str = "hasToken",
) -> tuple[str, dict[str, Any]]:
    """The newest ``rows`` rows (all when None) whose text holds the query — what the skip
    index answers — and that may belong to a hit. A sent row outside a bound on the message
    (time, sender, cursor) is left out; an edit row is kept whenever it happened (it may belong
    to a message inside the bounds). Light columns only: no text is read but to match."""
    parameters: dict[str, Any] = {"tenant": request.tenant}
    conditions = ["tenant_id = {tenant:String}"]
    for number, token in enumerate(request.query.tokens):
        if operator == "hasToken":
            parameters[f"token_{number}"] = token
            conditions.append(f"hasToken(text_norm, {{token_{number}:String}})")
        else:  # an n-gram bloom filter answers LIKE only
            parameters[f"token_{number}"] = f"%{token}%"
            conditions.append(f"text_norm LIKE {{token_{number}:String}}")
    for number, phrase in enumerate(request.query.phrases):
        parameters[f"phrase_{number}"] = f" {' '.join(phrase)} "
        conditions.append(f"position(concat(' ', text_norm, ' '), {{phrase_{number}:String}}) > 0")
    sent = f"kind = {sql_string(MESSAGE_SENT)}"
    if request.conversation is not None:
        parameters["conversation"] = request.conversation
        conditions.append("conversation_id = {conversation:String}")
    if request.scope is not None:
        parameters["scope"] = [item.conversation_id for item in request.scope]
        conditions.append("conversation_id IN {scope:Array(String)}")
    if request.start is not None:
        # Edits happen after the send: every row of a message in range is at or after start.
        parameters["start"] = request.start
        conditions.append("occurred_at >= {start:DateTime64(6, 'UTC')}")
    if request.end is not None:
        parameters["end"] = request.end
        conditions.append(f"(NOT {sent} OR occurred_at < {{end:DateTime64(6, 'UTC')}})")
    if request.sender is not None:
        parameters["sender"] = request.sender
        conditions.append(f"(NOT {sent} OR sender_id = {{sender:String}})")
    if request.cursor is not None:
        parameters["cursor_time"] = request.cursor.sent_at_us
        conditions.append(
            f"(NOT {sent} OR toUnixTimestamp64Micro(occurred_at) <= {{cursor_time:Int64}})"
        )
    limit = "" if rows is None else f" LIMIT {int(rows)}"
    sql = (
        f"SELECT {_COLUMNS} FROM {quote_identifier(database)}.{quote_identifier(table)} "
        f"WHERE {' AND '.join(conditions)} ORDER BY occurred_at DESC{limit}"
    )
    return sql, parameters


def related_sql(
    database: str,
    tenant: str,
    messages: Sequence[tuple[str, str]],
    without_sent: Sequence[tuple[str, str]],
    table: str = SEARCH_TABLE,
) -> tuple[str, dict[str, Any]]:
    """The edit and recall rows of ``messages`` and the sent rows of ``without_sent``: what a
    fold needs beyond the candidates. The sorting key starts with (tenant, kind, conversation),
    so both are narrow ranges of the table."""
    parameters: dict[str, Any] = {
        "tenant": tenant,
        "conversations": sorted({conversation for conversation, _ in messages}),
        "messages": sorted({message for _, message in messages}),
        "sent_conversations": sorted({conversation for conversation, _ in without_sent}),
        "sent_messages": sorted({message for _, message in without_sent}),
    }
    kinds = f"({sql_string(MESSAGE_EDITED)}, {sql_string(MESSAGE_RECALLED)})"
    sql = (
        f"SELECT {_COLUMNS} FROM {quote_identifier(database)}.{quote_identifier(table)} "
        "WHERE tenant_id = {tenant:String} AND ("
        f"(kind IN {kinds} AND conversation_id IN {{conversations:Array(String)}} "
        "AND message_id IN {messages:Array(UUID)}) OR "
        f"(kind = {sql_string(MESSAGE_SENT)} "
        "AND conversation_id IN {sent_conversations:Array(String)} "
        "AND message_id IN {sent_messages:Array(UUID)}))"
    )
    return sql, parameters


def texts_sql(
    database: str, tenant: str, rows: Sequence[_Row], table: str = SEARCH_TABLE
) -> tuple[str, dict[str, Any]]:
    """The texts of ``rows`` (the latest rows of a page's hits), for the snippets."""
    parameters: dict[str, Any] = {
        "tenant": tenant,
        "conversations": sorted({row.conversation_id for row in rows}),
        "messages": sorted({row.message_id for row in rows}),
        "event_seqs": sorted({row.event_seq for row in rows}),
    }
    kinds = f"({sql_string(MESSAGE_SENT)}, {sql_string(MESSAGE_EDITED)})"
    sql = (
        "SELECT conversation_id, message_id, event_seq, text "
        f"FROM {quote_identifier(database)}.{quote_identifier(table)} "
        f"WHERE tenant_id = {{tenant:String}} AND kind IN {kinds} "
        "AND conversation_id IN {conversations:Array(String)} "
        "AND message_id IN {messages:Array(UUID)} AND event_seq IN {event_seqs:Array(UInt64)}"
    )
    return sql, parameters


class MessageSearch:
    """Answers searches from one store's ``message_search`` table.

    A round asks ClickHouse for the newest ``n`` candidate rows (rows whose text matches: the
    skip index's answer), then for the edit, recall and sent rows those messages still need,
    and folds each message: a hit is a sent message, not recalled, whose latest row is a
    candidate (its current text matches). The hits are exact down to the oldest candidate's
    time ``T`` when the round was cut at ``n``: any message sent after ``T`` that matches has a
    candidate row after ``T`` (its sent row, or a later edit). A page with ``limit + 1`` hits
    newer than ``T`` is complete; otherwise the next round asks for eight times more rows, the
    last for all. The page's texts are read last, for its snippets.
    """

    def __init__(
        self,
        store: ClickHouseStore,
        table: str = SEARCH_TABLE,
        *,
        operator: str = "hasToken",
        settings_clause: str = "",
        first_round_rows: int = FIRST_ROUND_ROWS,
    ) -> None:
        self.store = store
        self.table = table
        self.operator = operator
        #: e.g. ``SETTINGS use_skip_indexes = 0`` (the benchmark's baseline).
        self.settings_clause = settings_clause
        self.first_round_rows = first_round_rows

    async def search(self, request: SearchRequest) -> SearchPage:
        if request.scope is not None and not request.scope:
            return SearchPage(query=request.query, hits=[], next_cursor=None)
        started = time.perf_counter()
        rows: int | None = self.first_round_rows
        rounds = 0
        while True:
            rounds += 1
            found, threshold = await self._round(request, rows)
            if threshold is None or len(found) > request.limit or rows is None:
                break
            rows = rows * 8 if rows * 8 <= MAX_ROUND_ROWS else None
        page = found[: request.limit]
        texts = await self._texts(request.tenant, [message.latest for message in page])
        hits = [_hit(message, texts, request.query) for message in page]
        next_cursor = None
        if len(found) > request.limit and hits:
            last = hits[-1]
            next_cursor = Cursor(_micros(last.sent_at), last.conversation_id, last.seq).encode()
        return SearchPage(
            query=request.query,
            hits=hits,
            next_cursor=next_cursor,
            elapsed_ms=(time.perf_counter() - started) * 1000,
            extra={"rounds": rounds},
        )

    async def _query(self, sql: str, parameters: dict[str, Any]) -> Sequence[Sequence[Any]]:
        result = await answered(
            self.store.query_async(f"{sql} {self.settings_clause}".rstrip(), parameters),
            partial(SearchError, SearchErrorCode.UNAVAILABLE),
            log,
            "a search query failed",
        )
        return result.result_rows

    async def _round(
        self, request: SearchRequest, rows: int | None
    ) -> tuple[list[_Message], datetime | None]:
        """The hits among the newest ``rows`` candidates, newest first (at most ``limit + 1``),
        and the time they are exact down to (None: every candidate was read)."""
        database = self.store.database
        candidates = [
            _row(values)
            for values in await self._query(
                *candidates_sql(
                    database, request, rows=rows, table=self.table, operator=self.operator
                )
            )
        ]
        threshold = None
        if rows is not None and len(candidates) >= rows:
            threshold = min(row.occurred_at for row in candidates)
        messages: dict[tuple[str, str], _Message] = {}
        for row in candidates:
            key = (row.conversation_id, row.message_id)
            messages.setdefault(key, _Message()).add(row, matches=True)
        if messages:
            without_sent = [key for key, message in messages.items() if message.sent is None]
            related = await self._query(
                *related_sql(database, request.tenant, list(messages), without_sent, self.table)
            )
            for values in related:
                row = _row(values)
                message = messages.get((row.conversation_id, row.message_id))
                if message is not None:
                    message.add(row, matches=False)
        hits = [message for message in messages.values() if _is_hit(message, request, threshold)]
        hits.sort(key=_newest_first, reverse=True)
        return hits[: request.limit + 1], threshold

    async def _texts(
        self, tenant: str, rows: Sequence[_Row | None]
    ) -> dict[tuple[str, str, int], str]:
        wanted = [row for row in rows if row is not None]
        if not wanted:
            return {}
        found = await self._query(*texts_sql(self.store.database, tenant, wanted, self.table))
        return {
            (conversation_id, str(message_id), int(event_seq)): text
            for conversation_id, message_id, event_seq, text in found
        }


def _newest_first(message: _Message) -> tuple[datetime, str, int]:
    assert message.sent is not None
    return (message.sent.occurred_at, message.sent.conversation_id, message.sent.seq)


def _is_hit(message: _Message, request: SearchRequest, threshold: datetime | None) -> bool:
    sent = message.sent
    if sent is None or message.recalled or not message.latest_matches:
        return False
    sent_at = sent.occurred_at
    if threshold is not None and sent_at <= threshold:
        return False  # an older match may be among the rows not read
    if request.start is not None and sent_at < request.start:
        return False
    if request.end is not None and sent_at >= request.end:
        return False
    if request.sender is not None and sent.sender_id != request.sender:
        return False
    if request.conversation is not None and sent.conversation_id != request.conversation:
        return False
    if request.scope is not None and not any(
        item.conversation_id == sent.conversation_id
        and item.from_seq <= sent.seq
        and (item.to_seq is None or sent.seq <= item.to_seq)
        for item in request.scope
    ):
        return False
    if request.cursor is not None:
        cursor = request.cursor
        return (_micros(sent_at), sent.conversation_id, sent.seq) < (
            cursor.sent_at_us,
            cursor.conversation_id,
            cursor.seq,
        )
    return True


def _micros(moment: datetime) -> int:
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _row(values: Sequence[Any]) -> _Row:
    conversation_id, message_id, kind, seq, event_seq, sender_id, occurred_at = values
    if occurred_at.tzinfo is None:
        occurred_at = occurred_at.replace(tzinfo=UTC)
    return _Row(
        conversation_id=conversation_id,
        message_id=str(message_id),
        kind=kind,
        seq=int(seq),
        event_seq=int(event_seq),
        sender_id=sender_id,
        occurred_at=occurred_at.astimezone(UTC),
    )


def _hit(
    message: _Message, texts: dict[tuple[str, str, int], str], query: SearchQuery
) -> SearchHit:
    sent, latest = message.sent, message.latest
    assert sent is not None and latest is not None
    text = texts.get((latest.conversation_id, latest.message_id, latest.event_seq), "")
    return SearchHit(
        conversation_id=sent.conversation_id,
        seq=sent.seq,
        message_id=sent.message_id,
        sender_id=sent.sender_id,
        sent_at=sent.occurred_at,
        edited=message.edited,
        snippet=snippet(text, query),
    )
