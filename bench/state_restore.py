"""How long a stream worker with a large state takes to process again after a restart.

    python -m bench.state_restore [--messages 10000000] [--users 1000000] [--views 2]

A fresh topic catalog's state topics are filled as a long-running worker would have left them:
``--messages`` dedupe records (the message table: one per message of the last 7 days) and, for
``--users`` users, a header and ``--views`` conversation views each. Then one
``imstream run stream-worker`` is started three times:

1. **cold**: an empty store; it reads every state record into its store (the only time it does);
2. **after a clean stop** (SIGTERM): the store's checkpoints are at the end, nothing is read;
3. **after SIGKILL** while 1:1 traffic runs: the tail written since the last checkpoint is read.

Each start is timed from the process start to "processing again": a probe message produced before
the start has reached its recipient's sync queue. The worker's RSS (and peak RSS) once ready is
reported: the state is on disk, so memory does not grow with it.

Results go to ``docs/bench/streams.json`` (section ``state_restore``); docs/performance.md has the
table.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydantic_core
from confluent_kafka import Producer

from bench.common import (
    REPO_ROOT,
    BenchError,
    Progress,
    ServerProcess,
    bench_topics,
    machine_facts,
    now_iso,
    run_main,
    run_space,
    start_run,
)
from bench.harness import (
    add_output_options,
    bench_parser,
    produce_waiting,
    run_document,
    store_results,
)
from bench.stream_throughput import Counter, fill, stream_worker
from core.connections import kafka_producer_config
from core.settings import Settings
from schemas.events import direct_conversation_id
from schemas.topics import TopicCatalog, user_key
from streams.state import child_key
from tests.streams.support import created, message

RESULTS_PATH = REPO_ROOT / "docs" / "bench" / "streams.json"
TENANT = "acme"


def fill_state(
    settings: Settings,
    catalog: TopicCatalog,
    *,
    messages: int,
    users: int,
    views: int,
    progress: Progress,
) -> int:
    """Write the synthetic state records; returns how many."""
    producer = Producer(
        kafka_producer_config(
            settings, **{"enable.idempotence": True, "linger.ms": 20, "batch.size": 1_000_000}
        )
    )
    now = time.time()
    count = 0

    def produce(topic: str, key: bytes, value: bytes) -> None:
        nonlocal count
        produce_waiting(producer, topic, key, value)
        count += 1
        if count % 200_000 == 0:
            producer.poll(0)
            progress.update(f"filling the state topics: {count:,} records")

    for index in range(messages):
        value = {"sender_id": f"user-{index % 1000}", "seq": index, "recalled": False}
        value |= {"at": now - (index % 600_000), "partition": index % 6}
        produce(
            catalog.message_state.name,
            f"{uuid.UUID(int=index)}".encode(),
            pydantic_core.to_json(value),
        )
    for index in range(users):
        key = user_key(TENANT, f"user-{index}").decode()
        header = {"last_sync_id": 40, "devices": {}, "unread_total": 3 * views, "applied": {}}
        produce(catalog.user_state.name, key.encode(), pydantic_core.to_json(header))
        for view in range(views):
            value = {"last_seq": 20, "read_seq": 17, "unread": [[18, 20]], "muted": False}
            value |= {"merged_since_push": 0, "position": 21}
            produce(
                catalog.user_state.name,
                child_key(key, f"c-{index}-{view}").encode(),
                pydantic_core.to_json(value),
            )
    if producer.flush(300) != 0:
        raise BenchError("could not write the state records")
    progress.done(f"filled the state topics with {count:,} records")
    return count


def rss_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0])
    return fields


class Traffic:
    """1:1 messages at a steady rate in a thread (the state keeps changing while it runs)."""

    def __init__(self, settings: Settings, catalog: TopicCatalog, rate: float) -> None:
        self._stop = threading.Event()
        self.sent = 0
        first, second = "traffic-a", "traffic-b"
        conversation_id = direct_conversation_id(TENANT, first, second)

        def run() -> None:
            fill(settings, catalog, [created(first, second, conversation_id)], Progress())
            producer = Producer(kafka_producer_config(settings, **{"enable.idempotence": True}))
            while not self._stop.is_set():
                event = message(first, conversation_id, f"t{self.sent}")
                producer.produce(
                    catalog.messages_in.name,
                    key=f"{TENANT}/{conversation_id}".encode(),
                    value=event.model_dump_json().encode(),
                )
                producer.poll(0)
                self.sent += 1
                time.sleep(1 / rate)
            producer.flush(30)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def timed_start(
    settings: Settings,
    *,
    catalog: TopicCatalog,
    worker: ServerProcess,
    counter: Counter,
    probe: str,
    progress: Progress,
) -> dict[str, Any]:
    """Start ``worker`` with a probe message waiting; time until its sync entries exist."""
    first, second = f"{probe}-a", f"{probe}-b"
    conversation_id = direct_conversation_id(TENANT, first, second)
    before = counter.count
    fill(
        settings,
        catalog,
        [created(first, second, conversation_id), message(first, conversation_id, probe)],
        progress,
    )
    started = time.monotonic()
    worker.start(timeout=900)
    ready = time.monotonic() - started
    memory = rss_kib(worker.pid)
    while counter.count < before + 4:  # creation and message, to both users
        if not worker.alive():
            raise BenchError(f"the worker died:\n{worker.log_tail()}")
        if time.monotonic() - started > 900:
            raise BenchError(f"{probe}: the probe was not processed in 900 s")
        time.sleep(0.02)
    processing = time.monotonic() - started
    result = {
        "seconds_to_ready": round(ready, 2),
        "seconds_to_processing": round(processing, 2),
        "rss_mib": round(memory.get("VmRSS", 0) / 1024, 1),
        # The process's own memory, and the store's pages mapped into it (reclaimable page
        # cache: LMDB reads the file through mmap).
        "rss_anonymous_mib": round(memory.get("RssAnon", 0) / 1024, 1),
        "rss_file_mib": round(memory.get("RssFile", 0) / 1024, 1),
        "peak_rss_mib": round(memory.get("VmHWM", 0) / 1024, 1),
    }
    progress.done(f"{probe}: processing again {processing:.1f} s after the start; {result}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("bench.state_restore", __doc__)
    parser.add_argument("--messages", type=int, default=10_000_000, help="dedupe records")
    parser.add_argument("--users", type=int, default=1_000_000, help="users with state")
    parser.add_argument("--views", type=int, default=2, help="conversation views per user")
    parser.add_argument("--traffic-rate", type=float, default=200.0, help="messages/s")
    add_output_options(parser, RESULTS_PATH)
    args = parser.parse_args(argv)
    progress, base = start_run()
    settings, log_dir = run_space(base, "restore")
    started_at = now_iso()
    with bench_topics(settings, progress) as catalog:
        records = fill_state(
            settings,
            catalog,
            messages=args.messages,
            users=args.users,
            views=args.views,
            progress=progress,
        )
        counter = Counter(settings, catalog.sync_events.name)
        worker = stream_worker(
            settings,
            log_dir / "worker",
            instance_id="bench-restore",
            env={"IM_STREAMS__STATE_DIR": str(log_dir / "state")},
        )
        starts: dict[str, Any] = {}
        traffic: Traffic | None = None
        try:

            def start(probe: str) -> dict[str, Any]:
                return timed_start(
                    settings,
                    catalog=catalog,
                    worker=worker,
                    counter=counter,
                    probe=probe,
                    progress=progress,
                )

            starts["cold"] = start("cold")
            worker.stop()
            starts["after_clean_stop"] = start("clean")
            traffic = Traffic(settings, catalog, args.traffic_rate)
            time.sleep(15.0)  # past a checkpoint, and then some
            worker.kill()
            starts["after_sigkill"] = start("killed")
            traffic.stop()
            traffic = None
        finally:
            if traffic is not None:
                traffic.stop()
            worker.stop()
            counter.close()
    document = run_document(
        started_at,
        machine_facts(base),
        args,
        state_records=records,
        store_bytes=sum(f.stat().st_size for f in (log_dir / "state").rglob("*") if f.is_file()),
        starts=starts,
        worker_log=str(log_dir / "worker.log"),
    )
    progress.done(f"state restore: {starts}")
    store_results("state_restore", document, args, progress)
    return 0


if __name__ == "__main__":
    run_main(main)
