"""Users' message search: authorized here like history reads, answered by the ClickHouse owner.

The ingress decides what the user may search, exactly as it decides what history the user may
read (``ingress.reads``): the conversations the user may read — one named conversation is
checked as history checks it (``ServingStore.read_access``) and refused with history's
``forbidden`` when the user may not read it; without one, every conversation of the user's
conversation list — and within each the seqs the user may read: the whole timeline ``[1, ∞)``
for a member, ``[1, departure]`` for a former member. Hits of messages recalled meanwhile are
dropped here (the serving store has the recall before it is answered; the audit a moment
later). That scope, a list of ``(conversation, from_seq, to_seq)``, goes with the query to
the search API of the process that owns ClickHouse (``POST /v1/search/scoped`` on
``IM_INGRESS__ANALYTICS_URL``); ClickHouse never decides who may read what. The ingress speaks
there as itself: a token it signs per search with its service key (``IM_SERVICE_AUTH__*``, role
``ingress``) names the user and the tenant it authenticated, and the search API searches that
tenant — the body names none.

The query is parsed here first (``schemas.search``), so a bad one is refused
without a round trip, as ``schema-invalid`` on the field ``q`` with the search code in the
message (``[query-empty] …``). ClickHouse unreachable, slow past
``IM_INGRESS__SEARCH_TIMEOUT_SECONDS`` or the serving store not connected: ``unavailable`` with a
retry hint — a search is always safe to repeat.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final, Literal

import httpx
from pydantic import BaseModel, Field

from core.principals import issue_service_token
from core.settings import Settings
from core.tls import client_context
from ingress.connection import Principal
from ingress.reads import Reads, unavailable
from schemas import frames as fr
from schemas.errors import ErrorCode
from schemas.search import (
    MAX_LIMIT,
    MAX_SCOPE,
    SearchError,
    SearchErrorCode,
    parse_query,
)
from sinks.cql.store import ServingStore, StoreUnavailableError

_log = logging.getLogger(__name__)

SCOPED_PATH: Final = "/v1/search/scoped"
#: Searches in flight to the search API per node; more wait for a connection (within the
#: timeout). The API queues past its own query pool anyway (``IM_SINKS__ANALYTICS_QUERY_QUEUE``).
MAX_CONNECTIONS: Final = 32


class SearchHit(BaseModel):
    conversation_id: str
    seq: int = Field(description="The message's seq in the conversation")
    message_id: str
    sender_id: str
    sent_at: str = Field(description="RFC 3339, UTC")
    edited: bool = Field(description="The text shown is an edit's")
    snippet: str = Field(description="Text around the first match; matches between « and »")


class SearchResults(BaseModel):
    """The reply to a search: the caller's messages whose latest text matches, newest first."""

    type: Literal["search_results"] = "search_results"
    id: str
    query: str
    hits: list[SearchHit]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page"
    )


