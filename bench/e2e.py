"""The whole system under load: send → deliver through real WebSockets, Kafka, the stream worker
and the sinks, all on this machine, against a raw Kafka round trip measured in the same run.

    python -m bench.e2e [--rates 250,500,1000,1500] [--group-rates 50,100] [--duration 20]
                        [--shape 50] [--backlog 20]

What runs — as ``imstream up`` runs it, one OS process per kind: the stream worker, two ingress
nodes, the CQL sink and the ClickHouse sink, on a fresh topic catalog (``bench.e2e.<time>.<pid>.``),
a fresh CQL keyspace and a chDB path of their own; the local stack's Kafka and Cassandra (started
if they are not running, left as found). ``--pairs`` 1:1 conversations and ``--groups`` groups of
``--group-size`` members are spread over ``--client-processes`` load generator processes, each
user one device, one SDK client (``client.sdk.Client``) over a real WebSocket; the two users
of a pair are on different ingress nodes, so every 1:1 delivery crosses nodes.

Phases: first an unreported warm-up (``--warm-up-seconds`` of 1:1 traffic at 100/s: the JVMs
and caches are cold after start-up), then one per target rate, 1:1 first (``--rates``,
messages/s for the whole system), then group traffic (``--group-rates``, group messages/s;
each is delivered to ``group-size - 1`` members). Each phase sends open loop at its rate for
``--warmup`` + ``--duration`` seconds and measures the ``--duration`` part: accepted/s,
delivered/s, send → deliver latency (from calling ``send`` to the receiver's ``events()``
yielding the message), send → accepted latency, CPU per process kind. Every message of a phase
must reach every other member exactly once (the phase waits up to ``--drain`` seconds for
stragglers): deliveries missing after the drain and duplicates are counted, not assumed.

A phase is **sustained** when delivered/s is at least 97% of the target, p99 send → deliver is at
most ``--p99-bar-ms`` (200), every delivery arrived by the end of the drain, none twice, no send was
refused, and the generator itself kept its schedule (p99 lag under 50 ms; otherwise the phase
measured the generator, not the system). ``--stop-after-failures N`` stops raising the 1:1 rate
after N unsustained phases.

Raw baseline, same run, before the load: a confluent-kafka producer (the gateway's settings:
idempotent, ``acks=all``, ``linger.ms=2``) and a consumer in this process, the payload the size of
the gateway's ``message.sent`` record; produce → consume round trip at each target rate, and the
highest rate one producer and one consumer reach.

Kafka and CPU per message: every phase also reports the records and bytes (keys and values, read
back read-committed, so without transaction markers) written to each topic of the catalog during
its measured window, and CPU microseconds per process kind, both per message delivered in the
window (a group message counts once, not once per member).

User shape (``--shape N``, default 1): by default each user is in one conversation, its pair's,
with nothing unread. With ``--shape N`` every load user (both users of every pair) is first put
into ``N - 1`` further direct conversations, each with a synthetic peer of its own who created it
and sent ``--backlog`` messages (default 20) the user has not read: ``N`` conversations and
``backlog * (N - 1)`` unread messages per user. The shape is built before the users connect, as
``conversation.created`` and ``message.sent`` commands produced straight onto the conversation
input topic (as bench/state_shape.py does; the worker admits unknown users here); the benchmark
waits until the stream worker's consumer lag is 0 and the sinks caught up, then connects the load
users, whose clients sync their backlog, and waits until the ingress nodes and load generators
are idle again before the warm-up. It reports how long that took and how many records it
produced (``--shape-timeout`` bounds the wait). Run it at 1, 50 and 500 to see whether a
message's Kafka bytes and CPU stay flat as a user's conversations and unread count grow.

Results: docs/bench/e2e.json, docs/bench/e2e-latency.png (latency against rate; needs
matplotlib, ``pip install -e '.[bench]'``); docs/performance.md has the table. A run with
``--shape 1`` writes the section ``e2e``; any other shape ``e2e_shape_<N>_backlog_<B>`` and the
plot ``e2e-latency-shape-<N>-backlog-<B>.png``, so runs of different shapes keep each other.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from confluent_kafka import (
    Consumer,
    IsolationLevel,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec

from bench.common import (
    LOOPBACK,
    REPO_ROOT,
    BenchError,
    CpuMeter,
    Progress,
    ServerProcess,
    bench_topics,
    free_port,
    imstream_command,
    local_stack,
    machine_facts,
    now_iso,
    percentiles_ms,
    run_main,
    run_settings,
    stack_server_pid,
    start_run,
    write_results,
)
from bench.e2e_load import Phase, PhaseResult, WorkerPlan, run_worker
from bench.harness import (
    add_load_options,
    add_output_options,
    bench_parser,
    options_document,
    options_from,
    stop_workers,
)
from bench.ingress_throughput import body_text, built_record
from bench.loadgen import Credentials
from bench.raw_produce import durable_producer_config
from bench.shapes import conversation_created, text_message
from bench.stream_throughput import fill
from core.connections import cql_cluster, kafka_config, kafka_consumer_config
from core.lag import group_lag
from core.settings import Settings
from pipelines.processes import BY_NAME, consumer_groups
from pipelines.stack.process import lower_priority
from schemas.events import (
    ConversationKind,
    Event,
    TextBody,
    direct_conversation_id,
)
from schemas.topics import TopicCatalog, topic_catalog

RESULTS_PATH = REPO_ROOT / "docs" / "bench" / "e2e.json"
PLOT_PATH = REPO_ROOT / "docs" / "bench" / "e2e-latency.png"
TENANT = "bench"
#: A phase whose generator was later than this (p99) measured the generator, not the system.
GENERATOR_LAG_LIMIT_MS = 50.0
#: A partition's end offset, for ``AdminClient.list_offsets``.
LATEST: OffsetSpec = OffsetSpec.latest()  # type: ignore[no-untyped-call]
#: The rate of the unreported warm-up phase, 1:1 messages/s.
WARM_UP_RATE = 100.0
#: A sink whose groups are at most this many records behind has caught up (transaction markers
#: leave a record or so per partition that a consumer never commits past).
SINK_LAG_SETTLED = 100
#: The share of the target rate a phase must deliver to count as sustained.
DELIVERED_SHARE = 0.97
#: A phase is sustained only if every sink caught up within this long of the window's end: a
#: rate the stores cannot keep up with is not sustained (history and search would drift further
#: and further behind live delivery).
SINK_CATCH_UP_BAR_SECONDS = 5.0
#: The stream worker logs its totals this often in the benchmark (for transactions per second).
WORKER_PROGRESS_SECONDS = 1.0
#: The stream worker's progress line: its totals of transactions so far.
WORKER_TOTALS = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*worker totals: (\d+) transactions, "
    r"(\d+) batches \((\d+) shared\), interval (\d+) ms"
)
#: After shaping, the load users' clients sync their backlog: done once the ingress nodes and the
#: load generators together use less than this share of one core …
CLIENTS_IDLE_PCT = 15.0
#: … in this many consecutive one-second samples.
CLIENTS_IDLE_SAMPLES = 3


@dataclass(frozen=True, slots=True)
class Options:
    rates: list[float]
    group_rates: list[float]
    pairs: int
    groups: int
    group_size: int
    warmup: float
    duration: float
    drain: float
    body_bytes: int
    client_processes: int
    p99_bar_ms: float
    raw_seconds: float
    sink_nice: int
    sink_catch_up: float
    stop_after_failures: int
    warm_up_seconds: float
    idle_seconds: float
    #: Conversations per load user (1: only its pair's) and unread messages in each added one.
    shape: int
    backlog: int
    shape_timeout: float
    output: Path
    plot: Path
    write: bool

    @property
    def unread_per_user(self) -> int:
        return self.backlog * (self.shape - 1)


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = bench_parser("bench.e2e", __doc__)
    parser.add_argument("--rates", default="100,200,300,400,500,750,1000")
    parser.add_argument("--group-rates", default="25,50,100,150")
    parser.add_argument("--pairs", type=int, default=200, help="1:1 conversations (%(default)s)")
    parser.add_argument("--groups", type=int, default=20, help="groups (%(default)s)")
    parser.add_argument("--group-size", type=int, default=8, help="members (%(default)s)")
    add_load_options(parser, warmup=5.0, duration=20.0, drain=20.0)
    parser.add_argument("--p99-bar-ms", type=float, default=200.0, help="the latency bar")
    parser.add_argument("--raw-seconds", type=float, default=5.0, help="per raw rate")
    parser.add_argument(
        "--sink-nice", type=int, default=10, help="the sinks' nice value, as `imstream up` sets it"
    )
    parser.add_argument(
        "--sink-catch-up", type=float, default=120.0, help="seconds to wait for the sinks"
    )
    parser.add_argument(
        "--stop-after-failures",
        type=int,
        default=0,
        help="stop raising the 1:1 rate after this many unsustained phases (0: run every rate)",
    )
    parser.add_argument(
        "--warm-up-seconds",
        type=float,
        default=40.0,
        help="an unreported 1:1 phase first, at 100/s (0: none)",
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=15.0,
        help="after the warm-up, the whole system idle with every client connected: the "
        "machine's busy share and each process's CPU (0: not measured) (%(default)s)",
    )
    parser.add_argument(
        "--shape",
        type=int,
        default=1,
        help="conversations per load user; N > 1 adds N-1 direct ones with synthetic peers and an "
        "unread backlog before the load (%(default)s)",
    )
    parser.add_argument(
        "--backlog",
        type=int,
        default=20,
        help="unread messages in each conversation --shape adds (%(default)s)",
    )
    parser.add_argument(
        "--shape-timeout",
        type=float,
        default=7200.0,
        help="seconds to wait for the worker and the sinks to apply the shape, and again for the "
        "clients to sync it (%(default)s)",
    )
    add_output_options(parser, RESULTS_PATH)
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        help=f"default {PLOT_PATH} (with --shape N > 1: e2e-latency-shape-N-backlog-B.png)",
    )
    args = parser.parse_args(argv)

    def rates(text: str) -> list[float]:
        try:
            values = sorted({float(part) for part in text.split(",") if part.strip()})
        except ValueError:
            parser.error(f"rates must be comma-separated numbers, got {text!r}")
        if any(value <= 0 for value in values):
            parser.error(f"rates must be positive, got {text!r}")
        return values

    if args.group_size < 2:
        parser.error("--group-size must be at least 2")
    if args.shape < 1:
        parser.error("--shape must be at least 1")
    if args.backlog < 0:
        parser.error("--backlog must not be negative")
    plot_path = args.plot
    if plot_path is None:
        plot_path = (
            PLOT_PATH
            if args.shape == 1
            else PLOT_PATH.with_name(f"e2e-latency-shape-{args.shape}-backlog-{args.backlog}.png")
        )
    return options_from(
        Options,
        args,
        rates=rates(args.rates),
        group_rates=rates(args.group_rates) if args.group_rates else [],
        plot=plot_path,
        write=not args.no_write,
    )


# ---------------------------------------------------------------------------------------------
# The system
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class System:
    settings: Settings
    processes: dict[str, ServerProcess]
    urls: tuple[str, ...]
    keyspace: str
    #: A CQL session for Cassandra's own counters (``cql_counters``).
    cql: Any = None

    def pids(self) -> dict[str, int]:
        return {name: server.pid for name, server in self.processes.items()}

    def check_alive(self) -> None:
        for name, server in self.processes.items():
            if not server.alive():
                raise BenchError(f"{name} exited during the run; its log: {server.log_path}")


@contextmanager
def keyspace_for(settings: Settings, progress: Progress) -> Iterator[str]:
    """A fresh keyspace migrated by ``imstream db migrate``; dropped on the way out."""
    name = f"bench_e2e_{uuid.uuid4().hex[:10]}"
    done = subprocess.run(
        imstream_command("db", "migrate"),
        env={**os.environ, "IM_CQL__KEYSPACE": name},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"`imstream db migrate` failed:\n{done.stdout}{done.stderr}")
    progress.done(f"migrated keyspace {name}")
    try:
        yield name
    finally:
        cluster = cql_cluster(settings)
        try:
            cluster.connect().execute(f"DROP KEYSPACE IF EXISTS {name}", timeout=120)
            progress.done(f"dropped keyspace {name}")
        finally:
            cluster.shutdown()


@contextmanager
def running_system(
    settings: Settings, keyspace: str, log_dir: Path, progress: Progress, *, sink_nice: int
) -> Iterator[System]:
    common = {
        **os.environ,
        "IM_KAFKA__TOPIC_PREFIX": settings.kafka.topic_prefix,
        "IM_CQL__KEYSPACE": keyspace,
        "IM_CLICKHOUSE__CHDB_PATH": str(log_dir / "chdb"),
        "IM_SINKS__ANALYTICS_PORT": str(free_port()),
        "IM_STREAMS__INSTANCE_ID": f"bench-e2e-{os.getpid()}",
        # Its totals once a second: transactions per second, read back from its log.
        "IM_STREAMS__PROGRESS_SECONDS": str(WORKER_PROGRESS_SECONDS),
        # Synthetic users, created right after they connect: not held back for the
        # known-users record of their first sign-in (docs/streams.md "Admission").
        "IM_STREAMS__MEMBER_ADMISSION": "open",
        # The benchmark's users send far above a person's rate; the default limit would cap it.
        "IM_INGRESS__RATE_LIMIT_PER_SECOND": "1000000",
        "IM_INGRESS__RATE_LIMIT_BURST": "1000000",
    }
    ports = [free_port(), free_port()]
    specs: list[tuple[str, list[str], dict[str, str], int]] = [
        ("stream-worker", ["run", "stream-worker"], {}, 0),
        ("cql-sink", ["run", "cql-sink"], {}, 0),
        ("clickhouse-sink", ["run", "clickhouse-sink"], {}, 0),
        *(
            (
                f"ingress-{index + 1}",
                ["run", "ingress"],
                {
                    "IM_INGRESS__HOST": LOOPBACK,
                    "IM_INGRESS__PORT": str(port),
                    "IM_INGRESS__INTERNAL_PORT": str(free_port()),
                    "IM_INGRESS__NODE_ID": f"bench-{os.getpid()}-{index + 1}",
                },
                port,
            )
            for index, port in enumerate(ports)
        ),
    ]
    with ExitStack() as stack:
        processes: dict[str, ServerProcess] = {}
        for name, argv, env, port in specs:
            # Ready as `imstream up` waits for it: once the process announced it.
            server = ServerProcess(
                name,
                imstream_command(*argv),
                env={**common, **env},
                port=port,
                log_path=log_dir / f"{name}.log",
                ready_file=log_dir / f"{name}.ready",
            )
            stack.enter_context(server)
            progress.update(f"starting {name} …")
            server.start(timeout=120)
            if name in BY_NAME and BY_NAME[name].sink and sink_nice:
                # As `imstream up` runs them: the delivery path gets the CPU first.
                lower_priority(server.pid, sink_nice)
            processes[name] = server
            progress.done(f"{name} is ready (pid {server.pid}, log {server.log_path})")
        urls = tuple(f"ws://{LOOPBACK}:{port}/v1/ws" for port in ports)
        cluster = cql_cluster(settings)
        stack.callback(cluster.shutdown)
        yield System(settings, processes, urls, keyspace, cluster.connect())
        progress.done("stopping the system …")


# ---------------------------------------------------------------------------------------------
# Raw baseline: produce → consume round trip
# ---------------------------------------------------------------------------------------------


def raw_round_trip(
    settings: Settings,
    payload_bytes: int,
    rates: Sequence[float],
    seconds: float,
    progress: Progress,
) -> dict[str, Any]:
    """Produce at each rate (and then as fast as possible) while a consumer in this process
    reads the records back; latency is from ``produce()`` to the consumer having the record."""
    topic = f"{settings.kafka.topic_prefix}raw.round-trip"
    admin = AdminClient(kafka_config(settings))
    admin.create_topics([NewTopic(topic, num_partitions=6, replication_factor=1)])[topic].result(30)
    stamp = 8  # the payload starts with the send instant, in nanoseconds
    filler = b"x" * max(0, payload_bytes - stamp)
    consumer = Consumer(
        kafka_consumer_config(
            settings,
            f"bench-raw-{uuid.uuid4().hex[:8]}",
            **{
                "auto.offset.reset": "latest",
                "fetch.wait.max.ms": 100,
            },
        )
    )
    latencies: list[float] = []
    received = 0
    stop = threading.Event()
    assigned = threading.Event()

    def on_assign(_consumer: Consumer, _partitions: list[Any]) -> None:
        assigned.set()

    def consume() -> None:
        nonlocal received
        while not stop.is_set():
            message = consumer.poll(0.1)
            if message is None or message.error() is not None:
                continue
            value = message.value() or b""
            latencies.append(time.monotonic_ns() / 1e9 - int.from_bytes(value[:stamp]) / 1e9)
            received += 1

    consumer.subscribe([topic], on_assign=on_assign)
    reader = threading.Thread(target=consume, name="raw-consumer", daemon=True)
    reader.start()
    producer = Producer(durable_producer_config(settings))
    failed = 0

    def delivered(error: KafkaError | None, _message: Message) -> None:
        nonlocal failed
        if error is not None:
            failed += 1

    def produce_one(index: int) -> None:
        value = time.monotonic_ns().to_bytes(stamp) + filler
        while True:
            try:
                producer.produce(
                    topic, value=value, key=str(index % 400).encode(), on_delivery=delivered
                )
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)

    try:
        if not assigned.wait(30):
            raise BenchError("the raw consumer got no partitions within 30 s")
        time.sleep(1.0)  # the consumer's position is resolved before the first record
        paced: list[dict[str, Any]] = []
        for rate in rates:
            latencies.clear()
            paced.append(_paced_round_trips(rate, seconds, produce_one, producer, latencies))
            progress.done(
                f"raw round trip at {rate:,.0f}/s: p50 {paced[-1]['latency_ms']['p50']} ms, "
                f"p99 {paced[-1]['latency_ms']['p99']} ms"
            )
        # As fast as one producer and one consumer go.
        latencies.clear()
        flat_out = _flat_out_round_trips(seconds, produce_one, producer, lambda: received)
        progress.done(
            f"raw round trip flat out: {flat_out['round_trips_per_second']:,.0f}/s "
            f"({flat_out['sent']:,} records)"
        )
        return {
            "payload_bytes": payload_bytes,
            "failed": failed,
            "paced": paced,
            "flat_out": flat_out,
        }
    finally:
        stop.set()
        reader.join(5)
        consumer.close()
        admin.delete_topics([topic])


def _paced_round_trips(
    rate: float,
    seconds: float,
    produce_one: Callable[[int], None],
    producer: Producer,
    latencies: list[float],
) -> dict[str, Any]:
    """``rate`` records a second for ``seconds``, then up to 10 s for the consumer to read
    them back; ``latencies`` fills as it does."""
    start = time.monotonic()
    total = int(rate * seconds)
    for index in range(total):
        delay = start + index / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        produce_one(index)
    producer.flush(30)
    deadline = time.monotonic() + 10
    while len(latencies) < total and time.monotonic() < deadline:
        time.sleep(0.05)
    return {
        "rate": rate,
        "sent": total,
        "received": len(latencies),
        "latency_ms": percentiles_ms(latencies),
    }


def _flat_out_round_trips(
    seconds: float,
    produce_one: Callable[[int], None],
    producer: Producer,
    received: Callable[[], int],
) -> dict[str, Any]:
    """Records as fast as the producer takes them for ``seconds``, then up to 30 s for the
    consumer (whose count ``received`` reads) to catch up."""
    before = received()
    total = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        for _ in range(1000):
            produce_one(total)
            total += 1
    producer.flush(60)
    deadline = time.monotonic() + 30
    while received() - before < total and time.monotonic() < deadline:
        time.sleep(0.05)
    elapsed = time.monotonic() - start
    return {
        "sent": total,
        "received": received() - before,
        "seconds": round(elapsed, 2),
        "round_trips_per_second": round((received() - before) / elapsed, 1),
    }


# ---------------------------------------------------------------------------------------------
# The user shape: more conversations per user, with unread backlogs
# ---------------------------------------------------------------------------------------------


def shaping_events(users: Sequence[str], shape: int, backlog: int, text: str) -> Iterator[Event]:
    """Each user's ``shape - 1`` further direct conversations, each created by a synthetic peer of
    its own who then sends ``backlog`` messages the user does not read: first every creation,
    then the messages round robin over the conversations (as a backlog piles up over time).
    Their client message ids do not start with the run tag, so the load generators skip them."""
    body = TextBody(text=text)
    conversations: list[tuple[str, str]] = []
    for user in users:
        for index in range(1, shape):
            peer = f"{user}-s{index}"
            conversation_id = direct_conversation_id(TENANT, user, peer)
            conversations.append((peer, conversation_id))
            yield conversation_created(
                TENANT, conversation_id, [peer, user], ConversationKind.DIRECT
            )
    for number in range(backlog):
        client_msg_id = f"backlog-{number}"
        for peer, conversation_id in conversations:
            yield text_message(
                TENANT, peer, conversation_id, client_msg_id, body, device_id=f"{peer}-d"
            )


def apply_shape(
    system: System,
    catalog: TopicCatalog,
    users: Sequence[str],
    options: Options,
    progress: Progress,
) -> dict[str, Any]:
    """Produce the shape's commands onto the conversation input topic; return once the stream
    worker applied them all (consumer lag 0) and the sinks caught up."""
    settings = system.settings
    added = len(users) * (options.shape - 1)
    progress.done(
        f"shaping: {len(users)} load users into {options.shape - 1} more direct conversations "
        f"each ({added:,}, one synthetic peer each) with {options.backlog} unread messages in "
        f"each: {options.unread_per_user:,} unread per user …"
    )
    started = time.monotonic()
    text = body_text(options.body_bytes)
    records = fill(
        settings, catalog, shaping_events(users, options.shape, options.backlog, text), progress
    )
    produced = time.monotonic() - started
    worker_done: float | None = None
    while True:
        system.check_alive()
        lag = worker_lag(settings)
        if lag == 0 and worker_done is None:
            worker_done = time.monotonic() - started
        lags = running_sink_lags(system)
        if lag == 0 and sinks_settled(lags):
            break
        elapsed = time.monotonic() - started
        if elapsed > options.shape_timeout:
            raise BenchError(
                f"the shape was not applied within {options.shape_timeout:.0f} s: the stream "
                f"worker is {lag} records behind, the sinks {lags}"
            )
        progress.update(
            f"shaping: {elapsed:,.0f} s, stream worker {lag} records behind, sinks {lags}"
        )
        time.sleep(2.0)
    seconds = time.monotonic() - started
    result = {
        "conversations_per_user": options.shape,
        "backlog_per_conversation": options.backlog,
        "unread_per_user": options.unread_per_user,
        "load_users": len(users),
        "conversations_added": added,
        "messages_added": added * options.backlog,
        "records_produced": records,
        "produce_seconds": round(produced, 1),
        "stream_worker_caught_up_seconds": round(worker_done or seconds, 1),
        "sinks_caught_up_seconds": round(seconds, 1),
    }
    progress.done(
        f"shaped: {records:,} records produced in {produced:,.0f} s; the stream worker had applied "
        f"them after {result['stream_worker_caught_up_seconds']:,.0f} s, the sinks after "
        f"{seconds:,.0f} s"
    )
    return result


def wait_clients_synced(
    system: System, load: Load, timeout: float, progress: Progress
) -> dict[str, Any]:
    """Wait until the load users' clients have synced their backlog (they do on connecting): the
    ingress nodes and the load generators idle again. Past ``timeout`` the run goes on, noted."""
    pids = {name: pid for name, pid in system.pids().items() if name.startswith("ingress-")}
    meter = CpuMeter({**pids, **load.pids()})
    started = time.monotonic()
    previous = meter.snapshot()
    idle = 0
    busy = 0.0
    while idle < CLIENTS_IDLE_SAMPLES and time.monotonic() - started < timeout:
        time.sleep(1.0)
        current = meter.snapshot()
        busy = sum(CpuMeter.percent(previous, current)["processes_pct_of_one_core"].values())
        previous = current
        idle = idle + 1 if busy < CLIENTS_IDLE_PCT else 0
        system.check_alive()
        progress.update(
            f"clients syncing their backlog: {time.monotonic() - started:,.0f} s, ingress and "
            f"load generators at {busy:.0f}% of one core"
        )
    seconds = time.monotonic() - started
    synced = idle >= CLIENTS_IDLE_SAMPLES
    progress.done(
        f"the clients synced their backlog in {seconds:,.0f} s (ingress and load generators now "
        f"at {busy:.0f}% of one core)"
        if synced
        else f"WARNING: the ingress nodes and load generators were still at {busy:.0f}% of one "
        f"core after {seconds:,.0f} s: the clients may still be syncing their backlog"
    )
    return {
        "clients_synced_seconds": round(seconds, 1) if synced else None,
        "clients_idle_pct_of_one_core": round(busy, 1),
    }


# ---------------------------------------------------------------------------------------------
# The load
# ---------------------------------------------------------------------------------------------


def run_tag() -> str:
    """The prefix of this run's user ids and client message ids."""
    return f"e2e{os.getpid()}x{int(time.time())}"


