"""Token buckets on an injected clock: burst, refill, retry-after and bounded memory."""

from __future__ import annotations

import pytest

from ingress.ratelimit import Limit, ScopedLimiter, TokenBucketLimiter, retry_after_ms
from tests.clock import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_burst_then_refused_with_time_until_next_token(clock: FakeClock) -> None:
    limiter = TokenBucketLimiter(rate_per_second=2, burst=3, clock=clock)
    assert [limiter.try_acquire("device-1") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.try_acquire("device-1") == pytest.approx(0.5)
    clock.now += 0.2
    assert limiter.try_acquire("device-1") == pytest.approx(0.3)


def test_refill_at_the_configured_rate_up_to_the_burst(clock: FakeClock) -> None:
    limiter = TokenBucketLimiter(rate_per_second=10, burst=5, clock=clock)
    for _ in range(5):
        assert limiter.try_acquire("device-1") == 0.0
    clock.now += 0.1
    assert limiter.try_acquire("device-1") == 0.0
    assert limiter.try_acquire("device-1") > 0
    clock.now += 60  # a long pause refills to the burst, not beyond
    assert [limiter.try_acquire("device-1") for _ in range(6)].count(0.0) == 5


def test_refused_attempts_take_nothing(clock: FakeClock) -> None:
    limiter = TokenBucketLimiter(rate_per_second=1, burst=1, clock=clock)
    assert limiter.try_acquire("device-1") == 0.0
    for _ in range(10):
        assert limiter.try_acquire("device-1") == pytest.approx(1.0)
    clock.now += 1.0
    assert limiter.try_acquire("device-1") == 0.0


def test_explicit_now_and_cost(clock: FakeClock) -> None:
    limiter = TokenBucketLimiter(rate_per_second=4, burst=8, clock=clock)
    assert limiter.try_acquire("device-1", now=5.0, cost=6) == 0.0
    assert limiter.try_acquire("device-1", now=5.0, cost=4) == pytest.approx(0.5)
    assert limiter.try_acquire("device-1", now=5.5, cost=4) == 0.0
    with pytest.raises(ValueError, match="exceeds the burst"):
        limiter.try_acquire("device-1", cost=9)


def test_keys_do_not_share_tokens(clock: FakeClock) -> None:
    limiter = TokenBucketLimiter(rate_per_second=1, burst=1, clock=clock)
    assert limiter.try_acquire("device-1") == 0.0
    assert limiter.try_acquire("device-1") > 0
    assert limiter.try_acquire("device-2") == 0.0


def test_refilled_buckets_are_evicted(clock: FakeClock) -> None:
    limiter = TokenBucketLimiter(rate_per_second=10, burst=5, clock=clock)
    for index in range(1000):
        limiter.try_acquire(f"device-{index}")
    assert len(limiter) == 1000
    clock.now += 0.05  # 0.5 tokens back: every bucket still remembers its spent token
    limiter.try_acquire("late-device")
    assert len(limiter) == 1001
    clock.now += 0.06  # the old buckets are full again and carry no information; the late one not
    limiter.try_acquire("another-device")
    assert len(limiter) == 2
    assert limiter.try_acquire("late-device", cost=5) == pytest.approx(0.04)


def test_memory_is_bounded_even_when_every_key_is_busy(clock: FakeClock) -> None:
    limiter = TokenBucketLimiter(rate_per_second=1, burst=2, max_keys=100, clock=clock)
    for index in range(10_000):
        limiter.try_acquire(f"device-{index}")
        assert len(limiter) <= 100
    assert len(limiter) == 100


def test_recently_used_buckets_survive_eviction(clock: FakeClock) -> None:
    limiter = TokenBucketLimiter(rate_per_second=1, burst=1, max_keys=3, clock=clock)
    limiter.try_acquire("flooder")
    limiter.try_acquire("device-1")
    limiter.try_acquire("flooder")  # refused, but marks the bucket as recently used
    limiter.try_acquire("device-2")
    limiter.try_acquire("device-3")  # evicts device-1, the least recently used
    assert limiter.try_acquire("flooder") > 0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"rate_per_second": 0, "burst": 1}, "rate_per_second"),
        ({"rate_per_second": 1, "burst": 0.5}, "burst"),
        ({"rate_per_second": 1, "burst": 1, "max_keys": 0}, "max_keys"),
    ],
)
def test_impossible_limits_are_refused(arguments: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TokenBucketLimiter(**arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seconds", "milliseconds"), [(0.0, 0), (0.0001, 1), (0.5, 500), (0.2501, 251), (2, 2000)]
)
def test_retry_after_is_rounded_up(seconds: float, milliseconds: int) -> None:
    assert retry_after_ms(seconds) == milliseconds


def scoped(clock: FakeClock) -> ScopedLimiter:
    return ScopedLimiter(
        [Limit("device", 1, 3), Limit("user", 2, 5), Limit("tenant", 4, 8)], clock=clock
    )


def test_rotating_device_ids_does_not_escape_the_users_limit(clock: FakeClock) -> None:
    """The device id is the client's to choose: before, each new id was a fresh burst."""
    limiter = scoped(clock)
    passed = [
        limiter.try_acquire((("t", "u", f"device-{n}"), ("t", "u"), "t")) is None for n in range(20)
    ]
    assert passed.count(True) == 5  # the user's burst, not 20 fresh device bursts
    refusal = limiter.try_acquire((("t", "u", "device-99"), ("t", "u"), "t"))
    assert refusal is not None and refusal.scope == "user"
    assert refusal.wait_seconds == pytest.approx(0.5)


def test_a_tenants_users_share_the_tenants_limit_and_a_refusal_spends_nothing(
    clock: FakeClock,
) -> None:
    limiter = scoped(clock)
    passed = [
        limiter.try_acquire((("t", f"user-{n}", "d"), ("t", f"user-{n}"), "t")) is None
        for n in range(12)
    ]
    assert passed.count(True) == 8
    refusal = limiter.try_acquire((("t", "fresh", "d"), ("t", "fresh"), "t"))
    assert refusal is not None and refusal.scope == "tenant"
    # The refused commands spent none of their device's or user's tokens.
    clock.now += 0.25  # one tenant token back
    assert limiter.try_acquire((("t", "fresh", "d"), ("t", "fresh"), "t")) is None
    other = ScopedLimiter([Limit("device", 1, 3), Limit("user", 2, 5)], clock=clock)
    for _ in range(3):
        assert other.try_acquire((("t", "u", "d"), ("t", "u"))) is None
    assert other.try_acquire((("t", "u", "d"), ("t", "u"))).scope == "device"  # type: ignore[union-attr]
    # The user still has the two tokens the device's refusal did not take.
    assert other.try_acquire((("t", "u", "e"), ("t", "u"))) is None
    assert other.try_acquire((("t", "u", "f"), ("t", "u"))) is None
    assert other.try_acquire((("t", "u", "g"), ("t", "u"))).scope == "user"  # type: ignore[union-attr]
