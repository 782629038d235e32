"""The one backoff helper: the capped exponential, its jitters, its own count, and its callers'
numbers (kept as they were before the three Backoff classes became this one)."""

from __future__ import annotations

import ast
import random
import sys
from pathlib import Path

from client.sdk import default_backoff
from core import backoff as backoff_module
from core.backoff import Backoff
from core.settings import Settings
from sinks.clickhouse.sink import retry_backoff as clickhouse_backoff
from sinks.cql.sink import retry_backoff as cql_backoff


def test_without_jitter_the_delay_doubles_from_base_up_to_cap() -> None:
    backoff = Backoff(0.5, 30.0)
    assert [backoff.delay(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]


def test_an_endless_retry_loop_stays_at_the_cap() -> None:
    assert Backoff(0.1, 10.0).delay(100_000) == 10.0
    assert Backoff(0.2, 10.0, "full").delay(10**9) <= 10.0


def test_full_jitter_spreads_over_zero_to_the_ceiling() -> None:
    backoff = Backoff(0.2, 10.0, "full", rng=random.Random(7))
    for attempt, ceiling in ((1, 0.2), (3, 0.8), (12, 10.0)):
        delays = [backoff.delay(attempt) for _ in range(500)]
        assert all(0 <= delay <= ceiling for delay in delays)
        assert min(delays) < ceiling * 0.1
        assert max(delays) > ceiling * 0.9


def test_equal_jitter_never_waits_less_than_half_the_ceiling() -> None:
    backoff = Backoff(0.2, 10.0, "equal", rng=random.Random(7))
    for attempt, ceiling in ((1, 0.2), (4, 1.6), (20, 10.0)):
        delays = [backoff.delay(attempt) for _ in range(500)]
        assert all(ceiling / 2 <= delay < ceiling for delay in delays)
        assert max(delays) - min(delays) > ceiling * 0.4


def test_a_seeded_rng_repeats_the_delays() -> None:
    first = Backoff(1.0, 60.0, "full", rng=random.Random(3))
    second = Backoff(1.0, 60.0, "full", rng=random.Random(3))
    assert [first.delay(n) for n in range(1, 10)] == [second.delay(n) for n in range(1, 10)]


def test_next_counts_its_own_attempts_and_reset_starts_over() -> None:
    backoff = Backoff(0.5, 4.0)
    assert [backoff.next() for _ in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert backoff.attempts == 5
    backoff.reset()
    assert backoff.attempts == 0
    assert backoff.next() == 0.5


def test_delay_is_pure_so_concurrent_loops_can_share_one_policy() -> None:
    shared = Backoff(0.5, 30.0)
    shared.next()
    assert shared.delay(1) == 0.5
    assert shared.attempts == 1


def test_the_module_imports_the_standard_library_only() -> None:
    """The SDK imports it, and the SDK must not drag in the server's dependencies."""
    tree = ast.parse(Path(backoff_module.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 0
    }
    assert imported
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}


def test_the_callers_keep_their_numbers() -> None:
    settings = Settings()
    sinks = settings.sinks
    cql = cql_backoff(settings)
    assert (cql.base, cql.cap, cql.jitter) == (
        sinks.cql_retry_initial_seconds,
        sinks.cql_retry_max_seconds,
        "equal",
    )
    clickhouse = clickhouse_backoff()
    assert (clickhouse.base, clickhouse.cap, clickhouse.jitter) == (0.5, 30.0, "none")
    sdk = default_backoff()
    assert (sdk.base, sdk.cap, sdk.jitter) == (0.2, 10.0, "full")
