"""Finding a Java runtime that can run Kafka 4 and Cassandra 5 (both need Java 17 or newer)."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pipelines.stack.errors import StackError, StackErrorCode

MINIMUM_JAVA = 17
_VERSION = re.compile(r'version "(?P<version>[^"]+)"')


@dataclass(frozen=True)
class JavaRuntime:
    executable: Path
    major_version: int
    version_text: str


def parse_major_version(version_output: str) -> int | None:
    """The major version from ``java -version`` output (``1.8.0_292`` → 8, ``17.0.15`` → 17)."""
    match = _VERSION.search(version_output)
    if match is None:
        return None
    parts = match.group("version").split(".")
    try:
        major = int(parts[0].split("-")[0].split("+")[0])
        if major == 1 and len(parts) > 1:
            return int(parts[1])
    except ValueError:
        return None
    return major


def find_java(java_home: Path | None) -> JavaRuntime:
    """The Java runtime to use: ``java_home/bin/java`` when given, else ``java`` on the PATH."""
    if java_home is not None:
        candidate = java_home / "bin" / "java"
        if not candidate.is_file():
            raise StackError(
                StackErrorCode.JAVA_MISSING,
                f"no java at {candidate} (from IM_STACK__JAVA_HOME / JAVA_HOME); install Java "
                f"{MINIMUM_JAVA}+ (e.g. apt-get install openjdk-17-jre-headless) or point "
                f"IM_STACK__JAVA_HOME at a JDK {MINIMUM_JAVA}+",
            )
        executable = candidate
    else:
        found = shutil.which("java")
        if found is None:
            raise StackError(
                StackErrorCode.JAVA_MISSING,
                f"java was not found on the PATH; install Java {MINIMUM_JAVA}+ "
                f"(e.g. apt-get install openjdk-17-jre-headless) or set IM_STACK__JAVA_HOME",
            )
        executable = Path(found)
    try:
        completed = subprocess.run(
            [str(executable), "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise StackError(
            StackErrorCode.JAVA_MISSING, f"{executable} -version could not run: {error}"
        ) from error
    output = completed.stderr + completed.stdout
    major = parse_major_version(output)
    if major is None:
        raise StackError(
            StackErrorCode.JAVA_MISSING,
            f"{executable} -version printed no version we understand: {output.strip()[:200]!r}",
        )
    if major < MINIMUM_JAVA:
        raise StackError(
            StackErrorCode.JAVA_TOO_OLD,
            f"{executable} is Java {major}; Kafka 4 and Cassandra 5 need Java {MINIMUM_JAVA} or "
            f"newer: install one and set IM_STACK__JAVA_HOME to it",
        )
    first_line = output.strip().splitlines()[0] if output.strip() else ""
    return JavaRuntime(executable=executable, major_version=major, version_text=first_line)
