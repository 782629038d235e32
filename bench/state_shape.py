"""Cost of a 1:1 message against how much its users have accumulated (issue 15's shape test).

    python -m bench.state_shape [--shapes 1,50,500] [--users 100] [--backlog 5] [--messages 10000]

For each shape C, a fresh topic catalog holds ``--users`` users in pairs (one direct conversation
each, the measured traffic), and each user is also in C-1 ten-member groups that have
``--backlog`` messages nobody has read: the user's state holds C conversations and about
``0.9 * backlog * (C-1)`` unread messages. One stream worker (both processors) takes that in
(warm-up); then ``--messages`` 1:1 messages go through it as a backlog drain, and the benchmark
reports, per message: the stage's rate, the worker's and the broker's CPU microseconds, and the
records and bytes the stage wrote to each Kafka topic (outputs and state).

Before the fine-grained state layout, each of those messages rewrote both users' whole state
(every conversation, every unread seq); now the bytes and CPU per message should be flat in C.

Results go to ``docs/bench/streams.json`` (section ``state_shape``); docs/performance.md has the
table.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from bench.common import (
    REPO_ROOT,
    BenchError,
    CpuMeter,
    Progress,
    bench_topics,
    machine_facts,
    now_iso,
    run_main,
    run_space,
    start_run,
)
from bench.harness import add_output_options, bench_parser, run_document, store_results
from bench.shapes import conversation_created, text_message
from bench.stream_throughput import Counter, direct_scenario, fill, stream_worker
from core.connections import kafka_config
from core.settings import Settings
from schemas.events import (
    ConversationCreated,
    ConversationKind,
    Event,
    MessageSent,
    TextBody,
)
from schemas.topics import TopicCatalog

RESULTS_PATH = REPO_ROOT / "docs" / "bench" / "streams.json"
TENANT = "bench"
GROUP_SIZE = 10


def backlog_groups(users: int, shape: int) -> dict[str, list[str]]:
    """Each user's C-1 ten-member groups: one group per user per round, members shuffled."""
    conversations: dict[str, list[str]] = {}
    names = [f"u{index}" for index in range(users)]
    for round_ in range(shape - 1):
        shuffled = names[:]
        random.Random(round_).shuffle(shuffled)
        for start in range(0, users - GROUP_SIZE + 1, GROUP_SIZE):
            conversations[f"g{round_}-{start}"] = shuffled[start : start + GROUP_SIZE]
    return conversations


