"""Helpers of the system tests: the supervised system as ``imstream up`` runs it, SDK devices
that record what they are shown, reads of the ClickHouse audit the sink wrote, and the fake push
providers the system's push sink talks to."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
from cryptography.hazmat.primitives.asymmetric import rsa

from client.sdk import Client, Received
from core.settings import Settings
from pipelines.demo import DemoOptions, main_demo
from pipelines.stack import process
from pipelines.supervisor import Child, ProcessState, Supervisor
from schemas.events import Event, MessageSent
from schemas.topics import topic_catalog
from tests.ingress.support import TENANT, token
from tests.sinks.push.fakes.apns import FakeApns
from tests.sinks.push.fakes.fcm import FakeFcm
from tests.sinks.push.fakes.tls import LocalPki
from tests.sinks.push.support import APNS_DEBUG_TOPIC, APNS_TOPIC, ApnsKey
from tests.sinks.staff_support import staff_headers

E = TypeVar("E", bound=Event)
T = TypeVar("T")


@dataclass(eq=False)
class Running:
    """The supervised system: its children, where the ingress nodes and analytics listen."""

    supervisor: Supervisor
    ports: list[int]
    settings: Settings
    _: KW_ONLY
    analytics_port: int
    chdb_path: Path
    lock: threading.Lock
    """Held by the supervising thread while it checks the children: a test that stops a child
    on purpose holds it too, so that the stop is not taken for a crash."""

    def url(self, node: int) -> str:
        return f"ws://127.0.0.1:{self.ports[node]}/v1/ws"

    def child(self, name: str) -> Child:
        (found,) = [c for c in self.supervisor.children if c.name == name]
        return found

    def kill(self, name: str) -> int:
        """SIGKILL a child (the supervisor restarts it); its pid."""
        pid = self.child(name).pid
        assert pid is not None, f"{name} is not running"
        os.kill(pid, signal.SIGKILL)
        return pid

    def restarts(self) -> dict[str, int]:
        return {child.name: child.restarts for child in self.supervisor.children}

    def ready(self, name: str) -> bool:
        """Running and announced ready, as ``imstream up`` waits for it (``core/readiness.py``):
        an ingress node listening with ``/readyz`` true, the stream worker assigned with its
        state restored, a sink assigned (the ClickHouse sink's analytics API answering)."""
        child = self.child(name)
        return self.supervisor.state(child) is ProcessState.READY

    def wait_ready(self, within: float = 90.0) -> None:
        """Every child ready (blocking); fails with the log tail of the ones that are not."""
        deadline = time.monotonic() + within
        while True:
            waiting = [c for c in self.supervisor.children if not self.ready(c.name)]
            if not waiting:
                return
            if time.monotonic() > deadline:
                tails = {c.name: process.last_lines(c.log_path, 10) for c in waiting}
                raise AssertionError(f"not ready after {within:g} s: {tails}")
            time.sleep(0.1)

    @contextlib.contextmanager
    def stopped(self, name: str, timeout: float = 30.0) -> Iterator[None]:
        """Stop a child with SIGTERM (it drains) and keep it stopped; started again after."""

        def stop(pid: int) -> None:
            killed = process.stop([pid], timeout)
            assert not killed, f"{name} did not stop on SIGTERM within {timeout:g} s"

        with self._down(name, stop):
            yield

    @contextlib.contextmanager
    def killed(self, name: str) -> Iterator[None]:
        """SIGKILL a child (it says no goodbye) and keep it down; started again after."""

        def kill(pid: int) -> None:
            os.kill(pid, signal.SIGKILL)
            for _ in range(100):
                process.reap(pid)
                if not process.is_alive(pid):
                    break
                time.sleep(0.1)

        with self._down(name, kill):
            yield

    @contextlib.contextmanager
    def _down(self, name: str, take_down: Callable[[int], None]) -> Iterator[None]:
        """``take_down`` the running child under the lock, so that the supervisor does not
        restart it meanwhile; it stays down until the block ends, then is started again."""
        child = self.child(name)
        with self.lock:
            assert child.pid is not None, f"{name} is not running"
            take_down(child.pid)
            child.pid, child.restart_at = None, None
        try:
            yield
        finally:
            with self.lock:
                child.restart_at = time.monotonic()  # the supervisor starts it on its next check

    def analytics(self, query: str, **parameters: str) -> dict[str, Any]:
        """A named analytics query through the ClickHouse sink's HTTP API (blocking)."""
        url = (
            f"http://127.0.0.1:{self.analytics_port}/v1/analytics/{query}?"
            + urllib.parse.urlencode(parameters)
        )
        response = httpx.get(url, headers=staff_headers(), timeout=10)
        response.raise_for_status()
        answer = response.json()
        assert isinstance(answer, dict)
        return answer

    def audited_messages(self, tenant: str) -> dict[str, dict[str, int]]:
        """How often each ``message.sent`` of ``tenant`` is in the audit (read with ``FINAL``),
        by topic name, then event id. Read from the chDB path in a process of its own (chDB
        allows one path per process, and the test process may hold another); call it while the
        ClickHouse sink is stopped, since it owns the path while it runs."""
        done = subprocess.run(
            [sys.executable, "-c", _READ_AUDIT, tenant],
            env={**os.environ, "IM_CLICKHOUSE__CHDB_PATH": str(self.chdb_path)},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        counts: dict[str, dict[str, int]] = {}
        for topic, event_id, copies in json.loads(done.stdout):
            counts.setdefault(topic, {})[event_id] = copies
        return counts


async def run_small_demo(
    system: Running, tenant: str, *, push_timeout: float
) -> tuple[int, list[str], list[str]]:
    """``imstream demo`` against ``system``, small and seeded: 6 users (4 of them offline), 6
    conversations of 4, 10 messages/s for 6 s. Its exit code, its report lines and its progress
    lines."""
    options = DemoOptions(
        url=system.url(0),
        tenant=tenant,
        users=6,
        offline_users=4,
        conversations=6,
        group_size=4,
        rate=10.0,
        duration=6.0,
        seed=7,
        analytics_url=f"http://127.0.0.1:{system.analytics_port}",
        apns_app_id=APNS_TOPIC,
        push_timeout=push_timeout,
    )
    lines: list[str] = []
    progress: list[str] = []
    code = await asyncio.to_thread(
        main_demo, system.settings, options, echo=lines.append, progress=progress.append
    )
    return code, lines, progress


_READ_AUDIT = """
import json, sys
from core.connections import clickhouse_client
from core.settings import Settings
from sinks.clickhouse.schema import AUDIT_TABLE, quote_identifier

settings = Settings()
client = clickhouse_client(settings)
table = f"{quote_identifier(settings.clickhouse.database)}.{AUDIT_TABLE}"
result = client.query(
    f"SELECT topic, toString(event_id), count() FROM {table} FINAL "
    "WHERE tenant_id = {tenant:String} AND event_type = 'message.sent' "
    "GROUP BY topic, event_id",
    parameters={"tenant": sys.argv[1]},
)
print(json.dumps([list(row) for row in result.result_rows]))
"""


class Device:
    """One SDK client of a user, with a task that records every event it surfaces.

    ``received`` is what the device's user would have been shown, in order."""

    def __init__(
        self,
        system: Running,
        user: str,
        name: str,
        node: int,
        *,
        tenant: str = TENANT,
        **options: Any,
    ) -> None:
        self.user = user
        self.name = name
        self.client = Client(
            system.url(node),
            tenant_id=tenant,
            device_id=name,
            token=token(system.settings, user, tenant=tenant),
            request_timeout=20,
            **options,
        )
        self.received: list[Received] = []
        self._collecting: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Device:
        await self.client.connect()
        self._collecting = asyncio.get_running_loop().create_task(self._collect())
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.client.close()
        if self._collecting is not None:
            self._collecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collecting

    async def _collect(self) -> None:
        async for item in self.client.events():
            self.received.append(item)

    def events(self, kind: type[E], conversation_id: str | None = None) -> list[E]:
        """The stored events of ``kind`` surfaced so far (of one conversation, if named)."""
        return [
            item.event
            for item in self.received
            if isinstance(item.event, kind)
            and item.sync_id is not None
            and (
                conversation_id is None
                or getattr(item.event.payload, "conversation_id", None) == conversation_id
            )
        ]

    def messages(self, conversation_id: str) -> list[MessageSent]:
        return self.events(MessageSent, conversation_id)

    def message_ids(self, conversation_id: str) -> list[str]:
        return [message.event_id for message in self.messages(conversation_id)]

    def sync_ids(self) -> list[int]:
        return [item.sync_id for item in self.received if item.sync_id is not None]

    async def drained(self, within: float = 10.0) -> None:
        """Until the collecting task has recorded everything the client surfaced so far."""
        await self.wait(lambda d: d.client._events.empty(), within, "the surfaced events")

    async def wait(self, condition: Callable[[Device], bool], within: float, what: str) -> None:
        """Until ``condition(self)`` holds; fails after ``within`` seconds, or at once if the
        client stopped."""
        deadline = time.monotonic() + within
        while not condition(self):
            if self._collecting is not None and self._collecting.done():
                self._collecting.result()  # raises what stopped it
                raise AssertionError(f"{self.user}/{self.name} stopped waiting for {what}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.user}/{self.name}: timed out after {within:g} s waiting for {what}"
                )
            await asyncio.sleep(0.05)


async def wait_all(
    devices: list[Device], condition: Callable[[Device], bool], within: float, what: str
) -> None:
    await asyncio.gather(*(device.wait(condition, within, what) for device in devices))


async def assert_audited_exactly_once(
    system: Running, tenant: str, accepted: list[str], queues: int, within: float = 90.0
) -> None:
    """The ClickHouse audit holds every accepted message of ``tenant`` exactly once as
    sequenced, ``queues`` times in the sync queues (one per member), and nothing else.

    First as the sink's analytics API counts them (it may still be catching up after a restart;
    more than were accepted fails at once), then one by one from its chDB path, read while the
    sink is stopped; it is started again after."""
    loop = asyncio.get_running_loop()

    def sequenced() -> int:
        try:
            answer = system.analytics("messages_per_minute", tenant=tenant)
        except httpx.HTTPError:  # a restarted sink that is not listening (or ready) yet
            return -1
        return sum(int(row["messages"]) for row in answer["rows"])

    deadline = loop.time() + within
    while (audited := await asyncio.to_thread(sequenced)) != len(accepted):
        assert audited <= len(accepted), f"{audited} messages audited, {len(accepted)} accepted"
        if loop.time() > deadline:
            raise AssertionError(f"{audited} of {len(accepted)} messages audited in {within:g} s")
        await asyncio.sleep(0.5)
    with system.stopped("clickhouse-sink"):
        audit = await asyncio.to_thread(system.audited_messages, tenant)
    catalog = topic_catalog(system.settings)
    assert audit[catalog.messages_sequenced.name] == dict.fromkeys(accepted, 1)
    assert audit[catalog.sync_events.name] == dict.fromkeys(accepted, queues)
    # The ingress's records: a send re-sent after a lost connection may be there twice.
    assert set(audit[catalog.messages_in.name]) == set(accepted)


@dataclass(frozen=True, slots=True)
class FakeCounts:
    """What one fake provider counted itself: requests answered 200, and refused."""

    accepted: int
    rejected: int
    abandoned: int


class PushFakes:
    """The fake APNs (HTTP/2, TLS with the test CA) and fake FCM (with its OAuth token endpoint)
    of ``tests/sinks/push/fakes`` on an event loop of their own, in a daemon thread: they must
    answer the push sink while the tests' loop is idle (between tests, in blocking waits)."""

    def __init__(
        self, pki: LocalPki, apns_key: ApnsKey, service_account_key: rsa.RSAPrivateKey
    ) -> None:
        self.pki = pki
        self.apns_key = apns_key
        self.apns = FakeApns(
            pki,
            team_id=apns_key.team_id,
            key_id=apns_key.key_id,
            public_key=apns_key.public_key,
            topics=frozenset({APNS_TOPIC, APNS_DEBUG_TOPIC}),
        )
        self.fcm = FakeFcm(
            project_id="imstream-system-test",
            client_email="push-sender@imstream-system-test.iam.gserviceaccount.com",
            private_key=service_account_key,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="push-fakes", daemon=True
        )

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    def start(self) -> None:
        self._thread.start()
        self._call(self.apns.start())
        self._call(self.fcm.start())

    def stop(self) -> None:
        self._call(self.apns.stop())
        self._call(self.fcm.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def env(self, directory: Path) -> dict[str, str]:
        """The ``IM_PUSH__…`` variables that point a push sink at the fakes (its APNs key and
        service-account file written to ``directory``)."""
        key_path = directory / f"AuthKey_{self.apns_key.key_id}.p8"
        key_path.write_text(self.apns_key.pem)
        credentials = self.fcm.write_service_account(directory / "service-account.json")
        return {
            "IM_PUSH__APNS_KEY_PATH": str(key_path),
            "IM_PUSH__APNS_KEY_ID": self.apns_key.key_id,
            "IM_PUSH__APNS_TEAM_ID": self.apns_key.team_id,
            "IM_PUSH__APNS_TOPIC": APNS_TOPIC,
            "IM_PUSH__APNS_HOST": self.apns.address,
            "IM_PUSH__APNS_CA_FILE": str(self.pki.ca_file),
            "IM_PUSH__FCM_CREDENTIALS_PATH": str(credentials),
            "IM_PUSH__FCM_ENDPOINT": self.fcm.endpoint,
        }

    def apns_tokens(self) -> list[str]:
        """The device tokens of every request the fake APNs received so far, in order."""

        async def snapshot() -> list[str]:
            return [received.token for received in self.apns.stats.received]

        return self._call(snapshot())

    def counts(self) -> dict[str, FakeCounts]:
        """Per provider (``apns``, ``fcm``), the fake's own counts, read on its loop."""

        async def snapshot() -> dict[str, FakeCounts]:
            return {
                name: FakeCounts(
                    accepted=fake.stats.accepted,
                    rejected=sum(fake.stats.rejected.values()),
                    abandoned=fake.stats.abandoned,
                )
                for name, fake in (("apns", self.apns), ("fcm", self.fcm))
            }

        return self._call(snapshot())
