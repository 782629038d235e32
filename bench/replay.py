"""Replay throughput: records/s replayed into each target against a raw consume of the same range
in the same run.

    python -m bench.replay [--records 200000] [--conversations 200]

On topics of its own (``bench.replay.<time>.<pid>.``) the benchmark produces ``--records``
``message.sent`` events with their sequence numbers onto ``im.messages.sequenced`` (as the stream
stage writes them: conversation keys, ``--conversations`` conversations), then reads that whole
range five ways, each through ``core.replay.replay`` with a cursor of its own, no rate limit:

- **raw**: a bare ``confluent_kafka.Consumer`` assigned to the range (``read_committed``, the
  replay's fetch size), counting records: the ceiling (after one unmeasured warm-up read, the
  fastest of three);
- **replay → none**: the replay loop (cursor commits, chunking, end detection) with a target that
  drops the records: what the replay machinery costs;
- **replay → topic**: re-published into ``im.messages.in`` (idempotent producer, ``acks=all``);
- **replay → cql**: the CQL sink's planning and writes (``CqlTarget``) into a fresh keyspace on the
  local Cassandra;
- **replay → clickhouse**: the audit's decoding and inserts (``analytics.jobs.AuditTarget``,
  what the ClickHouse sink process runs for ``imstream replay --into clickhouse``) into chDB at a
  temporary path owned by this process.

Reported per way: records/s, seconds, and the ratio to raw. Results go to
``docs/bench/replay.json``; the table is in docs/performance.md ("Replay").
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cassandra.cluster import Session
from confluent_kafka import Consumer, Message, Producer, TopicPartition

from analytics.jobs import AuditTarget
from bench.common import (
    REPO_ROOT,
    Progress,
    bench_topics,
    machine_facts,
    now_iso,
    run_main,
    run_settings,
    write_results,
)
from bench.harness import bench_parser, produce_waiting
from core.connections import (
    clickhouse_client,
    cql_cluster,
    kafka_consumer_config,
    kafka_producer_config,
)
from core.replay import PartitionRange, ReplayResult, replay, resolve_ranges
from core.settings import Settings
from pipelines.replay_targets import CqlTarget, TopicTarget
from schemas import events as ev
from schemas.topics import TopicCatalog, conversation_key
from sinks.clickhouse.store import ClickHouseStore
from sinks.cql.migrate import migrate

RESULTS = REPO_ROOT / "docs" / "bench" / "replay.json"
TENANT = "bench"


class DropTarget:
    """Takes the records and keeps nothing: the replay loop's own cost."""

    name = "none"

    def apply(self, messages: Sequence[Message]) -> None:
        return None

    def close(self) -> None:
        return None


def produce(settings: Settings, catalog: TopicCatalog, records: int, conversations: int) -> None:
    producer = Producer(
        kafka_producer_config(settings, **{"enable.idempotence": True, "linger.ms": 20})
    )
    start = datetime.now(UTC) - timedelta(hours=1)
    seqs: dict[str, int] = {}
    for index in range(records):
        conversation = f"c{index % conversations}"
        seqs[conversation] = seqs.get(conversation, 0) + 1
        sender = f"u{index % 97}"
        event = ev.MessageSent.new(
            tenant_id=TENANT,
            actor=ev.Actor(user_id=sender, device_id=f"{sender}-phone"),
            event_id=ev.message_event_id(TENANT, sender, f"m{index}"),
            occurred_at=start + timedelta(milliseconds=index),
            payload=ev.MessageSentPayload(
                conversation_id=conversation,
                client_msg_id=f"m{index}",
                body=ev.TextBody(text=f"message {index} of the replay benchmark"),
                conversation_seq=seqs[conversation],
            ),
        )
        key = conversation_key(TENANT, conversation)
        produce_waiting(
            producer, catalog.messages_sequenced.name, key, ev.encode_event(event), wait=0.1
        )
        producer.poll(0)
    if producer.flush(120) > 0:
        raise RuntimeError("the benchmark's records were not all acknowledged")