class UserSearch:
    """The search side of one ingress node: authorization from the serving store, the search
    from the ClickHouse owner's API."""

    def __init__(self, settings: Settings, reads: Reads) -> None:
        self.reads = reads
        self.url = settings.ingress.analytics_url.rstrip("/") + SCOPED_PATH
        self.timeout = settings.ingress.search_timeout_seconds
        self._settings = settings  # the service key: checked when the node starts (server.py)
        #: An https analytics_url signed by a private CA (compose's) is verified against that CA.
        ca_path = settings.ingress.analytics_ca_path
        self._http = httpx.AsyncClient(
            verify=client_context(ca_path) if ca_path is not None else True,
            # Connecting, each read and write, and waiting for a free connection.
            timeout=httpx.Timeout(self.timeout),
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS),
        )

    async def close(self) -> None:
        """Close the connections to the search API (the ingress app's shutdown)."""
        await self._http.aclose()

    async def search(
        self,
        principal: Principal,
        request_id: str,
        *,
        q: str | None,
        conversation_id: str | None,
        limit: int,
        cursor: str | None,
    ) -> SearchResults | fr.ErrorFrame:
        """The reply to one search; never raises."""
        try:
            parse_query(q)
        except SearchError as error:
            return _invalid(request_id, error)
        if not 1 <= limit <= MAX_LIMIT:
            return fr.ErrorFrame(
                id=request_id,
                code=ErrorCode.SCHEMA_INVALID,
                message=f"limit must be 1 to {MAX_LIMIT}",
                field="limit",
            )
        store = self.reads.store
        if store is None:
            return _unavailable(request_id, "the serving store is not connected yet")
        tenant, user = principal.tenant_id, principal.user_id
        try:
            if conversation_id is not None:
                # History's check: a former member up to the departure, a deleted group never.
                access = await store.read_access(tenant, conversation_id, user)
                if access is None:
                    return fr.ErrorFrame(
                        id=request_id,
                        code=ErrorCode.FORBIDDEN,
                        message=f"only members read conversation {conversation_id}",
                    )
                scope = [(conversation_id, access.until_seq)]
            else:
                rows = await store.conversations(tenant, user, limit=MAX_SCOPE)
                # A member reads a conversation's whole timeline (as history does).
                scope = [(row.conversation_id, None) for row in rows]
        except StoreUnavailableError as error:
            return _unavailable(request_id, f"the serving store did not answer ({error})")
        body = {
            "q": q,
            "limit": limit,
            "cursor": cursor,
            "scope": [
                {"conversation_id": conversation, "from_seq": 1, "to_seq": until}
                for conversation, until in scope
            ],
        }
        try:
            token = issue_service_token(self._settings, tenant=tenant, user=user)
            status, answer = await self._post(body, token)
        except (httpx.HTTPError, ValueError) as error:
            _log.warning("search at %s failed: %s", self.url, error)
            return _unavailable(request_id, f"the search service did not answer ({error})")
        if status == 200:
            hits = [SearchHit.model_validate(hit) for hit in answer.get("hits", [])]
            try:
                hits = await _not_recalled(store, tenant, hits)
            except StoreUnavailableError as error:
                return _unavailable(request_id, f"the serving store did not answer ({error})")
            return SearchResults(
                id=request_id,
                query=str(answer.get("query", q)),
                hits=hits,
                next_cursor=answer.get("next_cursor"),
            )
        code = str(answer.get("code", ""))
        message = str(answer.get("message", f"status {status}"))
        if status == 400 and code in {item.value for item in SearchErrorCode}:
            return _invalid(
                request_id, SearchError(SearchErrorCode(code), message, answer.get("field"))
            )
        return _unavailable(request_id, f"the search service answered {status}: {message}")

    async def _post(self, body: dict[str, Any], token: str) -> tuple[int, dict[str, Any]]:
        """One request to the search API, bounded by the timeout for connecting and for each
        read."""
        response = await self._http.post(
            self.url, json=body, headers={"Authorization": f"Bearer {token}"}
        )
        answer = response.json()
        if not isinstance(answer, dict):
            raise ValueError(f"the search service answered {type(answer).__name__}, not an object")
        return response.status_code, answer


async def _not_recalled(
    store: ServingStore, tenant_id: str, hits: list[SearchHit]
) -> list[SearchHit]:
    """``hits`` without recalled messages: the audit drops them with the ClickHouse sink's lag,
    the serving store holds the recall before the recall is answered (one lookup per
    conversation of the page)."""
    by_conversation: dict[str, set[str]] = {}
    for hit in hits:
        by_conversation.setdefault(hit.conversation_id, set()).add(hit.message_id)
    found = await asyncio.gather(
        *(store.recalled(tenant_id, c, ids) for c, ids in by_conversation.items())
    )
    recalled = {message for messages in found for message in messages}
    return [hit for hit in hits if hit.message_id not in recalled]


def _invalid(request_id: str, error: SearchError) -> fr.ErrorFrame:
    return fr.ErrorFrame(
        id=request_id,
        code=ErrorCode.SCHEMA_INVALID,
        message=f"[{error.code}] {error.message}",
        field=error.field,
    )


def _unavailable(request_id: str, why: str) -> fr.ErrorFrame:
    return unavailable(request_id, why, "the search")
