"""What a push attempt came to: a sender's classified reply, and the outcome record of an attempt.

Every attempt yields one :class:`PushOutcome` (the caller writes them to ClickHouse for the
push-outcome dashboards); the last one of a job has ``final`` set and says whether the token is
to be removed and whether the job is to be dead-lettered.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from schemas.events import PushProvider
from sinks.push.errors import DeadLetterCode


class OutcomeKind(StrEnum):
    SENT = "sent"
    INVALID_TOKEN = "invalid_token"
    """The provider says the token is no longer valid: remove it, never retry."""
    THROTTLED = "throttled"
    """The provider asked us to slow down (429); retried after its Retry-After."""
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ProviderReply:
    """One request to a provider as its sender classifies it."""

    kind: OutcomeKind
    reason: str
    """The provider's own reason (``BadDeviceToken``, ``UNREGISTERED``, …) or a
    :class:`~sinks.push.errors.LocalReason`."""
    retryable: bool = False
    status_code: int | None = None
    retry_after_seconds: float | None = None
    """The provider's Retry-After, when it sent one."""
    token_invalid_since: datetime | None = None
    """APNs's timestamp of a 410: the token was invalid from then on. A token registered again
    after it is a new registration and must be kept."""
    provider_message_id: str | None = None

    @property
    def provider_unhealthy(self) -> bool:
        """A 5xx, a timeout or a broken connection: what the circuit breaker counts. A 429 is
        not: both providers throttle per device token, so it says nothing of the provider."""
        return self.kind is OutcomeKind.FAILED and self.retryable

    @classmethod
    def sent(cls, status_code: int, provider_message_id: str | None = None) -> ProviderReply:
        return cls(
            OutcomeKind.SENT, "", status_code=status_code, provider_message_id=provider_message_id
        )


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """A Retry-After header in seconds (delta-seconds or an HTTP date); None when absent or
    unreadable — the caller then backs off on its own schedule."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


class PushOutcome(BaseModel):
    """One attempt to deliver one push job to one device: a row of the push-outcome table."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    device_id: str
    provider: PushProvider
    kind: OutcomeKind
    status_code: int | None
    """The provider's HTTP status; null when it did not answer (timeout, connection, breaker)."""
    reason: str
    attempt: int
    """1 for the first attempt of this job on this device."""
    latency_ms: float
    """From the request leaving to its answer (waiting for a concurrency slot excluded)."""
    token_removed: bool
    """The provider rejected the token for good: the caller removes it (a ``push_token.removed``
    event with reason ``provider-rejected``)."""
    token_invalid_since: datetime | None = None
    final: bool
    """The job is done on this device: no attempt follows."""
    retry_in_ms: float | None = None
    """When not final: how long the sender waits before the next attempt."""
    dead_letter_code: DeadLetterCode | None = None
    """When final and not delivered: why, for the dead-letter topic's headers."""
    finished_at: datetime
    provider_message_id: str | None = None

    @property
    def delivered(self) -> bool:
        return self.kind is OutcomeKind.SENT
