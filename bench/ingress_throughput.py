"""Frames per second through one ingress process: ``send`` → ``accepted`` round trips.

For each connection count N, N WebSocket connections (spread over ``--client-processes`` load
generator processes, never the server's) each keep ``--window`` sends outstanding for
``--warmup`` + ``--duration`` seconds; accepted/s and the send→accepted latency are measured over
the last ``--duration`` seconds. In the same run:

- **raw**: a confluent-kafka produce loop in this process with the gateway's producer settings
  (idempotent, ``acks=all``, same ``linger.ms``), the same record and topic, and N x window records
  in flight — the Kafka round trip without the gateway. The ratio ingress/raw is reported.
- **bare echo**: the same load against bench/bare_ws.py (FastAPI + uvicorn + wsproto answering
  each frame at once, no Kafka): the ceiling the WebSocket stack and this load generator allow.
- **profile**: one more ingress run with py-spy sampling the server, summarised by area.

Everything listens on 127.0.0.1; topics are created under a prefix of this run and deleted at
the end; every process started here is stopped. Results: docs/bench/ingress.json, section
``throughput``.

    python -m bench.ingress_throughput                       # N = 1, 10, 100, 500
    python -m bench.ingress_throughput --repeat 3            # as recorded in docs/bench/
    python -m bench.ingress_throughput --connections 1,10 --duration 5 --no-write
"""

from __future__ import annotations

import multiprocessing
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from bench import profile
from bench.common import (
    BENCH_TENANT,
    LOOPBACK,
    RESULTS_PATH,
    BenchError,
    CpuMeter,
    Progress,
    bench_topics,
    ingress_server,
    interrupt_on_sigterm,
    kafka_broker_pid,
    machine_facts,
    now_iso,
    percentiles_ms,
    raise_open_file_limit,
    run_main,
    run_settings,
    write_results,
)
from bench.harness import (
    BARE_CREDENTIALS,
    add_load_options,
    add_output_options,
    add_target_options,
    bare_ws_server,
    bench_parser,
    load_settings,
    options_from,
    parse_targets,
    results_head,
)
from bench.loadgen import Credentials, LoadPlan, LoadResult, Window, identities, run_worker
from bench.raw_produce import SampleRecord, produce_loop
from bench.shapes import text_message
from core.connections import kafka_config
from core.settings import Settings
from schemas.events import TextBody, encode_event
from schemas.topics import conversation_key

TARGETS = ("ingress", "raw", "bare")
#: Per-device rate limit for the benchmark's server: far above what one connection can send, so
#: that the gateway's capacity is measured, not the limit (which protects it from one client).
UNLIMITED_RATE = "1000000000"


@dataclass(frozen=True, slots=True)
class Options:
    connections: list[int]
    window: int
    warmup: float
    duration: float
    drain: float
    body_bytes: int
    client_processes: int
    repeat: int
    targets: tuple[str, ...]
    profile_connections: int
    ws_path: str
    output: Path | None


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = bench_parser("bench.ingress_throughput", __doc__)
    parser.add_argument(
        "--connections",
        default="1,10,100,500",
        help="comma-separated connection counts N (default: %(default)s)",
    )
    parser.add_argument(
        "--window", type=int, default=8, help="outstanding sends per connection (%(default)s)"
    )
    add_load_options(parser, warmup=3.0, duration=10.0, drain=10.0)
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per N (and per raw level); the median run is reported, every rate is kept "
        "(%(default)s)",
    )
    add_target_options(parser, TARGETS)
    parser.add_argument(
        "--profile-connections",
        type=int,
        default=100,
        help="N of the extra ingress run profiled with py-spy; 0 skips it (%(default)s)",
    )
    add_output_options(parser, RESULTS_PATH)
    args = parser.parse_args(argv)
    targets = parse_targets(parser, args.targets, TARGETS)
    connections = [int(value) for value in args.connections.split(",") if value.strip()]
    if min([*connections, args.window, args.client_processes, args.repeat], default=0) < 1:
        parser.error("connection counts, --window, --client-processes, --repeat must be >= 1")
    if args.duration <= 0 or args.warmup < 0:
        parser.error("--duration must be positive and --warmup not negative")
    return options_from(
        Options,
        args,
        connections=connections,
        targets=targets,
        output=None if args.no_write else args.output,
    )


