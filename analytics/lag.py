"""Consumer-group lag, sampled into ClickHouse for the dashboards (``consumer_lag``).

Kafka holds committed offsets only as they are now; a chart of lag over time needs samples. The
ClickHouse sink process takes one every ``interval`` seconds: for every consumer group of every
process kind (given by the process wiring from the process table, the groups ``imstream status``
shows), the end offsets minus the committed offsets (``core.lag.group_lag``, counted the same
way), one row per group with the sample's time.

Failure-safe: a sample that fails — Kafka unreachable, a topic missing, ClickHouse refusing the
insert — is logged and skipped; the sampler, a daemon thread, keeps its schedule and never stops
the sink. Samples are not replayed or deduplicated: each is a fact about one moment (a plain
``MergeTree``, kept 90 days).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from core.lag import group_lag
from core.settings import Settings
from sinks.clickhouse.schema import CONSUMER_LAG_TABLE
from sinks.clickhouse.store import ClickHouseStore

log = logging.getLogger(__name__)

#: Seconds between samples.
LAG_SAMPLE_SECONDS = 10.0
LAG_COLUMNS = ["sampled_at", "process", "group_id", "lag"]
#: How long ``stop`` waits for a sample in progress (its Kafka calls time out after 10 s).
STOP_TIMEOUT_SECONDS = 15.0

LagReader = Callable[[Settings, str, list[str]], int | None]
#: Per process kind: its consumer groups and the topics each reads.
GroupLister = Callable[[Settings], dict[str, dict[str, list[str]]]]


class LagSampler:
    """Samples every consumer group's lag into ``consumer_lag`` from a daemon thread."""

    def __init__(
        self,
        settings: Settings,
        store: ClickHouseStore,
        groups: GroupLister,
        *,
        interval: float = LAG_SAMPLE_SECONDS,
        read_lag: LagReader = group_lag,
    ) -> None:
        self.settings = settings
        self.store = store
        self.groups = groups
        self.interval = interval
        self.read_lag = read_lag
        #: Samples taken, samples lost (ClickHouse refused them), groups skipped in a sample.
        self.samples = 0
        self.failures = 0
        self.group_failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lag-sampler", daemon=True)

    def sample(self) -> int:
        """Take one sample now; the rows inserted (groups whose lag could be read)."""
        sampled_at = datetime.now(UTC)
        rows = []
        for process, groups in self.groups(self.settings).items():
            for group, topics in groups.items():
                try:
                    lag = self.read_lag(self.settings, group, topics)
                except Exception as error:  # e.g. its topics are not created yet: skip the group
                    self.group_failures += 1
                    log.warning("consumer lag of %s not sampled: %s", group, error)
                    continue
                if lag is not None:
                    rows.append([sampled_at, process, group, lag])
        if rows:
            self.store.call(
                lambda client: client.insert(
                    CONSUMER_LAG_TABLE,
                    rows,
                    column_names=LAG_COLUMNS,
                    database=self.store.database,
                )
            )
        return len(rows)

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                written = self.sample()
                self.samples += 1
                log.debug("consumer lag sampled: %d groups", written)
            except Exception as error:  # a hiccup (Kafka, ClickHouse) skips one sample, no more
                self.failures += 1
                log.warning(
                    "consumer lag sample failed (the next is in %.0fs): %s", self.interval, error
                )
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - began)))

    def start(self) -> None:
        self._thread.start()
        log.info("sampling consumer lag every %.0fs into %s", self.interval, CONSUMER_LAG_TABLE)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(STOP_TIMEOUT_SECONDS)
