"""Runs imstream process kinds as child processes: restarts a crashed one, stops all in order.

Used by ``imstream up``. Each child is ``python -m pipelines run <kind>`` in its own session (so a
terminal's Ctrl-C reaches only the supervisor, which then stops the children in order), with its
output appended to ``<state dir>/logs/<kind>.log``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.stack import process

#: Restart delays after consecutive crashes, in seconds; the last one repeats.
BACKOFF_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass(slots=True)
class Child:
    kind: str
    log_path: Path
    pid: int | None = None
    started_at: float = 0.0
    crashes: int = 0
    restart_at: float | None = None
    history: list[str] = field(default_factory=list)

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "pipelines", "run", self.kind]


class Supervisor:
    def __init__(self, kinds: Sequence[str], log_dir: Path, report: Callable[[str], None]) -> None:
        self.children = [Child(kind=kind, log_path=log_dir / f"{kind}.log") for kind in kinds]
        self.report = report

    def start_all(self) -> None:
        for child in self.children:
            self._start(child)

    def _start(self, child: Child) -> None:
        child.pid = process.start_detached(child.argv, cwd=Path.cwd(), log_path=child.log_path)
        child.started_at = time.monotonic()
        child.restart_at = None
        self.report(f"{child.kind}: started (pid {child.pid}, log {child.log_path})")

    def check(self) -> None:
        """Notice crashed children and restart them with backoff; call this periodically."""
        now = time.monotonic()
        for child in self.children:
            if child.pid is not None:
                process.reap(child.pid)
                if process.is_alive(child.pid):
                    if now - child.started_at > 60:
                        child.crashes = 0
                    continue
                delay = BACKOFF_SECONDS[min(child.crashes, len(BACKOFF_SECONDS) - 1)]
                tail = " | ".join(process.last_lines(child.log_path, 3))
                self.report(
                    f"{child.kind}: exited (pid {child.pid}); restarting in {delay:.0f}s. "
                    f"Last log lines: {tail}"
                )
                child.pid = None
                child.crashes += 1
                child.restart_at = now + delay
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
            done.append(f"{child.kind}: {how} (pid {child.pid})")
            child.pid = None
        return done
