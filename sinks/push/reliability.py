"""Delivering one notification to one device through its provider, reliably and observably.

:class:`PushDispatcher` holds one lane per provider — the provider's sender, a semaphore that
bounds the requests in flight to it, and its circuit breaker — and runs each delivery as a
sequence of attempts:

- Each attempt waits for a slot (the bound is per provider), asks the breaker, then sends with a
  per-request timeout. It yields one :class:`~sinks.push.outcome.PushOutcome`.
- 429, 5xx, timeouts and broken connections are retried, up to ``max_attempts`` in all, after an
  exponential backoff with full jitter (uniform in ``[0, min(cap, base · 2^(n-1))]``), and never
  sooner than the provider's Retry-After. A Retry-After longer than ``max_retry_after_seconds``
  ends the delivery at once rather than holding it for minutes.
- The breaker opens after ``failure_threshold`` consecutive provider failures (5xx, timeouts,
  connection errors — not 429s, which both providers send per device token), rejects attempts
  for ``cool_down_seconds``, then lets one probe through: its success closes the breaker, its
  failure opens it again.
- A delivery ends with a final outcome: sent, invalid token (to be removed), or not delivered
  with a dead-letter code (retries exhausted, rejected for good, breaker open, Retry-After too
  long) for the caller's push dead-letter topic.

Delivery is at least once per device: a timed-out attempt may have reached the provider, and its
retry carries the same collapse id, so the device shows the notification once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Protocol

from core.backoff import Backoff
from core.push_settings import PushProviderSettings
from schemas.events import PushProvider
from sinks.push.apns import ApnsSender
from sinks.push.errors import DeadLetterCode, LocalReason, PushConfigError
from sinks.push.fcm import FcmSender
from sinks.push.notification import PushNotification, PushTarget
from sinks.push.outcome import OutcomeKind, ProviderReply, PushOutcome

log = logging.getLogger(__name__)


class PushSender(Protocol):
    """One provider's client: one request per call, classified; no retries of its own."""

    @property
    def provider(self) -> PushProvider: ...

    async def send(self, notification: PushNotification, target: PushTarget) -> ProviderReply:
        """Send once. Errors the provider or the network cause come back as a reply; only a
        timeout (imposed by the caller's cancellation) and programming errors raise."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 5
    backoff_base_seconds: float = 0.5
    backoff_cap_seconds: float = 30.0
    max_retry_after_seconds: float = 120.0

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Full jitter after attempt ``attempt`` (1-based): spreads the retries of many jobs
        that failed together instead of sending them back in one wave."""
        policy = Backoff(self.backoff_base_seconds, self.backoff_cap_seconds, "full", rng)
        return policy.delay(attempt)


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass(frozen=True, slots=True)
class BreakerPermit:
    """Leave to make one attempt; ``probe`` when it is the half-open breaker's one trial."""

    probe: bool


class CircuitBreaker:
    """Consecutive-failure circuit breaker of one provider (single event loop, no locking)."""

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int,
        cool_down_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._failure_threshold = failure_threshold
        self._cool_down_seconds = cool_down_seconds
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._consecutive_failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    @property
    def state(self) -> BreakerState:
        if (
            self._state is BreakerState.OPEN
            and self._clock() - self._opened_at >= self._cool_down_seconds
        ):
            return BreakerState.HALF_OPEN
        return self._state

    def acquire(self) -> BreakerPermit | None:
        """A permit for one attempt, or None while the breaker is open (or half-open with its
        probe already in flight)."""
        state = self.state
        if state is BreakerState.CLOSED:
            return BreakerPermit(probe=False)
        if state is BreakerState.HALF_OPEN and not self._probe_in_flight:
            self._state = BreakerState.HALF_OPEN
            self._probe_in_flight = True
            log.info("push provider %s: circuit half-open, sending one probe", self.name)
            return BreakerPermit(probe=True)
        return None

    def record(self, permit: BreakerPermit, *, healthy: bool) -> None:
        """The attempt made under ``permit`` found the provider healthy (any answer but a 5xx)
        or not (a 5xx, a timeout, a broken connection)."""
        if permit.probe:
            self._probe_in_flight = False
            if healthy:
                self._close()
            else:
                self._open("its probe failed")
        elif self._state is BreakerState.CLOSED:
            if healthy:
                self._consecutive_failures = 0
            else:
                self._consecutive_failures += 1
                if self._consecutive_failures >= self._failure_threshold:
                    self._open(f"{self._consecutive_failures} consecutive failures")
        # Otherwise the answer is to a request sent before the breaker opened: it changes
        # nothing; only the probe decides.

    def abandon(self, permit: BreakerPermit) -> None:
        """The attempt was cancelled before an answer: free the probe slot for someone else."""
        if permit.probe:
            self._probe_in_flight = False

    def _open(self, why: str) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        log.warning(
            "push provider %s: circuit open (%s); no requests for %.1f s, then one probe",
            self.name,
            why,
            self._cool_down_seconds,
        )

    def _close(self) -> None:
        self._state = BreakerState.CLOSED
        self._consecutive_failures = 0
        log.info("push provider %s: circuit closed", self.name)


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """Every attempt of one delivery, in order; the last is final."""

    outcomes: tuple[PushOutcome, ...]

    @property
    def final(self) -> PushOutcome:
        return self.outcomes[-1]

    @property
    def delivered(self) -> bool:
        return self.final.kind is OutcomeKind.SENT

    @property
    def token_removed(self) -> bool:
        return self.final.token_removed

    @property
    def dead_letter_code(self) -> DeadLetterCode | None:
        return self.final.dead_letter_code


