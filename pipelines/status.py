"""``imstream status``: every process ``imstream up`` runs, with its consumer lag and last error.

Reads the supervisor's state file (``<run dir>/processes.json``), tells each process ready,
starting or down from its pid and its ready file (``core/readiness.py``), reads the
committed offsets of each process kind's consumer groups against the topics' end offsets, and
takes the last ERROR/CRITICAL line of each process's log. Lag is in records; a partition one
record behind counts as caught up (the one is a transaction's commit marker, which consumers never
receive), so a real lag of exactly one record per partition is not shown.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.lag import group_lag
from core.settings import Settings
from pipelines.console import table_text
from pipelines.processes import consumer_groups
from pipelines.supervisor import ProcessState, child_state, load_state

_ERROR_LINE = re.compile(r" (ERROR|CRITICAL) ")


@dataclass(frozen=True)
class ProcessStatus:
    name: str
    pid: int | None
    state: ProcessState
    restarts: int
    lag: int | None
    last_error: str | None
    log: str


def last_error(log: Path) -> str | None:
    try:
        lines = log.read_text(errors="replace").splitlines()[-2000:]
    except FileNotFoundError:
        return None
    errors = [line for line in lines if _ERROR_LINE.search(line)]
    return errors[-1][:200] if errors else None


def statuses(settings: Settings) -> list[ProcessStatus]:
    groups = consumer_groups(settings)
    result = []
    for entry in load_state(settings.stack.run_dir):
        pid = entry.get("pid")
        pid = pid if isinstance(pid, int) else None
        kind = str(entry.get("kind"))
        lags = [group_lag(settings, g, t) for g, t in groups.get(kind, {}).items()]
        known = [lag for lag in lags if lag is not None]
        log = Path(str(entry.get("log")))
        restarts = entry.get("restarts")
        ready_file = entry.get("ready_file")
        result.append(
            ProcessStatus(
                name=str(entry.get("name")),
                pid=pid,
                state=child_state(pid, Path(ready_file) if isinstance(ready_file, str) else None),
                restarts=restarts if isinstance(restarts, int) else 0,
                lag=sum(known) if known and len(known) == len(lags) else None,
                last_error=last_error(log),
                log=str(log),
            )
        )
    return result


def status_command(settings: Settings, echo: Callable[[str], None]) -> int:
    """Print a line per process; 1 when ``imstream up`` is not running or a process is not ready
    (down, or still starting)."""
    found = statuses(settings)
    if not found:
        echo("imstream up is not running here (no processes.json in the state dir)")
        return 1
    rows = [
        (
            item.name,
            str(item.state),
            str(item.pid or "-"),
            str(item.restarts),
            "-" if item.lag is None else str(item.lag),
            item.last_error or "-",
        )
        for item in found
    ]
    header = ("PROCESS", "STATE", "PID", "RESTARTS", "LAG", "LAST ERROR")
    echo(table_text(header, rows, right={"PID", "RESTARTS", "LAG"}))
    others = {
        state: [item.name for item in found if item.state is state]
        for state in (ProcessState.STARTING, ProcessState.DOWN)
    }
    ready = len(found) - sum(map(len, others.values()))
    echo(
        f"{ready} of {len(found)} processes ready"
        + "".join(f"; {', '.join(names)} {state}" for state, names in others.items() if names)
        + f"; consumer lag {sum(item.lag or 0 for item in found)} records"
    )
    return 0 if ready == len(found) else 1