def body_text(size: int) -> str:
    words = "the quick brown fox jumps over the lazy dog "
    return (words * (size // len(words) + 1))[:size].strip() or "x"


# ---------------------------------------------------------------------------------------------
# One load run: N connections against one server
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadTarget:
    label: str
    url: str
    server_pid: int
    other_pids: dict[str, int]


def _receive(pipe: Connection, timeout: float, what: str) -> tuple[Any, ...]:
    if not pipe.poll(timeout):
        raise BenchError(f"a load generator did not report {what} within {timeout:.0f} s")
    message: tuple[Any, ...] = pipe.recv()
    return message


def run_load(
    target: LoadTarget,
    connections: int,
    options: Options,
    credentials: Credentials,
    progress: Progress,
    *,
    run_tag: str,
    profile_output: Path | None = None,
) -> dict[str, Any]:
    """Drive ``connections`` connections against ``target`` once; return the measurement."""
    context = multiprocessing.get_context("spawn")
    workers = min(options.client_processes, connections)
    shares = [
        connections // workers + (1 if i < connections % workers else 0) for i in range(workers)
    ]
    counters = context.Array("q", workers, lock=False)
    processes: list[multiprocessing.process.BaseProcess] = []
    pipes: list[Connection] = []
    first = 0
    text = body_text(options.body_bytes)
    try:
        for worker, share in enumerate(shares):
            parent_end, child_end = context.Pipe()
            plan = LoadPlan(
                worker=worker,
                url=target.url,
                tenant_id=BENCH_TENANT,
                first_connection=first,
                connections=share,
                window=options.window,
                body_text=text,
                run_tag=run_tag,
                credentials=credentials,
            )
            process = context.Process(
                target=run_worker, args=(plan, child_end, counters), name=f"loadgen-{worker}"
            )
            process.start()
            child_end.close()
            processes.append(process)
            pipes.append(parent_end)
            first += share
        progress.update(f"{target.label} N={connections}: opening connections …")
        for pipe in pipes:
            message = _receive(pipe, 60 + connections * 0.05, "its connections")
            if message[0] != "ready":
                failure = message[1].failure if isinstance(message[1], LoadResult) else message
                raise BenchError(f"{target.label} N={connections}: {failure}")
        start_at = time.monotonic() + 0.5
        window = Window(
            start_at=start_at,
            measure_from=start_at + options.warmup,
            measure_until=start_at + options.warmup + options.duration,
            drain_until=start_at + options.warmup + options.duration + options.drain,
        )
        for pipe in pipes:
            pipe.send(("go", window))
        meter = CpuMeter(
            {
                "server": target.server_pid,
                **target.other_pids,
                **{f"load generator {i}": p.pid for i, p in enumerate(processes) if p.pid},
            },
            threads_of=target.server_pid,
        )
        time.sleep(max(0.0, window.measure_from - time.monotonic()))
        before = meter.snapshot()
        accepted_before = sum(counters)
        recorder = (
            profile.start_recording(target.server_pid, options.duration, profile_output)
            if profile_output is not None
            else None
        )
        while (now := time.monotonic()) < window.measure_until:
            elapsed = now - window.measure_from
            done = sum(counters) - accepted_before
            progress.update(
                f"{target.label} N={connections}: {elapsed:4.1f}/{options.duration:.0f} s, "
                f"{done:,} accepted ({done / max(elapsed, 1e-3):,.0f}/s)"
            )
            time.sleep(min(0.5, max(0.0, window.measure_until - now)))
        after = meter.snapshot()
        results: list[LoadResult] = []
        for pipe in pipes:
            message = _receive(pipe, options.drain + 30, "its results")
            results.append(message[1])
        if recorder is not None:
            _, problem = recorder.communicate(timeout=60)
            if recorder.returncode != 0:
                progress.done(f"py-spy failed: {problem.decode(errors='replace').strip()}")
    finally:
        for pipe in pipes:
            if not pipe.closed:
                pipe.close()
        for started in processes:
            started.join(10)
            if started.is_alive():
                started.terminate()
                started.join(5)
    return _summarise(target, connections, options, results, CpuMeter.percent(before, after))


def _summarise(
    target: LoadTarget,
    connections: int,
    options: Options,
    results: list[LoadResult],
    cpu: dict[str, Any],
) -> dict[str, Any]:
    failures = [result.failure for result in results if result.failure]
    if failures:
        raise BenchError(f"{target.label} N={connections}: " + "; ".join(failures))
    latencies = [latency for result in results for latency in result.latencies]
    accepted = sum(result.accepted_in_window for result in results)
    errors: Counter[str] = Counter()
    closed: Counter[str] = Counter()
    for result in results:
        errors.update(result.errors)
        closed.update(result.closed_by_server)
    rate = accepted / options.duration
    server_cpu = cpu["processes_pct_of_one_core"].get("server")
    return {
        "connections": connections,
        "client_processes": len(results),
        "connected": sum(result.connected for result in results),
        "accepted_per_second": round(rate, 1),
        "accepted_in_window": accepted,
        # What one send costs the server in CPU: the figure that sets its capacity per core.
        "server_cpu_us_per_accepted": round(server_cpu / 100 * 1e6 / rate, 1)
        if server_cpu and rate
        else None,
        "latency_ms": percentiles_ms(latencies),
        "sent_total": sum(result.sent for result in results),
        "accepted_total": sum(result.accepted_total for result in results),
        "errors_by_code": dict(errors),
        "unanswered_after_drain": sum(result.unanswered for result in results),
        "connections_closed_by_server": dict(closed),
        "cpu": cpu,
    }


# ---------------------------------------------------------------------------------------------
# The targets
# ---------------------------------------------------------------------------------------------


def run_ingress(
    settings: Settings, options: Options, progress: Progress, log_dir: Path
) -> tuple[list[dict[str, Any]], dict[str, Any] | None, dict[str, str]]:
    """Every N against one ``imstream run ingress``, then the profiled run."""
    server_env = {
        "IM_INGRESS__RATE_LIMIT_PER_SECOND": UNLIMITED_RATE,
        "IM_INGRESS__RATE_LIMIT_BURST": UNLIMITED_RATE,
    }
    server = ingress_server(
        settings, log_dir / "ingress.log", node_id="bench-ingress-1", extra=server_env
    )
    kafka_pid = kafka_broker_pid(settings)
    credentials = Credentials.of(settings)
    runs = []
    profiled = None
    with server:
        server.start()
        progress.done(f"imstream ingress pid {server.pid} on {LOOPBACK}:{server.port}")
        target = LoadTarget(
            label="ingress",
            url=f"ws://{LOOPBACK}:{server.port}{options.ws_path}",
            server_pid=server.pid,
            other_pids={"kafka broker": kafka_pid} if kafka_pid else {},
        )
        for connections in options.connections:
            runs.append(repeated_load(target, connections, options, credentials, progress))
        if options.profile_connections > 0:
            if profile.py_spy_path() is None:
                progress.done("py-spy is not installed (pip install py-spy): no profile taken")
            else:
                output = log_dir / "ingress-profile.txt"
                run = run_load(
                    target,
                    options.profile_connections,
                    options,
                    credentials,
                    progress,
                    run_tag="profiled",
                    profile_output=output,
                )
                progress.done(_line("ingress (profiled)", run))
                profiled = {"run": run, "summary": profile.summarise(output)}
        if not server.alive():
            raise BenchError(f"the ingress died during the run; its log: {server.log_path}")
    return runs, profiled, server_env


def median_run(runs: list[dict[str, Any]], rate_key: str) -> dict[str, Any]:
    """The run with the median rate (the lower one of an even count), with every rate listed."""
    ordered = sorted(runs, key=lambda run: float(run[rate_key]))
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["repeats_" + rate_key] = [run[rate_key] for run in runs]
    return chosen


def repeated_load(
    target: LoadTarget,
    connections: int,
    options: Options,
    credentials: Credentials,
    progress: Progress,
) -> dict[str, Any]:
    runs = []
    for attempt in range(options.repeat):
        run = run_load(
            target,
            connections,
            options,
            credentials,
            progress,
            run_tag=f"n{connections}.r{attempt}",
        )
        progress.done(_line(target.label, run))
        runs.append(run)
    chosen = median_run(runs, "accepted_per_second")
    chosen["accepted_total_all_repeats"] = sum(run["accepted_total"] for run in runs)
    return chosen


def _line(label: str, run: dict[str, Any]) -> str:
    latency = run["latency_ms"]
    server_cpu = run["cpu"]["processes_pct_of_one_core"].get("server")
    errors = f", errors {run['errors_by_code']}" if run["errors_by_code"] else ""
    return (
        f"{label} N={run['connections']}: {run['accepted_per_second']:,.0f} accepted/s, "
        f"p50 {latency['p50']} ms, p99 {latency['p99']} ms, server CPU {server_cpu}%{errors}"
    )


def written_records(settings: Settings, topic: str) -> tuple[int, SampleRecord | None]:
    """How many records ``topic`` holds, and the last one written to its fullest partition."""
    consumer = Consumer(
        kafka_config(
            settings,
            **{"group.id": f"{settings.kafka.topic_prefix}reader", "enable.auto.commit": False},
        )
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        highs = {
            partition: consumer.get_watermark_offsets(TopicPartition(topic, partition), 10)[1]
            for partition in partitions
        }
        total = sum(highs.values())
        if total == 0:
            return 0, None
        fullest = max(highs, key=lambda partition: highs[partition])
        consumer.assign([TopicPartition(topic, fullest, highs[fullest] - 1)])
        message = consumer.poll(10)
        if message is None or message.error() is not None:
            return total, None
        value = message.value() or b""
        stored = message.headers() or []
        headers = list(stored.items() if isinstance(stored, dict) else stored)
        return total, SampleRecord(value=value, headers=headers, source="read back from the topic")
    finally:
        consumer.close()


def built_record(body_bytes: int) -> SampleRecord:
    """A ``message.sent`` as the schemas encode it, when no gateway record is at hand."""
    user_id, _, conversation_id = identities(0)
    body = TextBody(text=body_text(body_bytes))
    event = text_message(
        BENCH_TENANT, user_id, conversation_id, "raw.1", body, device_id="device-0"
    )
    return SampleRecord(value=encode_event(event), headers=[], source="built from schemas.events")


def run_raw(
    settings: Settings,
    topic: str,
    record: SampleRecord,
    options: Options,
    progress: Progress,
) -> list[dict[str, Any]]:
    levels = sorted({connections * options.window for connections in options.connections})
    runs = []
    for in_flight in levels:
        keys = [
            conversation_key(BENCH_TENANT, identities(index)[2])
            for index in range(max(1, in_flight // options.window))
        ]

        def report(done: int, elapsed: float, in_flight: int = in_flight) -> None:
            measured = elapsed - options.warmup
            rate = f" ({done / measured:,.0f}/s)" if measured > 0.5 else " (warming up)"
            progress.update(
                f"raw in-flight={in_flight}: {elapsed:4.1f}/{options.warmup + options.duration:.0f}"
                f" s, {done:,} delivered{rate}"
            )

        repeats = []
        for _ in range(options.repeat):
            result = produce_loop(
                settings,
                topic,
                keys,
                record,
                in_flight=in_flight,
                warmup=options.warmup,
                duration=options.duration,
                on_progress=report,
            )
            run: dict[str, Any] = {
                "in_flight": in_flight,
                "keys": len(keys),
                "delivered_per_second": round(result.delivered_in_window / options.duration, 1),
                # CPU of this process (the loop and librdkafka's threads) per delivered record.
                "cpu_us_per_delivered": round(result.cpu_seconds * 1e6 / result.delivered_total, 1)
                if result.delivered_total
                else None,
                "latency_ms": percentiles_ms(result.latencies),
                "failed": result.failed,
                "errors": result.errors,
            }
            repeats.append(run)
            progress.done(
                f"raw in-flight={in_flight}: {run['delivered_per_second']:,.0f} delivered/s, "
                f"p50 {run['latency_ms']['p50']} ms, p99 {run['latency_ms']['p99']} ms"
            )
        runs.append(median_run(repeats, "delivered_per_second"))
    return runs


def run_bare(options: Options, progress: Progress, log_dir: Path) -> list[dict[str, Any]]:
    server, url = bare_ws_server(log_dir)
    runs = []
    with server:
        server.start()
        target = LoadTarget(
            label="bare echo",
            url=url,
            server_pid=server.pid,
            other_pids={},
        )
        for connections in options.connections:
            runs.append(repeated_load(target, connections, options, BARE_CREDENTIALS, progress))
    return runs


# ---------------------------------------------------------------------------------------------
# Putting it together
# ---------------------------------------------------------------------------------------------


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 3)


def comparisons(
    options: Options,
    ingress: list[dict[str, Any]],
    raw: list[dict[str, Any]],
    bare: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    raw_by_level = {run["in_flight"]: run["delivered_per_second"] for run in raw}
    raw_best = max(raw_by_level.values(), default=None)
    bare_by_n = {run["connections"]: run["accepted_per_second"] for run in bare}
    rows = []
    for run in ingress:
        connections = run["connections"]
        raw_same = raw_by_level.get(connections * options.window)
        rows.append(
            {
                "connections": connections,
                "ingress_accepted_per_second": run["accepted_per_second"],
                "raw_same_in_flight_per_second": raw_same,
                "ratio_ingress_to_raw_same_in_flight": _ratio(run["accepted_per_second"], raw_same),
                "raw_best_per_second": raw_best,
                "ratio_ingress_to_raw_best": _ratio(run["accepted_per_second"], raw_best),
                "bare_echo_per_second": bare_by_n.get(connections),
                "ratio_ingress_to_bare_echo": _ratio(
                    run["accepted_per_second"], bare_by_n.get(connections)
                ),
            }
        )
    return rows


def table(rows: list[dict[str, Any]], ingress: list[dict[str, Any]]) -> str:
    """The comparison as a Markdown table (for docs/performance.md)."""
    by_n = {run["connections"]: run for run in ingress}
    lines = [
        "| N | ingress accepted/s | p50 / p95 / p99 ms | server CPU | CPU µs/send "
        "| raw, same in-flight /s | ingress/raw | ingress/raw best | bare echo /s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        run = by_n[row["connections"]]
        ms = run["latency_ms"]
        lines.append(
            f"| {row['connections']} | {row['ingress_accepted_per_second']:,.0f} "
            f"| {ms['p50']} / {ms['p95']} / {ms['p99']} "
            f"| {run['cpu']['processes_pct_of_one_core'].get('server')}% "
            f"| {run['server_cpu_us_per_accepted']} "
            f"| {row['raw_same_in_flight_per_second'] or 0:,.0f} "
            f"| {row['ratio_ingress_to_raw_same_in_flight']} "
            f"| {row['ratio_ingress_to_raw_best']} "
            f"| {row['bare_echo_per_second'] or 0:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    interrupt_on_sigterm()
    progress = Progress()
    settings = load_settings()
    if settings is None:
        return 2
    raise_open_file_limit(max(options.connections) * 2 + 1024)
    settings = run_settings(settings, "throughput")
    log_dir = Path(tempfile.mkdtemp(prefix="imstream-bench-"))
    progress.done(f"server logs and raw profile in {log_dir}")
    facts = machine_facts(settings)
    began = now_iso()
    ingress: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    bare: list[dict[str, Any]] = []
    profiled: dict[str, Any] | None = None
    server_env: dict[str, str] = {}
    records: dict[str, Any] = {}
    try:
        with bench_topics(settings, progress) as catalog:
            topic = catalog.messages_in.name
            if "ingress" in options.targets:
                ingress, profiled, server_env = run_ingress(settings, options, progress, log_dir)
            written, sample = written_records(settings, topic)
            accepted = sum(run["accepted_total_all_repeats"] for run in ingress) + (
                profiled["run"]["accepted_total"] if profiled else 0
            )
            records = {"topic_records_after_ingress_runs": written, "accepted_total": accepted}
            if accepted > written:
                raise BenchError(
                    f"the gateway accepted {accepted} sends but {topic} holds {written} records"
                )
            record = sample or built_record(options.body_bytes)
            records |= {
                "record_value_bytes": len(record.value),
                "record_headers": [name for name, _ in record.headers],
                "record_source": record.source,
            }
            if "raw" in options.targets:
                raw = run_raw(settings, topic, record, options, progress)
        if "bare" in options.targets:
            bare = run_bare(options, progress, log_dir)
    except BenchError as error:
        sys.stderr.write(f"\nerror: {error}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted; everything started was stopped\n")
        return 130
    rows = comparisons(options, ingress, raw, bare)
    results = {
        **results_head("bench.ingress_throughput", began, facts),
        "parameters": {
            "connections": options.connections,
            "window_per_connection": options.window,
            "warmup_seconds": options.warmup,
            "duration_seconds": options.duration,
            "body_bytes": options.body_bytes,
            "client_processes": options.client_processes,
            "repeat": options.repeat,
            "client_library": "websockets (asyncio client), no compression",
            "ingress_env_overrides": server_env,
            "kafka_producer": "idempotent, acks=all, linger.ms="
            f"{settings.ingress.kafka_linger_ms}, replication {settings.kafka.replication_factor}",
        },
        "records": records,
        "ingress": ingress,
        "raw_confluent_kafka": raw,
        "bare_echo": bare,
        "comparison": rows,
        "profile": profiled,
        "median_server_cpu_pct": statistics.median(
            [run["cpu"]["processes_pct_of_one_core"].get("server", 0.0) for run in ingress]
        )
        if ingress
        else None,
    }
    if options.output is not None:
        write_results("throughput", results, options.output)
        progress.done(f"results written to {options.output} (section 'throughput')")
    if ingress:
        sys.stdout.write(table(rows, ingress) + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)
