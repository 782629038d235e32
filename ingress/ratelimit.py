"""Per-key token buckets: how the ingress keeps one device, user or tenant from flooding the
pipeline.

Each key may spend ``burst`` commands at once and then ``rate_per_second`` on average. A refused
command learns how long until it would be allowed, which the gateway turns into the
``retry_after_ms`` of its rate-limit error.

Memory stays bounded. A bucket that has refilled to ``burst`` holds no information (a new bucket
starts full), so such idle buckets are dropped as soon as they reach the least-recently-used end of
the table. Only if more than ``max_keys`` keys are all mid-burst at once is a partly spent bucket
evicted, which at worst grants that key a fresh burst.

A command spends a token of its device, of its user and of its tenant (:class:`ScopedLimiter`):
the device id is the client's to choose, so a per-device limit alone is no limit (rotating the
id let 999 of 1,000 requests through instead of 40); the user's bucket bounds all the user's
devices together, the tenant's all its users.

Not thread-safe: one limiter belongs to one event loop, and the limits are per ingress process (a
device is connected to one node at a time; a user's devices may be on several).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass


class _Bucket:
    __slots__ = ("tokens", "updated_at")

    def __init__(self, tokens: float, updated_at: float) -> None:
        self.tokens = tokens
        self.updated_at = updated_at


class TokenBucketLimiter:
    """Token buckets keyed by any hashable, refilled lazily on access."""

    def __init__(
        self,
        *,
        rate_per_second: float,
        burst: float,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_second <= 0:
            raise ValueError("rate_per_second must be positive")
        if burst < 1:
            raise ValueError("burst must be at least 1, or no command could ever pass")
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._rate = rate_per_second
        self._burst = burst
        self._max_keys = max_keys
        self._clock = clock
        #: Least recently used first.
        self._buckets: OrderedDict[Hashable, _Bucket] = OrderedDict()

    def try_acquire(self, key: Hashable, now: float | None = None, cost: float = 1.0) -> float:
        """Take ``cost`` tokens from ``key``'s bucket if it has them.

        Returns 0.0 when the command may proceed, otherwise the seconds until enough tokens will
        have accumulated (nothing is taken in that case). ``now`` defaults to the limiter's clock.
        """
        if cost > self._burst:
            raise ValueError(f"cost {cost} exceeds the burst {self._burst}; it could never pass")
        now = self._clock() if now is None else now
        bucket = self._buckets.get(key)
        if bucket is None:
            self._evict(now, room_for=1)
            bucket = _Bucket(self._burst, now)
            self._buckets[key] = bucket
        else:
            self._buckets.move_to_end(key)
            elapsed = max(0.0, now - bucket.updated_at)
            bucket.tokens = min(self._burst, bucket.tokens + elapsed * self._rate)
            bucket.updated_at = now
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            return 0.0
        return (cost - bucket.tokens) / self._rate

    def refund(self, key: Hashable, cost: float = 1.0) -> None:
        """Give back ``cost`` tokens taken from ``key`` (a later limit refused the command)."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.tokens = min(self._burst, bucket.tokens + cost)

    def __len__(self) -> int:
        """How many buckets are held (for metrics and tests)."""
        return len(self._buckets)

    def _evict(self, now: float, room_for: int) -> None:
        """Drop refilled buckets from the LRU end, then make room for ``room_for`` new ones."""
        buckets = self._buckets
        while buckets:
            oldest = next(iter(buckets.values()))
            if oldest.tokens + (now - oldest.updated_at) * self._rate < self._burst:
                break  # the oldest bucket still remembers spent tokens
            buckets.popitem(last=False)
        while len(buckets) > self._max_keys - room_for:
            buckets.popitem(last=False)


@dataclass(frozen=True, slots=True)
class Limit:
    """One scope's bucket shape: ``scope`` names it in refusals (device, user, tenant)."""

    scope: str
    rate_per_second: float
    burst: float


@dataclass(frozen=True, slots=True)
class Refusal:
    """Which limit refused a command, and the seconds until it would pass."""

    scope: str
    wait_seconds: float
    limit: Limit


class ScopedLimiter:
    """A bucket per key of each scope: a command passes only if every scope has a token for it,
    and then spends one in each (a refusal spends none)."""

    def __init__(
        self,
        limits: Sequence[Limit],
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits = tuple(limits)
        self._limiters = tuple(
            TokenBucketLimiter(
                rate_per_second=limit.rate_per_second,
                burst=limit.burst,
                max_keys=max_keys,
                clock=clock,
            )
            for limit in self._limits
        )

    def try_acquire(self, keys: Sequence[Hashable], now: float | None = None) -> Refusal | None:
        """Spend a token of each scope's ``keys`` entry (in the order of the limits), or none."""
        if len(keys) != len(self._limits):
            raise ValueError(f"{len(self._limits)} keys needed, one per scope; got {len(keys)}")
        for index, (limiter, key) in enumerate(zip(self._limiters, keys, strict=True)):
            wait = limiter.try_acquire(key, now)
            if wait > 0:
                for spent, spent_key in zip(self._limiters[:index], keys[:index], strict=True):
                    spent.refund(spent_key)
                limit = self._limits[index]
                return Refusal(limit.scope, wait, limit)
        return None


def retry_after_ms(seconds: float) -> int:
    """Milliseconds to tell a client, rounded up so that it never retries a moment too early."""
    return math.ceil(seconds * 1000)
