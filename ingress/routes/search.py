"""Message search over REST: ``GET /v1/tenants/{tenant_id}/search?q=&conversation=&limit=&cursor=``
→ ``search_results``, the caller's messages (members only) whose latest text matches, newest
first (``ingress.search``; docs/protocol.md#search).

Each request counts against the device's rate like a frame; errors are ``error`` frames.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from ingress.deps import GatewayDep, PrincipalDep, RequestIdDep
from ingress.routes.replies import ERROR_RESPONSES, frame_response
from ingress.search import SearchResults, UserSearch
from schemas import frames as fr
from schemas.events import ConversationId
from schemas.search import DEFAULT_LIMIT, MAX_LIMIT, MAX_QUERY_CHARS

router = APIRouter(prefix="/v1/tenants/{tenant_id}", tags=["reads"])

_SEARCH_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    403: {"model": fr.ErrorFrame, "description": "Not a member of the named conversation"},
    503: {"model": fr.ErrorFrame, "description": "The store or the search did not answer; repeat"},
}


def _user_search(request: Request, gateway: GatewayDep) -> UserSearch:
    """The node's one :class:`UserSearch` (one HTTP connection pool), made on first use."""
    search = getattr(request.app.state, "user_search", None)
    if not isinstance(search, UserSearch):
        search = UserSearch(gateway.reads.settings, gateway.reads)
        request.app.state.user_search = search
    return search


@router.get(
    "/search",
    summary="Search the caller's messages",
    response_model=SearchResults,
    responses=_SEARCH_RESPONSES,
)
async def search_messages(
    request: Request,
    *,
    principal: PrincipalDep,
    gateway: GatewayDep,
    request_id: RequestIdDep,
    q: Annotated[
        str,
        Query(
            description=f'Words and "quoted phrases", all required, any case '
            f"(≤ {MAX_QUERY_CHARS} characters)"
        ),
    ] = "",
    conversation: Annotated[
        ConversationId | None, Query(description="Only this conversation (members only)")
    ] = None,
    limit: Annotated[int, Query(description=f"At most this many hits (≤ {MAX_LIMIT})")] = (
        DEFAULT_LIMIT
    ),
    cursor: Annotated[
        str | None, Query(max_length=512, description="The `next_cursor` of the previous page")
    ] = None,
) -> Response:
    """Members only: the conversations the caller is a member of (or the one named), newest
    first; a recalled message is never found, an edited one by its latest text."""
    refusal = gateway.rate_limit(principal)
    if refusal is not None:
        return frame_response(gateway, gateway.rate_limited(request_id, refusal))
    answer = await _user_search(request, gateway).search(
        principal, request_id, q=q, conversation_id=conversation, limit=limit, cursor=cursor
    )
    if isinstance(answer, fr.ErrorFrame):
        return frame_response(gateway, answer)
    return Response(answer.model_dump_json(), media_type="application/json")
