"""Executing the CQL sink's writes: asynchronous, bounded in flight, retried while transient.

Writes are grouped per partition: the statements of one call for the same partition key go in
one ``UNLOGGED`` batch (at most ``MAX_GROUP`` statements), which the cluster applies as one
mutation — one request for the driver, one commit-log entry and one memtable update for the
node, where separate statements cost each of them once per statement.

Partitions with the same replicas then share a request: an ``UNLOGGED`` batch of at most
``MAX_PARTITIONS`` partitions and ``MAX_BATCH_BYTES`` of values, routed (token-aware, by its
first statement) to one of those replicas, which applies every mutation itself — no coordinator
hop, and no batch log (unlogged). Within those bounds the cluster neither warns nor refuses with
its default thresholds (``unlogged_batch_across_partitions_warn_threshold``: 10 partitions,
``batch_size_warn_threshold``: 5 KiB), so this holds on any cluster. The driver's cost is per
request (about 100 µs of Python each), so this is where the sink's CPU went: a 1:1 message was
8 requests, now 1 or 2. On a one-node cluster every partition has the same replica. At most
``max_in_flight`` requests are outstanding (``Session.execute_async``).

A request that fails for a transient reason — a timeout, ``Unavailable``, ``NoHostAvailable``, a
lost connection, an overloaded or bootstrapping node — is retried with exponential backoff and
jitter, for as long as it takes. One that the cluster refuses for good (``InvalidRequest``,
``Unauthorized``, a value that cannot be serialised) is, if a group, sent again one statement at
a time, to find the write at fault; a single write refused is handed back to the caller, which
dead-letters its record (and the earlier writes of the same cells it made moot are sent in its
place: ``PlannedWrite.overrides``).
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
from cassandra.query import BatchStatement, BatchType, Statement

from core.backoff import Backoff

log = logging.getLogger(__name__)

#: At most one retry warning per this many seconds.
WARNING_INTERVAL = 10.0
#: Statements per single-partition batch: a bounded request (the cluster's batch size limits do
#: not apply to single-partition batches, its mutation size limit does).
MAX_GROUP = 64
#: Partitions per request of partitions that share their replicas: Cassandra's default
#: ``unlogged_batch_across_partitions_warn_threshold`` (a batch over it is logged and warned).
MAX_PARTITIONS = 10
#: Bytes of bound values per such request, under Cassandra's default ``batch_size_warn_threshold``
#: of 5 KiB (which counts the mutations' data: the values plus a little per cell).
MAX_BATCH_BYTES = 4096

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
    #: Earlier writes of the same batch to the same cells, which this one makes moot
    #: (``rules.coalesce``): not sent, unless this one is refused — then they are.
    overrides: tuple[PlannedWrite, ...] = ()


@dataclass(frozen=True, slots=True)
class _Request:
    """One request to the cluster: a single write, or a single-partition batch of writes."""

    statement: Statement
    writes: tuple[PlannedWrite, ...]


def _single(write: PlannedWrite) -> _Request:
    return _Request(write.statement, (write,))


#: The replicas of a partition: ``(keyspace, routing key) → hosts`` (empty when unknown).
Replicas = Callable[[str, bytes], Sequence[Any]]


def _values_bytes(statement: Statement) -> int:
    """What a bound statement's values weigh (serialised; an unset or null value weighs 0)."""
    values = getattr(statement, "values", None) or ()
    return sum(len(value) for value in values if isinstance(value, bytes))


def grouped(writes: Sequence[PlannedWrite], replicas: Replicas | None = None) -> list[_Request]:
    """``writes`` as requests: one per partition (and consistency level), up to ``MAX_GROUP``
    statements each; then, with ``replicas``, the small ones of partitions that share their
    replicas together, up to ``MAX_PARTITIONS`` and ``MAX_BATCH_BYTES`` per request."""
    requests = _per_partition(writes)
    return requests if replicas is None else _by_replicas(requests, replicas)


def _by_replicas(requests: list[_Request], replicas: Replicas) -> list[_Request]:
    combined: list[_Request] = []
    open_batches: dict[tuple[Any, ...], list[tuple[_Request, int]]] = {}

    def close(key: tuple[Any, ...]) -> None:
        members = open_batches.pop(key)
        if len(members) == 1:
            combined.append(members[0][0])
            return
        batch = BatchStatement(batch_type=BatchType.UNLOGGED, consistency_level=key[1])
        writes: list[PlannedWrite] = []
        for request, _size in members:
            for write in request.writes:
                batch.add(write.statement)
                writes.append(write)
        combined.append(_Request(batch, tuple(writes)))

    for request in requests:
        first = request.writes[0].statement
        routing_key = first.routing_key
        size = sum(_values_bytes(write.statement) for write in request.writes)
        if routing_key is None or first.keyspace is None or size > MAX_BATCH_BYTES:
            combined.append(request)
            continue
        hosts = tuple(sorted(str(host.host_id) for host in replicas(first.keyspace, routing_key)))
        key = (first.keyspace, first.consistency_level, hosts)
        members = open_batches.get(key)
        if members is not None and (
            len(members) >= MAX_PARTITIONS or sum(n for _, n in members) + size > MAX_BATCH_BYTES
        ):
            close(key)
            members = None
        if members is None:
            members = open_batches[key] = []
        members.append((request, size))
    for key in list(open_batches):
        close(key)
    return combined


