"""The search routes of the analytics API (``analytics.api``), served by the process that
owns the ClickHouse data path:

- ``GET /v1/search?tenant=&q=&from=&to=&conversation=&sender=&limit=&cursor=`` — analysts: the
  tenant's messages whose latest text matches, newest first;
- ``POST /v1/search/scoped`` with ``{"q", "limit", "cursor", "scope": [{"conversation_id",
  "from_seq", "to_seq"}]}`` — a user's search, asked by the ingress after it authorized the scope
  (the conversations the user is a member of, and the seqs the user may read). Only the
  ingress's service token opens it, and the tenant searched is that token's ``tid`` (the user's
  tenant, as the ingress authenticated it): a body naming another tenant is refused (403).

Errors are ``{"code", "message", "field"}`` with a :class:`SearchErrorCode` and its status (the
app's one handler, ``analytics.api``). Who
may call which route is decided before either runs (``analytics.access``): an analyst's
``tenant`` is its own.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from analytics.access import principal_of
from analytics.parameters import From, QueryModel, Text, To, count, once_each
from analytics.search import (
    MessageSearch,
    SearchRequest,
    identifier,
    scoped_request,
    search_request,
)
from core.principals import forbidden
from schemas.search import DEFAULT_LIMIT, MAX_LIMIT, SearchError, SearchErrorCode
from sinks.clickhouse.store import ClickHouseStore

router = APIRouter(tags=["search"])

#: One of the ids a search filters on: 1-128 characters, empty is none.
Identifier = Annotated[str | None, identifier]


class AnalystSearch(QueryModel):
    """``?tenant=&q=&from=&to=&conversation=&sender=&limit=&cursor=`` of an analyst's search;
    ``q`` and ``cursor`` are read by the search language (their own error codes)."""

    tenant: Identifier = None
    q: str | None = None
    start: From = None
    end: To = None
    conversation: Identifier = None
    sender: Identifier = None
    limit: Annotated[int, count(MAX_LIMIT, DEFAULT_LIMIT)] = DEFAULT_LIMIT
    cursor: Text = None

    def request(self) -> SearchRequest:
        """As a search of one tenant; raises :class:`SearchError`."""
        if self.tenant is None:
            raise SearchError(
                SearchErrorCode.INVALID_PARAMETER, "tenant is required: search one tenant", "tenant"
            )
        return search_request(
            self.tenant,
            self.q,
            start=self.start,
            end=self.end,
            conversation=self.conversation,
            sender=self.sender,
            limit=self.limit,
            cursor=self.cursor,
        )


_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {
        "description": "query-empty, query-too-long, query-too-many-terms, "
        "query-unbalanced-quote, unknown-parameter, invalid-parameter or invalid-cursor"
    },
    503: {"description": "unavailable: ClickHouse did not answer"},
}


def _search(request: Request) -> MessageSearch:
    store = request.app.state.analytics.store
    assert isinstance(store, ClickHouseStore)
    return MessageSearch(store)


@router.get(
    "/v1/search",
    summary="Analysts' message search: ?tenant=&q=&from=&to=&conversation=&sender=&limit=&cursor=",
    responses=_RESPONSES,
    dependencies=[Depends(once_each)],
)
async def search_messages(request: Request, asked: Annotated[AnalystSearch, Query()]) -> Any:
    search = asked.request()
    page = await _search(request).search(search)
    return {"tenant": search.tenant, **page.json()}


@router.post(
    "/v1/search/scoped",
    summary="A user's message search over the conversation ranges the ingress authorized",
    responses=_RESPONSES,
)
async def search_scoped(request: Request) -> Any:
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise SearchError(SearchErrorCode.INVALID_PARAMETER, "the body must be a JSON object", None)
    tenant = principal_of(request).tenant
    named = body.pop("tenant", None)
    if named is not None and named != tenant:
        raise forbidden(f"the token is for tenant {tenant!r}; the body names another")
    search = scoped_request(body, tenant)
    page = await _search(request).search(search)
    return {"tenant": search.tenant, **page.json()}
