"""A benchmark that needs something another process holds refuses up front, in one line that
names what is taken and by whom (bench/common.py: ``require_chdb_path_free``,
``require_port_free``, ``ensure_local_stack``): never a traceback half-way through, and never
"starting" (then stopping) the stack another process runs on."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from io import StringIO
from pathlib import Path

import pytest

from bench.common import Progress, chdb_path_holder, ensure_local_stack
from core.settings import Settings
from pipelines.stack.manager import LocalStack

HOLD_CHDB = """
import sys, time
import chdb.session
session = chdb.session.Session(sys.argv[1])
session.query("SELECT 1")
print("holding", flush=True)
time.sleep(120)
"""


@pytest.fixture
def held_chdb_path(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A chDB path another process has open (as ``make run``'s ClickHouse sink holds the
    default one), and that process's pid."""
    path = tmp_path / "chdb"
    path.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_CHDB, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "holding"
        yield path, holder.pid
    finally:
        holder.kill()
        holder.wait(10)


@pytest.fixture
def held_port() -> Iterator[int]:
    """A loopback port this process listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def run_bench(module: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_refused(done: subprocess.CompletedProcess[str], *named: str) -> str:
    """Exit code 1 and one ``error:`` line on stderr naming each of ``named``."""
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: "), done.stderr
    for what in named:
        assert what in lines[0], done.stderr
    return lines[0]


def test_a_held_chdb_path_is_named_with_its_holder(held_chdb_path: tuple[Path, int]) -> None:
    path, pid = held_chdb_path
    holder = chdb_path_holder(path)
    assert holder is not None and holder.startswith(f"pid {pid} ")
    assert chdb_path_holder(path.parent) is None  # no chDB there at all


def test_the_dashboards_benchmark_refuses_a_held_chdb_path(
    held_chdb_path: tuple[Path, int],
) -> None:
    path, pid = held_chdb_path
    done = run_bench(
        "bench.dashboards",
        "--keep",
        str(path),
        "--rows",
        "10",
        "--runs",
        "1",
        "--no-write",
        env={"IM_CLICKHOUSE__CHDB_PATH": str(path)},
    )
    line = assert_refused(done, f"chDB path {path}", f"pid {pid}", "--keep")
    assert "Traceback" not in line


def test_the_large_group_benchmark_refuses_a_stack_port_held_by_another_process(
    tmp_path: Path, held_port: int
) -> None:
    """A stack with nothing running in its state directory (the benchmark would start it) and
    its Kafka broker port held by this test: refused before anything starts."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    # Were the check missing, the stack's own one would still refuse, without fetching jars.
    (state_dir / "jars").symlink_to(Settings().stack.state_dir / "jars")
    done = run_bench(
        "bench.large_group",
        "--members",
        "10",
        "--quick",
        "--no-crossing",
        "--no-write",
        env={
            "IM_STACK__STATE_DIR": str(state_dir),
            "IM_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{held_port}",
        },
    )
    assert_refused(done, f"port {held_port}", "kafka broker port", f"pid {os.getpid()}")
    assert not list(state_dir.glob("kafka*")), "the stack was started"


def test_a_held_shared_chdb_path_leaves_the_running_stack_alone(
    local_stack: LocalStack, settings: Settings, held_chdb_path: tuple[Path, int]
) -> None:
    """``make run`` holding the shared chDB path: the benchmarks' stack (Kafka, Cassandra) is up
    all the same, so nothing is started here, and so nothing would be stopped on the way out."""
    path, _ = held_chdb_path
    clickhouse = settings.clickhouse.model_copy(update={"chdb_path": path})
    held = settings.model_copy(update={"clickhouse": clickhouse})
    assert not LocalStack(held).is_up()  # what the benchmarks asked before: "down"
    said = StringIO()
    assert ensure_local_stack(held, Progress(said)) == ()
    assert "starting" not in said.getvalue()