def worker_pairs(tag: str, worker: int, workers: int, pairs: int) -> tuple[tuple[str, str], ...]:
    """The 1:1 pairs load generator ``worker`` (of ``workers``) drives, as their users' ids."""
    return tuple(
        (f"{tag}-w{worker}-p{index}a", f"{tag}-w{worker}-p{index}b")
        for index in range(worker, pairs, workers)
    )


def pair_users(tag: str, options: Options) -> list[str]:
    """Every user of every pair, over all load generators."""
    workers = max(1, options.client_processes)
    return [
        user
        for worker in range(workers)
        for pair in worker_pairs(tag, worker, workers, options.pairs)
        for user in pair
    ]


class Load:
    """The load generator processes and their conversations."""

    def __init__(self, system: System, options: Options, progress: Progress, tag: str) -> None:
        self.options = options
        self.progress = progress
        context = multiprocessing.get_context("spawn")
        workers = max(1, options.client_processes)
        self.counters = context.Array("q", workers, lock=False)
        self.pipes: list[Connection] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        settings = system.settings
        credentials = Credentials.of(settings)
        self.catalog = topic_catalog(settings)
        self.admin = AdminClient(kafka_config(settings))
        text = body_text(options.body_bytes)
        for worker in range(workers):
            pairs = worker_pairs(tag, worker, workers, options.pairs)
            groups = tuple(
                tuple(f"{tag}-w{worker}-g{index}m{member}" for member in range(options.group_size))
                for index in range(worker, options.groups, workers)
            )
            plan = WorkerPlan(
                worker=worker,
                urls=system.urls,
                tenant_id=TENANT,
                pairs=pairs,
                groups=groups,
                credentials=credentials,
                body_text=text,
                run_tag=tag,
            )
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=run_worker, args=(plan, child_end, self.counters), name=f"e2e-load-{worker}"
            )
            process.start()
            child_end.close()
            self.pipes.append(parent_end)
            self.processes.append(process)
        users = 0
        for pipe in self.pipes:
            message = self._receive(pipe, 300, "its connections")
            users += message[1]["users"]
        progress.done(
            f"{users} users connected over {len(system.urls)} ingress nodes; "
            f"{options.pairs} 1:1 conversations, {options.groups} groups of {options.group_size}"
        )

    def _receive(self, pipe: Connection, timeout: float, what: str) -> tuple[Any, ...]:
        if not pipe.poll(timeout):
            raise BenchError(f"a load generator did not report {what} within {timeout:.0f} s")
        message: tuple[Any, ...] = pipe.recv()
        if message[0] == "failed":
            raise BenchError(f"a load generator failed:\n{message[1]}")
        return message

    def pids(self) -> dict[str, int]:
        return {f"load generator {i}": p.pid for i, p in enumerate(self.processes) if p.pid}

    @staticmethod
    def warm_up_options(options: Options) -> Options:
        return replace(options, warmup=0.0, duration=options.warm_up_seconds, drain=10.0)

    def run_phase(self, index: int, kind: str, rate: float, system: System) -> dict[str, Any]:
        options = self.options
        start_at = time.monotonic() + 0.5
        measure_from = start_at + options.warmup
        measure_until = measure_from + options.duration
        workers = len(self.pipes)
        for pipe in self.pipes:
            pipe.send(
                (
                    "phase",
                    Phase(
                        index=index,
                        kind=kind,
                        rate=rate / workers,
                        start_at=start_at,
                        measure_from=measure_from,
                        measure_until=measure_until,
                        drain_until=measure_until + options.drain,
                    ),
                )
            )
        meter = CpuMeter(
            {
                **system.pids(),
                **stack_pids(system.settings),
                **self.pids(),
                "benchmark": os.getpid(),
            }
        )
        time.sleep(max(0.0, measure_from - time.monotonic()))
        before = meter.snapshot()
        wall_from = time.time()
        delivered_before = sum(self.counters)
        offsets_before = end_offsets(self.admin, self.catalog)
        cql_before = cql_counters(system)
        label = f"{kind} at {rate:,.0f}/s"
        while (now := time.monotonic()) < measure_until:
            done = sum(self.counters) - delivered_before
            self.progress.update(
                f"{label}: {now - measure_from:4.1f}/{options.duration:.0f} s, {done:,} delivered "
                f"({done / max(now - measure_from, 1e-3):,.0f}/s)"
            )
            time.sleep(min(0.5, max(0.0, measure_until - now)))
        after = meter.snapshot()
        wall_until = time.time()
        watch = CatchUpWatch(system, time.monotonic() + options.sink_catch_up)
        offsets_after = end_offsets(self.admin, self.catalog)
        lag_at_end = sink_lags(system.settings)
        self.progress.update(f"{label}: waiting for the last deliveries …")
        results: list[PhaseResult] = [
            self._receive(pipe, options.drain + 60, "its phase results")[1] for pipe in self.pipes
        ]
        system.check_alive()
        summary = summarise(kind, rate, options, results, CpuMeter.percent(before, after))
        self.progress.update(f"{label}: waiting for the sinks to catch up …")
        caught_up = watch.result()
        summary["sinks"] = {
            "lag_records_at_window_end": lag_at_end,
            "caught_up_seconds_after_window": caught_up,
        }
        if caught_up is None or caught_up > SINK_CATCH_UP_BAR_SECONDS:
            summary["sustained"] = False
            summary["why_not_sustained"].append(
                f"sinks caught up {'not at all' if caught_up is None else f'after {caught_up} s'}"
                f" (bar: {SINK_CATCH_UP_BAR_SECONDS:g} s after the window)"
            )
        messages = summary["delivered_messages_in_window"]
        # Counted once the sinks wrote the window's messages (and a little of the ramp before).
        summary["cql"] = cql_per_message(cql_before, cql_counters(system), messages)
        summary["stream_worker"] = worker_transactions(
            system.processes["stream-worker"].log_path, wall_from, wall_until
        )
        # Read back once the sinks are done, so that the reading competes with nothing measured.
        self.progress.update(f"{label}: reading back what the window wrote to Kafka …")
        summary["kafka"] = kafka_per_message(
            system.settings, offsets_before, offsets_after, summary["delivered_messages_in_window"]
        )
        return summary

    def close(self) -> None:
        stop_workers(self.pipes, self.processes)


