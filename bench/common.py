"""What the benchmarks share: the server processes they start, the topics they create, what they
read of a process's CPU and memory, the facts about the machine, and where the results go."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, TextIO

import confluent_kafka
import httpx
import psutil
from confluent_kafka.admin import AdminClient
from prometheus_client.parser import text_string_to_metric_families

from core.connections import kafka_config
from core.readiness import read_announcement
from core.settings import Settings
from pipelines.stack import process as stack_process
from pipelines.stack.errors import StackError
from pipelines.stack.manager import LocalStack
from pipelines.stack.services import port_is_free
from pipelines.topics import apply_topics
from schemas.topics import TopicCatalog, topic_catalog

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO_ROOT / "docs" / "bench" / "ingress.json"
LOOPBACK = "127.0.0.1"
#: The benchmark's tenant; every user and device it makes up belongs to it.
BENCH_TENANT = "bench"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: The local stack's services a benchmark uses as they run: the systems it starts keep their
#: ClickHouse data in chDB paths of their own, never the shared one (``settings.chdb_path``).
STACK_SERVICES = ("kafka", "cassandra")


class BenchError(RuntimeError):
    """The benchmark cannot go on; the message says what failed and what to do."""


class Progress:
    """One line that updates in place on a terminal; on a pipe, a line every few seconds."""

    def __init__(self, stream: TextIO = sys.stderr, min_interval: float = 5.0) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._min_interval = min_interval
        self._last = 0.0
        self._width = 0

    def update(self, text: str) -> None:
        """A transient status; on a pipe only one every ``min_interval`` seconds is written."""
        if self._tty:
            self._stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
            self._stream.flush()
            return
        now = time.monotonic()
        if now - self._last >= self._min_interval:
            self._last = now
            self._stream.write(text + "\n")
            self._stream.flush()

    def done(self, text: str) -> None:
        """A line that stays."""
        if self._tty:
            self._stream.write("\r" + text.ljust(self._width) + "\n")
            self._width = 0
        else:
            self._stream.write(text + "\n")
        self._stream.flush()


def run_main(main: Callable[[], int]) -> NoReturn:
    """A benchmark's entry point: its exit code; a ``BenchError`` (or a ``StackError`` from the
    stack's helpers, which says what to do too) as ``error: …`` and exit code 1, Ctrl-C (or
    SIGTERM, see ``interrupt_on_sigterm``) as "interrupted" and 130."""
    try:
        sys.exit(main())
    except (BenchError, StackError) as error:
        sys.stderr.write(f"error: {error}\n")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)


def interrupt_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt so that every ``finally`` cleans up as on Ctrl-C."""

    def _raise(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)


def start_run() -> tuple[Progress, Settings]:
    """How a benchmark's ``main`` starts once its options are read: SIGTERM interrupts it like
    Ctrl-C (so its clean-up runs), a progress line, and the settings from the environment."""
    interrupt_on_sigterm()
    return Progress(), Settings()


def raise_open_file_limit(wanted: int) -> int:
    """Raise this process's soft open-file limit (inherited by its children) towards ``wanted``.

    Returns the new soft limit; the hard limit caps it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def free_port() -> int:
    """A TCP port on the loopback address that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


# ---------------------------------------------------------------------------------------------
# What another process can hold: checked up front, so that a benchmark refuses in one line
# before it starts anything rather than failing half-way (or stopping what is not its own)
# ---------------------------------------------------------------------------------------------


def describe_process(pid: int | None) -> str:
    """``pid N (its command line)``, as far as this user may see it."""
    if pid is None:
        return "another process"
    try:
        # One line, however the command was typed (``python -c`` code holds newlines).
        command = " ".join(" ".join(psutil.Process(pid).cmdline()).split())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return f"pid {pid}"
    if len(command) > 100:
        command = command[:97] + "..."
    return f"pid {pid} ({command})" if command else f"pid {pid}"


