"""Request bodies read within a bound, at the ASGI level: before a framework reads (and parses)
a whole body, a server that faces the internet must know it is not 200 MiB. The ingress and the
analytics API both refuse an oversized body this way (each with its own error frame)."""

from __future__ import annotations

from starlette.types import Message, Receive, Scope


def declared_length(scope: Scope) -> int | None:
    """The request's ``Content-Length``: None when it has none, -1 when it is not a number (h11
    and httptools refuse such a request before the app; the callers refuse it too)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return -1
    return None


async def read_bounded(receive: Receive, limit: int) -> bytes | None:
    """The request's body, or ``None`` as soon as the chunks read add up to over ``limit``."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # the client left; the app sees an empty body and answers no one
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def replayed(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` once, then what the server sends (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