def backlog_events(groups: dict[str, list[str]], backlog: int) -> Iterator[Event]:
    """The groups' creation, then ``backlog`` messages in each that nobody reads."""
    for conversation_id, members in groups.items():
        yield conversation_created(TENANT, conversation_id, members, ConversationKind.GROUP)
    body = TextBody(text="x" * 100)
    ids = list(groups)
    for index in range(backlog * len(ids)):
        conversation_id = ids[index % len(ids)]
        sender = groups[conversation_id][index // len(ids) % GROUP_SIZE]
        yield text_message(
            TENANT, sender, conversation_id, f"b{index}", body, device_id=f"{sender}-d"
        )


def watermarks(settings: Settings, catalog: TopicCatalog) -> dict[tuple[str, int], int]:
    consumer = Consumer(kafka_config(settings, **{"group.id": f"bench-{uuid.uuid4().hex}"}))
    try:
        marks = {}
        for topic in catalog:
            if topic is catalog.messages_in:
                continue
            for partition in range(topic.partitions):
                _low, high = consumer.get_watermark_offsets(
                    TopicPartition(topic.name, partition), timeout=30
                )
                marks[(topic.name, partition)] = high
        return marks
    finally:
        consumer.close()


def written(
    settings: Settings, before: dict[tuple[str, int], int], after: dict[tuple[str, int], int]
) -> dict[str, dict[str, int]]:
    """Records and bytes (keys and values) committed to each topic between two watermarks."""
    consumer = Consumer(
        kafka_config(
            settings,
            **{
                "group.id": f"bench-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            },
        )
    )
    totals: dict[str, dict[str, int]] = {}
    pending = {tp for tp, end in after.items() if end > before.get(tp, 0)}
    consumer.assign([TopicPartition(t, p, before.get((t, p), 0)) for t, p in pending])
    idle = time.monotonic()
    try:
        while pending and time.monotonic() - idle < 10:
            for message in consumer.consume(10_000, timeout=0.5):
                if message.error() is not None:
                    continue
                idle = time.monotonic()
                tp = (message.topic() or "", message.partition() or 0)
                entry = totals.setdefault(tp[0], {"records": 0, "bytes": 0})
                entry["records"] += 1
                entry["bytes"] += len(message.key() or b"") + len(message.value() or b"")
                if (message.offset() or 0) + 1 >= after[tp]:
                    pending.discard(tp)
    finally:
        consumer.close()
    return totals


def run_shape(
    base: Settings,
    shape: int,
    *,
    users: int,
    backlog: int,
    messages: int,
    settle: float,
    progress: Progress,
) -> dict[str, Any]:
    settings, log_dir = run_space(base, f"shape-{shape}")
    groups = backlog_groups(users, shape)
    direct = direct_scenario(messages, users // 2)
    # Sync entries: one per member per creation and per message.
    warm_entries = len(groups) * GROUP_SIZE * (1 + backlog) + 2 * len(direct.conversations)
    target = warm_entries + 2 * messages
    with bench_topics(settings, progress) as catalog:
        fill(settings, catalog, backlog_events(groups, backlog), progress)
        creations = (e for e in direct.events() if isinstance(e, ConversationCreated))
        fill(settings, catalog, creations, progress)
        counter = Counter(settings, catalog.sync_events.name)
        worker = stream_worker(settings, log_dir / "worker", instance_id="bench-shape")
        try:
            worker.start(timeout=120)
            started = time.monotonic()
            while counter.count < warm_entries:
                if not worker.alive():
                    raise BenchError(f"the worker died:\n{worker.log_tail()}")
                progress.update(
                    f"shape {shape}: warm-up {counter.count:,}/{warm_entries:,} sync entries, "
                    f"{time.monotonic() - started:.0f} s"
                )
                time.sleep(0.1)
            progress.done(f"shape {shape}: warm-up done in {time.monotonic() - started:.0f} s")
            # The last transactions land, and the broker's log cleaner works through the warm-up's
            # state records before the measurement (on 2 vCPUs it competes with the worker).
            time.sleep(settle)
            before = watermarks(settings, catalog)
            meter = CpuMeter.with_broker(settings, {"stream-worker": worker.pid})
            cpu_start = meter.snapshot()
            started = time.monotonic()
            sends = (e for e in direct.events() if isinstance(e, MessageSent))
            fill(settings, catalog, sends, progress)
            while counter.count < target:
                if not worker.alive():
                    raise BenchError(f"the worker died:\n{worker.log_tail()}")
                progress.update(f"shape {shape}: {counter.count - warm_entries:,} measured")
                time.sleep(0.05)
            seconds = time.monotonic() - started
            cpu = CpuMeter.percent(cpu_start, meter.snapshot())
            time.sleep(2.0)
            after = watermarks(settings, catalog)
        finally:
            worker.stop()
            counter.close()
        topics = written(settings, before, after)
    per_core = cpu["processes_pct_of_one_core"]
    prefix = settings.kafka.topic_prefix
    result = {
        "conversations_per_user": shape,
        "unread_per_user": round(0.9 * backlog * (shape - 1)),
        "users": users,
        "messages": messages,
        "seconds": round(seconds, 2),
        "messages_per_second": round(messages / seconds),
        "cpu_us_per_message": {
            name: round(pct / 100 * seconds / messages * 1e6) for name, pct in per_core.items()
        },
        "records_per_message": round(sum(t["records"] for t in topics.values()) / messages, 2),
        "bytes_per_message": round(sum(t["bytes"] for t in topics.values()) / messages),
        "topics": {name.removeprefix(prefix): totals for name, totals in sorted(topics.items())},
    }
    progress.done(
        f"shape {shape}: {result['messages_per_second']:,} messages/s, "
        f"{result['bytes_per_message']:,} bytes and {result['records_per_message']} records "
        f"per message, CPU µs per message {result['cpu_us_per_message']}"
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("bench.state_shape", __doc__)
    parser.add_argument("--shapes", default="1,50,500", help="conversations per user")
    parser.add_argument("--users", type=int, default=100, help="users (%(default)s)")
    parser.add_argument("--backlog", type=int, default=5, help="messages per group (%(default)s)")
    parser.add_argument("--messages", type=int, default=30_000, help="measured 1:1 messages")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds after the warm-up")
    add_output_options(parser, RESULTS_PATH)
    args = parser.parse_args(argv)
    if args.users % GROUP_SIZE:
        parser.error(f"--users must be a multiple of {GROUP_SIZE}")
    progress, base = start_run()
    started = now_iso()
    results = [
        run_shape(
            base,
            int(shape),
            users=args.users,
            backlog=args.backlog,
            messages=args.messages,
            settle=args.settle,
            progress=progress,
        )
        for shape in args.shapes.split(",")
    ]
    document = run_document(started, machine_facts(base), args, shapes=results)
    store_results("state_shape", document, args, progress)
    return 0


if __name__ == "__main__":
    run_main(main)
