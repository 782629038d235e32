"""Messages per second through the whole stream stage, against raw consume→produce loops.

    python -m bench.stream_throughput [--messages 20000] [--group-messages 2000] [--repeat 1]

For each scenario — 1:1 messages (``--pairs`` conversations) and 50-member groups — and each
worker layout, the benchmark fills ``im.messages.in`` of a fresh topic catalog with the
conversations and the messages, starts the worker process(es), and measures from the moment the
worker is ready until the last sync-queue entry is committed (counted by a ``read_committed``
consumer in this process). That is a backlog drain: the highest rate the stage sustains.

Layouts:
- ``single``: one ``imstream run stream-worker`` process running both processors (two threads);
- ``split``: one process per processor (``--processor conversations`` / ``--processor users``),
  so that the two can use both cores.

In the same run, on 200,000 copies of one of the scenario's input records, two raw loops give
the ceiling of the Kafka client: ``raw``, a confluent-kafka consume → produce loop (one output
per input, idempotent producer), and ``raw-transactional``, the same loop committing one
transaction per batch with the input offsets in it — the worker's Kafka pattern without any of
its processing.

Results go to ``docs/bench/streams.json``; docs/performance.md has the table.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from bench.common import (
    REPO_ROOT,
    BenchError,
    CpuMeter,
    Progress,
    ServerProcess,
    bench_topics,
    imstream_command,
    machine_facts,
    now_iso,
    run_main,
    run_space,
    start_run,
    with_topic_prefix,
)
from bench.harness import (
    add_output_options,
    bench_parser,
    produce_waiting,
    run_document,
    store_results,
)
from bench.profile import start_recording, summarise
from bench.shapes import conversation_created, text_message
from core.connections import kafka_config, kafka_producer_config
from core.settings import Settings
from schemas.events import (
    ConversationKind,
    Event,
    MessageSent,
    TextBody,
    direct_conversation_id,
    encode_event,
)
from schemas.topics import TopicCatalog, conversation_key

RESULTS_PATH = REPO_ROOT / "docs" / "bench" / "streams.json"
TENANT = "bench"
LAYOUTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "single": ((),),
    "split": (("--processor", "conversations"), ("--processor", "users")),
}


@dataclass(frozen=True)
class Scenario:
    name: str
    conversations: dict[str, list[str]]
    messages: int
    kind: ConversationKind

    @property
    def sync_entries(self) -> int:
        """Sync-queue entries the run must produce: one per member per message, plus creation."""
        members = [len(m) for m in self.conversations.values()]
        per_message = sum(members) / len(members)
        return int(self.messages * per_message) + sum(members)

    def events(self) -> Iterator[Event]:
        for conversation_id, members in self.conversations.items():
            yield conversation_created(TENANT, conversation_id, members, self.kind)
        ids = list(self.conversations)
        body = TextBody(text="x" * 100)
        for index in range(self.messages):
            conversation_id = ids[index % len(ids)]
            members = self.conversations[conversation_id]
            sender = members[(index // len(ids)) % len(members)]
            yield text_message(
                TENANT, sender, conversation_id, f"c{index}", body, device_id=f"{sender}-d"
            )


def direct_scenario(messages: int, pairs: int) -> Scenario:
    conversations = {
        direct_conversation_id(TENANT, f"u{2 * i}", f"u{2 * i + 1}"): [f"u{2 * i}", f"u{2 * i + 1}"]
        for i in range(pairs)
    }
    return Scenario("direct", conversations, messages, ConversationKind.DIRECT)


def group_scenario(messages: int, groups: int, size: int) -> Scenario:
    conversations = {f"g{g}": [f"g{g}-m{m}" for m in range(size)] for g in range(groups)}
    return Scenario(f"group{size}", conversations, messages, ConversationKind.GROUP)


def stream_worker(
    settings: Settings,
    path: Path,
    *,
    instance_id: str,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> ServerProcess:
    """``imstream run stream-worker`` on the settings' Kafka and topic catalog, its log and ready
    file at ``path`` + ``.log`` / ``.ready``. Members are admitted without a sign-in: the
    benchmarks' users are synthetic and never sign in."""
    return ServerProcess(
        path.name,
        imstream_command("run", "stream-worker", *args),
        env={
            **os.environ,
            "IM_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
            "IM_KAFKA__TOPIC_PREFIX": settings.kafka.topic_prefix,
            "IM_STREAMS__INSTANCE_ID": instance_id,
            "IM_STREAMS__MEMBER_ADMISSION": "open",
            **(env or {}),
        },
        port=0,
        log_path=path.with_suffix(".log"),
        ready_file=path.with_suffix(".ready"),
    )


