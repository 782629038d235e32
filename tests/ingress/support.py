"""Helpers for the gateway tests: a real ingress process, a real WebSocket client, Kafka reads.

Every gateway here is ``imstream run ingress`` in a subprocess on a free port, configured the
way an operator would configure it (``IM_`` variables), talking to the real local Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cassandra.cluster import Session
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from wsproto.frame_protocol import FrameProtocol, Opcode

from client.sdk import Client
from core.auth import issue_token
from core.connections import kafka_config
from core.settings import Settings
from core.tls import client_context
from pipelines.topics import apply_topics
from schemas.events import MessageSent
from schemas.topics import TopicCatalog, partition_for_key, topic_catalog

#: The iOS app (APNs bundle id) the test gateways are configured with (``IM_PUSH__APNS_TOPIC``):
#: push tokens may name it, or no app.
PUSH_APP = "dev.imstream.app"

TENANT = "acme"
IMSTREAM = Path(sys.executable).parent / "imstream"
JsonObject = dict[str, Any]


#: The event each client command is published as (and which ``command.rejected`` names).
COMMAND_EVENT_TYPES = {
    "send": "message.sent",
    "recall": "message.recalled",
    "edit": "message.edited",
    "read": "receipt.read",
    "typing": "typing.changed",
    "mute": "conversation.mute_changed",
    "push_settings": "user.push_settings_changed",
    "clear_badge": "badge.cleared",
    "conversation.create": "conversation.created",
    "conversation.rename": "conversation.renamed",
    "conversation.add_member": "conversation.member_added",
    "conversation.remove_member": "conversation.member_removed",
    "conversation.change_role": "conversation.member_role_changed",
    "conversation.leave": "conversation.left",
    "conversation.delete": "conversation.deleted",
}


def payloads(data: bytes) -> list[str]:
    """The text frames in ``data`` (server frames as the gateway writes them), decoded by wsproto
    as a client would."""
    protocol = FrameProtocol(client=True, extensions=[])
    protocol.receive_bytes(data)
    frames = list(protocol.received_frames())
    assert all(frame.opcode is Opcode.TEXT and frame.frame_finished for frame in frames)
    return [str(frame.payload) for frame in frames]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def wait_for(condition: Callable[[], bool], *, timeout: float = 20.0, what: str = "it") -> None:
    """Poll ``condition`` until it holds (blocking); fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


