"""A clock for code that takes one (``clock: Callable[[], float]``), moved by the test itself."""

from __future__ import annotations


class FakeClock:
    """Says ``now`` when called; a test moves time on with ``clock.now += seconds``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
