"""A process's start-up readiness, announced in a small file that others read.

Each process kind decides when it is ready to do its work, and logs its ``READY_MESSAGE`` then:
an ingress node once it listens and its ``/readyz`` holds (Kafka answers, live delivery is
assigned); the stream worker once both processors are assigned and have restored their state;
each sink once its consumer group assigned it partitions (the ClickHouse sink's analytics API
answers before that). At the same moment it writes the ready file named by ``IM_READY_FILE``:
``imstream up`` waits for every child's file before it says "up", ``imstream status`` shows
ready / starting / down from it, and the container healthchecks (``imstream ready``) read it.

The file is JSON ``{"pid": …, "ready_at": …, "detail": …}``, written atomically once and removed
when the process exits normally. A process killed with SIGKILL leaves it behind, so a reader
believes it only while the pid it names is alive (and the supervisor removes a child's file
before starting the child again).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Announcement:
    """What a ready file says: which process, since when (Unix time), and what it does."""

    pid: int
    ready_at: float
    detail: str


class ReadyFile:
    """The ready file of this process; ``path`` None (no ``IM_READY_FILE``) announces nothing."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.announced = False

    def announce(self, detail: str) -> None:
        """Write the file (atomically); later calls do nothing. Safe from any thread."""
        if self.announced:
            return
        self.announced = True
        if self.path is None:
            return
        body = {"pid": os.getpid(), "ready_at": time.time(), "detail": detail}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(body))
        temporary.replace(self.path)

    def withdraw(self) -> None:
        """Remove the file if this process wrote it (at exit): a stopped process is not ready."""
        if self.path is None or not self.announced:
            return
        found = read_announcement(self.path)
        if found is not None and found.pid == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def read_announcement(path: Path) -> Announcement | None:
    """The announcement at ``path``; None when there is none or it cannot be read. Whether its
    process still runs is the caller's check (a killed process leaves its file behind)."""
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(body, dict):
        return None
    pid, ready_at, detail = body.get("pid"), body.get("ready_at"), body.get("detail")
    if not isinstance(pid, int) or not isinstance(ready_at, int | float):
        return None
    return Announcement(pid=pid, ready_at=float(ready_at), detail=str(detail or ""))