async def wait_until(
    condition: Callable[[], bool], *, within: float = 20.0, what: str = "it"
) -> None:
    """Poll ``condition`` until it holds, without blocking the event loop."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g} s waiting for {what}")
        await asyncio.sleep(0.05)


# -- topics ------------------------------------------------------------


def create_topics(admin: AdminClient, settings: Settings, prefix: str) -> Settings:
    """Apply the catalog under ``prefix``; returns the settings that name those topics."""
    kafka = settings.kafka.model_copy(update={"topic_prefix": prefix})
    prefixed = settings.model_copy(update={"kafka": kafka})
    apply_topics(admin, topic_catalog(prefixed))
    return prefixed


def run_imstream(
    *arguments: str, variables: Mapping[str, str], timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """``imstream <arguments>`` as an operator runs it, with ``variables`` added to this
    process's environment; finished, its output captured as text."""
    return subprocess.run(
        [str(IMSTREAM), *arguments],
        env={**os.environ, **variables},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def delete_topics(admin: AdminClient, settings: Settings) -> None:
    names = [topic.name for topic in topic_catalog(settings)]
    for future in admin.delete_topics(names, operation_timeout=30).values():
        future.result(timeout=30)


@contextlib.contextmanager
def migrated_keyspace(settings: Settings, session: Session) -> Iterator[str]:
    """A fresh keyspace migrated by ``imstream db migrate`` (the operator's command); dropped
    on the way out."""
    name = "t_" + uuid.uuid4().hex[:12]
    done = run_imstream(
        "db",
        "migrate",
        variables={"IM_CQL__KEYSPACE": name, "IM_KAFKA__TOPIC_PREFIX": settings.kafka.topic_prefix},
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    try:
        yield name
    finally:
        # With the keyspaces a test rebuilt from it (``imstream rebuild cql``: <name>_r...).
        rebuilt = [
            row.keyspace_name
            for row in session.execute("SELECT keyspace_name FROM system_schema.keyspaces")
            if row.keyspace_name.startswith(f"{name}_r")
        ]
        for keyspace in [name, *rebuilt]:
            session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=60)


# -- the gateway process ------------------------------------------------------------


@dataclass
class Gateway:
    """A running ``imstream run ingress``."""

    settings: Settings
    process: subprocess.Popen[bytes]
    log_path: Path
    #: The CA the test trusts for a gateway serving TLS (``IM_INGRESS__TLS_CERT_PATH``).
    ca_file: Path | None = None

    @property
    def tls(self) -> ssl.SSLContext | None:
        return None if self.ca_file is None else client_context(self.ca_file)

    @property
    def port(self) -> int:
        return self.settings.ingress.port

    @property
    def node_id(self) -> str:
        return self.settings.ingress.node_id

    @property
    def secure(self) -> str:
        """``"s"`` when the node serves TLS: https, wss."""
        return "s" if self.settings.ingress.tls_cert_path is not None else ""

    @property
    def http(self) -> str:
        return f"http{self.secure}://127.0.0.1:{self.port}"

    @property
    def internal(self) -> str:
        """The internal listener: metrics and API docs."""
        return f"http://127.0.0.1:{self.settings.ingress.internal_port}"

    @property
    def ws(self) -> str:
        return f"ws{self.secure}://127.0.0.1:{self.port}/v1/ws"

    @property
    def catalog(self) -> TopicCatalog:
        return topic_catalog(self.settings)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | JsonObject | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> tuple[int, Mapping[str, str], bytes]:
        """One HTTP request (blocking): status, headers (lower-case names), body."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        if isinstance(data, str):
            data = data.encode()
        url = path if path.startswith("http") else self.http + path
        sent = dict(headers or {})
        if data is not None:
            sent["Content-Type"] = "application/json"
        response = httpx.request(
            method, url, content=data, headers=sent, timeout=timeout, verify=self.tls or True
        )
        return response.status_code, _lower(response.headers.items()), response.content

    def ready(self) -> bool:
        try:
            status, _, _ = self.request("GET", "/readyz", timeout=5)
        except httpx.TransportError:
            return False
        return status == 200

    def serving(self) -> bool:
        """Ready, and its serving store (reads) connected."""
        try:
            status, _, raw = self.request("GET", "/readyz", timeout=5)
        except httpx.TransportError:
            return False
        return status == 200 and bool(json.loads(raw).get("serving_store"))

    def alive(self) -> bool:
        try:
            status, _, _ = self.request("GET", "/healthz", timeout=5)
        except httpx.TransportError:
            return False
        return status == 200

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        _, _, body = self.request("GET", self.internal + "/metrics")
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def holds_socket_of(self, client_port: int) -> bool:
        """Whether the node still has a TCP socket to the client at ``client_port``."""
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                local, remote = line.split()[1:3]
                local_port = int(local.rsplit(":", 1)[1], 16)
                remote_port = int(remote.rsplit(":", 1)[1], 16)
                if (local_port, remote_port) == (self.port, client_port):
                    return True
        return False

    def stop(self, signum: signal.Signals = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise AssertionError(
                f"the gateway did not stop on {signum.name}:\n{self.log()}"
            ) from None


def _lower(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers}


def start_gateway(
    settings: Settings,
    log_dir: Path,
    *,
    kafka: Mapping[str, Any] | None = None,
    ingress: Mapping[str, Any] | None = None,
    cql: Mapping[str, Any] | None = None,
    auth: Mapping[str, Any] | None = None,
    push: Mapping[str, Any] | None = None,
    wait: Callable[[Gateway], bool] = Gateway.ready,
    ca_file: Path | None = None,
) -> Gateway:
    """Start ``imstream run ingress`` with these overrides and wait until ``wait`` holds;
    ``ca_file``: the CA the test trusts when the node serves TLS."""
    ingress_values = {
        "port": free_port(),
        "internal_port": free_port(),
        "node_id": unique("node"),
        **(ingress or {}),
    }
    kafka_values = {
        "bootstrap_servers": settings.kafka.bootstrap_servers,
        "topic_prefix": settings.kafka.topic_prefix,
        **(kafka or {}),
    }
    environment = dict(os.environ)
    cql_values = dict(cql or {})
    auth_values = dict(auth or {})
    push_values = dict(push or {})
    for group, values in (
        ("KAFKA", kafka_values),
        ("INGRESS", ingress_values),
        ("CQL", cql_values),
        ("AUTH", auth_values),
        ("PUSH", push_values),
    ):
        for key, value in values.items():
            text = json.dumps(value) if isinstance(value, dict | list) else str(value)
            environment[f"IM_{group}__{key.upper()}"] = text
    configured = settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(update=kafka_values),
            "ingress": settings.ingress.model_copy(update=ingress_values),
            "cql": settings.cql.model_copy(update=cql_values),
            "auth": settings.auth.model_copy(update=auth_values),
            "push": settings.push.model_validate(
                {**settings.push.model_dump(mode="json"), **push_values}
            ),
        }
    )
    log_path = log_dir / f"{ingress_values['node_id']}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(IMSTREAM), "run", "ingress"],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    gateway = Gateway(configured, process, log_path, ca_file)
    deadline = time.monotonic() + 60
    while not wait(gateway):
        if process.poll() is not None or time.monotonic() > deadline:
            gateway.stop(signal.SIGKILL)
            raise AssertionError(f"the gateway did not become ready:\n{gateway.log()}")
        time.sleep(0.05)
    return gateway


# -- the client side ------------------------------------------------------------


def token(
    settings: Settings,
    user: str,
    *,
    tenant: str = TENANT,
    device: str | None = None,
    ttl: timedelta = timedelta(hours=1),
    secret: str | None = None,
    jti: str | None = None,
) -> str:
    """A client token for ``user`` signed with the settings' key (or ``secret``); ``jti``: the
    token id a revocation names."""
    return issue_token(
        secret or settings.auth.jwt_secret.get_secret_value(),
        user_id=user,
        tenant_id=tenant,
        issuer=settings.auth.jwt_issuer,
        audience=settings.auth.jwt_audience,
        device_id=device,
        ttl=ttl,
        token_id=jti,
    )


def hello(
    settings: Settings,
    user: str,
    device: str,
    *,
    tenant: str = TENANT,
    token_text: str | None = None,
    cursor: int = 0,
) -> JsonObject:
    return {
        "type": "hello",
        "id": "hello-1",
        "token": token_text if token_text is not None else token(settings, user, tenant=tenant),
        "tenant_id": tenant,
        "device_id": device,
        "platform": "android",
        "sync_cursor": cursor,
    }


async def open_socket(gateway: Gateway, **options: Any) -> ClientConnection:
    if gateway.tls is not None:
        options.setdefault("ssl", gateway.tls)
    return await connect(
        gateway.ws, compression=None, ping_interval=None, open_timeout=20, **options
    )


async def assert_upgrade_refused(gateway: Gateway, status: int, code: str) -> None:
    """The WebSocket upgrade is answered ``status`` with the error ``code`` and a Retry-After."""
    with pytest.raises(InvalidStatus) as refused:
        await open_socket(gateway)
    response = refused.value.response
    assert response.status_code == status
    assert json.loads(response.body or b"{}")["code"] == code
    assert int(response.headers["Retry-After"]) >= 1


async def open_device(
    gateway: Gateway, user: str, device: str | None = None, *, tenant: str = TENANT
) -> tuple[ClientConnection, JsonObject]:
    """A socket past ``hello``, and its ``hello_ok``."""
    socket_ = await open_socket(gateway)
    await socket_.send(json.dumps(hello(gateway.settings, user, device or "phone", tenant=tenant)))
    reply = await receive(socket_)
    assert reply["type"] == "hello_ok", reply
    return socket_, reply


async def receive(socket_: ClientConnection, within: float = 20.0) -> JsonObject:
    """The next frame, decoded."""
    raw = await asyncio.wait_for(socket_.recv(), within)
    frame = json.loads(raw)
    assert isinstance(frame, dict)
    return frame


async def request(socket_: ClientConnection, frame: JsonObject | str | bytes) -> JsonObject:
    """Send one frame and return the next frame received (its reply on a quiet socket)."""
    await socket_.send(frame if isinstance(frame, str | bytes) else json.dumps(frame))
    return await receive(socket_)


async def close_code(socket_: ClientConnection, within: float = 20.0) -> int:
    """Read until the server closes the socket; its close code (1006 if none arrived)."""
    async with asyncio.timeout(within):
        try:
            while True:
                await socket_.recv()
        except ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd is not None else 1006


async def group_message_arrives(
    sender: ClientConnection, receiver: ClientConnection, member: str, *, name: str, text: str
) -> None:
    """``sender`` creates a group with ``member`` and sends ``text`` in it; the receiver (the
    member's socket) is delivered that message within a minute."""
    conversation = unique("group")
    created = await request(
        sender,
        {
            "type": "conversation.create",
            "id": "c1",
            "conversation_id": conversation,
            "kind": "group",
            "name": name,
            "members": [member],
        },
    )
    assert created["type"] == "ok", created
    reply = await request(
        sender,
        {
            "type": "send",
            "id": "s1",
            "conversation_id": conversation,
            "client_msg_id": "m1",
            "body": {"type": "text", "text": text},
        },
    )
    assert reply["type"] == "accepted", reply
    async with asyncio.timeout(60):
        while True:
            frame = await receive(receiver, within=60)
            event = frame.get("event", {})
            if frame["type"] == "event" and event.get("type") == "message.sent":
                assert event["payload"]["body"]["text"] == text
                break


async def first_message_sent(client: Client) -> MessageSent:
    """The first ``message.sent`` among an SDK client's events."""
    async for item in client.events():
        if isinstance(item.event, MessageSent):
            return item.event
    raise AssertionError("the client's events ended")


# -- reading Kafka ------------------------------------------------------------


def reading_consumer(settings: Settings) -> Consumer:
    """A consumer of a group of its own that commits nothing: it only reads."""
    return Consumer(
        kafka_config(settings, **{"group.id": unique("test"), "enable.auto.commit": False})
    )


def high_watermark(settings: Settings, topic: str, partition: int) -> int:
    """The partition's end offset as the broker sees it now: every record below it is committed
    (blocking)."""
    consumer = reading_consumer(settings)
    try:
        _, high = consumer.get_watermark_offsets(
            TopicPartition(topic, partition), timeout=10, cached=False
        )
    finally:
        consumer.close()
    return int(high)


def end_offset(settings: Settings, topic: str, key: bytes) -> tuple[int, int]:
    """The partition ``key`` goes to and its end offset now (blocking)."""
    partitions = topic_catalog(settings).by_name(topic).partitions
    partition = partition_for_key(key, partitions)
    return partition, high_watermark(settings, topic, partition)


def read_records(
    settings: Settings,
    topic: str,
    partition: int,
    offset: int,
    count: int,
    *,
    key: bytes | None = None,
) -> list[tuple[bytes | None, JsonObject]]:
    """``count`` records of a partition from ``offset`` on, as (key, decoded JSON value); only
    those with ``key`` if one is given (the presence topic also carries the nodes' leases)."""
    consumer = reading_consumer(settings)
    consumer.assign([TopicPartition(topic, partition, offset)])
    records: list[tuple[bytes | None, JsonObject]] = []
    deadline = time.monotonic() + 20
    try:
        while len(records) < count and time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is None or message.error() is not None:
                continue
            if key is not None and message.key() != key:
                continue
            records.append((message.key(), json.loads(message.value() or b"null")))
    finally:
        consumer.close()
    return records


def read_to_end(
    settings: Settings, topic: str, partition: int, offset: int
) -> list[tuple[bytes | None, JsonObject]]:
    """Every record of a partition from ``offset`` to its current end."""
    high = high_watermark(settings, topic, partition)
    return read_records(settings, topic, partition, offset, high - offset)
