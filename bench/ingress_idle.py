"""Idle connections held by one ingress process, and what each costs in resident memory.

A client process (bench/idle_client.py, never the server's) opens K authenticated connections
(``hello`` → ``hello_ok``) and keeps them idle, pinging under the server's idle timeout. The
server's RSS is read from /proc/<pid>/status before and after:

    KB per connection = (RSS with K idle connections - RSS before) / K

"Before" is taken after a short warm-up (a few hundred connections opened and closed), so that
one-time costs — imports and caches filled on first use — are not charged to the connections.
For calibration the same client holds the same K connections on bench/bare_ws.py, a bare FastAPI
WebSocket endpoint on uvicorn with ``ws="wsproto"`` and no deflate: imstream/bare is the honest
figure. A third run lets the client offer permessage-deflate, as browsers always do, to show what
the gateway's deflate setting costs.

Everything listens on 127.0.0.1; topics are created under a prefix of this run and deleted at
the end; every process started here is stopped. Results: docs/bench/ingress.json, section
``idle``.

    python -m bench.ingress_idle                      # K = 10,000
    python -m bench.ingress_idle --connections 1000 --targets imstream,bare --no-write
"""

from __future__ import annotations

import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.common import (
    BENCH_TENANT,
    LOOPBACK,
    RESULTS_PATH,
    BenchError,
    Progress,
    ServerProcess,
    bench_topics,
    free_port,
    ingress_server,
    interrupt_on_sigterm,
    machine_facts,
    memory_kb,
    now_iso,
    prometheus_value,
    raise_open_file_limit,
    run_main,
    run_settings,
    write_results,
)
from bench.harness import (
    BARE_CREDENTIALS,
    add_output_options,
    add_target_options,
    bare_ws_server,
    bench_parser,
    load_settings,
    options_from,
    parse_targets,
    results_head,
)
from bench.idle_client import IdlePlan, OpenReport, run_client
from bench.loadgen import Credentials
from core.settings import Settings

TARGETS = ("imstream", "bare", "imstream-deflate")
#: The bar of issue 3: this many idle connections per process at no more than this many KB each.
BAR_CONNECTIONS = 10_000
BAR_KB_PER_CONNECTION = 40.0
#: Connections the warm-up opens and closes; their indexes lie apart from the measured ones.
WARMUP_FIRST_INDEX = 1_000_000
#: The gateway's gauge of open WebSocket connections (ingress/metrics.py), read as a cross-check.
CONNECTIONS_METRIC = "imstream_ingress_connections"


@dataclass(frozen=True, slots=True)
class Options:
    connections: int
    warmup_connections: int
    settle: float
    samples: int
    targets: tuple[str, ...]
    ws_path: str
    output: Path | None


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = bench_parser("bench.ingress_idle", __doc__)
    parser.add_argument(
        "--connections", type=int, default=10_000, help="idle connections K (%(default)s)"
    )
    parser.add_argument(
        "--warmup-connections",
        type=int,
        default=200,
        help="connections opened and closed before the baseline is read (%(default)s)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=75.0,
        help="seconds to hold the connections before reading RSS; longer than the server's idle "
        "timeout (60 s) shows that the pings keep them open (%(default)s)",
    )
    parser.add_argument(
        "--samples", type=int, default=5, help="RSS readings, 1 s apart; the median is used"
    )
    add_target_options(parser, TARGETS)
    add_output_options(parser, RESULTS_PATH)
    args = parser.parse_args(argv)
    targets = parse_targets(parser, args.targets, TARGETS)
    if args.connections < 1 or args.samples < 1 or args.warmup_connections < 0:
        parser.error("--connections and --samples must be at least 1")
    return options_from(
        Options,
        args,
        targets=targets,
        output=None if args.no_write else args.output,
    )


def memory_sample(pid: int, samples: int) -> dict[str, int]:
    """The median of ``samples`` readings (1 s apart) of each /proc/<pid>/status figure."""
    readings = []
    for index in range(samples):
        if index:
            time.sleep(1.0)
        readings.append(memory_kb(pid))
    return {
        key: int(statistics.median(reading[key] for reading in readings)) for key in readings[0]
    }


def _expect(pipe: Connection, reply: str, timeout: float) -> Any:
    if not pipe.poll(timeout):
        raise BenchError(f"the idle client did not answer {reply!r} within {timeout:.0f} s")
    message = pipe.recv()
    if message[0] != reply:
        raise BenchError(f"the idle client failed: {message[1]}")
    return message[1]


