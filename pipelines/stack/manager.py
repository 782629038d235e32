"""``imstream stack up | down | status | logs``: the embedded local stack as one object."""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from core.connections import clickhouse_client
from core.settings import Settings
from pipelines.stack import process
from pipelines.stack.errors import StackError, StackErrorCode
from pipelines.stack.java import JavaRuntime, find_java
from pipelines.stack.maven import Progress, fetch_bundle
from pipelines.stack.services import (
    CassandraServer,
    JavaServer,
    KafkaBrokerSecurity,
    KafkaServer,
)

#: Every service of the local stack, in start order.
SERVICES: tuple[str, ...] = ("kafka", "cassandra", "clickhouse")
HEALTH_POLL_SECONDS = 0.5
LOG_LINES_ON_FAILURE = 25


class ServiceState(StrEnum):
    UP = "up"
    DOWN = "down"
    STARTING = "starting"


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    state: ServiceState
    endpoint: str
    pids: tuple[int, ...] = ()
    rss_bytes: int | None = None
    data_path: Path | None = None
    log_path: Path | None = None
    detail: str = ""


def _silent(_: str) -> None:
    return None


class LocalStack:
    """Kafka and Cassandra as detached JVMs under ``stack.state_dir``, plus ClickHouse via chDB."""

    def __init__(
        self,
        settings: Settings,
        progress: Progress | None = None,
        *,
        services: Collection[str] | None = None,
        kafka_security: KafkaBrokerSecurity | None = None,
    ) -> None:
        """``services`` limits the stack to some of ``SERVICES`` (all by default), e.g. a test's
        second Kafka that it stops and starts without touching the shared stack;
        ``kafka_security`` secures its Kafka (SASL_SSL and ACLs, e.g. a test's)."""
        unknown = set(services or ()) - set(SERVICES)
        if unknown:
            raise ValueError(f"unknown service(s) {sorted(unknown)}; known: {', '.join(SERVICES)}")
        self.services = tuple(services) if services is not None else SERVICES
        self.settings = settings
        self.progress = progress or _silent
        self.state_dir = settings.stack.state_dir
        self.jars_dir = self.state_dir / "jars"
        self.kafka = KafkaServer(settings, kafka_security)
        self.cassandra = CassandraServer(settings)
        self.servers: tuple[JavaServer, ...] = tuple(
            server for server in (self.kafka, self.cassandra) if server.name in self.services
        )
        #: The services the last ``up`` started (the others were running already).
        self.started: tuple[str, ...] = ()

    def server(self, name: str) -> JavaServer:
        for server in self.servers:
            if server.name == name:
                return server
        known = ", ".join(server.name for server in self.servers)
        raise KeyError(f"no service {name!r} in the local stack (known: {known})")

    def up(self) -> list[ServiceStatus]:
        """Start whatever is not running and wait until every service answers; idempotent."""
        started: dict[str, int] = {}
        try:
            self._start_missing(started)
            self._wait_until_healthy(started)
        except StackError:
            self._stop_started(started)
            raise
        self.started = tuple(started)
        if "clickhouse" in self.services:
            self._check_clickhouse()
        return self.status()

    def _start_missing(self, started: dict[str, int]) -> None:
        java: JavaRuntime | None = None
        for server in self.servers:
            if process.find_pids(server.marker):
                self.progress(f"{server.name}: already running")
                continue
            java = java or find_java(self.settings.stack.java_home)
            folder = fetch_bundle(
                server.bundle,
                self.jars_dir,
                maven_executable=self.settings.stack.maven_executable,
                repository_url=self.settings.stack.maven_repository_url,
                local_repository=self.settings.stack.maven_local_repository,
                progress=self.progress,
            )
            classpath = str(folder / "libs" / "*")
            server.check_ports_free()
            server.prepare(java.executable, classpath)
            pid = process.start_detached(
                server.command(java.executable, classpath),
                cwd=server.home,
                log_path=server.log_path,
                nice=self.settings.stack.cassandra_nice if server.name == "cassandra" else 0,
            )
            started[server.name] = pid
            self.progress(f"{server.name}: started (pid {pid}), waiting until it answers …")

    def _stop_started(self, started: dict[str, int]) -> None:
        """After a failed start, stop what this call started so that no process is left behind."""
        for server in self.servers:
            if server.name in started:
                process.stop(
                    process.find_pids(server.marker), self.settings.stack.stop_timeout_seconds
                )

    def _wait_until_healthy(self, started: dict[str, int]) -> None:
        deadline = time.monotonic() + self.settings.stack.start_timeout_seconds
        waiting = list(self.servers)
        began = time.monotonic()
        while waiting:
            for server in list(waiting):
                pid = started.get(server.name)
                if pid is not None:
                    process.reap(pid)
                    if not process.is_alive(pid):
                        raise self._health_failure(server, "exited during start-up")
                if server.healthy():
                    waiting.remove(server)
                    self.progress(f"{server.name}: up after {time.monotonic() - began:.1f}s")
            if not waiting:
                return
            if time.monotonic() > deadline:
                server = waiting[0]
                raise self._health_failure(
                    server,
                    f"did not answer within {self.settings.stack.start_timeout_seconds:.0f}s",
                )
            time.sleep(HEALTH_POLL_SECONDS)

    def _health_failure(self, server: JavaServer, what: str) -> StackError:
        process.stop(process.find_pids(server.marker), self.settings.stack.stop_timeout_seconds)
        tail = process.last_lines(server.log_path, LOG_LINES_ON_FAILURE)
        return StackError(
            StackErrorCode.HEALTH_CHECK_FAILED,
            f"{server.name} {what} and was stopped. Last lines of {server.log_path}:\n  "
            + "\n  ".join(tail or ["(the log is empty)"]),
        )

    def _check_clickhouse(self) -> None:
        status = self.clickhouse_status()
        if status.state is not ServiceState.UP:
            raise StackError(StackErrorCode.CLICKHOUSE_UNAVAILABLE, status.detail)
        self.progress(f"clickhouse: up ({status.detail})")

    def clickhouse_status(self) -> ServiceStatus:
        settings = self.settings
        endpoint = settings.clickhouse.url or f"chdb://{settings.chdb_path.resolve()}"
        data_path = None if settings.clickhouse.url else settings.chdb_path
        try:
            client = clickhouse_client(settings)
            try:
                version = client.query("SELECT version()").result_rows[0][0]
                client.command(f"CREATE DATABASE IF NOT EXISTS `{settings.clickhouse.database}`")
            finally:
                client.close()
        except Exception as error:  # report any client failure as "down", with its reason
            what = "ClickHouse server" if settings.clickhouse.url else "chDB"
            return ServiceStatus(
                name="clickhouse",
                state=ServiceState.DOWN,
                endpoint=endpoint,
                data_path=data_path,
                detail=f"{what} at {endpoint} did not answer: {error}",
            )
        kind = "server over HTTP" if settings.clickhouse.url else "chDB, in-process"
        return ServiceStatus(
            name="clickhouse",
            state=ServiceState.UP,
            endpoint=endpoint,
            data_path=data_path,
            detail=f"{kind}, version {version}",
        )

    def status(self) -> list[ServiceStatus]:
        statuses = []
        for server in self.servers:
            pids = tuple(process.find_pids(server.marker))
            if not pids:
                state = ServiceState.DOWN
            else:
                state = ServiceState.UP if server.healthy() else ServiceState.STARTING
            rss = sum(process.rss_bytes(pid) or 0 for pid in pids) or None
            statuses.append(
                ServiceStatus(
                    name=server.name,
                    state=state,
                    endpoint=server.endpoint,
                    pids=pids,
                    rss_bytes=rss,
                    data_path=server.data_dir,
                    log_path=server.log_path,
                    detail=f"{server.bundle.name} {server.bundle.version}",
                )
            )
        if "clickhouse" in self.services:
            statuses.append(self.clickhouse_status())
        return statuses

    def is_up(self) -> bool:
        return all(status.state is ServiceState.UP for status in self.status())

    def down(self, only: Collection[str] | None = None) -> list[str]:
        """Stop every process the stack started (of ``only``, when given: the others are left
        running); return what was done, one line per service."""
        done = []
        for server in reversed(self.servers):
            pids = process.find_pids(server.marker)
            if only is not None and server.name not in only:
                if pids:
                    done.append(f"{server.name}: left running (it was running before)")
                continue
            if not pids:
                done.append(f"{server.name}: was not running")
                continue
            killed = process.stop(pids, self.settings.stack.stop_timeout_seconds)
            how = "killed after the stop timeout" if killed else "stopped"
            done.append(f"{server.name}: {how} (pid {', '.join(map(str, pids))})")
        return done
