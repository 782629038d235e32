"""Where a server's time goes: a py-spy sampling profile of a running process, summarised.

py-spy (``pip install py-spy``) samples the Python stacks of another process without stopping it
(``--nonblocking``), so the profile is taken while the benchmark drives the server. Its raw
output has one line per distinct stack: ``thread (tid);frame;frame;… count``, each frame
``function (file:line)``. The summary attributes each sample to an *area* (our packages, the
libraries under them, the event loop) twice: by its innermost frame (where the CPU actually was)
and by every area on its stack (what the time was spent for).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

#: Areas by the path of a frame's file (py-spy's ``--full-filenames``), first match wins.
_AREAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("imstream ingress/", (str(REPO_ROOT / "ingress") + "/",)),
    ("imstream schemas/", (str(REPO_ROOT / "schemas") + "/",)),
    ("imstream streams/", (str(REPO_ROOT / "streams") + "/",)),
    ("imstream pipelines/", (str(REPO_ROOT / "pipelines") + "/",)),
    ("pydantic", ("/site-packages/pydantic/", "/site-packages/pydantic_core/")),
    ("uvicorn", ("/site-packages/uvicorn/",)),
    ("WebSocket protocol (wsproto, h11)", ("/site-packages/wsproto/", "/site-packages/h11/")),
    ("starlette / fastapi", ("/site-packages/starlette/", "/site-packages/fastapi/")),
    ("confluent-kafka (Python side)", ("/site-packages/confluent_kafka/",)),
    ("JWT (pyjwt, cryptography)", ("/site-packages/jwt/", "/site-packages/cryptography/")),
    ("prometheus_client", ("/site-packages/prometheus_client/",)),
    ("start-up (typer, click)", ("/site-packages/typer/", "/site-packages/click/")),
    ("other libraries", ("/site-packages/",)),
    ("asyncio event loop", ("/asyncio/", "/selectors.py")),
    ("json", ("/json/",)),
    ("logging", ("/logging/",)),
    ("threading", ("/threading.py",)),
)
_STDLIB = re.compile(r"^.*/lib/python3\.\d+/")
_STARTUP_AREAS = frozenset({"start-up (typer, click)", "imstream pipelines/"})
#: The thread an asyncio server runs its event loop on.
_LOOP_THREAD = "MainThread"


def py_spy_path() -> Path | None:
    """The py-spy next to this interpreter, or on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    if beside.exists():
        return beside
    found = shutil.which("py-spy")
    return Path(found) if found else None


def start_recording(pid: int, seconds: float, output: Path) -> subprocess.Popen[bytes] | None:
    """Start sampling ``pid`` for ``seconds`` at 100 Hz into ``output``; ``None`` without py-spy."""
    executable = py_spy_path()
    if executable is None:
        return None
    return subprocess.Popen(
        [
            str(executable),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, round(seconds))),
            "--rate",
            "100",
            "--format",
            "raw",
            "--threads",
            "--full-filenames",
            "--nonblocking",
            "--output",
            str(output),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _area(file: str) -> str:
    for name, markers in _AREAS:
        if any(marker in file for marker in markers):
            return name
    return "other standard library (dataclasses, uuid, enum, …)"


def _short(file: str) -> str:
    """The path from the package on: ``ingress/gateway.py``, ``asyncio/events.py``."""
    for marker in ("/site-packages/", str(REPO_ROOT) + "/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return _STDLIB.sub("", file)


def summarise(
    raw_profile: Path, top: int = 15, *, threads: tuple[str, ...] = (_LOOP_THREAD,)
) -> dict[str, Any]:
    """Samples per thread and, for the event-loop thread, in % of its samples:

    - ``self_by_area_pct``: the innermost frame's area, where the CPU was;
    - ``inclusive_by_area_pct``: every area on the stack below the event loop's callback frame
      (``Handle._run``), what the callback spent its time in;
    - ``top_self_functions_pct`` and ``top_imstream_functions_inclusive_pct``.
    """
    by_thread: Counter[str] = Counter()
    self_area: Counter[str] = Counter()
    inclusive_area: Counter[str] = Counter()
    self_function: Counter[str] = Counter()
    imstream_inclusive: Counter[str] = Counter()
    loop_samples = 0
    for line in raw_profile.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        thread, *frames = stack.split(";")
        # "thread (1234): MainThread" -> "MainThread"
        thread_name = thread.partition(": ")[2] or thread
        by_thread[thread_name] += count
        if thread_name not in threads:
            continue
        loop_samples += count
        parsed = [match for frame in frames if (match := _FRAME.match(frame)) is not None]
        if not parsed:
            self_area["(no Python frame)"] += count
            continue
        leaf = parsed[-1]
        self_area[_area(leaf["file"])] += count
        self_function[f"{leaf['function']} ({_short(leaf['file'])})"] += count
        for area in {_area(frame["file"]) for frame in _callback_frames(parsed)}:
            inclusive_area[area] += count
        for function in {
            f"{frame['function']} ({_short(frame['file'])})"
            for frame in _callback_frames(parsed)
            if _area(frame["file"]).startswith("imstream")
        }:
            imstream_inclusive[function] += count

    def percent(counter: Counter[str], of: int, limit: int | None = None) -> dict[str, float]:
        if not of:
            return {}
        return {name: round(100 * count / of, 1) for name, count in counter.most_common(limit)}

    total = sum(by_thread.values())
    return {
        "samples": total,
        "rate_hz": 100,
        "samples_by_thread_pct": percent(by_thread, total),
        "profiled_threads": list(threads),
        "event_loop_thread" if threads == (_LOOP_THREAD,) else "profiled_thread_samples": {
            "samples": loop_samples,
            "self_by_area_pct": percent(self_area, loop_samples),
            "inclusive_by_area_pct": percent(inclusive_area, loop_samples),
            "top_self_functions_pct": percent(self_function, loop_samples, top),
            "top_imstream_functions_inclusive_pct": percent(imstream_inclusive, loop_samples, top),
        },
    }


def _callback_frames(frames: list[re.Match[str]]) -> list[re.Match[str]]:
    """The frames below the innermost ``Handle._run``: the work of one event-loop callback.

    A stack sampled without pausing the process may lack its outer frames; then every frame but
    those of start-up counts.
    """
    for index in range(len(frames) - 1, -1, -1):
        if frames[index]["function"] == "Handle._run":
            return frames[index + 1 :]
    return [frame for frame in frames if _area(frame["file"]) not in _STARTUP_AREAS]