def hold_idle(
    label: str,
    server: ServerProcess,
    *,
    url: str,
    credentials: Credentials,
    options: Options,
    progress: Progress,
    offer_deflate: bool,
    connections_metric: str | None = None,
    metrics_url: str | None = None,
) -> dict[str, Any]:
    """Open, hold and close ``options.connections`` idle connections; measure the server's RSS."""
    context = multiprocessing.get_context("spawn")
    opened = context.Value("q", 0, lock=False)
    pipe, child_end = context.Pipe()
    plan = IdlePlan(
        url=url, tenant_id=BENCH_TENANT, credentials=credentials, offer_deflate=offer_deflate
    )
    client = context.Process(target=run_client, args=(plan, child_end, opened), name="idle-client")
    client.start()
    child_end.close()
    try:
        if options.warmup_connections:
            pipe.send(("open", WARMUP_FIRST_INDEX, options.warmup_connections))
            warmup: OpenReport = _expect(pipe, "opened", 120)
            pipe.send(("close",))
            _expect(pipe, "closed", 120)
            progress.done(f"{label}: warm-up opened and closed {warmup.opened} connections")
            time.sleep(3.0)
        before = memory_sample(server.pid, options.samples)
        progress.done(f"{label}: server pid {server.pid}, RSS before {before['VmRSS']:,} kB")
        pipe.send(("open", 0, options.connections))
        began = time.monotonic()
        while not pipe.poll(0.5):
            elapsed = time.monotonic() - began
            rss = memory_kb(server.pid)["VmRSS"]
            progress.update(
                f"{label}: {opened.value:,}/{options.connections:,} open "
                f"({opened.value / max(elapsed, 1e-3):,.0f}/s), server RSS {rss / 1024:,.0f} MB"
            )
            if elapsed > 120 + options.connections / 20:
                raise BenchError(f"{label}: opening the connections did not finish in time")
            if not server.alive():
                raise BenchError(f"{label}: the server died; its log: {server.log_path}")
        report: OpenReport = _expect(pipe, "opened", 1)
        if report.opened == 0:
            raise BenchError(f"{label}: no connection opened: {report.first_errors}")
        progress.done(
            f"{label}: {report.opened:,} connections open in {report.seconds:.1f} s "
            f"({report.failed} failed), holding them for {options.settle:.0f} s"
        )
        after_open = memory_kb(server.pid)
        held_until = time.monotonic() + options.settle
        while (remaining := held_until - time.monotonic()) > 0:
            progress.update(
                f"{label}: holding {opened.value:,} idle connections, {remaining:3.0f} s left, "
                f"server RSS {memory_kb(server.pid)['VmRSS'] / 1024:,.0f} MB"
            )
            time.sleep(min(1.0, remaining))
        after = memory_sample(server.pid, options.samples)
        server_count = (
            prometheus_value(metrics_url, connections_metric)
            if connections_metric and metrics_url
            else None
        )
        pipe.send(("check",))
        alive: int = _expect(pipe, "alive", 60)
        pipe.send(("close",))
        _expect(pipe, "closed", 300)
        pipe.send(("exit",))
    finally:
        client.join(30)
        if client.is_alive():
            client.terminate()
            client.join(5)
        pipe.close()
    held = alive or 1
    result = {
        "connections_requested": options.connections,
        "connections_opened": report.opened,
        "connections_failed": report.failed,
        "connections_alive_at_measurement": alive,
        "open_seconds": round(report.seconds, 2),
        "opened_per_second": round(report.opened / report.seconds, 1) if report.seconds else None,
        "first_errors": report.first_errors,
        "client_offered_deflate": offer_deflate,
        "deflate_negotiated": report.deflate_negotiated,
        "server_idle_timeout_ms": report.idle_timeout_ms,
        "connections_server_reports": server_count,
        "memory_before_kb": before,
        "rss_right_after_opening_kb": after_open["VmRSS"],
        "memory_after_kb": after,
        "rss_before_mib": round(before["VmRSS"] / 1024, 1),
        "rss_after_mib": round(after["VmRSS"] / 1024, 1),
        "kb_per_connection": round((after["VmRSS"] - before["VmRSS"]) / held, 2),
        "anon_kb_per_connection": round((after["RssAnon"] - before["RssAnon"]) / held, 2),
    }
    progress.done(
        f"{label}: {alive:,} idle connections, RSS {result['rss_before_mib']} -> "
        f"{result['rss_after_mib']} MiB: {result['kb_per_connection']} KB per connection"
    )
    return result


