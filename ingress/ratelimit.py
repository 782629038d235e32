"""Per-key token buckets: how the ingress keeps one device from flooding the pipeline.

Each key (typically a device) may spend ``burst`` commands at once and then ``rate_per_second``
on average. A refused command learns how long until it would be allowed, which the gateway turns
into the ``retry_after_ms`` of its rate-limit error.

Memory stays bounded. A bucket that has refilled to ``burst`` holds no information (a new bucket
starts full), so such idle buckets are dropped as soon as they reach the least-recently-used end of
the table. Only if more than ``max_keys`` keys are all mid-burst at once is a partly spent bucket
evicted, which at worst grants that key a fresh burst.

Not thread-safe: one limiter belongs to one event loop, and the limit is per ingress process (a
device is connected to one node at a time).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable


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


def retry_after_ms(seconds: float) -> int:
    """Milliseconds to tell a client, rounded up so that it never retries a moment too early."""
    return math.ceil(seconds * 1000)
