"""The ready file: announced once, believed only while its process runs, removed by its owner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from core.readiness import ReadyFile, read_announcement
from pipelines.supervisor import ProcessState, child_state


def test_announce_writes_once_and_withdraw_removes_it(tmp_path: Path) -> None:
    path = tmp_path / "ready" / "cql-sink.json"
    ready = ReadyFile(path)
    assert read_announcement(path) is None
    ready.announce("group g, keyspace k")
    first = read_announcement(path)
    assert first is not None
    assert (first.pid, first.detail) == (os.getpid(), "group g, keyspace k")
    ready.announce("again")  # a second assignment announces nothing new
    assert read_announcement(path) == first
    ready.withdraw()
    assert not path.exists()


def test_withdraw_leaves_another_process_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "worker.json"
    mine = ReadyFile(path)
    mine.announce("old run")
    # The process was restarted: the new run's file names another pid.
    path.write_text(json.dumps({"pid": os.getpid() + 1, "ready_at": 1.0, "detail": "new run"}))
    mine.withdraw()
    assert path.exists()


def test_no_path_announces_nothing(tmp_path: Path) -> None:
    ready = ReadyFile(None)
    ready.announce("x")
    assert ready.announced
    ready.withdraw()
    assert list(tmp_path.iterdir()) == []


def test_malformed_files_are_not_announcements(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    for text in ("", "{", "[]", '{"pid": "1", "ready_at": 1}', '{"pid": 1}'):
        path.write_text(text)
        assert read_announcement(path) is None, text


def test_a_file_counts_only_while_the_process_that_wrote_it_runs(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    ReadyFile(path).announce("me")
    assert child_state(os.getpid(), path) is ProcessState.READY
    assert child_state(None, path) is ProcessState.DOWN
    assert child_state(os.getpid(), tmp_path / "missing.json") is ProcessState.STARTING
    # A file left by a killed process says nothing about the pid running now.
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    path.write_text(json.dumps({"pid": int(gone.stdout), "ready_at": 1.0, "detail": "old"}))
    assert child_state(os.getpid(), path) is ProcessState.STARTING


def test_the_ready_command_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ready.json"

    def ready(file: Path | None) -> subprocess.CompletedProcess[str]:
        environment = {k: v for k, v in os.environ.items() if k != "IM_READY_FILE"}
        if file is not None:
            environment["IM_READY_FILE"] = str(file)
        return subprocess.run(
            [sys.executable, "-m", "pipelines", "ready"],
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    unset = ready(None)
    assert unset.returncode == 2
    assert "[ready-file-unset]" in unset.stderr
    starting = ready(path)
    assert starting.returncode == 1
    assert starting.stdout.startswith("starting: no running process announced readiness")
    ReadyFile(path).announce("group g")  # this test's process, which runs
    done = ready(path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"(pid {os.getpid()}: group g)" in done.stdout