def run_imstream(
    settings: Settings, options: Options, progress: Progress, log_dir: Path, *, deflate: bool
) -> dict[str, Any]:
    internal_port = free_port()
    label = "imstream (client offers deflate)" if deflate else "imstream"
    server = ingress_server(
        settings,
        log_dir / ("ingress-deflate.log" if deflate else "ingress.log"),
        node_id="bench-idle-1",
        internal_port=internal_port,
    )
    credentials = Credentials.of(settings)
    with server:
        server.start()
        result = hold_idle(
            label,
            server,
            url=f"ws://{LOOPBACK}:{server.port}{options.ws_path}",
            credentials=credentials,
            options=options,
            progress=progress,
            offer_deflate=deflate,
            connections_metric=CONNECTIONS_METRIC,
            # The metrics are on the node's internal listener, never its client port.
            metrics_url=f"http://{LOOPBACK}:{internal_port}/metrics",
        )
        if not server.alive():
            raise BenchError(f"{label}: the server died; its log: {server.log_path}")
        began = time.monotonic()
        exit_code = server.stop(timeout=120)
        result["server_stop_seconds"] = round(time.monotonic() - began, 1)
        result["server_exit_code"] = exit_code
    return result


def run_bare(options: Options, progress: Progress, log_dir: Path) -> dict[str, Any]:
    server, url = bare_ws_server(log_dir)
    with server:
        server.start()
        return hold_idle(
            "bare FastAPI/uvicorn/wsproto",
            server,
            url=url,
            credentials=BARE_CREDENTIALS,
            options=options,
            progress=progress,
            offer_deflate=False,
        )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    interrupt_on_sigterm()
    progress = Progress()
    settings = load_settings()
    if settings is None:
        return 2
    limit = raise_open_file_limit(options.connections + options.warmup_connections + 1024)
    if limit < options.connections + 256:
        sys.stderr.write(
            f"error: the open-file limit is {limit}; one process cannot hold "
            f"{options.connections} connections. Use --connections {limit - 1024} or raise the "
            "hard limit (ulimit -Hn).\n"
        )
        return 2
    settings = run_settings(settings, "idle")
    log_dir = Path(tempfile.mkdtemp(prefix="imstream-bench-"))
    progress.done(f"server logs in {log_dir}")
    facts = machine_facts(settings)
    began = now_iso()
    runs: dict[str, dict[str, Any]] = {}
    try:
        if {"imstream", "imstream-deflate"} & set(options.targets):
            with bench_topics(settings, progress):
                if "imstream" in options.targets:
                    runs["imstream"] = run_imstream(
                        settings, options, progress, log_dir, deflate=False
                    )
                if "imstream-deflate" in options.targets:
                    runs["imstream_client_offers_deflate"] = run_imstream(
                        settings, options, progress, log_dir, deflate=True
                    )
        if "bare" in options.targets:
            runs["bare_fastapi_wsproto_no_deflate"] = run_bare(options, progress, log_dir)
    except BenchError as error:
        sys.stderr.write(f"\nerror: {error}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted; everything started was stopped\n")
        return 130
    imstream = runs.get("imstream")
    bare = runs.get("bare_fastapi_wsproto_no_deflate")
    ratio = (
        round(imstream["kb_per_connection"] / bare["kb_per_connection"], 2)
        if imstream and bare and bare["kb_per_connection"] > 0
        else None
    )
    bar_met = (
        imstream["connections_alive_at_measurement"] >= BAR_CONNECTIONS
        and imstream["kb_per_connection"] <= BAR_KB_PER_CONNECTION
        if imstream
        else None
    )
    results = {
        **results_head("bench.ingress_idle", began, facts),
        "parameters": {
            "connections": options.connections,
            "warmup_connections": options.warmup_connections,
            "settle_seconds": options.settle,
            "rss_samples": options.samples,
            "client_library": "websockets (asyncio client), one client process",
            "rss_source": "VmRSS of /proc/<server pid>/status, median of the samples",
        },
        "runs": runs,
        "ratio_imstream_to_bare": ratio,
        "bar": {
            "connections_at_least": BAR_CONNECTIONS,
            "kb_per_connection_at_most": BAR_KB_PER_CONNECTION,
            "met": bar_met,
        },
    }
    if options.output is not None:
        write_results("idle", results, options.output)
        progress.done(f"results written to {options.output} (section 'idle')")
    for name, run in runs.items():
        sys.stdout.write(
            f"{name}: {run['connections_alive_at_measurement']:,} idle connections, "
            f"{run['kb_per_connection']} KB each (RSS {run['rss_before_mib']} -> "
            f"{run['rss_after_mib']} MiB)\n"
        )
    if ratio is not None:
        sys.stdout.write(f"imstream/bare: {ratio}; bar met: {bar_met}\n")
    return 0


if __name__ == "__main__":
    run_main(main)
