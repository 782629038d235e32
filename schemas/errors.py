"""Stable error codes, WebSocket close codes and the one exception that bad input raises.

Clients branch on these values, dashboards count them and docs/protocol.md lists them, so a value
never changes meaning once released: add new members, never rename or reuse one.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum, StrEnum
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from pydantic import ValidationError
from pydantic_core import from_json


class ErrorCode(StrEnum):
    """The ``code`` of an ``error`` frame (and of a REST error body)."""

    MALFORMED_JSON = "malformed-json"
    UNKNOWN_TYPE = "unknown-type"
    SCHEMA_INVALID = "schema-invalid"
    FRAME_TOO_LARGE = "frame-too-large"
    BODY_TOO_LARGE = "body-too-large"
    INVALID_UTF8 = "invalid-utf8"
    AUTH_REQUIRED = "auth-required"
    TOKEN_INVALID = "token-invalid"
    TOKEN_EXPIRED = "token-expired"
    TENANT_MISMATCH = "tenant-mismatch"
    TOKEN_REVOKED = "token-revoked"
    RATE_LIMITED = "rate-limited"
    UNAVAILABLE = "unavailable"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not-found"
    PUSH_APP_NOT_ALLOWED = "push-app-not-allowed"
    INTERNAL = "internal"

    @property
    def description(self) -> str:
        """One line for docs and operators: what happened and what the client should do."""
        return _ERROR_DESCRIPTIONS[self][0]

    @property
    def http_status(self) -> int:
        """The status the REST API answers with, so that both doors report an error alike."""
        return _ERROR_DESCRIPTIONS[self][1]


_ERROR_DESCRIPTIONS: dict[ErrorCode, tuple[str, int]] = {
    ErrorCode.MALFORMED_JSON: ("The frame is not valid JSON.", 400),
    ErrorCode.UNKNOWN_TYPE: ("The frame is JSON, but its `type` is not one the server knows.", 400),
    ErrorCode.SCHEMA_INVALID: ("A field is missing or invalid; `field` names its path.", 422),
    ErrorCode.FRAME_TOO_LARGE: ("The frame exceeds the server's frame size limit.", 413),
    ErrorCode.BODY_TOO_LARGE: ("The message body exceeds the body size limit.", 413),
    ErrorCode.INVALID_UTF8: ("The frame's bytes are not valid UTF-8.", 400),
    ErrorCode.AUTH_REQUIRED: ("A command arrived before a successful `hello`.", 401),
    ErrorCode.TOKEN_INVALID: ("The token is malformed, forged or not meant for this server.", 401),
    ErrorCode.TOKEN_EXPIRED: ("The token has expired; get a new one and reconnect.", 401),
    ErrorCode.TENANT_MISMATCH: ("The token belongs to a different tenant than requested.", 403),
    ErrorCode.TOKEN_REVOKED: (
        "The token was revoked by an operator (that token, or a logout of the user or device); "
        "get a new one by signing in again.",
        401,
    ),
    ErrorCode.RATE_LIMITED: ("Too many commands; retry after `retry_after_ms`.", 429),
    ErrorCode.UNAVAILABLE: (
        "The command was not durably accepted (Kafka unreachable), or a read found the store "
        "unreachable; retry after `retry_after_ms` with the same ids.",
        503,
    ),
    ErrorCode.FORBIDDEN: ("The user may not do this (role or membership).", 403),
    ErrorCode.NOT_FOUND: ("The conversation, message or device does not exist.", 404),
    ErrorCode.PUSH_APP_NOT_ALLOWED: (
        "The push token names an app (`app_id`) that is not one of the tenant's configured apps, "
        "or the tenant has no app of this provider; name one of them, or none for the default.",
        403,
    ),
    ErrorCode.INTERNAL: ("An unexpected server error; the command may be retried.", 500),
}


class CloseCode(IntEnum):
    """WebSocket close codes the server uses; 4000-4999 are ours, 1009 is the RFC 6455 one."""

    MESSAGE_TOO_BIG = 1009
    AUTH_REQUIRED = 4001
    TOKEN_INVALID = 4002
    TOKEN_EXPIRED = 4003
    TENANT_MISMATCH = 4004
    TOKEN_REVOKED = 4005
    IDLE_TIMEOUT = 4008
    SLOW_CONSUMER = 4009
    SERVER_DRAINING = 4010
    REPLACED = 4011

    @property
    def description(self) -> str:
        """One line for docs and operators: why the socket was closed and what the client does."""
        return _CLOSE_DESCRIPTIONS[self]


_CLOSE_DESCRIPTIONS: dict[CloseCode, str] = {
    CloseCode.MESSAGE_TOO_BIG: "A frame exceeded the hard size limit; the socket cannot continue.",
    CloseCode.AUTH_REQUIRED: "No valid `hello` arrived in time or a command came before it.",
    CloseCode.TOKEN_INVALID: "The token is malformed, forged or not meant for this server.",
    CloseCode.TOKEN_EXPIRED: "The token expired; reconnect with a fresh one.",
    CloseCode.TENANT_MISMATCH: "The token belongs to a different tenant than the `hello` names.",
    CloseCode.TOKEN_REVOKED: (
        "The token was revoked (that token, or a logout of the user or device); sign in again."
    ),
    CloseCode.IDLE_TIMEOUT: "Nothing (not even a ping) arrived within the idle timeout.",
    CloseCode.SLOW_CONSUMER: (
        "The client read too slowly and its outbound queue overflowed; reconnect and sync from "
        "the last acked cursor."
    ),
    CloseCode.SERVER_DRAINING: (
        "This node is shutting down; reconnect (to another node) and sync from the cursor."
    ),
    CloseCode.REPLACED: (
        "A newer connection of the same device took over; do not reconnect automatically."
    ),
}


CodeT = TypeVar("CodeT", bound=str)


class CodedError(Exception, Generic[CodeT]):
    """An error with a stable ``code`` (a string enum's member) and a message for humans —
    the one shape of every refusal imstream names with a code (auth, migrations, the stack,
    replays, dead letters, quality checks, the HTTP APIs). ``str()`` is ``[code] message``, or
    the message alone where the caller prints the code apart (``bracketed = False``)."""

    bracketed: ClassVar[bool] = True

    def __init__(self, code: CodeT, message: str) -> None:
        super().__init__(f"[{code}] {message}" if self.bracketed else message)
        self.code: CodeT = code
        self.message = message


class SchemaError(ValueError):
    """Bad input on the wire: a stable ``code``, a readable message and the offending field path.

    Raised by ``parse_event`` and the frame parsers, so the ingress can answer with an ``error``
    frame and a stream processor can dead-letter the record with the reason in its headers.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        field: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(f"[{code}] {field}: {message}" if field else f"[{code}] {message}")
        self.code = code
        self.message = message
        self.field = field
        #: The ``id`` of the client command that failed, when it could be read, for the reply.
        self.request_id = request_id


def schema_error(
    error: ValidationError, raw: str | bytes, *, what: str, known_types: Sequence[str]
) -> SchemaError:
    """Turn pydantic's report on a union over ``type`` into one stable, readable error.

    Only the first problem is reported (with a count of the rest): a client fixes one field at a
    time, and a short message fits an error frame and a dead-letter header alike.
    """
    problems = error.errors(include_url=False)
    first = problems[0]
    kind, loc = first["type"], first["loc"]
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    if kind == "json_invalid":
        if isinstance(raw, bytes) and not _is_utf8(raw):
            return SchemaError(ErrorCode.INVALID_UTF8, f"the {what} is not valid UTF-8")
        return SchemaError(
            ErrorCode.MALFORMED_JSON, f"the {what} is not valid JSON: {first['msg']}"
        )
    if not loc and kind == "union_tag_invalid":
        return SchemaError(
            ErrorCode.UNKNOWN_TYPE,
            f"unknown {what} type {first['ctx']['tag']!r}; known types: {', '.join(known_types)}",
            "type",
        )
    if not loc and kind == "union_tag_not_found":
        return SchemaError(ErrorCode.SCHEMA_INVALID, f"the {what} needs a string `type`", "type")
    if not loc:
        return SchemaError(ErrorCode.SCHEMA_INVALID, f"the {what} must be a JSON object{more}")
    path = field_path(loc, _json_or_none(raw))
    if kind in {"union_tag_invalid", "union_tag_not_found"}:
        path = f"{path}.type" if path else "type"
    code = ErrorCode.BODY_TOO_LARGE if kind == "body_too_large" else ErrorCode.SCHEMA_INVALID
    # Our own rules raise ValueError; pydantic would prefix their text with "Value error, ".
    message = str(first["ctx"]["error"]) if kind == "value_error" else first["msg"]
    return SchemaError(code, f"{message}{more}", path or None)


def field_path(loc: Sequence[int | str], data: Any) -> str:
    """The dotted path of a pydantic error location, without the tags of discriminated unions.

    Pydantic puts the chosen union member's tag into ``loc`` (``body.text.text`` for the text
    field of a text body). Every union here discriminates on ``type``, so an element equal to the
    ``type`` of the object being walked is that tag, once per object, and is dropped.
    """
    parts: list[str] = []
    node = data
    tag_dropped = False
    for element in loc:
        if isinstance(node, dict) and not tag_dropped and node.get("type") == element:
            tag_dropped = True
            continue
        tag_dropped = False
        parts.append(str(element))
        if isinstance(node, dict):
            node = node.get(element)
        elif isinstance(node, list) and isinstance(element, int) and 0 <= element < len(node):
            node = node[element]
        else:
            node = None
    return ".".join(parts)


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _json_or_none(raw: str | bytes) -> Any:
    """The input as plain JSON, to walk error paths; only called once validation has failed."""
    try:
        return from_json(raw)  # bounded nesting (json.loads would raise RecursionError)
    except ValueError:
        return None


# -- the HTTP APIs' errors (the analytics API, search, quality datasets) ------------------


class ApiErrorCode(Protocol):
    """What the error codes of imstream's HTTP APIs share: a stable text and a status."""

    @property
    def http_status(self) -> int: ...


class ApiError(Exception):
    """A refused or failed request to one of imstream's HTTP APIs (analytics, search,
    quality datasets): a stable code, a readable message, the offending field; answered as
    ``{"code", "message", "field"}`` with the code's status."""

    def __init__(self, code: ApiErrorCode, message: str, field: str | None = None) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        self.field = field

    def body(self) -> dict[str, Any]:
        return {"code": str(self.code), "message": self.message, "field": self.field}
