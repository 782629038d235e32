"""``imstream up`` as ``make run`` runs it: "imstream is up" means every process answers.

The command runs as a real process on the shared local stack (which it finds running and so
leaves running), with topics, a keyspace, ports, a chDB path and a process directory of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cassandra.cluster import Session
from confluent_kafka.admin import AdminClient
from websockets.asyncio.client import connect

from client.sdk import Client
from core.settings import Settings
from pipelines.stack import process
from pipelines.supervisor import ChildSpec, StartupError, StartupErrorCode, Supervisor
from tests.ingress.support import (
    delete_topics,
    first_message_sent,
    free_port,
    hello,
    receive,
    token,
    unique,
)
from tests.sinks.staff_support import staff_headers

#: The up line ``imstream up`` prints once every process is ready.
UP_LINE = "imstream is up"
_STARTED = re.compile(r"^(?P<name>[\w-]+): started \(pid (?P<pid>\d+),")


class Up:
    """``imstream up`` in a process of its own; its output, line by line, as it comes."""

    def __init__(self, settings: Settings, environment: dict[str, str], run_dir: Path) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipelines", "up"],
            env={**os.environ, **environment},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def until(self, text: str, within: float) -> str:
        """The first line holding ``text`` (blocking); fails when the output ends first."""
        deadline = time.monotonic() + within
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {text!r} within {within:g} s:\n{self.output}") from None
            if line is None:
                raise AssertionError(f"the output ended without {text!r}:\n{self.output}")
            self.lines.append(line)
            if text in line:
                return line

    def finish(self, within: float) -> int:
        """Wait for the exit (all output read); the exit code."""
        code = self.process.wait(within)
        while (line := self._queue.get(timeout=within)) is not None:
            self.lines.append(line)
        return code

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def children(self) -> dict[str, int]:
        """The pid of every child it reported starting."""
        found = (_STARTED.match(line) for line in self.lines)
        return {match["name"]: int(match["pid"]) for match in found if match}

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        for pid in self.children().values():
            if process.is_alive(pid):
                process.stop([pid], 10)


def port_pair() -> int:
    """A port p with p and p + 1 free (ingress-1 and ingress-2)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise AssertionError("no two consecutive free ports")


@pytest.fixture
def isolated(
    settings: Settings,
    kafka_admin: AdminClient,
    cql_session: Session,
    tmp_path: Path,
) -> Iterator[tuple[Settings, dict[str, str]]]:
    """Settings and ``IM_`` variables for one ``imstream up`` next to everything else on the
    shared stack; its topics and keyspace are removed after."""
    prefix = unique("t-upcmd") + "."
    keyspace = "t_" + unique("up").replace("-", "_")
    ingress_port, internal_port, analytics_port = port_pair(), port_pair(), free_port()
    environment = {
        "IM_KAFKA__TOPIC_PREFIX": prefix,
        "IM_CQL__KEYSPACE": keyspace,
        "IM_INGRESS__PORT": str(ingress_port),
        "IM_INGRESS__INTERNAL_PORT": str(internal_port),
        "IM_SINKS__ANALYTICS_PORT": str(analytics_port),
        "IM_CLICKHOUSE__CHDB_PATH": str(tmp_path / "clickhouse"),
        "IM_STACK__PROCESSES_DIR": str(tmp_path / "run"),
        "IM_STREAMS__INSTANCE_ID": unique("worker"),
    }
    configured = settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(update={"topic_prefix": prefix}),
            "ingress": settings.ingress.model_copy(
                update={"port": ingress_port, "internal_port": internal_port}
            ),
            "sinks": settings.sinks.model_copy(update={"analytics_port": analytics_port}),
        }
    )
    try:
        yield configured, environment
    finally:
        with contextlib.suppress(Exception):  # the topics exist only if the command got there
            delete_topics(kafka_admin, configured)
        cql_session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=60)


async def first_try_socket(settings: Settings, port: int, user: str) -> None:
    """One WebSocket connection, no retry: it opens and the node answers ``hello``."""
    async with connect(
        f"ws://127.0.0.1:{port}/v1/ws", compression=None, ping_interval=None, open_timeout=10
    ) as socket_:
        await socket_.send(json.dumps(hello(settings, user, "probe")))
        reply = await receive(socket_, within=10)
        assert reply["type"] == "hello_ok", reply


