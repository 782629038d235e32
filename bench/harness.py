"""What the benchmarks share beside ``bench/common.py``: the options they all spell the same way
(``--output``/``--no-write``, ``--targets``/``--ws-path``), the settings check, the bare WebSocket
server the gateway is measured against, a produce that waits out a full local queue, and how a
finished run is printed and stored.

Each benchmark keeps its own options; these are the ones spelled alike, so that ``--no-write`` or
an unknown target reads the same in every ``python -m bench.<name>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from confluent_kafka import Producer
from pydantic import ValidationError

from bench.common import (
    LOOPBACK,
    Progress,
    ServerProcess,
    free_port,
    machine_facts,
    now_iso,
    write_results,
)
from bench.loadgen import Credentials
from core.settings import Settings
from ingress.gateway import WEBSOCKET_PATH

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

OptionsT = TypeVar("OptionsT", bound="DataclassInstance")

#: The tokens the bare WebSocket server (``bench/bare_ws.py``) accepts.
BARE_CREDENTIALS = Credentials(secret="x" * 32, issuer="bench", audience="bench")


def bare_ws_server(log_dir: Path) -> tuple[ServerProcess, str]:
    """The bare FastAPI WebSocket server (``bench/bare_ws.py``) on a free port, not started yet
    (its log in ``log_dir``), and its WebSocket URL."""
    port = free_port()
    server = ServerProcess(
        "bare FastAPI WebSocket server",
        [sys.executable, "-m", "bench.bare_ws", "--port", str(port)],
        env=None,
        port=port,
        log_path=log_dir / "bare.log",
        ready_paths=("/healthz",),
    )
    return server, f"ws://{LOOPBACK}:{port}/ws"


def load_settings() -> Settings | None:
    """``Settings()`` from the environment; None (the error written) if they are invalid."""
    try:
        return Settings()
    except ValidationError as error:
        sys.stderr.write(f"error: [settings-invalid] {error}\n")
        return None


def bench_parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """The options parser of ``python -m <module>``: its description the first paragraph of the
    benchmark's docstring ``doc`` (the rest is for the reader of the code)."""
    return argparse.ArgumentParser(
        prog=f"python -m {module}", description=(doc or "").split("\n\n", 1)[0] or None
    )


def add_target_options(parser: argparse.ArgumentParser, known: tuple[str, ...]) -> None:
    """``--targets`` (some of ``known``, all by default) and ``--ws-path`` (the gateway's)."""
    parser.add_argument(
        "--targets",
        default=",".join(known),
        help=f"which of {', '.join(known)} to run (default: %(default)s)",
    )
    parser.add_argument(
        "--ws-path", default=WEBSOCKET_PATH, help="the gateway's WebSocket path (%(default)s)"
    )


def add_load_options(
    parser: argparse.ArgumentParser, *, warmup: float, duration: float, drain: float
) -> None:
    """The options of a timed load from client processes, spelled alike in the benchmarks that
    drive one: ``--warmup``, ``--duration`` and ``--drain`` (seconds, with these defaults),
    ``--body-bytes`` and ``--client-processes``."""
    parser.add_argument(
        "--warmup", type=float, default=warmup, help="seconds before measuring (%(default)s)"
    )
    parser.add_argument(
        "--duration", type=float, default=duration, help="seconds measured (%(default)s)"
    )
    parser.add_argument(
        "--drain", type=float, default=drain, help="seconds to wait for late ones (%(default)s)"
    )
    parser.add_argument(
        "--body-bytes", type=int, default=100, help="text body size of each send (%(default)s)"
    )
    parser.add_argument(
        "--client-processes", type=int, default=2, help="load generators (%(default)s)"
    )


def produce_waiting(
    producer: Producer, topic: str, key: bytes, value: bytes, *, wait: float = 0.05
) -> None:
    """Produce one record; while the producer's local queue is full, serve its deliveries for
    ``wait`` seconds and try again (a load that fills Kafka faster than it acknowledges)."""
    while True:
        try:
            producer.produce(topic, key=key, value=value)
            return
        except BufferError:
            producer.poll(wait)


