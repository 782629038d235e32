"""Fetching the official server jars from Maven Central with ``mvn``, cached in the state dir.

A bundle (e.g. Kafka 4.1.1) is a folder ``<state>/jars/<name>-<version>/`` holding a generated
``pom.xml``, the runtime classpath in ``libs/`` and a ``.complete`` marker. Once the marker
exists the bundle is used as it is and Maven is not called again: a second ``stack up``
needs no network.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from pipelines.stack.errors import StackError, StackErrorCode

MAVEN_CENTRAL = "https://repo.maven.apache.org/maven2"
DEPENDENCY_PLUGIN_VERSION = "3.8.1"
_DOWNLOADED = re.compile(r"Downloaded from [^:]+: \S+ \((?P<size>[\d.]+) (?P<unit>[kKMG]?B)")
_UNITS = {"B": 1, "kB": 1_000, "KB": 1_000, "MB": 1_000_000, "GB": 1_000_000_000}

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Artifact:
    group_id: str
    artifact_id: str
    version: str

    def xml(self) -> str:
        return (
            f"<dependency><groupId>{escape(self.group_id)}</groupId>"
            f"<artifactId>{escape(self.artifact_id)}</artifactId>"
            f"<version>{escape(self.version)}</version></dependency>"
        )


@dataclass(frozen=True)
class Bundle:
    """A named set of artifacts whose runtime classpath one server needs."""

    name: str
    version: str
    artifacts: tuple[Artifact, ...]

    def folder(self, jars_dir: Path) -> Path:
        return jars_dir / f"{self.name}-{self.version}"

    def classpath(self, jars_dir: Path) -> str:
        return str(self.folder(jars_dir) / "libs" / "*")

    def is_cached(self, jars_dir: Path) -> bool:
        return (self.folder(jars_dir) / ".complete").is_file()


def _pom(bundle: Bundle) -> str:
    dependencies = "\n    ".join(artifact.xml() for artifact in bundle.artifacts)
    return f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>imstream.stack</groupId>
  <artifactId>{escape(bundle.name)}</artifactId>
  <version>{escape(bundle.version)}</version>
  <packaging>pom</packaging>
  <dependencies>
    {dependencies}
  </dependencies>
  <build><plugins><plugin>
    <groupId>org.apache.maven.plugins</groupId>
    <artifactId>maven-dependency-plugin</artifactId>
    <version>{DEPENDENCY_PLUGIN_VERSION}</version>
  </plugin></plugins></build>
</project>
"""


def _mirror_settings(repository_url: str) -> str:
    return f"""<settings xmlns="http://maven.apache.org/SETTINGS/1.0.0">
  <mirrors><mirror>
    <id>imstream-mirror</id><mirrorOf>*</mirrorOf><url>{escape(repository_url)}</url>
  </mirror></mirrors>
</settings>
"""


def fetch_bundle(
    bundle: Bundle,
    jars_dir: Path,
    *,
    maven_executable: str,
    repository_url: str = MAVEN_CENTRAL,
    local_repository: Path | None = None,
    progress: Progress | None = None,
) -> Path:
    """Make sure ``bundle``'s jars are in ``jars_dir``; return the folder holding ``libs/``."""
    folder = bundle.folder(jars_dir)
    if bundle.is_cached(jars_dir):
        return folder
    maven = shutil.which(maven_executable)
    if maven is None:
        raise StackError(
            StackErrorCode.MAVEN_MISSING,
            f"Maven ('{maven_executable}') was not found; it fetches the {bundle.name} jars from "
            f"Maven Central on first start. Install it (e.g. apt-get install maven) or set "
            f"IM_STACK__MAVEN_EXECUTABLE",
        )
    folder.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder / "libs", ignore_errors=True)
    (folder / "pom.xml").write_text(_pom(bundle), encoding="utf-8")
    command = [
        maven,
        "-B",
        "-f",
        str(folder / "pom.xml"),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={folder / 'libs'}",
        "-DincludeScope=runtime",
    ]
    if repository_url.rstrip("/") != MAVEN_CENTRAL:
        settings_file = folder / "maven-settings.xml"
        settings_file.write_text(_mirror_settings(repository_url), encoding="utf-8")
        command[1:1] = ["-s", str(settings_file)]
    if local_repository is not None:
        command.append(f"-Dmaven.repo.local={local_repository}")
    _run_maven(bundle, command, folder, repository_url, progress)
    (folder / ".complete").write_text("ok\n", encoding="utf-8")
    return folder


def _run_maven(
    bundle: Bundle,
    command: Sequence[str],
    folder: Path,
    repository_url: str,
    progress: Progress | None,
) -> None:
    log_path = folder / "maven.log"
    files = 0
    size = 0.0
    label = f"{bundle.name} {bundle.version}"
    if progress is not None:
        progress(f"fetching {label} jars with Maven …")
    with log_path.open("w", encoding="utf-8") as log:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            match = _DOWNLOADED.search(line)
            if match is not None:
                files += 1
                size += float(match.group("size")) * _UNITS.get(match.group("unit"), 1)
                if progress is not None:
                    progress(
                        f"fetching {label} jars: {files} files, {size / 1e6:.1f} MB downloaded"
                    )
        code = process.wait()
    if code != 0:
        tail = log_path.read_text(encoding="utf-8").splitlines()[-15:]
        errors = [line for line in tail if "[ERROR]" in line][:5] or tail[-5:]
        raise StackError(
            StackErrorCode.MAVEN_FETCH_FAILED,
            f"Maven could not fetch the {label} jars from {repository_url} and they are not in "
            f"the cache yet. Check the network or proxy (or set IM_STACK__MAVEN_REPOSITORY_URL to "
            f"a reachable mirror) and run again. Maven said:\n  "
            + "\n  ".join(errors)
            + f"\n(full log: {log_path})",
        )
    if progress is not None:
        jars = len(list((folder / "libs").glob("*.jar")))
        progress(f"fetched {label}: {jars} jars ({files} files, {size / 1e6:.1f} MB downloaded)")