def port_holder(port: int) -> str | None:
    """Who listens on TCP ``port`` (``describe_process``), or None when nothing does."""
    if port_is_free(port):
        return None
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:  # another user's sockets: taken, by someone we cannot name
        return describe_process(None)
    pid = next(
        (
            connection.pid
            for connection in connections
            if connection.status == psutil.CONN_LISTEN
            and connection.laddr
            and connection.laddr[1] == port
        ),
        None,
    )
    return describe_process(pid)


def require_port_free(port: int, what: str, instead: str) -> None:
    """Refuse (``BenchError``) when ``port`` (``what`` the benchmark wants it for) is taken,
    naming who holds it and what to do ``instead`` of stopping it."""
    holder = port_holder(port)
    if holder is not None:
        raise BenchError(
            f"port {port} on {LOOPBACK} ({what}) is taken by {holder}: stop it, or {instead}"
        )


def chdb_path_holder(path: Path) -> str | None:
    """Who holds the chDB data path ``path`` (``describe_process``), or None when it is free.

    chDB opens a path in one process at a time: like a ClickHouse server it keeps an exclusive
    ``flock`` on ``<path>/status`` (its pid written in it) while it has the path open, and a
    second process fails with "Cannot lock file …/status" on its first query. Asking that lock
    tells the same without loading chDB."""
    try:
        status = os.open(path / "status", os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(status, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        content = os.read(status, 4096).decode(errors="replace")
        pid = next(
            (
                int(value)
                for key, _, value in (line.partition(":") for line in content.splitlines())
                if key.strip() == "PID" and value.strip().isdigit()
            ),
            None,
        )
        return describe_process(pid)
    else:
        fcntl.flock(status, fcntl.LOCK_UN)
        return None
    finally:
        os.close(status)


def require_chdb_path_free(path: Path, instead: str) -> None:
    """Refuse (``BenchError``) when another process holds the chDB data path ``path``, naming
    it and what to do ``instead`` of stopping it."""
    holder = chdb_path_holder(path.expanduser().resolve())
    if holder is not None:
        raise BenchError(
            f"the chDB path {path} is taken by {holder}; chDB opens a path in one process at a "
            f"time: stop that process (`make run` holds the default path), or {instead}"
        )


def ensure_local_stack(settings: Settings, progress: Progress) -> tuple[str, ...]:
    """The local stack's Kafka and Cassandra, started if they are down; returns the services
    started here (the others were running).

    Only those two (``STACK_SERVICES``): asked about ClickHouse too, ``LocalStack.is_up`` says
    "down" while another process (``make run``) holds the shared chDB path, and a benchmark
    would then "start" the stack and, on the way out, stop the Kafka and Cassandra that process
    runs on. A port a missing service needs, held by a process that is not the stack's, is
    refused before anything starts."""
    stack = LocalStack(settings, services=STACK_SERVICES, progress=progress.update)
    if stack.is_up():
        return ()
    for server in stack.servers:
        if stack_process.find_pids(server.marker):
            continue  # running (still starting): ``up`` waits for it
        for role, port in server.ports().items():
            require_port_free(
                port,
                f"the local stack's {server.name} {role} port",
                "give the stack free ports in the settings (IM_KAFKA__BOOTSTRAP_SERVERS, "
                "IM_CQL__PORT, IM_STACK__*_PORT)",
            )
    progress.done(f"starting the local stack ({', '.join(STACK_SERVICES)}) …")
    try:
        stack.up()
    except StackError as error:
        raise BenchError(f"cannot start the local stack: {error}") from error
    return stack.started


@contextlib.contextmanager
def local_stack(settings: Settings, progress: Progress) -> Iterator[None]:
    """``ensure_local_stack``; on the way out the services it started are stopped, and only
    those."""
    started = ensure_local_stack(settings, progress)
    try:
        yield
    finally:
        if started:
            stack = LocalStack(settings, services=STACK_SERVICES)
            for line in stack.down(only=started):
                progress.done(f"stack: {line}")


# ---------------------------------------------------------------------------------------------
# Process and machine figures: psutil where it gives the same numbers; /proc (Linux) for what
# psutil does not give (RssAnon, RssFile, VmHWM, thread names)
# ---------------------------------------------------------------------------------------------


def memory_kb(pid: int) -> dict[str, int]:
    """/proc/<pid>/status: ``VmRSS``, ``RssAnon``, ``RssFile``, ``VmHWM`` (kB), ``Threads``."""
    wanted = {"VmRSS", "RssAnon", "RssFile", "VmHWM", "Threads"}
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in wanted:
            values[key] = int(rest.split()[0])
    return values


def _stat_cpu_seconds(stat_path: Path) -> float:
    # The command name in parentheses may hold spaces: the fields after it are what we want.
    fields = stat_path.read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a whole process (all its threads), in seconds."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of a process's threads, grouped: the main thread (the event loop of an asyncio
    server), librdkafka's threads (named ``rdk:…``) and the rest (from /proc: psutil gives a
    thread's CPU time but not its name)."""
    groups = {"main thread": 0.0, "librdkafka threads": 0.0, "other threads": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            seconds = _stat_cpu_seconds(task / "stat")
            name = (task / "comm").read_text().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended while we looked
        if task.name == str(pid):
            groups["main thread"] += seconds
        elif name.startswith("rdk:"):
            groups["librdkafka threads"] += seconds
        else:
            groups["other threads"] += seconds
    return groups


def system_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, summed over its cores."""
    times = psutil.cpu_times()
    # Guest time is already counted in user: the first eight fields are all of it on Linux.
    total = float(sum(times[:8]))
    idle = times.idle + getattr(times, "iowait", 0.0)
    return total - idle, total


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    at: float
    processes: dict[str, float]
    threads: dict[str, float]
    system_busy: float
    system_total: float


class CpuMeter:
    """CPU use of named processes (and the threads of one of them) between two snapshots."""

    def __init__(self, pids: Mapping[str, int], threads_of: int | None = None) -> None:
        self._pids = dict(pids)
        self._threads_of = threads_of

    @classmethod
    def with_broker(cls, settings: Settings, pids: Mapping[str, int]) -> CpuMeter:
        """The processes ``pids`` and, when it runs on this machine, the local stack's Kafka
        broker (as ``kafka``): what a stream stage costs the broker too."""
        broker = kafka_broker_pid(settings)
        return cls({**pids, "kafka": broker} if broker is not None else pids)

    def snapshot(self) -> CpuSnapshot:
        processes = {}
        for name, pid in self._pids.items():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                processes[name] = cpu_seconds(pid)
        threads = thread_cpu_seconds(self._threads_of) if self._threads_of is not None else {}
        busy, total = system_cpu_seconds()
        return CpuSnapshot(time.monotonic(), processes, threads, busy, total)

    @staticmethod
    def percent(start: CpuSnapshot, end: CpuSnapshot) -> dict[str, Any]:
        """Per process and thread group: percent of one core; machine: percent of all cores."""
        wall = end.at - start.at

        def share(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
            return {
                name: round(100 * (after[name] - before[name]) / wall, 1)
                for name in after
                if name in before
            }

        total = end.system_total - start.system_total
        busy = end.system_busy - start.system_busy
        processes = share(start.processes, end.processes)
        return {
            "processes_pct_of_one_core": processes,
            "server_threads_pct_of_one_core": share(start.threads, end.threads),
            "machine_busy_pct_of_all_cores": round(100 * busy / total, 1) if total else None,
            # Everything else on the machine (other jobs, the kernel's softirqs): the noise.
            "unmeasured_pct_of_one_core": round(100 * busy / wall - sum(processes.values()), 1),
        }


def kafka_broker_pid(settings: Settings) -> int | None:
    """The local stack's Kafka process, if this machine runs it (for its CPU use)."""
    return stack_server_pid(settings, "kafka")


def stack_server_pid(settings: Settings, name: str) -> int | None:
    """The local stack's ``name`` server process (kafka, cassandra), if this machine runs it."""
    pids = stack_process.find_pids(LocalStack(settings).server(name).marker)
    return pids[0] if pids else None


# ---------------------------------------------------------------------------------------------
# Settings, topics, server processes
# ---------------------------------------------------------------------------------------------


def run_prefix(kind: str) -> str:
    """A topic prefix no other run uses: ``bench.<kind>.<unix time>.<pid>.``."""
    return f"bench.{kind}.{int(time.time())}.{os.getpid()}."


def with_topic_prefix(settings: Settings, prefix: str) -> Settings:
    """The same settings with the catalog's topics under ``prefix``."""
    kafka = settings.kafka.model_copy(update={"topic_prefix": prefix})
    return settings.model_copy(update={"kafka": kafka})


def run_settings(settings: Settings, kind: str) -> Settings:
    """The same settings with the catalog's topics under a prefix of their own (``run_prefix``),
    so that a run starts from empty topics and leaves no others half-used."""
    return with_topic_prefix(settings, run_prefix(kind))


def run_space(settings: Settings, kind: str) -> tuple[Settings, Path]:
    """``run_settings``, and a fresh directory for the run's logs (``bench-<kind>-…`` in the
    temporary directory; kept after the run, for a look at what went wrong)."""
    return run_settings(settings, kind), Path(tempfile.mkdtemp(prefix=f"bench-{kind}-"))


@contextlib.contextmanager
def bench_topics(settings: Settings, progress: Progress) -> Iterator[TopicCatalog]:
    """Create the catalog's topics under the settings' prefix; delete them all on the way out."""
    catalog = topic_catalog(settings)
    admin = AdminClient(kafka_config(settings))
    try:
        apply_topics(admin, catalog, timeout=30.0)
    except confluent_kafka.KafkaException as error:
        raise BenchError(
            f"cannot create topics on {settings.kafka.bootstrap_servers}: {error}. Start the local "
            "stack with `imstream stack up` or point IM_KAFKA__BOOTSTRAP_SERVERS at a cluster."
        ) from error
    progress.done(f"created {len(list(catalog))} topics under prefix {settings.kafka.topic_prefix}")
    try:
        yield catalog
    finally:
        names = [topic.name for topic in catalog]
        failures = []
        for name, future in admin.delete_topics(names, operation_timeout=30).items():
            try:
                future.result(timeout=60)
            except Exception as error:
                failures.append(f"{name}: {error}")
        if failures:
            progress.done("could not delete topic(s): " + "; ".join(failures))
        else:
            progress.done(f"deleted the {len(names)} topics under {settings.kafka.topic_prefix}")


def imstream_command(*args: str) -> list[str]:
    """The ``imstream`` console script of the interpreter running the benchmark."""
    script = Path(sys.executable).with_name("imstream")
    if not script.exists():
        raise BenchError(f"{script} not found; install imstream first (`make install`)")
    return [str(script), *args]


class ServerProcess:
    """A server the benchmark starts, waits for and stops (SIGTERM, then SIGKILL)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None,
        port: int,
        log_path: Path,
        ready_paths: Sequence[str] = ("/readyz", "/healthz"),
        ready_file: Path | None = None,
    ) -> None:
        """``ready_file``: an imstream process, ready once it announced it there
        (``IM_READY_FILE``, as ``imstream up`` waits for it); otherwise the server is ready once
        a ``ready_paths`` URL answers."""
        self.name = name
        self.ready_file = ready_file
        self.port = port
        self.log_path = log_path
        self._argv = list(argv)
        self._env = dict(env) if env is not None else None
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)
            self._env = {**(self._env or os.environ), "IM_READY_FILE": str(ready_file)}
        self._ready_paths = ready_paths
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._process.pid

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *_exc_info: object) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and return once it answers HTTP on its port."""
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                self._argv,
                cwd=REPO_ROOT,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: Ctrl-C on the benchmark must not reach it before we stop it.
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with code {self._process.returncode} during start-up; "
                    f"its log: {self.log_path}\n{self.log_tail()}"
                )
            if self._answers():
                return
            time.sleep(0.2)
        raise BenchError(
            f"{self.name} was not ready (on {LOOPBACK}:{self.port} or in its log) within "
            f"{timeout:.0f} s; "
            f"its log: {self.log_path}\n{self.log_tail()}"
        )

    def _answers(self) -> bool:
        if self.ready_file is not None:
            found = read_announcement(self.ready_file)
            return found is not None and found.pid == self.pid
        for path in self._ready_paths:
            url = f"http://{LOOPBACK}:{self.port}{path}"
            try:
                status = httpx.get(url, timeout=2).status_code
            except httpx.TransportError:
                return False
            if status == 200:
                return True
            if status != 404:
                return False  # e.g. /readyz 503 while Kafka is not reachable yet
        return False

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as a crash."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(10)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` s; returns the exit code."""
        process = self._process
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait(10)


def ingress_server(
    settings: Settings,
    log_path: Path,
    *,
    node_id: str,
    internal_port: int | None = None,
    extra: Mapping[str, str] = {},
) -> ServerProcess:
    """An ``imstream run ingress`` serving ``settings`` on a free loopback port (its ``port``),
    not started yet; its metrics on ``internal_port`` (a free port if not given), and ``extra``
    over its environment."""
    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "IM_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
            "IM_KAFKA__TOPIC_PREFIX": settings.kafka.topic_prefix,
            "IM_KAFKA__REPLICATION_FACTOR": str(settings.kafka.replication_factor),
            "IM_AUTH__JWT_ALGORITHM": "HS256",
            "IM_AUTH__JWT_SECRET": settings.auth.jwt_secret.get_secret_value(),
            "IM_AUTH__JWT_ISSUER": settings.auth.jwt_issuer,
            "IM_AUTH__JWT_AUDIENCE": settings.auth.jwt_audience,
            "IM_INGRESS__HOST": LOOPBACK,
            "IM_INGRESS__PORT": str(port),
            "IM_INGRESS__INTERNAL_HOST": LOOPBACK,
            "IM_INGRESS__INTERNAL_PORT": str(internal_port or free_port()),
            "IM_INGRESS__NODE_ID": node_id,
        }
    )
    env.update(extra)
    command = imstream_command("run", "ingress")
    return ServerProcess("imstream ingress", command, env=env, port=port, log_path=log_path)


