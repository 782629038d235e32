"""Retry delays: exponential with a cap, and optional jitter — one helper for every retry loop.

The sinks wait out a store or Kafka outage with it (``sinks.cql``, ``sinks.clickhouse``,
``sinks.push``) and the Python SDK reconnects with it (``client.sdk``), each with its own
numbers. Standard library only: the SDK imports this module, and the SDK depends on nothing of
the server (schemas/ and websockets only).

Hand-written rather than a retry library (tenacity, backoff): the callers wait in their own
ways (polling Kafka to stay in the group, ``stop.wait``, ``asyncio.sleep``) and only need the
numbers; one formula is a few lines.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

#: 2^64 times any positive base is past any cap: the exponent stops growing there (a float
#: cannot hold 2^1024, and an endless retry loop must not overflow).
_MAX_EXPONENT = 64


#: How a delay ``d`` is spread, so that clients failing together do not retry together: not at
#: all (``none``), uniform in ``[0, d]`` (``full``: the most spread, some retries at once), or
#: uniform in ``[d/2, d)`` (``equal``: spread, yet never less than half the delay).
Jitter = Literal["none", "full", "equal"]


@dataclass(slots=True)
class Backoff:
    """``base · 2^(attempt-1)`` seconds before retry ``attempt`` (1, 2, …), at most ``cap``,
    spread by ``jitter``.

    Two ways to use it. :meth:`delay` is pure: callers that share one policy among concurrent
    retry loops keep their own attempt counts. :meth:`next` counts the attempts itself, and
    :meth:`reset` starts over after a success — for the one retry loop that owns the instance.
    """

    base: float
    cap: float
    jitter: Jitter = "none"
    #: Where the jitter comes from (a seeded one makes the delays repeatable).
    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)
    #: Retries counted by :meth:`next` since the last :meth:`reset`.
    attempts: int = field(default=0, compare=False)

    def delay(self, attempt: int) -> float:
        """The wait before retry ``attempt`` (1 for the first retry)."""
        ceiling = min(self.cap, self.base * float(2 ** min(max(attempt - 1, 0), _MAX_EXPONENT)))
        if self.jitter == "full":
            return self.rng.uniform(0, ceiling)
        if self.jitter == "equal":
            return ceiling * (0.5 + self.rng.random() / 2)
        return ceiling

    def next(self) -> float:
        """The wait before the next retry of this instance's own loop."""
        self.attempts += 1
        return self.delay(self.attempts)

    def reset(self) -> None:
        """Start over: the next :meth:`next` is the first retry's wait again."""
        self.attempts = 0
