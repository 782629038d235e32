"""Reads over REST: the same answers as the WebSocket's read frames, as ``GET`` routes.

- ``GET /v1/tenants/{tenant_id}/sync?cursor=&limit=`` → ``sync_page`` (the caller's own queue)
- ``GET /v1/tenants/{tenant_id}/conversations?limit=`` → ``conversation_list``
- ``GET /v1/tenants/{tenant_id}/conversations/{conversation_id}/messages?before_seq=&after_seq=
  &limit=`` → ``history_page`` (members only)
- ``GET /v1/tenants/{tenant_id}/conversations/{conversation_id}/messages/{seq}/read-by``
  → ``read_by`` (members only)

Each request counts against the device's rate like a frame; query parameters are validated by the
frame models, so both doors refuse bad input with the same codes.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response
from pydantic import ValidationError

from ingress.connection import Principal
from ingress.deps import GatewayDep, PrincipalDep, RequestIdDep
from ingress.gateway import Gateway, RefusalError
from ingress.routes.replies import ERROR_RESPONSES, frame_response
from schemas import frames as fr
from schemas.errors import schema_error
from schemas.events import ConversationId

router = APIRouter(prefix="/v1/tenants/{tenant_id}", tags=["reads"])

ConversationPath = Annotated[ConversationId, Path(description="The conversation")]
_READ_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    403: {"model": fr.ErrorFrame, "description": "Not a member of the conversation"},
    503: {"model": fr.ErrorFrame, "description": "The serving store did not answer; repeat"},
}


async def _answer(
    gateway: Gateway, principal: Principal, request_id: str, values: dict[str, Any]
) -> Response:
    refusal = gateway.rate_limit(principal)
    if refusal is not None:
        return frame_response(gateway, gateway.rate_limited(request_id, refusal))
    values = {"id": request_id, **{k: v for k, v in values.items() if v is not None}}
    try:
        frame = fr.CLIENT_FRAME_MODELS[values["type"]].model_validate(values)
    except ValidationError as error:
        problem = schema_error(error, "", what="request", known_types=fr.CLIENT_FRAME_TYPES)
        problem.request_id = request_id
        raise RefusalError(fr.ErrorFrame.from_schema_error(problem)) from None
    gateway.metrics.frame_in(frame.type)
    return frame_response(gateway, await gateway.execute(principal, frame))  # type: ignore[arg-type]


@router.get(
    "/sync",
    summary="The caller's sync queue after a cursor",
    response_model=fr.SyncPage,
    responses=_READ_RESPONSES,
)
async def get_sync(
    *,
    principal: PrincipalDep,
    gateway: GatewayDep,
    request_id: RequestIdDep,
    cursor: Annotated[int, Query(description="The highest sync id the device holds")] = 0,
    limit: Annotated[int, Query(description="At most this many events")] = (fr.DEFAULT_SYNC_LIMIT),
) -> Response:
    """Events after `cursor`, oldest first; page with `next_cursor` while `has_more`."""
    return await _answer(
        gateway, principal, request_id, {"type": "sync", "cursor": cursor, "limit": limit}
    )


@router.get(
    "/conversations",
    summary="The caller's conversation list",
    response_model=fr.ConversationList,
    responses=_READ_RESPONSES,
)
async def get_conversations(
    *,
    principal: PrincipalDep,
    gateway: GatewayDep,
    request_id: RequestIdDep,
    limit: Annotated[int, Query(description="At most this many")] = (
        fr.DEFAULT_CONVERSATIONS_LIMIT
    ),
) -> Response:
    """Latest activity first, with unread counts and read positions."""
    return await _answer(gateway, principal, request_id, {"type": "conversations", "limit": limit})


@router.get(
    "/conversations/{conversation_id}/messages",
    summary="A page of a conversation's timeline",
    response_model=fr.HistoryPage,
    responses=_READ_RESPONSES,
)
async def get_history(
    conversation_id: ConversationPath,
    *,
    principal: PrincipalDep,
    gateway: GatewayDep,
    request_id: RequestIdDep,
    before_seq: Annotated[int | None, Query(description="Entries before this seq")] = None,
    after_seq: Annotated[int | None, Query(description="Entries after this seq")] = None,
    limit: Annotated[int, Query(description="At most this many (≤ 200)")] = (
        fr.DEFAULT_HISTORY_LIMIT
    ),
) -> Response:
    """Members only. The latest entries without `before_seq`/`after_seq`; ascending by seq."""
    return await _answer(
        gateway,
        principal,
        request_id,
        {
            "type": "history",
            "conversation_id": conversation_id,
            "before_seq": before_seq,
            "after_seq": after_seq,
            "limit": limit,
        },
    )


@router.get(
    "/conversations/{conversation_id}/messages/{seq}/read-by",
    summary="Who has read a message",
    response_model=fr.ReadBy,
    responses=_READ_RESPONSES,
)
async def get_read_by(
    conversation_id: ConversationPath,
    seq: Annotated[int, Path(description="The message's seq")],
    *,
    principal: PrincipalDep,
    gateway: GatewayDep,
    request_id: RequestIdDep,
) -> Response:
    """Members only: the members whose read position is at or past `seq`."""
    return await _answer(
        gateway,
        principal,
        request_id,
        {"type": "who_read", "conversation_id": conversation_id, "seq": seq},
    )