def raw_consume(settings: Settings, ranges: Sequence[PartitionRange]) -> tuple[int, float]:
    consumer = Consumer(
        kafka_consumer_config(
            settings,
            f"bench-raw-{uuid.uuid4().hex[:8]}",
            **{"enable.partition.eof": True, "fetch.max.bytes": 16 * 1024 * 1024},
        )
    )
    ends = {(r.topic, r.partition): r.end for r in ranges if r.size > 0}
    pending = set(ends)
    consumer.assign([TopicPartition(r.topic, r.partition, r.start) for r in ranges if r.size])
    records = 0
    started = time.monotonic()
    try:
        while pending:
            for message in consumer.consume(2000, timeout=0.5):
                key = (message.topic() or "", message.partition() or 0)
                if message.error() is not None:
                    pending.discard(key)
                    continue
                records += 1
                # Done with a partition at its range's last record, as the replay loop is.
                if (message.offset() or 0) >= ends[key] - 1:
                    pending.discard(key)
    finally:
        consumer.close()
    return records, time.monotonic() - started


def way(name: str, result: ReplayResult, raw_rate: float) -> dict[str, Any]:
    rate = result.replayed / result.elapsed
    return {
        "way": name,
        "records": result.replayed,
        "seconds": round(result.elapsed, 2),
        "records_per_second": round(rate),
        "ratio_to_raw": round(rate / raw_rate, 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("bench.replay", __doc__)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--output", type=Path, default=RESULTS)
    options = parser.parse_args(argv)
    progress = Progress()
    base = Settings()
    settings = run_settings(base, "replay")
    ways: list[dict[str, Any]] = []
    with bench_topics(settings, progress) as catalog:
        progress.done(f"producing {options.records} message.sent records")
        produce(settings, catalog, options.records, options.conversations)
        ranges = resolve_ranges(settings, catalog.messages_sequenced.name)
        total = sum(r.size for r in ranges)
        raw_consume(settings, ranges)  # warm-up: the broker's page cache, the connections
        records, seconds = min(
            (raw_consume(settings, ranges) for _ in range(3)), key=lambda taken: taken[1]
        )
        raw_rate = records / seconds
        ways.append(
            {
                "way": "raw consume",
                "records": records,
                "seconds": round(seconds, 2),
                "records_per_second": round(raw_rate),
                "ratio_to_raw": 1.0,
            }
        )
        progress.done(f"raw consume: {records} of {total} records, {raw_rate:,.0f}/s")

        def run(name: str, target: Any) -> None:
            def show(state: Any) -> None:
                progress.update(
                    f"{name}: {state.records}/{state.total} ({state.rate:,.0f}/s, ETA "
                    f"{state.eta or 0:.0f}s)"
                )

            result = replay(settings, ranges, target, run_id=uuid.uuid4().hex[:12], progress=show)
            target.close()
            assert result.finished and result.replayed == records, result
            ways.append(way(name, result, raw_rate))
            progress.done(f"{name}: {ways[-1]['records_per_second']:,}/s")

        run("replay → none", DropTarget())
        run("replay → topic", TopicTarget(settings, catalog.messages_in, "bench"))
        cluster = cql_cluster(settings)
        session: Session = cluster.connect()
        keyspace = f"bench_replay_{uuid.uuid4().hex[:8]}"
        try:
            migrate(session, keyspace, 1)
            # The bench keyspace is this run's anchor: its data keys live there too (the sink
            # reads tenant_keys from the anchor, which this stack may never have migrated).
            own = settings.model_copy(
                update={"cql": settings.cql.model_copy(update={"keyspace": keyspace})}
            )
            run("replay → cql", CqlTarget(own, session, catalog, keyspace, threading.Event()))
        finally:
            session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=120)
            cluster.shutdown()
        chdb = Path(tempfile.mkdtemp(prefix="bench-replay-chdb-"))
        try:
            local = settings.model_copy(
                update={"clickhouse": settings.clickhouse.model_copy(update={"chdb_path": chdb})}
            )
            store = ClickHouseStore(clickhouse_client(local), "bench_replay")
            store.apply_schema(catalog)
            run("replay → clickhouse", AuditTarget(store, catalog))
            store.close()
        finally:
            shutil.rmtree(chdb, ignore_errors=True)
    document = {
        "measured_at": now_iso(),
        "machine": machine_facts(base),
        "records": options.records,
        "conversations": options.conversations,
        "ways": ways,
    }
    write_results("replay", document, options.output)
    for row in ways:
        progress.done(
            f"{row['way']:<22} {row['records_per_second']:>9,}/s  ratio {row['ratio_to_raw']}"
        )
    return 0


if __name__ == "__main__":
    run_main(main)