def fill(
    settings: Settings, catalog: TopicCatalog, events: Iterable[Event], progress: Progress
) -> int:
    """Write commands to ``im.messages.in``; returns the number of records."""
    producer = Producer(kafka_producer_config(settings, **{"enable.idempotence": True}))
    count = 0
    for event in events:
        conversation_id = str(getattr(event.payload, "conversation_id", ""))
        key = conversation_key(event.tenant_id, conversation_id)
        produce_waiting(producer, catalog.messages_in.name, key, encode_event(event))
        count += 1
        if count % 10_000 == 0:
            producer.poll(0)
            progress.update(f"filling {catalog.messages_in.name}: {count:,} records")
    if producer.flush(120) != 0:
        raise BenchError("could not write the input records to Kafka")
    progress.done(f"filled {catalog.messages_in.name} with {count:,} records")
    return count


class Counter:
    """Counts committed records of a topic from the beginning, in a thread."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.count = 0
        self._stop = threading.Event()
        self._consumer = Consumer(
            kafka_config(
                settings,
                **{
                    "group.id": f"bench-count-{uuid.uuid4().hex}",
                    "auto.offset.reset": "earliest",
                    "enable.auto.commit": False,
                    "isolation.level": "read_committed",
                },
            )
        )
        self._consumer.subscribe([topic])
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for message in self._consumer.consume(10_000, timeout=0.05):
                if message.error() is None:
                    self.count += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._consumer.close()


def run_stage(
    settings: Settings,
    catalog: TopicCatalog,
    scenario: Scenario,
    layout: str,
    *,
    log_dir: Path,
    profile_seconds: float,
    progress: Progress,
    timeout: float,
) -> dict[str, Any]:
    counter = Counter(settings, catalog.sync_events.name)
    workers = [
        stream_worker(
            settings,
            log_dir / f"{scenario.name}-{layout}-worker-{index}",
            instance_id=f"bench-{index}",
            args=args,
        )
        for index, args in enumerate(LAYOUTS[layout])
    ]
    try:
        for worker in workers:
            worker.start(timeout=120)
        meter = CpuMeter.with_broker(settings, {worker.name: worker.pid for worker in workers})
        started = time.monotonic()
        cpu_start = meter.snapshot()
        recorder = None
        profile_path = log_dir / f"{scenario.name}-{layout}.pyspy"
        if profile_seconds and len(workers) == 1:
            recorder = start_recording(workers[0].pid, profile_seconds, profile_path)
        while counter.count < scenario.sync_entries:
            elapsed = time.monotonic() - started
            if elapsed > timeout:
                raise BenchError(
                    f"{scenario.name}/{layout}: {counter.count:,} of {scenario.sync_entries:,} "
                    f"sync entries after {timeout:.0f} s; worker logs in {log_dir}"
                )
            for worker in workers:
                if not worker.alive():
                    raise BenchError(f"{worker.name} died:\n{worker.log_tail()}")
            progress.update(
                f"{scenario.name}/{layout}: {counter.count:,}/{scenario.sync_entries:,} sync "
                f"entries, {elapsed:.0f} s"
            )
            time.sleep(0.05)
        seconds = time.monotonic() - started
        cpu = CpuMeter.percent(cpu_start, meter.snapshot())
        profile = None
        if recorder is not None:
            recorder.wait(timeout=profile_seconds + 30)
            if profile_path.exists():
                profile = summarise(profile_path, threads=("conversations", "users"))
    finally:
        for worker in workers:
            worker.stop()
        counter.close()
    result = {
        "scenario": scenario.name,
        "layout": layout,
        "messages": scenario.messages,
        "sync_entries": scenario.sync_entries,
        "seconds": round(seconds, 2),
        "messages_per_second": round(scenario.messages / seconds),
        "sync_entries_per_second": round(scenario.sync_entries / seconds),
        "cpu": cpu,
        "profile": profile,
    }
    progress.done(
        f"{scenario.name}/{layout}: {result['messages_per_second']:,} messages/s "
        f"({result['sync_entries_per_second']:,} sync entries/s) in {seconds:.1f} s"
    )
    return result


def raw_input(settings: Settings, value: bytes, records: int, progress: Progress) -> str:
    """A scratch topic holding ``records`` copies of ``value`` under 500 keys."""
    admin = AdminClient(kafka_config(settings))
    source = f"{settings.kafka.topic_prefix}raw-in"
    for future in admin.create_topics([NewTopic(source, 6, 1)]).values():
        future.result(timeout=60)
    producer = Producer(kafka_producer_config(settings, **{"enable.idempotence": True}))
    for index in range(records):
        produce_waiting(producer, source, f"k{index % 500}".encode(), value)
    if producer.flush(120) != 0:
        raise BenchError("could not write the raw loops' input")
    progress.done(f"filled {source} with {records:,} records of {len(value)} bytes")
    return source


def drop_topics(settings: Settings, names: Sequence[str]) -> None:
    admin = AdminClient(kafka_config(settings))
    with contextlib.suppress(KafkaException):
        for future in admin.delete_topics(list(names)).values():
            future.result(timeout=60)


def copy_batch(
    producer: Producer, target: str, messages: Sequence[Message]
) -> tuple[dict[tuple[str, int], int], int]:
    """Produces each good record of ``messages`` to ``target`` (waiting while the producer's
    buffer is full); the next offset to commit per input partition, and how many were copied."""
    offsets: dict[tuple[str, int], int] = {}
    copied = 0
    for message in messages:
        if message.error() is not None:
            continue
        while True:
            try:
                producer.produce(target, key=message.key(), value=message.value())
                break
            except BufferError:
                producer.poll(0.05)
        tp = (message.topic() or "", message.partition() or 0)
        offsets[tp] = (message.offset() or 0) + 1
        copied += 1
    return offsets, copied


def raw_loop(
    settings: Settings,
    source: str,
    records: int,
    *,
    transactional: bool,
    batch_size: int,
    progress: Progress,
) -> dict[str, Any]:
    """Consume ``records`` records of ``source`` and produce each one to a scratch topic."""
    admin = AdminClient(kafka_config(settings))
    target = f"{settings.kafka.topic_prefix}raw-out-{uuid.uuid4().hex[:6]}"
    for future in admin.create_topics([NewTopic(target, 6, 1)]).values():
        future.result(timeout=60)
    group = f"{settings.kafka.topic_prefix}raw-{uuid.uuid4().hex[:6]}"
    consumer = Consumer(
        kafka_config(
            settings,
            **{
                "group.id": group,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": not transactional,
                "isolation.level": "read_committed",
            },
        )
    )
    extra: dict[str, Any] = {"enable.idempotence": True, "acks": "all", "linger.ms": 2}
    if transactional:
        extra["transactional.id"] = group
    producer = Producer(kafka_producer_config(settings, **extra))
    if transactional:
        producer.init_transactions(60)
    consumer.subscribe([source])
    done = 0
    started: float | None = None
    cpu_start = time.process_time()
    try:
        while done < records:
            messages = consumer.consume(batch_size, timeout=0.5)
            if not messages:
                continue
            if started is None:
                started = time.monotonic()
            if transactional:
                producer.begin_transaction()
            offsets, copied = copy_batch(producer, target, messages)
            done += copied
            if transactional:
                producer.send_offsets_to_transaction(
                    [TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                    consumer.consumer_group_metadata(),
                    60,
                )
                producer.commit_transaction(60)
            else:
                producer.poll(0)
            progress.update(f"raw{'-transactional' if transactional else ''}: {done:,}")
        if producer.flush(60) != 0:
            raise BenchError("the raw loop could not deliver its records")
        seconds = time.monotonic() - (started or time.monotonic())
    finally:
        consumer.close()
        with contextlib.suppress(KafkaException):
            for future in admin.delete_topics([target]).values():
                future.result(timeout=60)
    cpu = time.process_time() - cpu_start
    name = "raw-transactional" if transactional else "raw"
    result = {
        "loop": name,
        "records": done,
        "seconds": round(seconds, 2),
        "records_per_second": round(done / seconds) if seconds else None,
        "cpu_seconds": round(cpu, 2),
    }
    progress.done(f"{name}: {result['records_per_second']:,} records/s")
    return result


def run_scenario(
    base: Settings,
    scenario: Scenario,
    layouts: Sequence[str],
    *,
    progress: Progress,
    profile_seconds: float,
    timeout: float,
    raw_records: int,
) -> dict[str, Any]:
    settings, log_dir = run_space(base, f"streams-{scenario.name}")
    progress.done(f"{scenario.name}: worker logs in {log_dir}")
    runs = []
    raws: list[dict[str, Any]] = []
    for layout in layouts:
        # A fresh catalog per layout: the worker starts from empty state and an unread input.
        layout_settings = with_topic_prefix(settings, f"{settings.kafka.topic_prefix}{layout}.")
        with bench_topics(layout_settings, progress) as catalog:
            fill(layout_settings, catalog, scenario.events(), progress)
            runs.append(
                run_stage(
                    layout_settings,
                    catalog,
                    scenario,
                    layout,
                    log_dir=log_dir,
                    profile_seconds=profile_seconds if layout == "single" else 0.0,
                    progress=progress,
                    timeout=timeout,
                )
            )
            if not raws:
                sample = next(
                    encode_event(event)
                    for event in scenario.events()
                    if isinstance(event, MessageSent)
                )
                source = raw_input(layout_settings, sample, raw_records, progress)
                for transactional in (False, True):
                    raws.append(
                        raw_loop(
                            layout_settings,
                            source,
                            raw_records,
                            transactional=transactional,
                            batch_size=base.streams.batch_size,
                            progress=progress,
                        )
                    )
                drop_topics(layout_settings, [source])
    best = max(runs, key=lambda run: run["messages_per_second"])
    raw = {r["loop"]: r for r in raws}
    return {
        "scenario": scenario.name,
        "conversations": len(scenario.conversations),
        "members_per_conversation": len(next(iter(scenario.conversations.values()))),
        "runs": runs,
        "raw": raws,
        "best_layout": best["layout"],
        "best_messages_per_second": best["messages_per_second"],
        "ratio_to_raw": round(best["messages_per_second"] / raw["raw"]["records_per_second"], 3),
        "ratio_to_raw_transactional": round(
            best["messages_per_second"] / raw["raw-transactional"]["records_per_second"], 3
        ),
        "sync_entries_ratio_to_raw": round(
            best["sync_entries_per_second"] / raw["raw"]["records_per_second"], 3
        ),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("bench.stream_throughput", __doc__)
    parser.add_argument("--messages", type=int, default=40_000, help="1:1 messages (%(default)s)")
    parser.add_argument("--pairs", type=int, default=500, help="1:1 conversations (%(default)s)")
    parser.add_argument("--group-messages", type=int, default=4_000, help="group messages")
    parser.add_argument("--groups", type=int, default=20, help="groups (%(default)s)")
    parser.add_argument("--group-size", type=int, default=50, help="members (%(default)s)")
    parser.add_argument("--raw-records", type=int, default=200_000, help="raw loops' input")
    parser.add_argument("--layouts", default="single,split", help="worker layouts to run")
    parser.add_argument("--profile-seconds", type=float, default=8.0, help="0 to skip py-spy")
    parser.add_argument("--timeout", type=float, default=600.0, help="per run, seconds")
    add_output_options(parser, RESULTS_PATH)
    args = parser.parse_args(argv)
    progress, base = start_run()
    layouts = [layout for layout in args.layouts.split(",") if layout]
    unknown = set(layouts) - set(LAYOUTS)
    if unknown:
        parser.error(f"unknown layout(s) {', '.join(sorted(unknown))}; known: single, split")
    facts = machine_facts(base)
    started = now_iso()
    scenarios = [
        direct_scenario(args.messages, args.pairs),
        group_scenario(args.group_messages, args.groups, args.group_size),
    ]
    results = [
        run_scenario(
            base,
            scenario,
            layouts,
            progress=progress,
            profile_seconds=args.profile_seconds,
            timeout=args.timeout,
            raw_records=args.raw_records,
        )
        for scenario in scenarios
    ]
    document = run_document(started, facts, args, scenarios=results)
    for result in results:
        progress.done(
            f"{result['scenario']}: best {result['best_messages_per_second']:,} messages/s "
            f"({result['best_layout']}); ratio to raw {result['ratio_to_raw']}, to raw "
            f"transactional {result['ratio_to_raw_transactional']}"
        )
    store_results("stream_stage", document, args, progress)
    return 0


if __name__ == "__main__":
    run_main(main)
