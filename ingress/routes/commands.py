"""``POST /v1/tenants/{tenant_id}/commands``: the WebSocket's commands, one per request.

The body is one client frame (any command but ``hello``, which is the socket's, and ``ack``,
which acknowledges what a socket received); the reply is the frame the socket would have sent,
with the same delivery guarantee: ``accepted`` only once Kafka acknowledged the event.
"""

from __future__ import annotations

from typing import Annotated, Any, Final

from fastapi import APIRouter, Request, Response
from pydantic import Field, TypeAdapter

from ingress.commands import PublishingCommand
from ingress.deps import GatewayDep, PrincipalDep
from ingress.gateway import RefusalError
from ingress.routes.replies import ERROR_RESPONSES, frame_response, read_body
from schemas import frames as fr
from schemas.errors import SchemaError

router = APIRouter(prefix="/v1/tenants/{tenant_id}", tags=["commands"])

#: What the REST door takes, for the OpenAPI document (parsing uses ``parse_client_frame``, so
#: that both doors answer bad input with the same error codes).
RestCommand = Annotated[
    PublishingCommand | fr.Sync | fr.History | fr.Conversations | fr.WhoRead | fr.Ping,
    Field(discriminator="type"),
]
REF_TEMPLATE: Final = "#/components/schemas/{model}"


def command_schemas() -> dict[str, Any]:
    """OpenAPI components: ``RestCommand`` and every schema it refers to."""
    schema = TypeAdapter[Any](RestCommand).json_schema(ref_template=REF_TEMPLATE)
    definitions: dict[str, Any] = schema.pop("$defs", {})
    return {**definitions, "RestCommand": schema}


_BODY: Final = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RestCommand"}}},
    }
}


@router.post(
    "/commands",
    summary="Run one client command",
    response_model=fr.Accepted
    | fr.Ok
    | fr.SyncPage
    | fr.HistoryPage
    | fr.ConversationList
    | fr.ReadBy
    | fr.Pong,
    responses={**ERROR_RESPONSES, 500: {"model": fr.ErrorFrame}},
    openapi_extra=_BODY,
)
async def post_command(request: Request, principal: PrincipalDep, gateway: GatewayDep) -> Response:
    """The reply frame: `accepted` for `send` (only once Kafka acknowledged it), `ok` for the
    other write commands (with the `conversation_id` for `conversation.create`), the page for a
    read (`sync`, `history`, `conversations`, `who_read`; also as GET routes), `pong` for
    `ping`, or `error`."""
    body = await read_body(request, gateway.max_frame_bytes)
    # Like a socket's frames, every request counts against the device's rate, invalid ones too.
    refusal = gateway.rate_limit(principal)
    if refusal is not None:
        return frame_response(gateway, gateway.rate_limited(fr.request_id_of(body), refusal))
    try:
        frame = fr.parse_client_frame(body)
    except SchemaError as error:
        raise RefusalError(fr.ErrorFrame.from_schema_error(error)) from None
    gateway.metrics.frame_in(frame.type)
    return frame_response(gateway, await gateway.execute(principal, frame))
