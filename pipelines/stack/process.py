"""Detached server processes owned by the stack: start, find, stop — and never leave one behind.

Every process gets a marker on its command line (``-Dimstream.service=<name>@<state dir>``) so that
the stack recognises its own processes even after a lost pid file, and never signals a stranger
that happens to have reused a pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil


def marker(name: str, state_dir: Path) -> str:
    return f"-Dimstream.service={name}@{state_dir.resolve()}"


#: What a process that has ended but not been collected looks like: no longer running.
_ENDED = {psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD}


def find_pids(tag: str) -> list[int]:
    """Pids of live processes whose command line carries ``tag`` (processes this user may not
    inspect have no command line here, and are never ours)."""
    pids = []
    for found in psutil.process_iter(["cmdline", "status"]):
        cmdline = found.info["cmdline"] or []
        if tag in " ".join(cmdline) and found.info["status"] not in _ENDED:
            pids.append(found.pid)
    return sorted(pids)


def rss_bytes(pid: int) -> int | None:
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None


def start_detached(
    command: Sequence[str],
    *,
    cwd: Path,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    nice: int = 0,
) -> int:
    """Start ``command`` in its own session with output appended to ``log_path`` (and ``env``
    added to this process's environment), ``nice`` steps below this process's CPU priority;
    return its pid."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            list(command),
            cwd=cwd,
            env={**os.environ, **env} if env else None,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    if nice:
        lower_priority(process.pid, nice)
    return process.pid


def lower_priority(pid: int, nice: int) -> None:
    """Run ``pid`` ``nice`` steps below this process's CPU priority.

    Set from here (a preexec function is not safe in a threaded parent); the child's first
    milliseconds run at the parent's priority, which matters to nobody. The process is in a
    session of its own, and with the kernel's autogroup scheduling (most desktop and server
    kernels) a session competes with other sessions as one group whose weight a process's nice
    value does not change: the group's nice (``/proc/<pid>/autogroup``) is set too — a Linux
    knob that psutil does not cover, written directly.
    """
    own = os.getpriority(os.PRIO_PROCESS, 0)
    os.setpriority(os.PRIO_PROCESS, pid, min(19, own + nice))
    with contextlib.suppress(OSError):  # no autogroup scheduling here: the nice value is enough
        Path(f"/proc/{pid}/autogroup").write_text(str(min(19, nice)))


def is_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not; one this user may not inspect does)."""
    try:
        return psutil.Process(pid).status() not in _ENDED
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def reap(pid: int) -> int | None:
    """Collect ``pid`` if it is our child, so it does not linger as a zombie; its exit code
    (negative: the signal that ended it) when it was collected now, else None."""
    try:
        collected, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status) if collected == pid else None


def stop(pids: Sequence[int], timeout: float) -> list[int]:
    """SIGTERM ``pids``, wait up to ``timeout`` seconds, then SIGKILL; return the killed ones."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in pids:
            reap(pid)
        if not any(is_alive(pid) for pid in pids):
            return []
        time.sleep(0.2)
    killed = [pid for pid in pids if is_alive(pid)]
    for pid in killed:
        _signal(pid, signal.SIGKILL)
    for pid in killed:
        for _ in range(50):
            reap(pid)
            if not is_alive(pid):
                break
            time.sleep(0.1)
    return killed


def _signal(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def last_lines(path: Path, count: int = 20) -> list[str]:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            text = handle.read().decode(errors="replace")
    except OSError:
        return []
    return text.splitlines()[-count:]
