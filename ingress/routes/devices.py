"""``/v1/tenants/{tenant_id}/devices/{device_id}/push-token``: a device's APNs/FCM token.

``PUT`` registers it (``push_token.registered``), ``DELETE`` removes it
(``push_token.removed``, reason ``client``); both answer ``ok`` only once Kafka acknowledged the
event, on the compacted ``im.push.tokens`` topic keyed ``tenant/user/device``. A token bound to a
device (``did``) may only change that device's token.

The app a token is for (the APNs topic, the FCM app) is the tenant's, from the settings
(``IM_PUSH__TENANT_APPS``): the client may name one of the tenant's apps, or none for its first;
any other is refused with ``push-app-not-allowed`` — a client never picks where pushes go. Who
*holds* a token (another user's device may already) is the push sink's decision, from the token
topic in order (``sinks.push.tokens``): a registration here is a claim, and ``proof`` the
challenge the sink sent to the token, echoed (``sinks.push.proof``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response
from pydantic import Field, StringConstraints

from ingress.connection import Principal
from ingress.deps import GatewayDep, PrincipalDep, RequestIdDep
from ingress.gateway import Gateway, error_frame
from ingress.producer import KafkaUnavailable, PublishRejectedError
from ingress.routes.replies import ERROR_RESPONSES, frame_response
from schemas import frames as fr
from schemas.errors import ErrorCode
from schemas.events import (
    MAX_NAME_CHARS,
    MAX_PUSH_PROOF_CHARS,
    MAX_PUSH_TOKEN_CHARS,
    Actor,
    DeviceId,
    PushProvider,
    PushTokenRegistered,
    PushTokenRegisteredPayload,
    PushTokenRemovalReason,
    PushTokenRemoved,
    PushTokenRemovedPayload,
    WireModel,
)

router = APIRouter(prefix="/v1/tenants/{tenant_id}/devices/{device_id}", tags=["devices"])

DevicePath = Annotated[DeviceId, Path(description="The device whose token this is")]


class PushToken(WireModel):
    """A device's push token as the app got it from APNs or FCM."""

    provider: PushProvider
    token: Annotated[str, StringConstraints(min_length=1, max_length=MAX_PUSH_TOKEN_CHARS)]
    app_id: Annotated[
        str | None,
        StringConstraints(min_length=1, max_length=MAX_NAME_CHARS),
        Field(
            description="One of the tenant's apps (APNs bundle id or FCM application id), as "
            "the operator configured them; omitted: the tenant's default app of the provider"
        ),
    ] = None
    proof: Annotated[
        str | None,
        StringConstraints(min_length=1, max_length=MAX_PUSH_PROOF_CHARS),
        Field(
            description="The challenge a silent push brought to this token, echoed: needed "
            "only to take a token that a device of another user holds (PUT only)"
        ),
    ] = None


@router.put(
    "/push-token",
    summary="Register the device's push token",
    response_model=fr.Ok,
    responses={**ERROR_RESPONSES, 403: {"model": fr.ErrorFrame}},
)
async def register_push_token(
    device_id: DevicePath,
    token: PushToken,
    principal: PrincipalDep,
    gateway: GatewayDep,
    request_id: RequestIdDep,
) -> Response:
    """Publishes `push_token.registered`; `ok` once Kafka acknowledged it."""
    refusal = _refuse_other_device(gateway, principal.device_id, device_id, request_id)
    if refusal is not None:
        return refusal
    app_id = _tenant_app(gateway, principal.tenant_id, token)
    if app_id is None:
        return _refuse_app(gateway, principal.tenant_id, token, request_id)
    payload = PushTokenRegisteredPayload(
        user_id=principal.user_id,
        device_id=device_id,
        provider=token.provider,
        token=token.token,
        app_id=app_id,
        proof=token.proof,
    )
    event = PushTokenRegistered.new(
        tenant_id=principal.tenant_id,
        payload=payload,
        actor=Actor(user_id=principal.user_id, device_id=device_id),
    )
    return await _publish(gateway, event, request_id)


@router.delete(
    "/push-token",
    summary="Remove the device's push token",
    response_model=fr.Ok,
    responses={**ERROR_RESPONSES, 403: {"model": fr.ErrorFrame}},
)
async def remove_push_token(
    device_id: DevicePath,
    token: PushToken,
    principal: PrincipalDep,
    gateway: GatewayDep,
    request_id: RequestIdDep,
) -> Response:
    """Publishes `push_token.removed` (reason `client`) for exactly this token, so that a newer
    token of the device is not removed by a late request; `ok` once Kafka acknowledged it."""
    refusal = _refuse_other_device(gateway, principal.device_id, device_id, request_id)
    if refusal is not None:
        return refusal
    # A removal names the token, not a route: any app id (the tenant's default when none).
    app_id = (
        _tenant_app(gateway, principal.tenant_id, token) or token.app_id or token.provider.value
    )
    payload = PushTokenRemovedPayload(
        user_id=principal.user_id,
        device_id=device_id,
        reason=PushTokenRemovalReason.CLIENT,
        provider=token.provider,
        token=token.token,
        app_id=app_id,
    )
    event = PushTokenRemoved.new(
        tenant_id=principal.tenant_id,
        payload=payload,
        actor=Actor(user_id=principal.user_id, device_id=device_id),
    )
    return await _publish(gateway, event, request_id)


def _tenant_app(gateway: Gateway, tenant_id: str, token: PushToken) -> str | None:
    """The tenant's app the token is for; None when the client named none of them."""
    return gateway.push_apps(tenant_id).resolve(token.provider, token.app_id)


def _refuse_app(gateway: Gateway, tenant_id: str, token: PushToken, request_id: str) -> Response:
    apps = gateway.push_apps(tenant_id).app_ids(token.provider)
    if token.app_id is None:
        detail = f"tenant {tenant_id!r} has no {token.provider.value} app configured"
    else:
        detail = (
            f"app_id {token.app_id!r} is not one of tenant {tenant_id!r}'s "
            f"{token.provider.value} apps ({', '.join(apps) or 'none configured'})"
        )
    return frame_response(
        gateway,
        error_frame(ErrorCode.PUSH_APP_NOT_ALLOWED, detail, request_id, field="app_id"),
    )


def _refuse_other_device(
    gateway: Gateway, bound_device: str | None, device_id: str, request_id: str
) -> Response | None:
    if bound_device is None or bound_device == device_id:
        return None
    return frame_response(
        gateway,
        error_frame(
            ErrorCode.FORBIDDEN,
            f"the token is bound to device {bound_device!r}; it cannot change {device_id!r}",
            request_id,
        ),
    )


async def _publish(
    gateway: Gateway, event: PushTokenRegistered | PushTokenRemoved, request_id: str
) -> Response:
    actor = event.actor
    assert actor is not None
    refusal = gateway.rate_limit(Principal(event.tenant_id, actor.user_id, actor.device_id))
    if refusal is not None:
        return frame_response(gateway, gateway.rate_limited(request_id, refusal))
    try:
        await gateway.publish_event(event)
    except KafkaUnavailable as error:
        return frame_response(
            gateway,
            error_frame(
                ErrorCode.UNAVAILABLE,
                f"not recorded: {error}; retry",
                request_id,
                retry_after=error.retry_after_ms,
            ),
        )
    except PublishRejectedError as error:
        return frame_response(
            gateway,
            error_frame(ErrorCode.INTERNAL, f"Kafka refused it ({error.reason})", request_id),
        )
    return frame_response(gateway, fr.Ok(id=request_id))
