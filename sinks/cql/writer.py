"""Executing the CQL sink's writes: asynchronous, bounded in flight, retried while transient.

Writes are single-statement, single-partition requests (no batches: each statement goes to its
own partition's replicas, and a batch of different partitions would only add a coordinator hop).
At most ``max_in_flight`` requests are outstanding (``Session.execute_async``). A write that fails
for a transient reason — a timeout, ``Unavailable``, ``NoHostAvailable``, a lost connection, an
overloaded or bootstrapping node — is retried with exponential backoff and jitter, for as long as
it takes; one that the cluster refuses for good (``InvalidRequest``, ``Unauthorized``, a value
that cannot be serialised) is handed back to the caller, which dead-letters its record.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cassandra import (
    DriverException,
    OperationTimedOut,
    RequestExecutionException,
    RequestValidationException,
    Unauthorized,
)
from cassandra.cluster import NoHostAvailable, Session
from cassandra.connection import ConnectionException
from cassandra.protocol import (
    IsBootstrappingErrorMessage,
    OverloadedErrorMessage,
    ServerError,
    UnauthorizedErrorMessage,
)
from cassandra.protocol import RequestExecutionException as RequestExecutionMessage
from cassandra.protocol import RequestValidationException as RequestValidationMessage
from cassandra.query import Statement

from core.backoff import Backoff

log = logging.getLogger(__name__)

#: At most one retry warning per this many seconds.
WARNING_INTERVAL = 10.0

#: Errors worth waiting out: the cluster (or the way to it) is down, slow or busy.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    NoHostAvailable,
    OperationTimedOut,
    RequestExecutionException,  # Unavailable, read/write timeouts and failures
    RequestExecutionMessage,  # the same, as raised when the driver does not convert them
    ConnectionException,
    OverloadedErrorMessage,
    IsBootstrappingErrorMessage,
    ServerError,
    ConnectionError,
    TimeoutError,
)


def is_transient(error: BaseException) -> bool:
    return isinstance(error, TRANSIENT_ERRORS)


def refusal_code(error: BaseException) -> str:
    """The stable dead-letter code of a write the cluster refused for good."""
    if isinstance(error, Unauthorized | UnauthorizedErrorMessage):
        return "cql-unauthorized"
    if isinstance(error, RequestValidationException | RequestValidationMessage):
        return "cql-invalid-request"
    if isinstance(error, DriverException):
        return "cql-refused"
    return "cql-write-failed"


@dataclass(frozen=True, slots=True)
class PlannedWrite:
    """One statement and the index of the batch record it stores."""

    statement: Statement
    record: int


@dataclass
class WriterStats:
    writes: int = 0
    retries: int = 0
    retry_rounds: int = 0
    refused: int = 0
    last_error: str | None = None


class CqlWriter:
    """Runs lists of writes to completion; see the module docstring."""

    def __init__(
        self,
        session: Session,
        *,
        max_in_flight: int,
        backoff: Backoff,
        wait: Callable[[float], None],
    ) -> None:
        """``wait(seconds)`` is called between retry rounds and must return after about that
        long (the sink keeps its consumer group membership alive meanwhile, or raises to stop)."""
        self.session = session
        self.max_in_flight = max_in_flight
        self.backoff = backoff
        self.wait = wait
        self.stats = WriterStats()
        self._last_warning = -WARNING_INTERVAL

    def execute(self, writes: Sequence[PlannedWrite]) -> list[tuple[PlannedWrite, BaseException]]:
        """Execute every write; returns those refused for good, with their error."""
        refused: list[tuple[PlannedWrite, BaseException]] = []
        remaining = list(writes)
        attempt = 0
        failing_since: float | None = None
        while remaining:
            failures = self._round(remaining)
            self.stats.writes += len(remaining) - len(failures)
            transient = [(w, e) for w, e in failures if is_transient(e)]
            for write, error in failures:
                if not is_transient(error):
                    refused.append((write, error))
                    self.stats.refused += 1
            if not transient:
                if failing_since is not None:
                    log.info(
                        "CQL writes succeed again after %d retry rounds over %.1fs",
                        attempt,
                        time.monotonic() - failing_since,
                    )
                break
            attempt += 1
            failing_since = failing_since or time.monotonic()
            error = transient[0][1]
            self.stats.retries += len(transient)
            self.stats.retry_rounds += 1
            self.stats.last_error = f"{type(error).__name__}: {error}"
            delay = self.backoff.delay(attempt)
            now = time.monotonic()
            # The first failure, then one line per WARNING_INTERVAL: an outage of minutes must
            # not flood the log (the sink's progress line reports the retries as well).
            level = (
                logging.WARNING if now - self._last_warning >= WARNING_INTERVAL else logging.DEBUG
            )
            if level == logging.WARNING:
                self._last_warning = now
            log.log(
                level,
                "CQL write failed (transient), retrying %d writes in %.1fs (attempt %d): %s",
                len(transient),
                delay,
                attempt,
                self.stats.last_error[:300],
            )
            self.wait(delay)
            remaining = [write for write, _ in transient]
        return refused

    def _round(self, writes: Sequence[PlannedWrite]) -> list[tuple[PlannedWrite, BaseException]]:
        """Send every write, at most ``max_in_flight`` at a time; wait for all of them."""
        condition = threading.Condition()
        failures: list[tuple[PlannedWrite, BaseException]] = []
        in_flight = 0

        def succeeded(_rows: Any) -> None:
            nonlocal in_flight
            with condition:
                in_flight -= 1
                condition.notify()

        def failed(error: BaseException, write: PlannedWrite) -> None:
            nonlocal in_flight
            with condition:
                failures.append((write, error))
                in_flight -= 1
                condition.notify()

        for write in writes:
            with condition:
                while in_flight >= self.max_in_flight:
                    condition.wait(1.0)
                in_flight += 1
            try:
                future = self.session.execute_async(write.statement)
            except Exception as error:  # raised at once, e.g. no connection to any host
                failed(error, write)
                continue
            future.add_callbacks(succeeded, failed, errback_args=(write,))
        with condition:
            while in_flight > 0:
                condition.wait(1.0)
        return failures