@dataclass(slots=True)
class _Lane:
    sender: PushSender
    slots: asyncio.Semaphore
    breaker: CircuitBreaker


def build_senders(settings: PushProviderSettings) -> dict[PushProvider, PushSender]:
    """A sender for each configured provider: APNs with a key path, FCM with a service account.
    Raises :class:`PushConfigError` when a configured provider's settings cannot work."""
    senders: dict[PushProvider, PushSender] = {}
    if settings.apns_key_path is not None:
        senders[PushProvider.APNS] = ApnsSender.from_settings(settings)
    else:
        log.info("APNs is not configured (IM_PUSH__APNS_KEY_PATH): iOS devices get no pushes")
    if settings.fcm_credentials_path is not None:
        senders[PushProvider.FCM] = FcmSender.from_settings(settings)
    else:
        log.info("FCM is not configured (IM_PUSH__FCM_CREDENTIALS_PATH): Android gets no pushes")
    return senders


class PushDispatcher:
    """Delivers notifications through the provider senders; see the module docstring."""

    def __init__(
        self,
        senders: Mapping[PushProvider, PushSender],
        *,
        concurrency: int,
        retry: RetryPolicy,
        breaker_failure_threshold: int,
        breaker_cool_down_seconds: float,
        request_timeout_seconds: float,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._lanes = {
            provider: _Lane(
                sender=sender,
                slots=asyncio.Semaphore(concurrency),
                breaker=CircuitBreaker(
                    provider.value,
                    failure_threshold=breaker_failure_threshold,
                    cool_down_seconds=breaker_cool_down_seconds,
                    clock=clock,
                ),
            )
            for provider, sender in senders.items()
        }
        self._retry = retry
        self._request_timeout_seconds = request_timeout_seconds
        self._rng = rng or random.Random()
        self._clock = clock
        self._sleep = sleep

    @classmethod
    def from_settings(
        cls,
        settings: PushProviderSettings,
        senders: Mapping[PushProvider, PushSender] | None = None,
    ) -> PushDispatcher:
        """A dispatcher with the settings' limits, over ``senders`` or, by default, a sender
        for each provider the settings configure."""
        return cls(
            build_senders(settings) if senders is None else senders,
            concurrency=settings.concurrency,
            retry=RetryPolicy(
                max_attempts=settings.max_attempts,
                backoff_base_seconds=settings.backoff_base_seconds,
                backoff_cap_seconds=settings.backoff_cap_seconds,
                max_retry_after_seconds=settings.max_retry_after_seconds,
            ),
            breaker_failure_threshold=settings.breaker_failure_threshold,
            breaker_cool_down_seconds=settings.breaker_cool_down_seconds,
            request_timeout_seconds=settings.request_timeout_seconds,
        )

    @property
    def providers(self) -> frozenset[PushProvider]:
        return frozenset(self._lanes)

    def breaker(self, provider: PushProvider) -> CircuitBreaker:
        return self._lane(provider).breaker

    async def deliver(self, notification: PushNotification, target: PushTarget) -> DeliveryReport:
        """Deliver to one device, retrying as the module docstring says; every attempt's
        outcome is in the report."""
        lane = self._lane(target.provider)
        outcomes: list[PushOutcome] = []
        attempt = 0
        while True:
            attempt += 1
            async with lane.slots:
                permit = lane.breaker.acquire()
                if permit is None:
                    outcomes.append(
                        self._outcome(
                            notification,
                            target,
                            ProviderReply(OutcomeKind.FAILED, LocalReason.CIRCUIT_OPEN),
                            attempt=attempt,
                            latency_ms=0.0,
                            dead_letter_code=DeadLetterCode.CIRCUIT_OPEN,
                        )
                    )
                    return DeliveryReport(tuple(outcomes))
                started = self._clock()
                try:
                    async with asyncio.timeout(self._request_timeout_seconds):
                        reply = await lane.sender.send(notification, target)
                except TimeoutError:
                    reply = ProviderReply(OutcomeKind.FAILED, LocalReason.TIMEOUT, retryable=True)
                except BaseException:
                    lane.breaker.abandon(permit)
                    raise
                latency_ms = (self._clock() - started) * 1000.0
            lane.breaker.record(permit, healthy=not reply.provider_unhealthy)

            retry_in, dead_letter_code = self._next_step(reply, attempt)
            outcome = self._outcome(
                notification,
                target,
                reply,
                attempt=attempt,
                latency_ms=latency_ms,
                retry_in=retry_in,
                dead_letter_code=dead_letter_code,
            )
            outcomes.append(outcome)
            log.debug(
                "push %s to device %s via %s: attempt %d %s %s",
                notification.job_id,
                target.device_id,
                target.provider,
                attempt,
                reply.kind,
                reply.reason,
            )
            if retry_in is None:
                return DeliveryReport(tuple(outcomes))
            await self._sleep(retry_in)

    def _next_step(
        self, reply: ProviderReply, attempt: int
    ) -> tuple[float | None, DeadLetterCode | None]:
        """After attempt ``attempt``: seconds until the next one, or None and — unless the
        provider settled it (sent, invalid token) — why the job is given up."""
        if reply.kind is OutcomeKind.SENT or reply.kind is OutcomeKind.INVALID_TOKEN:
            return None, None
        if not reply.retryable:
            return None, DeadLetterCode.REJECTED
        if attempt >= self._retry.max_attempts:
            return None, DeadLetterCode.RETRIES_EXHAUSTED
        retry_after = reply.retry_after_seconds or 0.0
        if retry_after > self._retry.max_retry_after_seconds:
            return None, DeadLetterCode.RETRY_AFTER_TOO_LONG
        return max(self._retry.backoff(attempt, self._rng), retry_after), None

    async def close(self) -> None:
        for lane in self._lanes.values():
            await lane.sender.close()

    def _lane(self, provider: PushProvider) -> _Lane:
        try:
            return self._lanes[provider]
        except KeyError:
            raise PushConfigError(
                f"no {provider.value} sender is configured; set its IM_PUSH__ settings or drop "
                f"{provider.value} tokens before delivering"
            ) from None

    @staticmethod
    def _outcome(
        notification: PushNotification,
        target: PushTarget,
        reply: ProviderReply,
        *,
        attempt: int,
        latency_ms: float,
        retry_in: float | None = None,
        dead_letter_code: DeadLetterCode | None = None,
    ) -> PushOutcome:
        return PushOutcome(
            job_id=notification.job_id,
            device_id=target.device_id,
            provider=target.provider,
            kind=reply.kind,
            status_code=reply.status_code,
            reason=reply.reason,
            attempt=attempt,
            latency_ms=round(latency_ms, 3),
            token_removed=reply.kind is OutcomeKind.INVALID_TOKEN,
            token_invalid_since=reply.token_invalid_since,
            final=retry_in is None,
            retry_in_ms=None if retry_in is None else round(retry_in * 1000.0, 3),
            dead_letter_code=dead_letter_code,
            finished_at=datetime.now(UTC),
            provider_message_id=reply.provider_message_id,
        )