async def message_gets_through(settings: Settings, ports: list[int]) -> None:
    """Both nodes answer a first connection; a message sent on one reaches a device on the
    other."""
    ann, ben = unique("ann"), unique("ben")
    await asyncio.gather(*(first_try_socket(settings, port, ann) for port in ports))
    sender, receiver = (
        Client(
            f"ws://127.0.0.1:{port}/v1/ws",
            tenant_id="acme",
            device_id="phone",
            token=token(settings, user),
            request_timeout=20,
        )
        for user, port in ((ann, ports[0]), (ben, ports[1]))
    )
    await sender.connect()
    await receiver.connect()
    try:
        conversation = await sender.create_conversation([ben], kind="direct")
        accepted = await sender.send(conversation, "right after up")
        message = await asyncio.wait_for(first_message_sent(receiver), 60)
        assert message.event_id == accepted.event_id
        assert message.payload.body.model_dump()["text"] == "right after up"
    finally:
        await sender.close()
        await receiver.close()


def test_up_says_up_only_when_every_process_answers_and_a_message_gets_through(
    isolated: tuple[Settings, dict[str, str]], tmp_path: Path
) -> None:
    settings, environment = isolated
    up = Up(settings, environment, tmp_path / "run")
    try:
        up.until(UP_LINE, within=300)
        # At once, no retry: the analytics API and both ingress nodes answer the first time.
        analytics = f"http://127.0.0.1:{settings.sinks.analytics_port}/v1/analytics"
        assert httpx.get(analytics, timeout=10).status_code == 401, "the API wants a staff token"
        answer = httpx.get(analytics, headers=staff_headers(), timeout=10)
        assert answer.status_code == 200
        assert answer.json()["queries"]
        ports = [settings.ingress.port, settings.ingress.port + 1]
        asyncio.run(message_gets_through(settings, ports))

        # `imstream status` sees every process ready.
        status = subprocess.run(
            [sys.executable, "-m", "pipelines", "status"],
            env={**os.environ, **environment},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert status.returncode == 0, status.stdout + status.stderr
        assert "6 of 6 processes ready" in status.stdout, status.stdout

        # Ctrl-C stops every process it started, and leaves the stack it found running.
        up.process.send_signal(signal.SIGINT)
        assert up.finish(within=120) == 0, up.output
    finally:
        up.kill()
    children = up.children()
    assert set(children) == {
        "ingress-1",
        "ingress-2",
        "stream-worker",
        "cql-sink",
        "clickhouse-sink",
        "push-sink",
    }
    assert not [name for name, pid in children.items() if process.is_alive(pid)], up.output
    assert "kafka: left running (it was running before)" in up.lines, up.output
    assert not (tmp_path / "run" / "processes.json").exists()


def test_a_process_that_cannot_start_stops_the_start_up_and_leaves_nothing_running(
    isolated: tuple[Settings, dict[str, str]], tmp_path: Path
) -> None:
    settings, environment = isolated
    taken = settings.ingress.port + 1  # ingress-2's
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", taken))
        holder.listen()
        up = Up(settings, environment, tmp_path / "run")
        try:
            code = up.finish(within=300)
        finally:
            up.kill()
    assert code == 1, up.output
    assert "error: [process-exited] ingress-2 exited with status 1 before it was ready" in (
        up.output
    )
    assert f"[port-in-use] cannot listen on 127.0.0.1:{taken}" in up.output  # its log's tail
    assert UP_LINE not in up.output
    assert "the start-up failed; nothing that imstream up started is left running" in up.lines
    children = up.children()
    assert len(children) == 6, up.output
    assert not [name for name, pid in children.items() if process.is_alive(pid)], up.output
    assert "kafka: left running (it was running before)" in up.lines, up.output
    assert not (tmp_path / "run" / "processes.json").exists()


def test_a_process_that_never_becomes_ready_times_out_with_its_log(
    settings: Settings, tmp_path: Path
) -> None:
    # A CQL sink whose store never answers keeps retrying and never announces readiness.
    spec = ChildSpec("cql-sink", "cql-sink", {"IM_CQL__PORT": str(free_port())})
    supervisor = Supervisor([spec], tmp_path / "logs", report=lambda _: None)
    progress: list[str] = []
    supervisor.start_all()
    try:
        with pytest.raises(StartupError) as raised:
            supervisor.wait_ready(3.0, progress.append)
    finally:
        stopped = supervisor.stop_all(30)
    assert raised.value.code is StartupErrorCode.NOT_READY
    assert raised.value.child == "cql-sink"
    assert str(raised.value).startswith("[not-ready] cql-sink not ready within 3s")
    assert f"Last lines of {tmp_path / 'logs' / 'cql-sink.log'}" in str(raised.value)
    assert progress[0] == "waiting for cql-sink to be ready (0 of 1 ready, 0s)"
    assert stopped == [stopped[0]] and stopped[0].startswith("cql-sink: stopped")
