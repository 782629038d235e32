"""The REST door's dependencies: the gateway, the principal a request speaks for, its request id.

Routes declare what they need with these ``Annotated`` aliases; a request that cannot be
authenticated never reaches a route. Failures raise :class:`~ingress.gateway.RefusalError`, which
the app answers with the same ``error`` frame a WebSocket client would get, with
``ErrorCode.http_status`` as the status.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends, Header, Path, Request

from core.auth import AuthError
from ingress.connection import Principal
from ingress.gateway import Gateway, RefusalError, error_frame
from schemas.errors import ErrorCode
from schemas.events import DeviceId, TenantId
from schemas.frames import RequestId


def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


def request_id(
    x_request_id: Annotated[
        RequestId | None,
        Header(description="Echoed as the reply's `id`; one is generated when absent"),
    ] = None,
) -> str:
    return x_request_id or uuid.uuid4().hex


RequestIdDep = Annotated[str, Depends(request_id)]


def authenticate(
    gateway: GatewayDep,
    tenant_id: Annotated[TenantId, Path(description="The tenant the caller acts in")],
    authorization: Annotated[
        str | None, Header(description="`Bearer <JWT>`, the token a WebSocket `hello` carries")
    ] = None,
    x_device_id: Annotated[
        DeviceId | None,
        Header(
            description="The calling device, for tokens not bound to one (no `did` claim); "
            "must equal `did` when the token has one"
        ),
    ] = None,
) -> Principal:
    """The verified caller: user from the token, tenant from the path, device from either."""
    if authorization is None:
        raise RefusalError(
            error_frame(ErrorCode.AUTH_REQUIRED, "send the header Authorization: Bearer <token>")
        )
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise RefusalError(
            error_frame(ErrorCode.TOKEN_INVALID, "the Authorization header must be Bearer <token>")
        )
    try:
        claims = gateway.verify_token(token.strip(), tenant_id, x_device_id)
    except AuthError as error:
        raise RefusalError(error_frame(ErrorCode(error.code.value), error.message)) from None
    if claims.device_id is not None and x_device_id not in (None, claims.device_id):
        raise RefusalError(
            error_frame(
                ErrorCode.FORBIDDEN,
                f"the token was issued to device {claims.device_id!r}, not {x_device_id!r}",
            )
        )
    return Principal(
        tenant_id,
        claims.user_id,
        claims.device_id or x_device_id,
        tuple(sorted(claims.roles)),
    )


PrincipalDep = Annotated[Principal, Depends(authenticate)]
