"""Runs imstream process kinds as child processes: restarts a crashed one, stops all in order.

Used by ``imstream up``. Each child is ``python -m pipelines run <kind>`` in its own session (so a
terminal's Ctrl-C reaches only the supervisor, which then stops the children in order), named
(``ingress-1``, ``ingress-2``, ``stream-worker`` …), with its own ``IM_`` overrides and its output
appended to ``<run dir>/logs/<name>.log``.

Each child announces when it is ready in ``<run dir>/ready/<name>.json`` (``IM_READY_FILE``,
``core/readiness.py``). ``wait_ready`` is the start-up: it returns once every child announced,
and a child that exits before it announced, or one still silent at the deadline, is a start-up
failure (``StartupError``: the code, the child and its last log lines) rather than something
to restart — the same cause would stop it again.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from core.readiness import read_announcement
from pipelines.stack import process

#: Restart delays after consecutive crashes, in seconds; the last one repeats.
BACKOFF_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0)
#: How often the start-up looks at the children's ready files.
READY_POLL_SECONDS = 0.1
#: The start-up's progress line is repeated at least this often while nothing changes.
PROGRESS_SECONDS = 5.0
#: Log lines of a child that failed the start-up, shown to the operator.
LOG_LINES_ON_FAILURE = 15


class ProcessState(StrEnum):
    """A supervised process as ``imstream status`` shows it."""

    READY = "ready"
    STARTING = "starting"
    DOWN = "down"


class StartupErrorCode(StrEnum):
    #: A child exited before it announced that it is ready.
    EXITED = "process-exited"
    #: A child did not announce that it is ready within the start-up timeout.
    NOT_READY = "not-ready"
    #: The operator stopped the start-up (Ctrl-C, SIGTERM).
    INTERRUPTED = "interrupted"


class StartupError(Exception):
    """The start-up failed; ``str(failure)`` says which child, why, and its last log lines."""

    def __init__(self, code: StartupErrorCode, child: str | None, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.child = child


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """One process to run: ``imstream run <kind>`` as ``name`` with ``env`` added, ``nice``
    steps below the supervisor's CPU priority."""

    name: str
    kind: str
    env: dict[str, str] = field(default_factory=dict)
    nice: int = 0


@dataclass(slots=True)
class Child:
    name: str
    kind: str
    log_path: Path
    ready_path: Path
    env: dict[str, str] = field(default_factory=dict)
    nice: int = 0
    pid: int | None = None
    started_at: float = 0.0
    crashes: int = 0
    restarts: int = 0
    restart_at: float | None = None
    history: list[str] = field(default_factory=list)
    #: How its last run ended, when the supervisor collected it.
    exit_code: int | None = None

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "pipelines", "run", self.kind]