def prometheus_value(url: str, name: str) -> float | None:
    """The sum of a metric's samples on a Prometheus text page, or ``None`` if it is absent."""
    try:
        response = httpx.get(url, timeout=10)
        response.raise_for_status()
    except httpx.HTTPError:
        return None
    values = [
        sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name == name
    ]
    return sum(values) if values else None


# ---------------------------------------------------------------------------------------------
# Numbers and results
# ---------------------------------------------------------------------------------------------


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99/max of latencies given in seconds, in milliseconds (nearest rank)."""
    if not seconds:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(seconds)

    def rank(fraction: float) -> float:
        index = min(len(ordered) - 1, max(0, int(fraction * len(ordered) + 0.5) - 1))
        return round(ordered[index] * 1000, 2)

    return {"p50": rank(0.50), "p95": rank(0.95), "p99": rank(0.99), "max": rank(1.0)}


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def machine_facts(settings: Settings) -> dict[str, Any]:
    """What a reader needs to judge the numbers: the machine, the runtimes and the libraries."""
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        None,
    )
    memory_total_kb = psutil.virtual_memory().total // 1024
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_total_mb": memory_total_kb // 1024,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "kafka_version": settings.stack.kafka_version,
        "kafka_bootstrap_servers": settings.kafka.bootstrap_servers,
        "librdkafka": confluent_kafka.libversion()[0],
        "libraries": {
            name: _version(name)
            for name in (
                "confluent-kafka",
                "uvicorn",
                "fastapi",
                "starlette",
                "wsproto",
                "websockets",
                "pydantic",
                "uvloop",
                "httptools",
            )
        },
        "load_average_at_start": list(os.getloadavg()),
    }


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_results(section: str, results: Mapping[str, Any], path: Path = RESULTS_PATH) -> None:
    """Store one benchmark's results as ``section`` of the results file, keeping the others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = {}
    if path.exists():
        document = json.loads(path.read_text())
    document[section] = results
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
