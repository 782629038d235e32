"""Runs imstream process kinds as child processes: restarts a crashed one, stops all in order.

Used by ``imstream up``. Each child is ``python -m pipelines run <kind>`` in its own session (so a
terminal's Ctrl-C reaches only the supervisor, which then stops the children in order), named
(``ingress-1``, ``ingress-2``, ``stream-worker`` …), with its own ``IM_`` overrides and its output
appended to ``<state dir>/logs/<name>.log``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.stack import process

#: Restart delays after consecutive crashes, in seconds; the last one repeats.
BACKOFF_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0)


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
    env: dict[str, str] = field(default_factory=dict)
    nice: int = 0
    pid: int | None = None
    started_at: float = 0.0
    crashes: int = 0
    restarts: int = 0
    restart_at: float | None = None
    history: list[str] = field(default_factory=list)

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
        child.pid = process.start_detached(
            child.argv, cwd=Path.cwd(), log_path=child.log_path, env=child.env, nice=child.nice
        )
        child.started_at = time.monotonic()
        child.restart_at = None
        self.report(f"{child.name}: started (pid {child.pid}, log {child.log_path})")
        self.save()

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
                    f"{child.name}: exited (pid {child.pid}); restarting in {delay:.0f}s. "
                    f"Last log lines: {tail}"
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
                "restarts": child.restarts,
                "started_at": time.time() - (time.monotonic() - child.started_at),
            }
            for child in self.children
        ]
        temporary = self.state_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(state, indent=2))
        temporary.replace(self.state_path)


def load_state(state_dir: Path) -> list[dict[str, object]]:
    """The children ``imstream up`` runs, as it last wrote them; empty when it is not running."""
    try:
        loaded = json.loads((state_dir / "processes.json").read_text())
    except (FileNotFoundError, ValueError):
        return []
    return [entry for entry in loaded if isinstance(entry, dict)]
