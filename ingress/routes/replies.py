"""How the REST door answers: a server frame as the body, ``ErrorCode.http_status`` as status."""

from __future__ import annotations

import math
from typing import Any, Final

from fastapi import Request, Response

from ingress.gateway import Gateway, RefusalError, error_frame
from schemas import frames as fr
from schemas.errors import ErrorCode

#: The error statuses every authenticated route may answer, for the OpenAPI document.
ERROR_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    status: {"model": fr.ErrorFrame, "description": description}
    for status, description in {
        400: "Malformed JSON, unknown type or invalid UTF-8",
        401: "Missing, invalid or expired token",
        403: "Token of another tenant or device",
        413: "Body over the frame or message-body limit",
        422: "A field is missing or invalid (`field` names it)",
        429: "Rate-limited (`retry_after_ms`, and a `Retry-After` header)",
        503: "Kafka did not acknowledge in time; retry with the same ids",
    }.items()
}


def frame_response(gateway: Gateway, frame: fr.ServerFrame) -> Response:
    """``frame`` as a JSON response, counted like a frame sent on a socket."""
    headers = {}
    status = 200
    if isinstance(frame, fr.ErrorFrame):
        gateway.metrics.error(frame.code)
        status = frame.code.http_status
        if frame.retry_after_ms is not None:
            headers["Retry-After"] = str(math.ceil(frame.retry_after_ms / 1000))
    gateway.metrics.frame_out(frame.type)
    return Response(
        frame.model_dump_json(),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (``frame-too-large``) as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RefusalError(_too_large(int(declared), limit))
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RefusalError(_too_large(size, limit))
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> fr.ErrorFrame:
    return error_frame(
        ErrorCode.FRAME_TOO_LARGE,
        f"the body is at least {size} bytes; the limit is {limit} bytes",
    )