def add_output_options(parser: argparse.ArgumentParser, default: Path) -> None:
    """``--output`` (the results file, ``default``) and ``--no-write`` (print only)."""
    parser.add_argument("--output", type=Path, default=default, help="results file (%(default)s)")
    parser.add_argument("--no-write", action="store_true", help="do not write the results file")


def options_from(cls: type[OptionsT], args: argparse.Namespace, **given: Any) -> OptionsT:
    """A benchmark's options dataclass ``cls`` from the parsed ``args``: each field the value of
    the option of its name, unless ``given`` (the fields the benchmark works out itself)."""
    taken = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(cls)
        if field.init and field.name not in given
    }
    return cls(**taken, **given)


def options_document(options: DataclassInstance) -> dict[str, Any]:
    """A benchmark's options as the results' ``parameters``: paths as text, so it is JSON."""
    return {
        key: (str(value) if isinstance(value, Path) else value)
        for key, value in dataclasses.asdict(options).items()
    }


def stop_workers(pipes: Sequence[Connection], processes: Sequence[BaseProcess]) -> None:
    """Ask each worker process to stop (``("stop",)`` on its pipe), give it 30 s to finish, then
    terminate it; close the pipes."""
    for pipe in pipes:
        with suppress(OSError):
            pipe.send(("stop",))
    for process in processes:
        process.join(30)
        if process.is_alive():
            process.terminate()
            process.join(5)
    for pipe in pipes:
        pipe.close()


def parse_targets(
    parser: argparse.ArgumentParser, targets: str, known: tuple[str, ...]
) -> tuple[str, ...]:
    """The comma-separated ``targets``, each one of ``known`` (else the parser's usage error)."""
    chosen = tuple(target.strip() for target in targets.split(",") if target.strip())
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return chosen


def results_head(module: str, started_at: str, machine: Mapping[str, Any]) -> dict[str, Any]:
    """The first keys of a results document: when the run began and ended, the load average at
    its end, the command line that ran it, and the ``machine`` facts read before it began."""
    return {
        "started_at": started_at,
        "finished_at": now_iso(),
        "load_average_at_end": list(os.getloadavg()),
        "command": f"python -m {module} " + " ".join(sys.argv[1:]),
        "machine": machine,
    }


def run_document(
    started_at: str, machine: Mapping[str, Any], args: argparse.Namespace, **results: Any
) -> dict[str, Any]:
    """A results document: when the run began and ended, the ``machine`` facts, the options it
    ran with (``args``, the results file as text), then ``results``."""
    return {
        "started_at": started_at,
        "finished_at": now_iso(),
        "machine": machine,
        "parameters": vars(args) | {"output": str(args.output)},
        **results,
    }


def store_results(
    section: str, document: Mapping[str, Any], args: argparse.Namespace, progress: Progress
) -> None:
    """``document`` as ``section`` of ``args.output``, unless ``args.no_write``."""
    if not args.no_write:
        write_results(section, document, args.output)
        progress.done(f"wrote {args.output}")


def print_and_store(section: str, document: Mapping[str, Any], args: argparse.Namespace) -> None:
    """``document`` as JSON on stdout, and as ``section`` of ``args.output`` unless
    ``args.no_write``."""
    json.dump(document, sys.stdout, indent=2)
    sys.stdout.write("\n")
    if not args.no_write:
        write_results(section, document, args.output)


def measure_and_report(
    section: str,
    args: argparse.Namespace,
    measure: Callable[[Progress], Any],
    *,
    parameters: Sequence[str],
    note: str,
) -> int:
    """Run ``measure`` between two timestamps, the machine's facts read before it starts (its
    load average then says how busy it was), and print and store the document with the options
    named in ``parameters`` (exit code 0)."""
    progress = Progress()
    facts = machine_facts(Settings())
    started_at = now_iso()
    results = measure(progress)
    document = {
        "started_at": started_at,
        "finished_at": now_iso(),
        "parameters": {name: getattr(args, name) for name in parameters},
        "machine": facts,
        "results": results,
        "note": note,
    }
    print_and_store(section, document, args)
    return 0
