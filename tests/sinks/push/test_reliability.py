"""Retries, backoff, Retry-After, timeouts, concurrency bounds and circuit breakers — through
the fake providers, and the pure pieces (backoff, breaker, Retry-After parsing) on their own."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from schemas.events import PushProvider
from sinks.push.apns import ApnsSender
from sinks.push.errors import DeadLetterCode, LocalReason, PushConfigError
from sinks.push.notification import PushTarget
from sinks.push.outcome import OutcomeKind, parse_retry_after
from sinks.push.reliability import (
    BreakerPermit,
    BreakerState,
    CircuitBreaker,
    PushSender,
    RetryPolicy,
)
from tests.clock import FakeClock
from tests.sinks.push.fakes.apns import FakeApns
from tests.sinks.push.fakes.fcm import FakeFcm
from tests.sinks.push.fakes.script import FakeStats, Reply, Script
from tests.sinks.push.support import apns_target, fcm_target, make_dispatcher, make_notification


@dataclass(frozen=True, slots=True)
class Provider:
    """One provider under test: its sender, its fake, and how the fake says things."""

    kind: PushProvider
    sender: PushSender
    script: Script
    stats: FakeStats
    target: Callable[[], PushTarget]
    throttled: Reply
    server_error: Reply


#: Per provider: its fake's and its sender's fixtures, a target, and how the fake says
#: "throttled" and "server error".
PROVIDERS: dict[PushProvider, tuple[str, str, Callable[[], PushTarget], Reply, Reply]] = {
    PushProvider.APNS: (
        "fake_apns",
        "apns_sender",
        apns_target,
        Reply(429, "TooManyRequests", retry_after="1"),
        Reply(500, "InternalServerError"),
    ),
    PushProvider.FCM: (
        "fake_fcm",
        "fcm_sender",
        fcm_target,
        Reply(429, "QUOTA_EXCEEDED", retry_after="1"),
        Reply(500, "INTERNAL"),
    ),
}


@pytest.fixture(params=list(PROVIDERS), ids=["apns", "fcm"])
def provider(request: pytest.FixtureRequest) -> Provider:
    fake_fixture, sender_fixture, target, throttled, server_error = PROVIDERS[request.param]
    fake: FakeApns | FakeFcm = request.getfixturevalue(fake_fixture)
    sender: PushSender = request.getfixturevalue(sender_fixture)
    return Provider(
        request.param,
        sender,
        fake.script,
        fake.stats,
        target,
        throttled=throttled,
        server_error=server_error,
    )


async def test_429_is_retried_no_sooner_than_retry_after_then_sent(provider: Provider) -> None:
    dispatcher = make_dispatcher({provider.kind: provider.sender})
    target = provider.target()
    provider.script.set(target.token, provider.throttled, Reply())

    report = await dispatcher.deliver(make_notification(), target)

    throttled, sent = report.outcomes
    assert throttled.kind is OutcomeKind.THROTTLED
    assert throttled.status_code == 429
    assert throttled.reason == provider.throttled.reason
    assert not throttled.final
    assert throttled.retry_in_ms is not None
    assert throttled.retry_in_ms >= 1000
    assert sent.kind is OutcomeKind.SENT
    assert sent.final
    assert sent.attempt == 2
    first, second = provider.stats.for_token(target.token)
    assert second.received_at - first.received_at >= 1.0
    assert provider.stats.accepted == 1
    assert provider.stats.rejected == {provider.throttled.reason: 1}


async def test_500_is_retried_then_sent(provider: Provider) -> None:
    dispatcher = make_dispatcher({provider.kind: provider.sender})
    target = provider.target()
    notification = make_notification()
    provider.script.set(target.token, provider.server_error, Reply())

    report = await dispatcher.deliver(notification, target)

    failed, sent = report.outcomes
    assert (failed.kind, failed.status_code, failed.final) == (OutcomeKind.FAILED, 500, False)
    assert failed.reason == provider.server_error.reason
    assert (sent.kind, sent.status_code, sent.final) == (OutcomeKind.SENT, 200, True)
    for attempt, outcome in enumerate(report.outcomes, start=1):
        assert outcome.attempt == attempt
        assert outcome.job_id == notification.job_id
        assert outcome.device_id == target.device_id
        assert outcome.provider is provider.kind
        assert outcome.latency_ms > 0
        assert not outcome.token_removed
    assert report.delivered
    assert report.dead_letter_code is None
    assert len(provider.stats.for_token(target.token)) == 2


async def test_permanent_500_exhausts_retries_into_a_dead_letter(provider: Provider) -> None:
    dispatcher = make_dispatcher({provider.kind: provider.sender}, max_attempts=3)
    target = provider.target()
    provider.script.set(target.token, provider.server_error)

    report = await dispatcher.deliver(make_notification(), target)

    assert [o.attempt for o in report.outcomes] == [1, 2, 3]
    assert [o.final for o in report.outcomes] == [False, False, True]
    assert all(o.kind is OutcomeKind.FAILED for o in report.outcomes)
    assert report.dead_letter_code is DeadLetterCode.RETRIES_EXHAUSTED
    assert not report.delivered
    assert provider.stats.rejected == {provider.server_error.reason: 3}


async def test_slow_response_times_out(provider: Provider) -> None:
    dispatcher = make_dispatcher(
        {provider.kind: provider.sender}, max_attempts=1, request_timeout_seconds=0.3
    )
    target = provider.target()
    provider.script.set(target.token, Reply(delay=1.5))

    report = await dispatcher.deliver(make_notification(), target)

    (outcome,) = report.outcomes
    assert outcome.kind is OutcomeKind.FAILED
    assert outcome.reason == LocalReason.TIMEOUT
    assert outcome.status_code is None
    assert 250 <= outcome.latency_ms < 1000
    assert report.dead_letter_code is DeadLetterCode.RETRIES_EXHAUSTED


async def test_concurrency_never_exceeds_the_bound(provider: Provider) -> None:
    dispatcher = make_dispatcher({provider.kind: provider.sender}, concurrency=4)
    targets = [provider.target() for _ in range(16)]
    for target in targets:
        provider.script.set(target.token, Reply(delay=0.1))

    reports = await asyncio.gather(
        *(dispatcher.deliver(make_notification(), target) for target in targets)
    )

    assert all(report.delivered for report in reports)
    assert provider.stats.accepted == 16
    assert provider.stats.max_in_flight == 4


async def test_retry_after_beyond_the_limit_is_dead_lettered_at_once(
    provider: Provider,
) -> None:
    dispatcher = make_dispatcher({provider.kind: provider.sender}, max_retry_after_seconds=5.0)
    target = provider.target()
    provider.script.set(target.token, Reply(429, provider.throttled.reason, retry_after="600"))

    report = await dispatcher.deliver(make_notification(), target)

    (outcome,) = report.outcomes
    assert outcome.kind is OutcomeKind.THROTTLED
    assert outcome.final
    assert report.dead_letter_code is DeadLetterCode.RETRY_AFTER_TOO_LONG


async def test_breaker_opens_then_lets_one_probe_through_and_closes(
    apns_sender: ApnsSender, fake_apns: FakeApns
) -> None:
    dispatcher = make_dispatcher(
        {PushProvider.APNS: apns_sender},
        max_attempts=1,
        breaker_failure_threshold=3,
        breaker_cool_down_seconds=0.3,
    )
    target = apns_target()
    fake_apns.script.set(target.token, Reply(503, "ServiceUnavailable"))
    for _ in range(3):
        await dispatcher.deliver(make_notification(), target)
    assert dispatcher.breaker(PushProvider.APNS).state is BreakerState.OPEN

    rejected = await dispatcher.deliver(make_notification(), target)

    assert rejected.final.reason == LocalReason.CIRCUIT_OPEN
    assert rejected.final.status_code is None
    assert rejected.dead_letter_code is DeadLetterCode.CIRCUIT_OPEN
    assert len(fake_apns.stats.received) == 3  # the open breaker sent nothing

    await asyncio.sleep(0.35)
    assert dispatcher.breaker(PushProvider.APNS).state is BreakerState.HALF_OPEN
    fake_apns.script.set(target.token, Reply(delay=0.2))
    probe, while_probing = await asyncio.gather(
        dispatcher.deliver(make_notification(), target),
        dispatcher.deliver(make_notification(), target),
    )

    assert probe.delivered
    assert while_probing.final.reason == LocalReason.CIRCUIT_OPEN
    assert len(fake_apns.stats.received) == 4  # only the probe
    assert dispatcher.breaker(PushProvider.APNS).state is BreakerState.CLOSED
    assert (await dispatcher.deliver(make_notification(), target)).delivered


async def test_throttling_does_not_open_the_breaker(
    apns_sender: ApnsSender, fake_apns: FakeApns
) -> None:
    dispatcher = make_dispatcher(
        {PushProvider.APNS: apns_sender}, max_attempts=1, breaker_failure_threshold=2
    )
    target = apns_target()
    fake_apns.script.set(target.token, Reply(429, "TooManyRequests"))
    for _ in range(3):
        report = await dispatcher.deliver(make_notification(), target)
        assert report.final.kind is OutcomeKind.THROTTLED
    assert dispatcher.breaker(PushProvider.APNS).state is BreakerState.CLOSED


async def test_a_provider_without_sender_is_a_configuration_error(
    apns_sender: ApnsSender,
) -> None:
    dispatcher = make_dispatcher({PushProvider.APNS: apns_sender})
    with pytest.raises(PushConfigError, match="no fcm sender"):
        await dispatcher.deliver(make_notification(), fcm_target())
    assert dispatcher.providers == {PushProvider.APNS}


def test_backoff_is_full_jitter_under_a_growing_capped_ceiling() -> None:
    policy = RetryPolicy(backoff_base_seconds=0.5, backoff_cap_seconds=4.0)
    rng = random.Random(1)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)]:
        delays = [policy.backoff(attempt, rng) for _ in range(200)]
        assert all(0.0 <= delay <= ceiling for delay in delays)
        assert max(delays) > 0.8 * ceiling  # spread over the whole range …
        assert min(delays) < 0.2 * ceiling  # … not bunched near the top


def test_retry_after_in_seconds_or_as_an_http_date() -> None:
    now = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(
        format_datetime(now + timedelta(seconds=30), usegmt=True), now=now
    ) == (30.0)
    assert parse_retry_after(
        format_datetime(now - timedelta(seconds=30), usegmt=True), now=now
    ) == (0.0)
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def state_of(breaker: CircuitBreaker) -> BreakerState:
    """The state now (a function, so that type checkers do not carry over earlier asserts)."""
    return breaker.state


def test_breaker_counts_consecutive_failures_only() -> None:
    breaker = CircuitBreaker(
        "apns", failure_threshold=3, cool_down_seconds=10, clock=FakeClock(100.0)
    )
    permit = BreakerPermit(probe=False)
    for healthy in (False, False, True, False, False):
        breaker.record(permit, healthy=healthy)
    assert state_of(breaker) is BreakerState.CLOSED
    breaker.record(permit, healthy=False)
    assert state_of(breaker) is BreakerState.OPEN
    assert breaker.acquire() is None


def test_failed_probe_reopens_for_a_whole_cool_down() -> None:
    clock = FakeClock(100.0)
    breaker = CircuitBreaker("fcm", failure_threshold=1, cool_down_seconds=10, clock=clock)
    breaker.record(BreakerPermit(probe=False), healthy=False)
    clock.now += 9.9
    assert breaker.acquire() is None
    clock.now += 0.1
    probe = breaker.acquire()
    assert probe == BreakerPermit(probe=True)
    assert breaker.acquire() is None  # one probe at a time
    breaker.record(probe, healthy=False)
    assert state_of(breaker) is BreakerState.OPEN
    clock.now += 5
    assert breaker.acquire() is None
    clock.now += 5
    second_probe = breaker.acquire()
    assert second_probe is not None
    assert second_probe.probe
    breaker.record(second_probe, healthy=True)
    assert state_of(breaker) is BreakerState.CLOSED
    assert breaker.acquire() == BreakerPermit(probe=False)


def test_answers_from_before_the_breaker_opened_change_nothing() -> None:
    clock = FakeClock(100.0)
    breaker = CircuitBreaker("apns", failure_threshold=1, cool_down_seconds=10, clock=clock)
    in_flight = breaker.acquire()
    assert in_flight is not None
    breaker.record(BreakerPermit(probe=False), healthy=False)
    breaker.record(in_flight, healthy=True)  # sent before it opened, answered after
    assert state_of(breaker) is BreakerState.OPEN


def test_abandoned_probe_frees_the_probe_slot() -> None:
    clock = FakeClock(100.0)
    breaker = CircuitBreaker("apns", failure_threshold=1, cool_down_seconds=1, clock=clock)
    breaker.record(BreakerPermit(probe=False), healthy=False)
    clock.now += 1
    probe = breaker.acquire()
    assert probe is not None
    breaker.abandon(probe)
    assert breaker.acquire() == BreakerPermit(probe=True)
