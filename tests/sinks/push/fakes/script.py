"""What the fakes answer, scripted per device token, and what they count and record."""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Reply:
    """One answer of a fake. ``reason`` is the APNs reason or the FCM error code."""

    status: int = 200
    reason: str | None = None
    retry_after: str | None = None
    """The Retry-After header to send, as the provider would write it."""
    delay: float = 0.0
    """Seconds to wait before answering (a slow provider)."""
    timestamp_ms: int | None = None
    """APNs 410: since when the token is invalid."""
    field: str | None = None
    """FCM INVALID_ARGUMENT: the field the ``BadRequest`` detail names (the token by default)."""
    body: bool = True
    """APNs: whether an error has its JSON body (a proxy's bare 502 has none)."""
    padding: int = 0
    """APNs: bytes of filler in the error body, to exercise HTTP/2 flow control."""


OK = Reply()


class Script:
    """Per token, the answers to give in order; the last one is repeated. Unscripted tokens
    get 200."""

    def __init__(self) -> None:
        self._replies: dict[str, deque[Reply]] = {}

    def set(self, token: str, *replies: Reply) -> None:
        self._replies[token] = deque(replies or (OK,))

    def next(self, token: str) -> Reply:
        replies = self._replies.get(token)
        if not replies:
            return OK
        return replies.popleft() if len(replies) > 1 else replies[0]


@dataclass(frozen=True, slots=True)
class Received:
    """One request as the fake saw it."""

    token: str
    headers: dict[str, str]
    payload: dict[str, Any]
    received_at: float
    """The event loop's clock when the request was complete."""


@dataclass(slots=True)
class FakeStats:
    """The fake's own counts: what a test compares the sender's outcomes with."""

    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    """Per reason (APNs reason, FCM error code)."""
    received: list[Received] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    abandoned: int = 0
    """Requests the client gave up on before the answer (stream reset, connection closed)."""

    def begin(self, received: Received) -> None:
        self.received.append(received)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def end(self, reply: Reply | None) -> None:
        """``reply`` None: the client left before the answer."""
        self.in_flight -= 1
        if reply is None:
            self.abandoned += 1
        elif reply.status == 200:
            self.accepted += 1
        else:
            self.rejected[reply.reason or f"http-{reply.status}"] += 1

    def for_token(self, token: str) -> list[Received]:
        return [request for request in self.received if request.token == token]


async def wait_before_answering(reply: Reply) -> None:
    if reply.delay > 0:
        await asyncio.sleep(reply.delay)
