"""The CQL sink's cost per 1:1 message: its process's CPU, the Cassandra JVM's CPU and the CQL
requests it sends, on the sink's own apply path (no Kafka consume in the measure).

    python -m bench.cql_sink [--messages 6000] [--pairs 200] [--batch 150] [--repeats 3]

Builds ``--messages`` 1:1 messages over ``--pairs`` direct conversations as the stream stage
writes them: per message one ``message.sent`` (with its seq) on ``im.messages.sequenced`` and the
two users' sync records (with their conversation summaries) on ``im.sync.events``. Feeds them to
``CqlSink.apply`` ``--batch`` records at a time (as one consume hands them over) into a fresh
keyspace on the configured Cassandra, after ``--warmup`` unmeasured messages (the key ring, the
prepared statements, the JVM's JIT). Reports, per repeat and their median: CQL requests per
message (a batch statement counts once; the statements inside it are counted apart), CPU µs per
message of this
process (``time.process_time``) and of the Cassandra JVM (psutil ``cpu_times`` of the pid that
carries the stack's marker, including what it spends within ``--settle`` seconds after the last
write: memtable flushes, compactions).

Point it at a Cassandra of your own with ``IM_STACK__STATE_DIR`` / ``IM_CQL__PORT`` (the JVM is
found by its state dir's marker), so another load on the shared one does not count.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psutil
from cassandra.cluster import Session
from cassandra.query import BatchStatement

from bench.common import Progress
from bench.harness import bench_parser
from core.connections import cql_cluster
from core.records import InputRecord
from core.settings import Settings
from pipelines.stack import process as stack_process
from pipelines.stack.services import CassandraServer
from schemas import events as ev
from schemas.topics import TopicCatalog, conversation_key, topic_catalog, user_key
from sinks.cql.migrate import migrate
from sinks.cql.sink import CqlSink

TENANT = "bench"


@dataclass
class Counter:
    """CQL requests sent through one session, and the statements they carry."""

    requests: int = 0
    statements: int = 0
    reads: int = 0

    def count(self, statement: Any) -> None:
        self.requests += 1
        if isinstance(statement, BatchStatement):
            self.statements += len(statement._statements_and_parameters)
        else:
            self.statements += 1


def counting(session: Session, counter: Counter) -> None:
    """Count every request the sink sends through ``session`` (writes async, reads sync)."""
    execute_async: Callable[..., Any] = session.execute_async
    execute: Callable[..., Any] = session.execute

    def counted_async(statement: Any, *args: Any, **kwargs: Any) -> Any:
        counter.count(statement)
        return execute_async(statement, *args, **kwargs)

    def counted(statement: Any, *args: Any, **kwargs: Any) -> Any:
        counter.count(statement)
        counter.reads += 1
        return execute(statement, *args, **kwargs)

    session.execute_async = counted_async
    session.execute = counted


def one_to_one(catalog: TopicCatalog, messages: int, pairs: int, first: int) -> list[InputRecord]:
    """``messages`` 1:1 messages (numbered from ``first``) as the three records each makes."""
    start = datetime.now(UTC) - timedelta(hours=1)
    records: list[InputRecord] = []
    offsets = {catalog.messages_sequenced.name: 0, catalog.sync_events.name: 0}
    seqs: dict[int, int] = {}
    sync_ids: dict[str, int] = {}
    read: dict[tuple[str, str], int] = {}

    def add(topic: str, key: bytes, value: bytes) -> None:
        records.append(InputRecord(topic, 0, offsets[topic], key, value))
        offsets[topic] += 1

    for number in range(first, first + messages):
        pair = number % pairs
        users = [f"u{pair}a", f"u{pair}b"]
        sender, recipient = users if number // pairs % 2 == 0 else users[::-1]
        conversation = ev.direct_conversation_id(TENANT, *users)
        seqs[pair] = seqs.get(pair, 0) + 1
        seq = seqs[pair]
        event = ev.MessageSent.new(
            tenant_id=TENANT,
            actor=ev.Actor(user_id=sender, device_id=f"{sender}-phone"),
            event_id=ev.message_event_id(TENANT, sender, f"m{number}"),
            occurred_at=start + timedelta(milliseconds=number),
            payload=ev.MessageSentPayload(
                conversation_id=conversation,
                client_msg_id=f"m{number}",
                body=ev.TextBody(text=f"message {number} of the CQL sink benchmark"),
                conversation_seq=seq,
            ),
        )
        add(
            catalog.messages_sequenced.name,
            conversation_key(TENANT, conversation),
            ev.encode_event(event),
        )
        for user in (sender, recipient):
            sync_ids[user] = sync_ids.get(user, 0) + 1
            if user == sender:
                read[(user, conversation)] = seq
            summary = ev.ConversationSummary(
                conversation_id=conversation,
                last_seq=seq,
                read_seq=read.get((user, conversation), 0),
                unread=seq - read.get((user, conversation), 0),
            )
            sync = ev.SyncRecord(
                tenant_id=TENANT,
                user_id=user,
                sync_id=sync_ids[user] + first,
                event=event,
                conversation=summary,
            )
            add(
                catalog.sync_events.name,
                user_key(TENANT, user),
                sync.model_dump_json().encode(),
            )
    return records


def cassandra_process(settings: Settings) -> psutil.Process:
    pids = stack_process.find_pids(CassandraServer(settings).marker)
    if len(pids) != 1:
        raise SystemExit(
            f"bench.cql_sink: no single Cassandra of the state dir {settings.stack.state_dir} "
            f"(found pids {pids}); start one with `imstream stack up`"
        )
    return psutil.Process(pids[0])


def cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def measure(
    sink: CqlSink,
    records: Sequence[InputRecord],
    *,
    batch: int,
    counter: Counter,
    cassandra: psutil.Process,
    settle: float,
) -> dict[str, float]:
    messages = len(records) // 3
    before = Counter(counter.requests, counter.statements, counter.reads)
    own, server, wall = time.process_time(), cpu(cassandra), time.monotonic()
    for start in range(0, len(records), batch):
        poisoned = sink.apply(list(records[start : start + batch]))
        if poisoned:
            raise RuntimeError(f"{poisoned} records dead-lettered")
    own, wall = time.process_time() - own, time.monotonic() - wall
    time.sleep(settle)
    server = cpu(cassandra) - server
    return {
        "requests": (counter.requests - before.requests) / messages,
        "statements": (counter.statements - before.statements) / messages,
        "reads": (counter.reads - before.reads) / messages,
        "sink_us": own / messages * 1e6,
        "cassandra_us": server / messages * 1e6,
        "rate": messages / wall,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("bench.cql_sink", __doc__)
    parser.add_argument("--messages", type=int, default=6000)
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--batch", type=int, default=150, help="records per apply")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument(
        "--warmup", type=int, default=1000, help="messages written first, not measured"
    )
    options = parser.parse_args(argv)
    progress = Progress()
    settings = Settings()
    cassandra = cassandra_process(settings)
    cluster = cql_cluster(settings)
    session = cluster.connect()
    keyspace = f"bench_cql_sink_{uuid.uuid4().hex[:8]}"
    try:
        migrate(session, keyspace, 1)
        own = settings.model_copy(
            update={"cql": settings.cql.model_copy(update={"keyspace": keyspace})}
        )
        catalog = topic_catalog(own)
        counter = Counter()
        sink = CqlSink(own, session, keyspace=keyspace, stop=threading.Event())
        counting(session, counter)
        warmup = one_to_one(catalog, options.warmup, options.pairs, 10**7)
        for start in range(0, len(warmup), options.batch):
            sink.apply(warmup[start : start + options.batch])
        rows = []
        for repeat in range(options.repeats):
            records = one_to_one(catalog, options.messages, options.pairs, repeat * 10**5)
            row = measure(
                sink,
                records,
                batch=options.batch,
                counter=counter,
                cassandra=cassandra,
                settle=options.settle,
            )
            rows.append(row)
            progress.done(
                f"repeat {repeat + 1}: {row['requests']:.2f} requests "
                f"({row['statements']:.2f} statements, {row['reads']:.2f} reads) per message, "
                f"sink {row['sink_us']:.0f} µs, cassandra {row['cassandra_us']:.0f} µs per "
                f"message, {row['rate']:.0f} messages/s"
            )
        median = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
        progress.done(
            f"median of {options.repeats} ({options.messages} messages, {options.pairs} pairs, "
            f"{options.batch} records per batch): {median['requests']:.2f} requests "
            f"({median['statements']:.2f} statements, {median['reads']:.2f} reads) per message, "
            f"sink {median['sink_us']:.0f} µs, cassandra {median['cassandra_us']:.0f} µs per "
            f"message"
        )
        sink.consumer.close()
        sink.producer.flush(5)
    finally:
        session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=120)
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