def end_offsets(admin: AdminClient, catalog: TopicCatalog) -> dict[tuple[str, int], int]:
    """The end offset of every partition of the catalog's topics, in one request."""
    request = {
        TopicPartition(topic.name, partition): LATEST
        for topic in catalog
        for partition in range(topic.partitions)
    }
    futures = admin.list_offsets(
        request, isolation_level=IsolationLevel.READ_UNCOMMITTED, request_timeout=30
    )
    return {(tp.topic, tp.partition): future.result().offset for tp, future in futures.items()}


def kafka_written(
    settings: Settings, before: dict[tuple[str, int], int], after: dict[tuple[str, int], int]
) -> dict[str, dict[str, int]]:
    """Records and bytes (keys and values) committed to each topic between two sets of end
    offsets, read back read-committed (aborted records and transaction markers do not count)."""
    ranges = {tp: (before.get(tp, 0), end) for tp, end in after.items() if end > before.get(tp, 0)}
    totals: dict[str, dict[str, int]] = {}
    if not ranges:
        return totals
    consumer = Consumer(
        kafka_config(
            settings,
            **{
                "group.id": f"bench-e2e-bytes-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            },
        )
    )
    consumer.assign([TopicPartition(t, p, start) for (t, p), (start, _) in ranges.items()])
    pending = set(ranges)

    def finish(done: set[tuple[str, int]]) -> None:
        pending.difference_update(done)
        if done:
            consumer.pause([TopicPartition(t, p) for t, p in done])

    # A partition whose range ends on a transaction marker never yields its last offset: it is
    # done once the consumer's position passed the end, or the range stays idle for 3 s.
    last = time.monotonic()
    try:
        while pending and time.monotonic() - last < 3.0:
            done: set[tuple[str, int]] = set()
            for message in consumer.consume(10_000, timeout=0.5):
                if message.error() is not None:
                    continue
                tp = (message.topic() or "", message.partition() or 0)
                offset = message.offset() or 0
                end = ranges[tp][1]
                if offset >= end:
                    done.add(tp)
                    continue
                last = time.monotonic()
                entry = totals.setdefault(tp[0], {"records": 0, "bytes": 0})
                entry["records"] += 1
                entry["bytes"] += len(message.key() or b"") + len(message.value() or b"")
                if offset + 1 >= end:
                    done.add(tp)
            positions = consumer.position([TopicPartition(t, p) for t, p in pending - done])
            done.update(
                (tp.topic, tp.partition)
                for tp in positions
                if tp.offset >= ranges[(tp.topic, tp.partition)][1]
            )
            finish(done)
    finally:
        consumer.close()
    return totals


def kafka_per_message(
    settings: Settings,
    before: dict[tuple[str, int], int],
    after: dict[tuple[str, int], int],
    messages: float,
) -> dict[str, Any]:
    """What a window wrote to Kafka, in all and per message delivered in it."""
    topics = kafka_written(settings, before, after)
    records = sum(entry["records"] for entry in topics.values())
    size = sum(entry["bytes"] for entry in topics.values())
    prefix = settings.kafka.topic_prefix
    return {
        "records_per_delivered_message": round(records / messages, 2) if messages else None,
        "bytes_per_delivered_message": round(size / messages) if messages else None,
        "records": records,
        "bytes": size,
        "topics": {name.removeprefix(prefix): entry for name, entry in sorted(topics.items())},
    }


def cql_counters(system: System) -> dict[str, int]:
    """Cassandra's own counts so far: the writes and reads it coordinated on the run's keyspace
    (one per table a request touched: a batch of one partition counts once per table) and the
    native-protocol requests of every client connection."""
    session = system.cql
    counts = {"writes": 0, "reads": 0, "requests": 0}
    for kind, view in (
        ("writes", "coordinator_write_latency"),
        ("reads", "coordinator_read_latency"),
    ):
        rows = session.execute(
            f"SELECT count FROM system_views.{view} WHERE keyspace_name = %s", (system.keyspace,)
        )
        counts[kind] = sum(row.count for row in rows)
    counts["requests"] = sum(
        row.request_count or 0
        for row in session.execute("SELECT request_count FROM system_views.clients")
    )
    return counts


def cql_per_message(
    before: dict[str, int], after: dict[str, int], messages: float
) -> dict[str, Any]:
    done = {kind: after[kind] - before[kind] for kind in before}
    return {
        **{
            f"{kind}_per_delivered_message": round(n / messages, 2) if messages else None
            for kind, n in done.items()
        },
        **done,
    }


def worker_totals(log_path: Path) -> list[tuple[float, int, int, int, int]]:
    """The stream worker's progress lines: (wall time, transactions, batches, shared batches,
    interval ms) so far, oldest first."""
    found = []
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        match = WORKER_TOTALS.match(line)
        if match is not None:
            stamp = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            found.append((stamp, int(match[2]), int(match[3]), int(match[4]), int(match[5])))
    return found


def worker_transactions(log_path: Path, start: float, end: float) -> dict[str, Any]:
    """Transactions per second of the stream worker between two wall-clock times (from its
    totals logged every ``WORKER_PROGRESS_SECONDS``), and the batches per transaction."""
    lines = worker_totals(log_path)
    first = [entry for entry in lines if entry[0] <= start]
    last = [entry for entry in lines if entry[0] <= end]
    if not first or not last or last[-1][0] <= first[-1][0]:
        return {"transactions_per_second": None}
    (t0, n0, b0, s0, _), (t1, n1, b1, s1, interval) = first[-1], last[-1]
    transactions = n1 - n0
    return {
        "transactions_per_second": round(transactions / (t1 - t0), 1),
        "batches_per_transaction": round((b1 - b0) / transactions, 2) if transactions else None,
        "shared_batches": s1 - s0,
        "interval_ms_at_end": interval,
    }


class CatchUpWatch:
    """When every sink first caught up after the window's end: sampled from the end on, in the
    background, while the load generators drain."""

    def __init__(self, system: System, until: float) -> None:
        self.seconds: float | None = None
        self._system = system
        self._from = time.monotonic()
        self._until = until
        self._thread = threading.Thread(target=self._watch, name="catch-up", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while time.monotonic() < self._until:
            if sinks_settled(running_sink_lags(self._system)):
                self.seconds = round(time.monotonic() - self._from, 1)
                return
            time.sleep(0.25)

    def result(self) -> float | None:
        self._thread.join()
        return self.seconds


def measure_idle(
    system: System, load: Load, seconds: float, progress: Progress
) -> dict[str, Any] | None:
    """The whole system with every client connected and nothing sent, once the sinks are
    done: the machine's busy share (all cores) and each process's share of one core."""
    if seconds <= 0:
        return None
    deadline = time.monotonic() + 120
    while not sinks_settled(running_sink_lags(system)) and time.monotonic() < deadline:
        time.sleep(1.0)
    progress.update(f"idle: {seconds:.0f} s with every client connected …")
    meter = CpuMeter(
        {**system.pids(), **stack_pids(system.settings), **load.pids(), "benchmark": os.getpid()}
    )
    before = meter.snapshot()
    time.sleep(seconds)
    cpu = CpuMeter.percent(before, meter.snapshot())
    progress.done(
        f"idle, every client connected: the machine {cpu['machine_busy_pct_of_all_cores']}% "
        f"busy; per process (% of one core) {cpu['processes_pct_of_one_core']}"
    )
    return {"seconds": seconds, **cpu}


def running_sink_lags(system: System) -> dict[str, int | None]:
    """``sink_lags`` of the sinks this run started (the push sink does not run here: its lag
    only grows if the worker writes push jobs, as it does for users who are offline)."""
    lags = sink_lags(system.settings)
    return {kind: lag for kind, lag in lags.items() if kind in system.processes}


def sinks_settled(lags: dict[str, int | None]) -> bool:
    """Every sink is at most ``SINK_LAG_SETTLED`` records behind."""
    return all(lag is not None and lag <= SINK_LAG_SETTLED for lag in lags.values())


def worker_lag(settings: Settings) -> int | None:
    """Records the stream worker's consumer groups have still to commit, over their inputs."""
    values = [
        group_lag(settings, group, topics)
        for group, topics in consumer_groups(settings)["stream-worker"].items()
    ]
    return None if None in values else sum(v for v in values if v is not None)


def sink_lags(settings: Settings) -> dict[str, int | None]:
    """Records each sink's consumer group has still to commit, over every topic it reads."""
    lags: dict[str, int | None] = {}
    for kind, groups in consumer_groups(settings).items():
        if BY_NAME[kind].sink:
            values = [group_lag(settings, group, topics) for group, topics in groups.items()]
            lags[kind] = None if None in values else sum(v for v in values if v is not None)
    return lags


def stack_pids(settings: Settings) -> dict[str, int]:
    found = {name: stack_server_pid(settings, name) for name in ("kafka", "cassandra")}
    return {name: pid for name, pid in found.items() if pid is not None}


def summarise(
    kind: str,
    rate: float,
    options: Options,
    results: Sequence[PhaseResult],
    cpu: dict[str, Any],
) -> dict[str, Any]:
    duration = options.duration

    def total(name: str) -> int:
        return sum(getattr(result, name) for result in results)

    deliver = [value for result in results for value in result.deliver_s]
    accept = [value for result in results for value in result.accept_s]
    lag = [value for result in results for value in result.schedule_lag_s]
    errors: dict[str, int] = {}
    for result in results:
        for code, count in result.errors.items():
            errors[code] = errors.get(code, 0) + count
    lost = sum(result.lost for result in results)
    fan_out = 1 if kind == "direct" else options.group_size - 1
    delivered_messages = total("delivered_during_window") / fan_out
    delivered_rate = delivered_messages / duration
    latency = percentiles_ms(deliver)
    lag_ms = percentiles_ms(lag)
    reasons = []
    if delivered_rate < DELIVERED_SHARE * rate:
        reasons.append(f"delivered {delivered_rate:,.0f}/s of {rate:,.0f}/s")
    p99 = latency["p99"]
    if p99 is None or p99 > options.p99_bar_ms:
        reasons.append(f"p99 {p99} ms > {options.p99_bar_ms:g} ms")
    if lost:
        reasons.append(f"{lost} deliveries missing after the drain")
    if total("duplicates"):
        reasons.append(f"{total('duplicates')} duplicates")
    if errors:
        reasons.append(f"errors {errors}")
    generator_bound = (lag_ms["p99"] or 0) > GENERATOR_LAG_LIMIT_MS
    if generator_bound:
        reasons.append(f"generator fell behind (lag p99 {lag_ms['p99']} ms)")
    processes = cpu["processes_pct_of_one_core"]
    by_kind: dict[str, float] = {}
    for name, share in processes.items():
        kind_name = "ingress" if name.startswith("ingress-") else name
        kind_name = "load generators" if name.startswith("load generator") else kind_name
        by_kind[kind_name] = round(by_kind.get(kind_name, 0.0) + share, 1)
    cpu_per_message = {
        name: round(share / 100 * duration / delivered_messages * 1e6)
        for name, share in by_kind.items()
        if delivered_messages
    }
    return {
        "kind": kind,
        "target_per_second": rate,
        "shape": options.shape,
        "backlog": options.backlog,
        "unread_per_user": options.unread_per_user,
        "fan_out": fan_out,
        "accepted_per_second": round(total("accepted_in_window") / duration, 1),
        "delivered_messages_per_second": round(delivered_rate, 1),
        "deliveries_per_second": round(total("delivered_during_window") / duration, 1),
        "delivered_messages_in_window": round(delivered_messages, 1),
        "send_to_deliver_ms": latency,
        "send_to_accepted_ms": percentiles_ms(accept),
        "generator_lag_ms": lag_ms,
        "sent": total("scheduled"),
        "accepted": total("accepted_total"),
        "deliveries_expected": total("expected_total"),
        "deliveries": total("delivered_total"),
        "delivered_live": total("delivered_live"),
        "delivered_by_sync": total("delivered_by_sync"),
        # Not delivered by the end of the drain: lost, or later than the drain allows.
        "undelivered_after_drain": lost,
        "duplicates": total("duplicates"),
        "errors": errors,
        "reconnects": max((result.reconnects for result in results), default=0),
        "cpu_pct_of_one_core_by_kind": by_kind,
        "cpu_us_per_delivered_message_by_kind": cpu_per_message,
        "cpu": cpu,
        "sustained": not reasons,
        "why_not_sustained": reasons,
    }


def line(phase: dict[str, Any]) -> str:
    latency = phase["send_to_deliver_ms"]
    verdict = (
        "sustained"
        if phase["sustained"]
        else "NOT sustained: " + "; ".join(phase["why_not_sustained"])
    )
    kafka = phase["kafka"]
    cpu = sum(phase["cpu_us_per_delivered_message_by_kind"].values())
    by_kind = ", ".join(
        f"{kind} {value:,}"
        for kind, value in phase["cpu_us_per_delivered_message_by_kind"].items()
        if value
    )
    return (
        f"[shape {phase['shape']}, backlog {phase['backlog']}] "
        f"{phase['kind']} at {phase['target_per_second']:,.0f}/s: accepted "
        f"{phase['accepted_per_second']:,.0f}/s, delivered "
        f"{phase['delivered_messages_per_second']:,.0f}/s, send→deliver p50 {latency['p50']} / "
        f"p95 {latency['p95']} / p99 {latency['p99']} ms, "
        f"undelivered {phase['undelivered_after_drain']}, duplicates {phase['duplicates']}; "
        "sinks behind at the end "
        f"{phase['sinks']['lag_records_at_window_end']}, caught up after "
        f"{phase['sinks']['caught_up_seconds_after_window']} s; per delivered message "
        f"{kafka['records_per_delivered_message']} Kafka records, "
        f"{kafka['bytes_per_delivered_message']} bytes, "
        f"{phase['cql']['writes_per_delivered_message']} CQL writes, {cpu:,} CPU µs (all "
        f"processes: {by_kind}); {phase['stream_worker']['transactions_per_second']} "
        f"transactions/s — {verdict}"
    )


# ---------------------------------------------------------------------------------------------
# The plot
# ---------------------------------------------------------------------------------------------


def plot(document: dict[str, Any], path: Path, bar_ms: float) -> None:
    """Latency percentiles against the target rate, 1:1 phases, with the raw round trip."""
    import matplotlib  # noqa: PLC0415 — only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    direct = [phase for phase in document["phases"] if phase["kind"] == "direct"]
    rates = [phase["target_per_second"] for phase in direct]
    figure, axes = plt.subplots(figsize=(8, 5), dpi=110)
    for key, style in (("p50", "o-"), ("p95", "s-"), ("p99", "^-")):
        axes.plot(
            rates,
            [phase["send_to_deliver_ms"][key] for phase in direct],
            style,
            label=f"imstream send → deliver {key}",
        )
    raw = document["raw_baseline"]["paced"]
    axes.plot(
        [run["rate"] for run in raw],
        [run["latency_ms"]["p99"] for run in raw],
        "x--",
        color="grey",
        label="raw Kafka produce → consume p99",
    )
    axes.axhline(bar_ms, color="red", linewidth=1, linestyle=":", label=f"bar: p99 {bar_ms:g} ms")
    axes.set_yscale("log")
    axes.set_xlabel("target rate, 1:1 messages/s (whole system)")
    axes.set_ylabel("latency, ms (log scale)")
    machine = document["machine"]
    shape = document["shape"]
    shaped = (
        f", {shape['conversations_per_user']} conversations and "
        f"{shape['unread_per_user']} unread per user"
        if shape["conversations_per_user"] > 1
        else ""
    )
    axes.set_title(
        f"imstream end to end on {machine.get('cpu_count')} cores "
        f"(Kafka, Cassandra, all processes, load generators), {document['started_at'][:10]}"
        f"{shaped}",
        fontsize=9,
    )
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------


def results_section(options: Options) -> str:
    """``e2e`` for the default shape; other shapes each in a section of their own."""
    if options.shape == 1:
        return "e2e"
    return f"e2e_shape_{options.shape}_backlog_{options.backlog}"


def add_raw_ratios(phases: list[dict[str, Any]], raw: dict[str, Any]) -> None:
    """Each phase's p99 as a multiple of the raw round trip's at the same rate, where one ran."""
    raw_by_rate = {run["rate"]: run for run in raw["paced"]}
    for phase in phases:
        raw_run = raw_by_rate.get(phase["target_per_second"])
        if raw_run and raw_run["latency_ms"]["p99"] and phase["send_to_deliver_ms"]["p99"]:
            phase["p99_ratio_to_raw_round_trip"] = round(
                phase["send_to_deliver_ms"]["p99"] / raw_run["latency_ms"]["p99"], 1
            )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    progress, base = start_run()
    facts = machine_facts(base)
    started = now_iso()
    settings = run_settings(base, "e2e")
    payload = len(built_record(options.body_bytes).value)
    log_dir = Path(tempfile.mkdtemp(prefix="imstream-bench-e2e-"))
    progress.done(f"logs: {log_dir}")
    phases: list[dict[str, Any]] = []
    shaping: dict[str, Any] = {
        "conversations_per_user": options.shape,
        "backlog_per_conversation": options.backlog,
        "unread_per_user": options.unread_per_user,
    }
    with ExitStack() as stack:
        stack.enter_context(local_stack(base, progress))
        catalog = stack.enter_context(bench_topics(settings, progress))
        keyspace = stack.enter_context(keyspace_for(settings, progress))
        system = stack.enter_context(
            running_system(settings, keyspace, log_dir, progress, sink_nice=options.sink_nice)
        )
        raw = raw_round_trip(settings, payload, options.rates, options.raw_seconds, progress)
        tag = run_tag()
        if options.shape > 1:
            # Before the users connect: their backlog piled up while they were away.
            started_shaping = time.monotonic()
            shaping = apply_shape(system, catalog, pair_users(tag, options), options, progress)
        load = Load(system, options, progress, tag)
        stack.callback(load.close)
        if options.shape > 1:
            shaping |= wait_clients_synced(system, load, options.shape_timeout, progress)
            shaping["seconds"] = round(time.monotonic() - started_shaping, 1)
        if options.warm_up_seconds:
            # JVMs fresh from start-up (JIT, caches), first connections, first compactions:
            # a phase run and thrown away, so the measured ones see a system in its steady state.
            warm = Load.warm_up_options(options)
            progress.done(
                f"warming up: {warm.duration:.0f} s of 1:1 traffic at {WARM_UP_RATE:.0f}/s, "
                "not reported"
            )
            load.options = warm
            load.run_phase(999, "direct", WARM_UP_RATE, system)
            load.options = options
        idle = measure_idle(system, load, options.idle_seconds, progress)
        failures = 0
        for rate in options.rates:
            phase = load.run_phase(len(phases), "direct", rate, system)
            phases.append(phase)
            progress.done(line(phase))
            failures += not phase["sustained"]
            if options.stop_after_failures and failures >= options.stop_after_failures:
                break
        for rate in options.group_rates:
            phase = load.run_phase(len(phases), "group", rate, system)
            phases.append(phase)
            progress.done(line(phase))
    direct = [phase for phase in phases if phase["kind"] == "direct"]
    sustained = [phase["target_per_second"] for phase in direct if phase["sustained"]]
    best = max(sustained, default=None)
    add_raw_ratios(phases, raw)
    document = {
        "started_at": started,
        "finished_at": now_iso(),
        "machine": facts,
        "parameters": options_document(options),
        "raw_baseline": raw,
        "shape": shaping,
        "idle": idle,
        "phases": phases,
        "highest_sustained_direct_per_second": best,
        "highest_sustained_ratio_to_raw_flat_out": round(
            best / raw["flat_out"]["round_trips_per_second"], 4
        )
        if best
        else None,
    }
    progress.done(
        f"highest 1:1 rate sustained with p99 ≤ {options.p99_bar_ms:g} ms: {best:,.0f} messages/s"
        if best
        else "no 1:1 rate was sustained"
    )
    if options.write:
        options.output.parent.mkdir(parents=True, exist_ok=True)
        write_results(results_section(options), document, options.output)
        progress.done(f"wrote {options.output} (section {results_section(options)})")
        try:
            plot(document, options.plot, options.p99_bar_ms)
            progress.done(f"wrote {options.plot}")
        except ImportError:
            progress.done("matplotlib is not installed (pip install -e '.[bench]'); no plot")
    return 0


if __name__ == "__main__":
    run_main(main)