def _per_partition(writes: Sequence[PlannedWrite]) -> list[_Request]:
    groups: dict[tuple[Any, ...], list[PlannedWrite]] = {}
    for write in writes:
        statement = write.statement
        # The partition: the keyspace and the serialised partition key (the token-aware
        # policy computes the same routing key to pick the replica, and caches it).
        routing_key = statement.routing_key
        key: tuple[Any, ...] = (
            (statement.keyspace, routing_key, statement.consistency_level)
            if routing_key is not None
            else (id(write),)
        )
        groups.setdefault(key, []).append(write)
    requests: list[_Request] = []
    for group in groups.values():
        for start in range(0, len(group), MAX_GROUP):
            chunk = group[start : start + MAX_GROUP]
            if len(chunk) == 1:
                requests.append(_single(chunk[0]))
                continue
            consistency = chunk[0].statement.consistency_level
            batch = BatchStatement(batch_type=BatchType.UNLOGGED, consistency_level=consistency)
            for write in chunk:
                batch.add(write.statement)
            requests.append(_Request(batch, tuple(chunk)))
    return requests


@dataclass
class WriterStats:
    #: Statements written.
    writes: int = 0
    #: Requests sent (a batch counts once), retries and refusals included.
    requests: int = 0
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
        metadata = session.cluster.metadata
        self._replicas: Replicas = metadata.get_replicas

    def execute(self, writes: Sequence[PlannedWrite]) -> list[tuple[PlannedWrite, BaseException]]:
        """Execute every write; returns those refused for good, with their error."""
        refused: list[tuple[PlannedWrite, BaseException]] = []
        remaining = grouped(writes, self._replicas)
        attempt = 0
        failing_since: float | None = None
        while remaining:
            failures = self._round(remaining)
            failed = {id(request) for request, _ in failures}
            self.stats.writes += sum(len(r.writes) for r in remaining if id(r) not in failed)
            transient: list[_Request] = []
            again: list[_Request] = []
            for request, error in failures:
                if is_transient(error):
                    transient.append(request)
                elif len(request.writes) > 1:
                    # A group refused: one statement at a time, to find the write at fault.
                    again.extend(_single(write) for write in request.writes)
                else:
                    write = request.writes[0]
                    refused.append((write, error))
                    self.stats.refused += 1
                    again.extend(_single(moot) for moot in write.overrides)
            if not transient:
                if failing_since is not None and not again:
                    log.info(
                        "CQL writes succeed again after %d retry rounds over %.1fs",
                        attempt,
                        time.monotonic() - failing_since,
                    )
                remaining = again
                continue
            attempt += 1
            failing_since = failing_since or time.monotonic()
            error = next(error for _, error in failures if is_transient(error))
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
                "CQL write failed (transient), retrying %d requests in %.1fs (attempt %d): %s",
                len(transient),
                delay,
                attempt,
                self.stats.last_error[:300],
            )
            self.wait(delay)
            remaining = transient + again
        return refused

    def _round(self, requests: Sequence[_Request]) -> list[tuple[_Request, BaseException]]:
        """Send every request, at most ``max_in_flight`` at a time; wait for all of them."""
        condition = threading.Condition()
        failures: list[tuple[_Request, BaseException]] = []
        in_flight = 0

        def succeeded(_rows: Any) -> None:
            nonlocal in_flight
            with condition:
                in_flight -= 1
                condition.notify()

        def failed(error: BaseException, request: _Request) -> None:
            nonlocal in_flight
            with condition:
                failures.append((request, error))
                in_flight -= 1
                condition.notify()

        self.stats.requests += len(requests)
        for request in requests:
            with condition:
                while in_flight >= self.max_in_flight:
                    condition.wait(1.0)
                in_flight += 1
            try:
                future = self.session.execute_async(request.statement)
            except Exception as error:  # raised at once, e.g. no connection to any host
                failed(error, request)
                continue
            future.add_callbacks(succeeded, failed, errback_args=(request,))
        with condition:
            while in_flight > 0:
                condition.wait(1.0)
        return failures