class Supervisor:
    def __init__(
        self,
        specs: Sequence[ChildSpec | str],
        log_dir: Path,
        report: Callable[[str], None],
    ) -> None:
        self.children = []
        for given in specs:
            spec = ChildSpec(name=given, kind=given) if isinstance(given, str) else given
            self.children.append(
                Child(
                    name=spec.name,
                    kind=spec.kind,
                    log_path=log_dir / f"{spec.name}.log",
                    ready_path=log_dir.parent / "ready" / f"{spec.name}.json",
                    env=dict(spec.env),
                    nice=spec.nice,
                )
            )
        self.report = report
        #: What ``imstream status`` reads: each child's name, kind, pid, log and restarts.
        self.state_path = log_dir.parent / "processes.json"

    def start_all(self) -> None:
        for child in self.children:
            self._start(child)

    def _start(self, child: Child) -> None:
        # A file left by the child's last run (killed, so it could not remove it) says nothing
        # about this one.
        child.ready_path.unlink(missing_ok=True)
        child.pid = process.start_detached(
            child.argv,
            cwd=Path.cwd(),
            log_path=child.log_path,
            env={**child.env, "IM_READY_FILE": str(child.ready_path)},
            nice=child.nice,
        )
        child.started_at = time.monotonic()
        child.restart_at = None
        child.exit_code = None
        self.report(f"{child.name}: started (pid {child.pid}, log {child.log_path})")
        self.save()

    def wait_ready(
        self,
        timeout: float,
        progress: Callable[[str], None],
        interrupted: Callable[[], bool] = lambda: False,
    ) -> dict[str, float]:
        """Block until every child announced it is ready; the seconds each took after the start.

        Raises ``StartupError`` when a child exits first, when ``timeout`` seconds pass, or when
        ``interrupted()`` turns true; the children are left running for the caller to stop.
        ``progress`` gets a line whenever the set of children still starting changes, and every
        ``PROGRESS_SECONDS`` while it does not.
        """
        began = time.monotonic()
        took: dict[str, float] = {}
        shown, shown_at = "", 0.0
        while True:
            for child in self.children:
                if child.name in took:
                    continue
                if child.pid is None or not self._alive(child):
                    raise StartupError(
                        StartupErrorCode.EXITED,
                        child.name,
                        f"{child.name} exited{self._exit_status(child)} before it was ready. "
                        + self._log_tail(child),
                    )
                if self.state(child) is ProcessState.READY:
                    took[child.name] = time.monotonic() - began
            waiting = [child.name for child in self.children if child.name not in took]
            if not waiting:
                return took
            elapsed = time.monotonic() - began
            line = f"waiting for {', '.join(waiting)} to be ready"
            if line != shown or elapsed - shown_at >= PROGRESS_SECONDS:
                shown, shown_at = line, elapsed
                progress(f"{line} ({len(took)} of {len(self.children)} ready, {elapsed:.0f}s)")
            if interrupted():
                raise StartupError(
                    StartupErrorCode.INTERRUPTED, None, "the start-up was interrupted"
                )
            if elapsed > timeout:
                (first, *_) = [c for c in self.children if c.name not in took]
                raise StartupError(
                    StartupErrorCode.NOT_READY,
                    first.name,
                    f"{', '.join(waiting)} not ready within {timeout:g}s "
                    "(IM_STACK__READY_TIMEOUT_SECONDS). " + self._log_tail(first),
                )
            time.sleep(READY_POLL_SECONDS)

    def state(self, child: Child) -> ProcessState:
        """Down (not running), starting (running, not yet announced) or ready."""
        return child_state(child.pid, child.ready_path)

    def _alive(self, child: Child) -> bool:
        """Whether the child runs; collects it (and its exit status) once it ended."""
        assert child.pid is not None
        code = process.reap(child.pid)
        if code is not None:
            child.exit_code = code
            return False
        return process.is_alive(child.pid)

    @staticmethod
    def _exit_status(child: Child) -> str:
        return "" if child.exit_code is None else f" with status {child.exit_code}"

    @staticmethod
    def _log_tail(child: Child) -> str:
        tail = process.last_lines(child.log_path, LOG_LINES_ON_FAILURE)
        return f"Last lines of {child.log_path}:\n  " + "\n  ".join(tail or ["(the log is empty)"])

    def check(self) -> None:
        """Notice crashed children and restart them with backoff; call this periodically."""
        now = time.monotonic()
        for child in self.children:
            if child.pid is not None:
                if self._alive(child):
                    if now - child.started_at > 60:
                        child.crashes = 0
                    continue
                delay = BACKOFF_SECONDS[min(child.crashes, len(BACKOFF_SECONDS) - 1)]
                tail = " | ".join(process.last_lines(child.log_path, 3))
                self.report(
                    f"{child.name}: exited{self._exit_status(child)} (pid {child.pid}); "
                    f"restarting in {delay:.0f}s. Last log lines: {tail}"
                )
                child.pid = None
                child.crashes += 1
                child.restarts += 1
                child.restart_at = now + delay
                self.save()
            elif child.restart_at is not None and now >= child.restart_at:
                self._start(child)

    def stop_all(self, timeout: float) -> list[str]:
        """SIGTERM every child (they drain), SIGKILL what is left after ``timeout``."""
        done = []
        for child in reversed(self.children):
            if child.pid is None:
                continue
            killed = process.stop([child.pid], timeout)
            how = "killed after the stop timeout" if killed else "stopped"
            done.append(f"{child.name}: {how} (pid {child.pid})")
            child.pid = None
        self.state_path.unlink(missing_ok=True)
        return done

    def save(self) -> None:
        """Write the children's state for ``imstream status`` (atomically)."""
        state = [
            {
                "name": child.name,
                "kind": child.kind,
                "pid": child.pid,
                "log": str(child.log_path),
                "ready_file": str(child.ready_path),
                "restarts": child.restarts,
                "started_at": time.time() - (time.monotonic() - child.started_at),
            }
            for child in self.children
        ]
        temporary = self.state_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(state, indent=2))
        temporary.replace(self.state_path)


def load_state(run_dir: Path) -> list[dict[str, object]]:
    """The children ``imstream up`` runs, as it last wrote them; empty when it is not running."""
    try:
        loaded = json.loads((run_dir / "processes.json").read_text())
    except (FileNotFoundError, ValueError):
        return []
    return [entry for entry in loaded if isinstance(entry, dict)]


def child_state(pid: int | None, ready_path: Path | None) -> ProcessState:
    """A process's state from its pid and ready file: ready only while the process that wrote
    the file runs."""
    if pid is None or not process.is_alive(pid):
        return ProcessState.DOWN
    found = read_announcement(ready_path) if ready_path is not None else None
    return ProcessState.READY if found is not None and found.pid == pid else ProcessState.STARTING
