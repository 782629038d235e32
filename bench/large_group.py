"""Large groups end to end: what one message into a 100,000-member group costs the system, and how
fast it reaches the members' connected devices.

    python -m bench.large_group [--members 10000,100000] [--devices 2000] [--rate 20]
                                [--seconds 60] [--quick] [--output PATH] [--no-crossing]

Why: a group above the large-group threshold (``IM_STREAMS__LARGE_GROUP_THRESHOLD``, 500) must not
cost one Kafka record per member per message (write diffusion); it is read-diffused instead — one
record per group event that every ingress node reads and hands to the members' devices it holds.
This benchmark checks that claim from the outside, on the real processes, and puts numbers on it:
records per message, send → live delivery latency, CPU per message per process kind.

Each ``--members`` size runs on a system of its own, as ``imstream up`` runs it (bench/e2e.py's
``running_system``: the stream worker, two ingress nodes, the CQL and ClickHouse sinks, with
``IM_STREAMS__MEMBER_ADMISSION=open``), a fresh topic catalog (``bench.lg<size>.<time>.<pid>.``)
and a fresh keyspace, on the local stack's Kafka and Cassandra (started if they are down, never
stopped: others share them).

1. **Build.** The group is made straight on the conversation input topic, as the tests make
   theirs: one ``conversation.created`` naming the owner and the first 999 members (the most one
   event may name), then one ``conversation.member_added`` per further member from the owner, in
   big produce batches. Reported: how long until the stream worker had applied all of it (its
   consumer groups' lag 0 and every topic's end offsets still for 2 s), the records it wrote per
   topic, and how many adds the sequenced log holds (refusals would show there). Below the
   threshold every add is delivered to every member; above it an add should cost O(1) records,
   so building a 100,000-member group is linear — on write-diffusing code it is quadratic (a
   10,000-member group ≈ 50 M deliveries): once a minute of it shows that the build cannot end
   within ``--build-timeout``, the size fails with the estimate and the next one runs.
2. **Devices.** ``--devices`` members (user ids in the group, one device each, dev-token
   ``hello``) connect over raw WebSockets, alternately to the two ingress nodes, held by
   ``--receiver-processes`` processes (a Python process parsing 20,000 frames/s is itself the
   bottleneck; each process also measures its event loop's lag, reported beside the latencies: a
   lagging receiver timestamps late). Every ``event`` frame of the group that carries a
   ``message.sent`` (read diffusion: ``sync_id`` null; small groups: with a ``sync_id``) or a
   ``conversation.advanced`` (write diffusion of today's large groups: with a ``sync_id``) counts
   as a delivery of that message id, at ``time.time()`` on arrival; a second one is *doubled*.
   The frames seen are reported by kind (``<event type>/<null|sync_id>``). One more member, the
   owner, sends over its own socket (``send`` frames, pipelined, open loop at ``--rate``; the
   client_msg_id carries the send instant in ms); latency is arrival - send instant. A device
   connected throughout that never got a message is a *miss*.
3. **Warm-up**: ``--warm-up-seconds`` of group messages, reported apart (cold caches).
4. **Group-only window** (no other traffic): the system settles (stream worker idle, sinks
   caught up, bounded by ``--sink-catch-up``), the processes' idle CPU is measured for
   ``--idle-seconds``, then every topic's end offsets are noted, ``--window-seconds`` of group
   messages are sent at ``--rate``, the system settles again, and the end offsets are noted once
   more. The DATA records between the two (a ``read_committed`` consumer counts them:
   transaction markers take offsets too) divided by the messages give records per group message,
   per topic and in total — the input topic reported apart —, checked against
   ``ingress nodes + --records-constant``. CPU seconds of each process over the same span
   (ingress nodes, stream worker, sinks, Kafka, Cassandra, the benchmark's own clients, and
   ``benchmark``: this process, polling Kafka for lags and offsets) divided by the messages give
   CPU per group message, as measured and net of the idle rate. The span ends once the sinks
   have caught up, so their work for these messages is in it.
5. **With 1:1 traffic**: ``--seconds`` of group messages at ``--rate`` while bench/e2e_load.py's
   SDK load generator sends ``--direct-rate`` 1:1 messages/s between ``--direct-pairs`` pairs of
   other users: send → live delivery p50/p95/p99/max to the connected members (the bar:
   p99 ≤ ``--p99-bar-ms``, 500), misses, doubles, and the 1:1 traffic's own latency.

**Threshold crossing** (``--crossing``, on by default; a system of its own): a group of
threshold - 5 members with ``--crossing-devices`` of them connected; a group-only window below the
threshold; then members are added one at a time (owner's ``conversation.add_member`` frames on the
sending socket, so that Kafka keeps their order with the sends) up to threshold + 10, two messages
after each add; a window above the threshold; then members are removed one at a time down to
threshold - 10, two messages after each; a last window. Every connected device must get every
message exactly once, whichever way it came (read diffusion without ``sync_id``, the sync queue
with one): misses and doubles are reported per message with the group's size when it was sent,
with records per message below, above and below again.

Results: ``docs/bench/large_group.json`` (``--output``; section ``large_group``) with the machine's
facts. docs/performance.md has the discussion.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import re
import shutil
import tempfile
import time
import traceback
import uuid
from array import array
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import SynchronizedArray
from pathlib import Path
from typing import Any

import uvloop
from confluent_kafka import Consumer, TopicPartition
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench.common import (
    BENCH_TENANT,
    REPO_ROOT,
    BenchError,
    CpuMeter,
    CpuSnapshot,
    Progress,
    bench_topics,
    ensure_local_stack,
    machine_facts,
    now_iso,
    percentiles_ms,
    raise_open_file_limit,
    run_main,
    run_settings,
    start_run,
    write_results,
)
from bench.e2e import (
    SINK_LAG_SETTLED,
    System,
    keyspace_for,
    running_system,
    sink_lags,
    stack_pids,
)
from bench.e2e_load import Phase, PhaseResult, WorkerPlan, run_worker
from bench.harness import (
    add_output_options,
    bench_parser,
    options_document,
    options_from,
    stop_workers,
)
from bench.ingress_throughput import body_text
from bench.lean_ws import LeanSocket, open_lean
from bench.loadgen import Credentials
from bench.shapes import conversation_created
from bench.stream_throughput import fill
from core.connections import kafka_config
from core.lag import group_lag
from core.settings import Settings
from pipelines.processes import consumer_groups
from schemas.events import (
    MAX_MEMBERS_PER_EVENT,
    Actor,
    ConversationKind,
    ConversationMemberAdded,
    ConversationMemberAddedPayload,
    Event,
    Platform,
    TextBody,
    message_event_id,
)
from schemas.frames import (
    AddMember,
    Hello,
    Ping,
    RemoveMember,
    Send,
    encode_client_frame,
)
from schemas.topics import TopicCatalog

RESULTS_PATH = REPO_ROOT / "docs" / "bench" / "large_group.json"
TENANT = BENCH_TENANT
#: ``running_system`` starts two ingress nodes; the devices alternate between them.
INGRESS_NODES = 2
#: The device every synthetic member connects with.
DEVICE_ID = "d1"
#: How long the system must write nothing (every topic's end offsets still) to count as settled.
QUIET_SECONDS = 2.0
#: The receivers' event-loop lag is sampled this often.
LOOP_LAG_SAMPLE_SECONDS = 0.1
#: The first ``"type":"…"`` of a record's value: an event's type (the envelope's comes first).
_TYPE_PATTERN = re.compile(rb'"type":"([a-z_.]+)"')
_NAN = array("d", [math.nan])
#: How a large group's message frame starts (``EventFrame`` JSON as the gateway writes it).
_GROUP_MESSAGE_PREFIX = (
    b'{"type":"event","sync_id":null,"event":{"type":"message.sent","event_id":"'
)


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    members: list[int]
    devices: int
    rate: float
    seconds: float
    window_seconds: float
    warm_up_seconds: float
    idle_seconds: float
    drain: float
    direct_rate: float
    direct_pairs: int
    receiver_processes: int
    body_bytes: int
    p99_bar_ms: float
    records_constant: int
    build_timeout: float
    settle_timeout: float
    sink_catch_up: float
    sink_nice: int
    count_cap: int
    crossing: bool
    crossing_devices: int
    quick: bool
    output: Path
    write: bool


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = bench_parser("bench.large_group", __doc__)
    parser.add_argument(
        "--members", default="100000", help="group sizes, comma-separated (%(default)s)"
    )
    parser.add_argument("--devices", type=int, default=2000, help="connected members")
    parser.add_argument("--rate", type=float, default=20.0, help="group messages/s")
    parser.add_argument("--seconds", type=float, default=None, help="with 1:1 traffic (60)")
    parser.add_argument("--window-seconds", type=float, default=None, help="group-only (10)")
    parser.add_argument("--warm-up-seconds", type=float, default=None, help="unmeasured (5)")
    parser.add_argument("--idle-seconds", type=float, default=None, help="idle CPU baseline (5)")
    parser.add_argument(
        "--drain", type=float, default=30.0, help="seconds to wait for late deliveries"
    )
    parser.add_argument("--direct-rate", type=float, default=50.0, help="1:1 messages/s (0: off)")
    parser.add_argument("--direct-pairs", type=int, default=100, help="1:1 conversations")
    parser.add_argument("--receiver-processes", type=int, default=2, help="device processes")
    parser.add_argument("--body-bytes", type=int, default=100, help="text body size")
    parser.add_argument("--p99-bar-ms", type=float, default=500.0, help="the latency bar")
    parser.add_argument(
        "--records-constant",
        type=int,
        default=10,
        help="records per group message may be at most ingress nodes + this (%(default)s)",
    )
    parser.add_argument(
        "--build-timeout", type=float, default=3600.0, help="seconds to build a group"
    )
    parser.add_argument(
        "--settle-timeout", type=float, default=300.0, help="seconds to wait for the stream worker"
    )
    parser.add_argument(
        "--sink-catch-up", type=float, default=None, help="seconds to wait for the sinks (120)"
    )
    parser.add_argument("--sink-nice", type=int, default=10, help="as `imstream up` sets it")
    parser.add_argument(
        "--count-cap",
        type=int,
        default=3_000_000,
        help="count records one by one up to this many offsets; above, report offsets",
    )
    parser.add_argument(
        "--crossing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the threshold-crossing scenario (%(default)s)",
    )
    parser.add_argument("--crossing-devices", type=int, default=50, help="connected members")
    parser.add_argument(
        "--quick", action="store_true", help="short phases: 15 s with 1:1, 5 s group-only"
    )
    add_output_options(parser, RESULTS_PATH)
    args = parser.parse_args(argv)
    try:
        members = [int(part) for part in args.members.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--members must be comma-separated integers, got {args.members!r}")
    if not members or any(size < 2 for size in members):
        parser.error("--members: every group needs at least 2 members")
    if args.rate <= 0:
        parser.error("--rate must be positive")
    if args.devices < 1 or args.receiver_processes < 1:
        parser.error("--devices and --receiver-processes must be at least 1")

    def pick(value: float | None, full: float, quick: float) -> float:
        return value if value is not None else (quick if args.quick else full)

    return options_from(
        Options,
        args,
        members=members,
        seconds=pick(args.seconds, 60.0, 15.0),
        window_seconds=pick(args.window_seconds, 10.0, 5.0),
        warm_up_seconds=pick(args.warm_up_seconds, 5.0, 3.0),
        idle_seconds=pick(args.idle_seconds, 5.0, 3.0),
        sink_catch_up=pick(args.sink_catch_up, 120.0, 60.0),
        write=not args.no_write,
    )


# ---------------------------------------------------------------------------------------------
# Identities and the group
# ---------------------------------------------------------------------------------------------


def run_tag() -> str:
    """A short prefix for this run's user ids (ids are at most 64 characters)."""
    return f"lg{os.getpid() % 100_000}x{int(time.time()) % 1_000_000}"


def member_id(tag: str, index: int) -> str:
    return f"{tag}m{index}"


def build_events(tag: str, conversation_id: str, members: int) -> Iterator[Event]:
    """The group as commands: created with the owner (member 0) and the first members an event
    may name, then one ``member_added`` from the owner per further member."""
    owner = member_id(tag, 0)
    first = [member_id(tag, index) for index in range(min(members, MAX_MEMBERS_PER_EVENT))]
    name = f"bench group of {members}"
    yield conversation_created(
        TENANT, conversation_id, first, ConversationKind.GROUP, owner=True, name=name
    )
    for index in range(len(first), members):
        yield ConversationMemberAdded.new(
            tenant_id=TENANT,
            actor=Actor(user_id=owner),
            payload=ConversationMemberAddedPayload(
                conversation_id=conversation_id, user_id=member_id(tag, index)
            ),
        )


# ---------------------------------------------------------------------------------------------
# The device processes: receiving members and the sender
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DevicePlan:
    """What one device process holds: receiving members' sockets and/or the sender's."""

    worker: int
    urls: tuple[str, ...]
    tenant_id: str
    credentials: Credentials
    conversation_id: str
    #: Each receiving device: its user id and the index of the ingress node it connects to.
    devices: tuple[tuple[str, int], ...]
    #: The sending member (on node 0), if this process sends.
    sender: str | None
    body_text: str
    connect_concurrency: int = 50


@dataclass(frozen=True, slots=True)
class Script:
    """What the sender does: ``steps`` one after the other, open loop at ``rate`` steps/s from
    ``start_at`` (a ``time.monotonic()`` instant, one clock for every process). A step is
    ``("send", "")``, ``("add", user)`` or ``("remove", user)``."""

    label: str
    steps: tuple[tuple[str, str], ...]
    rate: float
    start_at: float


@dataclass(frozen=True, slots=True)
class SentMessage:
    client_msg_id: str
    message_id: str
    #: ``time.time()`` just before the frame was written.
    sent_at: float
    step: int


@dataclass(slots=True)
class SendReport:
    label: str
    sends: int = 0
    #: The accepted messages.
    messages: list[SentMessage] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    membership_ok: int = 0
    membership_errors: Counter[str] = field(default_factory=Counter)
    unanswered: int = 0
    #: ``command.rejected`` events the sender got so far in the run (a refused add, remove or
    #: send reaches the requester's devices that way), by reason.
    rejected: Counter[str] = field(default_factory=Counter)
    accept_s: list[float] = field(default_factory=list)
    schedule_lag_s: list[float] = field(default_factory=list)


@dataclass(slots=True)
class ConnectReport:
    worker: int
    connected: int = 0
    failed: int = 0
    seconds: float = 0.0
    first_errors: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Collected:
    """One device process's deliveries of the messages asked about."""

    worker: int
    devices: int = 0
    #: Devices connected from the start to now; only these are expected to have every message.
    connected_throughout: int = 0
    delivered: int = 0
    missed: int = 0
    doubled: int = 0
    latencies: array[float] = field(default_factory=lambda: array("d"))
    kinds: Counter[str] = field(default_factory=Counter)
    doubled_kinds: Counter[str] = field(default_factory=Counter)
    #: Per message id: delivered, missed, doubled and the kinds seen.
    per_message: dict[str, dict[str, Any]] = field(default_factory=dict)
    closed_codes: Counter[str] = field(default_factory=Counter)
    loop_lag_s: list[float] = field(default_factory=list)


class _DeviceWorker:
    def __init__(self, plan: DevicePlan, counters: SynchronizedArray[int]) -> None:
        self.plan = plan
        self.counters = counters
        self.count = len(plan.devices)
        self.sockets: list[LeanSocket | None] = [None] * self.count
        self.closed: dict[int, str] = {}
        self.tasks: list[asyncio.Task[None]] = []
        #: Per message id: the first arrival at each device (NaN: not yet), kinds, doubles.
        self.arrivals: dict[str, array[float]] = {}
        self.kinds: dict[str, Counter[str]] = {}
        self.doubles: dict[str, Counter[str]] = {}
        self.loop_lag_s: list[float] = []
        self.sender_socket: ClientConnection | None = None
        self.pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.rejected: Counter[str] = Counter()
        self.idle_timeout = 60.0
        self.received_count = 0
        self._conversation_marker = f'"conversation_id":"{plan.conversation_id}"'.encode()

    # -- connections ---------------------------------------------------------------------------

    def _hello(self, user: str, device: str) -> str:
        plan = self.plan
        token = plan.credentials.token(user_id=user, tenant_id=plan.tenant_id, device_id=device)
        hello = Hello(
            id="hello",
            token=token,
            tenant_id=plan.tenant_id,
            device_id=device,
            platform=Platform.WEB,
        )
        return encode_client_frame(hello)

    def _hello_answered(self, reply: dict[str, Any]) -> None:
        if reply.get("type") != "hello_ok":
            raise ConnectionRefusedError(f"hello was answered with {reply!r:.300}")
        self.idle_timeout = min(self.idle_timeout, reply.get("idle_timeout_ms", 60_000) / 1000)

    async def open(self, index: int, user: str, node: int) -> LeanSocket:
        """A member device's socket: lean (bench/lean_ws.py), its frames to :meth:`received`."""
        answered: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def on_text(payload: bytes) -> None:
            if answered.done():
                self.received(index, payload)
            else:
                answered.set_result(payload)

        def on_close(code: int | None) -> None:
            self.closed[index] = str(code)
            if not answered.done():
                answered.set_exception(ConnectionError(f"closed with {code} before hello_ok"))

        url = self.plan.urls[node % len(self.plan.urls)]
        async with asyncio.timeout(60):
            socket = await open_lean(url, on_text, on_close)
        socket.send_text(self._hello(user, DEVICE_ID))
        try:
            self._hello_answered(json.loads(await asyncio.wait_for(answered, timeout=60)))
        except BaseException:
            socket.close()
            raise
        return socket

    async def open_sender(self, user: str) -> ClientConnection:
        """The sender's socket (``websockets``: it waits for replies)."""
        websocket = await connect(
            self.plan.urls[0],
            compression=None,
            ping_interval=None,  # the protocol's ping frame keeps the socket alive instead
            proxy=None,
            open_timeout=60,
            close_timeout=5,
        )
        await websocket.send(self._hello(user, "sender"))
        try:
            self._hello_answered(json.loads(await asyncio.wait_for(websocket.recv(), timeout=60)))
        except BaseException:
            await websocket.close()
            raise
        return websocket

    async def connect(self) -> ConnectReport:
        plan = self.plan
        report = ConnectReport(plan.worker)
        began = time.monotonic()
        gate = asyncio.Semaphore(plan.connect_concurrency)

        async def open_one(index: int, user: str, node: int) -> None:
            async with gate:
                try:
                    socket = await self.open(index, user, node)
                except (OSError, TimeoutError) as error:
                    report.failed += 1
                    self.closed[index] = "never connected"
                    if len(report.first_errors) < 5:
                        report.first_errors.append(repr(error))
                    return
            self.sockets[index] = socket
            report.connected += 1

        await asyncio.gather(
            *(open_one(index, user, node) for index, (user, node) in enumerate(plan.devices))
        )
        if plan.sender is not None:
            self.sender_socket = await self.open_sender(plan.sender)
            self.tasks.append(asyncio.create_task(self.read_replies(self.sender_socket)))
        self.tasks.append(asyncio.create_task(self.ping_forever()))
        self.tasks.append(asyncio.create_task(self.watch_loop()))
        report.seconds = round(time.monotonic() - began, 2)
        return report

    async def ping_forever(self) -> None:
        """An application ``ping`` per socket every third of the idle timeout, spread out."""
        ping = encode_client_frame(Ping(id="ping"))
        tick, tick_seconds = 0, 0.5
        while True:
            await asyncio.sleep(tick_seconds)
            slices = max(1, round(self.idle_timeout / 3 / tick_seconds))
            for socket in self.sockets[tick % slices :: slices]:
                if socket is not None:
                    socket.send_text(ping)
            if self.sender_socket is not None and tick % slices == 0:
                with contextlib.suppress(ConnectionClosed):
                    await self.sender_socket.send(ping)
            tick += 1

    async def watch_loop(self) -> None:
        """How late the event loop wakes up: the receipt timestamps are at least this late."""
        while True:
            before = time.monotonic()
            await asyncio.sleep(LOOP_LAG_SAMPLE_SECONDS)
            self.loop_lag_s.append(time.monotonic() - before - LOOP_LAG_SAMPLE_SECONDS)
            self.counters[self.plan.worker] = self.received_count

    # -- receiving -----------------------------------------------------------------------------

    def received(self, index: int, payload: bytes) -> None:
        """A text frame at device ``index`` (replies and pongs are skipped unparsed).

        A large group's message is recognised by its frame's fixed prefix (the gateway writes
        ``EventFrame`` JSON in field order, without spaces) and its id cut out of it, and only
        other events are parsed: JSON parsing was half of what a device cost per message."""
        now = time.time()
        if payload.startswith(_GROUP_MESSAGE_PREFIX):
            end = payload.find(b'"', len(_GROUP_MESSAGE_PREFIX))
            if self._conversation_marker in payload:
                message_id = payload[len(_GROUP_MESSAGE_PREFIX) : end].decode()
                self.arrived(index, message_id, "message.sent/null", now)
            return
        if b'"event"' not in payload:
            return
        frame = json.loads(payload)
        if frame.get("type") != "event":
            return
        event = frame.get("event") or {}
        body = event.get("payload") or {}
        if body.get("conversation_id") != self.plan.conversation_id:
            return
        kind = event.get("type")
        if kind == "message.sent":
            found = event.get("event_id")
        elif kind == "conversation.advanced":
            found = body.get("message_id")
        else:
            return
        if isinstance(found, str):
            via = "null" if frame.get("sync_id") is None else "sync_id"
            self.arrived(index, found, f"{kind}/{via}", now)

    def arrived(self, index: int, message_id: str, kind: str, now: float) -> None:
        times = self.arrivals.get(message_id)
        if times is None:
            times = self.arrivals[message_id] = _NAN * self.count
            self.kinds[message_id] = Counter()
        if not math.isnan(times[index]):
            self.doubles.setdefault(message_id, Counter())[kind] += 1
            return
        times[index] = now
        self.kinds[message_id][kind] += 1
        # The shared counter (a lock per update) is brought up to date by watch_loop.
        self.received_count += 1

    def collect(self, sent: Mapping[str, float]) -> Collected:
        """Deliveries of the messages ``sent`` (message id → send instant), forgotten afterwards."""
        result = Collected(self.plan.worker, devices=self.count)
        throughout = [index for index in range(self.count) if index not in self.closed]
        result.connected_throughout = len(throughout)
        for code in self.closed.values():
            result.closed_codes[code] += 1
        for message_id, sent_at in sent.items():
            times = self.arrivals.pop(message_id, None)
            kinds = self.kinds.pop(message_id, Counter())
            doubles = self.doubles.pop(message_id, Counter())
            delivered = 0
            if times is not None:
                for index in throughout:
                    arrived = times[index]
                    if not math.isnan(arrived):
                        delivered += 1
                        result.latencies.append(arrived - sent_at)
            missed = len(throughout) - delivered
            result.delivered += delivered
            result.missed += missed
            result.doubled += doubles.total()
            result.kinds.update(kinds)
            result.doubled_kinds.update(doubles)
            result.per_message[message_id] = {
                "delivered": delivered,
                "missed": missed,
                "doubled": doubles.total(),
                "kinds": dict(kinds + doubles),
            }
        result.loop_lag_s = self.loop_lag_s
        self.loop_lag_s = []
        return result

    # -- sending -------------------------------------------------------------------------------

    async def read_replies(self, websocket: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for text in websocket:
                frame = json.loads(text)
                if frame.get("type") == "event":
                    event = frame.get("event") or {}
                    if event.get("type") == "command.rejected":
                        payload = event.get("payload") or {}
                        reason = f"{payload.get('command_type')}: {payload.get('reason')}"
                        self.rejected[reason] += 1
                    continue
                future = self.pending.pop(str(frame.get("id")), None)
                if future is not None and not future.done():
                    future.set_result(frame)
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ConnectionError("the sender's socket closed"))

    async def request(
        self, frame: Send | AddMember | RemoveMember
    ) -> asyncio.Future[dict[str, Any]]:
        """Write ``frame`` now; the returned future gets its reply."""
        if self.sender_socket is None:
            raise RuntimeError("this process does not send")
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[frame.id] = future
        await self.sender_socket.send(encode_client_frame(frame))
        return future

    async def run_script(self, script: Script) -> SendReport:
        plan = self.plan
        sender = plan.sender or ""
        report = SendReport(script.label)
        waits: list[asyncio.Task[None]] = []

        async def sent(message: SentMessage, reply: asyncio.Future[dict[str, Any]]) -> None:
            try:
                frame = await asyncio.wait_for(reply, timeout=60)
            except (TimeoutError, ConnectionError):
                report.unanswered += 1
                return
            if frame.get("type") == "accepted":
                report.messages.append(message)
                report.accept_s.append(time.time() - message.sent_at)
            else:
                report.errors[str(frame.get("code"))] += 1

        async def changed(reply: asyncio.Future[dict[str, Any]]) -> None:
            try:
                frame = await asyncio.wait_for(reply, timeout=60)
            except (TimeoutError, ConnectionError):
                report.unanswered += 1
                return
            if frame.get("type") == "ok":
                report.membership_ok += 1
            else:
                report.membership_errors[str(frame.get("code"))] += 1

        for step, (action, user) in enumerate(script.steps):
            due = script.start_at + step / script.rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            report.schedule_lag_s.append(time.monotonic() - due)
            request_id = f"{script.label}-{step}"
            if action == "send":
                sent_at = time.time()
                client_msg_id = f"{script.label}.{report.sends}.{int(sent_at * 1000)}"
                report.sends += 1
                message = SentMessage(
                    client_msg_id, message_event_id(TENANT, sender, client_msg_id), sent_at, step
                )
                frame: Send | AddMember | RemoveMember = Send(
                    id=request_id,
                    conversation_id=plan.conversation_id,
                    client_msg_id=client_msg_id,
                    body=TextBody(text=plan.body_text),
                )
                waits.append(asyncio.create_task(sent(message, await self.request(frame))))
            else:
                frame = (AddMember if action == "add" else RemoveMember)(
                    id=request_id, conversation_id=plan.conversation_id, user_id=user
                )
                waits.append(asyncio.create_task(changed(await self.request(frame))))
        await asyncio.gather(*waits)
        # Refusals come through the sync queue, after the stream worker applied the commands.
        await asyncio.sleep(2.0)
        report.rejected = Counter(self.rejected)
        report.messages.sort(key=lambda message: message.step)
        return report

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for socket in self.sockets:
            if socket is not None:
                socket.close()
        if self.sender_socket is not None:
            with contextlib.suppress(Exception):
                await self.sender_socket.close()


async def _serve_devices(
    plan: DevicePlan, pipe: Connection, counters: SynchronizedArray[int]
) -> None:
    worker = _DeviceWorker(plan, counters)
    loop = asyncio.get_running_loop()
    try:
        pipe.send(("ready", await worker.connect()))
        while True:
            message = await loop.run_in_executor(None, pipe.recv)
            if message[0] == "script":
                pipe.send(("sent", await worker.run_script(message[1])))
            elif message[0] == "collect":
                pipe.send(("collected", worker.collect(message[1])))
            else:
                return
    finally:
        with contextlib.suppress(Exception):
            await worker.close()


def run_devices(plan: DevicePlan, pipe: Connection, counters: SynchronizedArray[int]) -> None:
    """The device process's entry point (``multiprocessing`` with the spawn context).

    Over ``pipe``: worker → parent ``("ready", ConnectReport)``; parent → worker
    ``("script", Script)`` → ``("sent", SendReport)``, ``("collect", {message id: sent at})`` →
    ``("collected", Collected)``, ``("stop",)``; ``("failed", traceback)`` instead of any reply.
    """
    try:
        uvloop.run(_serve_devices(plan, pipe, counters))
    except Exception:  # reported to the parent, which stops the run with it
        with contextlib.suppress(OSError):
            pipe.send(("failed", traceback.format_exc()))
    finally:
        pipe.close()


def _receive(pipe: Connection, timeout: float, what: str) -> tuple[Any, ...]:
    if not pipe.poll(timeout):
        raise BenchError(f"a load process did not report {what} within {timeout:.0f} s")
    message: tuple[Any, ...] = pipe.recv()
    if message[0] == "failed":
        raise BenchError(f"a load process failed:\n{message[1]}")
    return message


class DeviceFleet:
    """The receiving devices (over ``receiver_processes`` processes) and the sender (its own)."""

    def __init__(
        self,
        system: System,
        conversation_id: str,
        receivers: Sequence[str],
        sender: str,
        *,
        processes: int,
        body: str,
        progress: Progress,
    ) -> None:
        settings = system.settings
        credentials = Credentials.of(settings)
        context = multiprocessing.get_context("spawn")
        workers = max(1, min(processes, len(receivers)))
        self.counters = context.Array("q", workers + 1, lock=False)
        self.pipes: list[Connection] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        plans = [DevicePlan(0, system.urls, TENANT, credentials, conversation_id, (), sender, body)]
        for worker in range(workers):
            devices = tuple(
                (user, index % len(system.urls))
                for index, user in enumerate(receivers)
                if index % workers == worker
            )
            plans.append(
                DevicePlan(
                    worker + 1, system.urls, TENANT, credentials, conversation_id, devices, None, ""
                )
            )
        for plan in plans:
            parent_end, child_end = context.Pipe()
            name = "sender" if plan.sender else f"receivers-{plan.worker}"
            process = context.Process(
                target=run_devices, args=(plan, child_end, self.counters), name=name
            )
            process.start()
            child_end.close()
            self.pipes.append(parent_end)
            self.processes.append(process)
        began = time.monotonic()
        self.connect: list[ConnectReport] = []
        for pipe in self.pipes:
            self.connect.append(_receive(pipe, 600, "its connections")[1])
        self.connected = sum(report.connected for report in self.connect)
        self.failed = sum(report.failed for report in self.connect)
        self.connect_seconds = round(time.monotonic() - began, 1)
        progress.done(
            f"{self.connected:,} member devices connected over {len(system.urls)} ingress nodes "
            f"from {workers} process{'es' if workers > 1 else ''} in {self.connect_seconds} s"
            + (f", {self.failed} failed: {self.connect[1].first_errors}" if self.failed else "")
        )

    def pids(self) -> dict[str, int]:
        pids = {}
        for index, process in enumerate(self.processes):
            if process.pid is not None:
                pids["sender" if index == 0 else f"receivers {index}"] = process.pid
        return pids

    def received(self) -> int:
        return sum(self.counters)

    def start_script(self, script: Script) -> None:
        self.pipes[0].send(("script", script))

    def script_result(self, timeout: float) -> SendReport:
        report: SendReport = _receive(self.pipes[0], timeout, "its sends")[1]
        return report

    def collect(self, sent: Mapping[str, float]) -> list[Collected]:
        for pipe in self.pipes[1:]:
            pipe.send(("collect", dict(sent)))
        return [_receive(pipe, 300, "its deliveries")[1] for pipe in self.pipes[1:]]

    def close(self) -> None:
        stop_workers(self.pipes, self.processes)


# ---------------------------------------------------------------------------------------------
# The 1:1 traffic: bench/e2e_load.py's SDK load generator, in one process
# ---------------------------------------------------------------------------------------------


class DirectTraffic:
    def __init__(self, system: System, pairs: int, body: str, progress: Progress) -> None:
        settings = system.settings
        context = multiprocessing.get_context("spawn")
        self.counters = context.Array("q", 1, lock=False)
        tag = f"lgd{os.getpid() % 100_000}x{int(time.time()) % 1_000_000}"
        plan = WorkerPlan(
            worker=0,
            urls=system.urls,
            tenant_id=TENANT,
            pairs=tuple((f"{tag}-p{index}a", f"{tag}-p{index}b") for index in range(pairs)),
            groups=(),
            credentials=Credentials.of(settings),
            body_text=body,
            run_tag=tag,
        )
        self.pipe, child_end = context.Pipe()
        self.process = context.Process(
            target=run_worker, args=(plan, child_end, self.counters), name="direct-load"
        )
        self.process.start()
        child_end.close()
        ready = _receive(self.pipe, 300, "its 1:1 conversations")[1]
        progress.done(
            f"1:1 load: {ready['users']} users in {ready['conversations']} 1:1 conversations"
        )
        self.phases = 0

    def pid(self) -> int | None:
        return self.process.pid

    def start(self, rate: float, start_at: float, seconds: float, drain: float) -> None:
        self.phases += 1
        self.pipe.send(
            (
                "phase",
                Phase(
                    index=self.phases,
                    kind="direct",
                    rate=rate,
                    start_at=start_at,
                    measure_from=start_at,
                    measure_until=start_at + seconds,
                    drain_until=start_at + seconds + drain,
                ),
            )
        )

    def result(self, timeout: float) -> PhaseResult:
        result: PhaseResult = _receive(self.pipe, timeout, "its 1:1 results")[1]
        return result

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.pipe.send(("stop",))
        self.process.join(30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        self.pipe.close()


def direct_summary(result: PhaseResult, rate: float, seconds: float) -> dict[str, Any]:
    return {
        "target_per_second": rate,
        "sent": result.scheduled,
        "accepted": result.accepted_total,
        "accepted_per_second": round(result.accepted_in_window / seconds, 1),
        "send_to_deliver_ms": percentiles_ms(result.deliver_s),
        "send_to_accepted_ms": percentiles_ms(result.accept_s),
        "generator_lag_ms": percentiles_ms(result.schedule_lag_s),
        "deliveries_expected": result.expected_total,
        "delivered": result.delivered_total,
        "delivered_live": result.delivered_live,
        "delivered_by_sync": result.delivered_by_sync,
        "undelivered_after_drain": result.lost,
        "duplicates": result.duplicates,
        "errors": dict(result.errors),
    }


# ---------------------------------------------------------------------------------------------
# Kafka: end offsets, records written, settling
# ---------------------------------------------------------------------------------------------

Marks = dict[tuple[str, int], int]


class Probe:
    """End offsets of every topic of the catalog, the stream worker's lag, records written."""

    def __init__(self, settings: Settings, catalog: TopicCatalog) -> None:
        self.settings = settings
        self.catalog = catalog
        self.prefix = settings.kafka.topic_prefix
        self.consumer = Consumer(
            kafka_config(settings, **{"group.id": f"bench-lg-probe-{uuid.uuid4().hex[:8]}"})
        )
        self.stream_groups = consumer_groups(settings)["stream-worker"]

    def close(self) -> None:
        self.consumer.close()

    def end_offsets(self) -> Marks:
        marks: Marks = {}
        for topic in self.catalog:
            for partition in range(topic.partitions):
                _low, high = self.consumer.get_watermark_offsets(
                    TopicPartition(topic.name, partition), timeout=30, cached=False
                )
                marks[(topic.name, partition)] = high
        return marks

    def stream_lag(self) -> int | None:
        """Records the stream worker's consumer groups have still to apply (None: unknown)."""
        lags = [
            group_lag(self.settings, group, topics) for group, topics in self.stream_groups.items()
        ]
        return None if None in lags else sum(lag for lag in lags if lag is not None)

    def input_lag(self) -> int | None:
        """The conversation processor's lag on the input topic alone."""
        for group, topics in self.stream_groups.items():
            if self.catalog.messages_in.name in topics:
                return group_lag(self.settings, group, [self.catalog.messages_in.name])
        return None

    def written(self, before: Marks, after: Marks, *, cap: int) -> dict[str, Any]:
        """The data records (and their key + value bytes) each topic got between two marks,
        counted by a ``read_committed`` consumer; above ``cap`` offsets in all, only the offsets
        (which include transaction markers) are reported. The sequenced log's records are also
        counted by event type."""
        spans = {
            tp: end - before.get(tp, 0) for tp, end in after.items() if end > before.get(tp, 0)
        }
        offsets: Counter[str] = Counter()
        for (topic, _partition), span in spans.items():
            offsets[topic] += span
        topics: dict[str, dict[str, Any]] = {
            name.removeprefix(self.prefix): {"offsets": count, "records": None, "bytes": None}
            for name, count in sorted(offsets.items())
        }
        if sum(offsets.values()) > cap:
            return {"exact": False, "topics": topics, "sequenced_by_type": {}}
        counts: dict[str, list[int]] = {name: [0, 0] for name in offsets}
        census: Counter[str] = Counter()
        sequenced = self.catalog.messages_sequenced.name
        consumer = Consumer(
            kafka_config(
                self.settings,
                **{
                    "group.id": f"bench-lg-count-{uuid.uuid4().hex[:8]}",
                    "enable.auto.commit": False,
                    "isolation.level": "read_committed",
                },
            )
        )
        pending = set(spans)
        consumer.assign([TopicPartition(t, p, before.get((t, p), 0)) for t, p in pending])
        idle_since = time.monotonic()
        try:
            while pending and time.monotonic() - idle_since < 10:
                batch = consumer.consume(10_000, timeout=0.5)
                for message in batch:
                    if message.error() is not None:
                        continue
                    tp = (message.topic() or "", message.partition() or 0)
                    offset = message.offset() or 0
                    if tp not in spans or offset >= after[tp]:
                        continue
                    entry = counts[tp[0]]
                    value = message.value() or b""
                    entry[0] += 1
                    entry[1] += len(message.key() or b"") + len(value)
                    if tp[0] == sequenced and (found := _TYPE_PATTERN.search(value)):
                        census[found.group(1).decode()] += 1
                    if offset + 1 >= after[tp]:
                        pending.discard(tp)
                if batch:
                    idle_since = time.monotonic()
                # A partition whose last offsets are transaction markers never delivers them:
                # it is done once the consumer's position is past the mark.
                for position in consumer.position([TopicPartition(t, p) for t, p in pending]):
                    tp = (position.topic, position.partition)
                    if position.offset >= after[tp]:
                        pending.discard(tp)
        finally:
            consumer.close()
        for name, (records, size) in counts.items():
            topics[name.removeprefix(self.prefix)].update(records=records, bytes=size)
        return {"exact": not pending, "topics": topics, "sequenced_by_type": dict(census)}


def running_sink_lags(system: System) -> dict[str, int | None]:
    """The lag of the sinks this system runs (``running_system`` starts no push sink)."""
    return {
        name: lag for name, lag in sink_lags(system.settings).items() if name in system.processes
    }


def settle(
    system: System,
    probe: Probe,
    progress: Progress,
    what: str,
    *,
    timeout: float,
    sinks: bool,
) -> dict[str, Any]:
    """Wait until the stream worker has applied everything (lag 0) and no topic got a record for
    ``QUIET_SECONDS``, and with ``sinks`` until the sinks are within ``SINK_LAG_SETTLED`` records;
    at most ``timeout`` seconds."""
    started = time.monotonic()
    last: Marks | None = None
    changed = started
    while True:
        system.check_alive()
        marks = probe.end_offsets()
        now = time.monotonic()
        if marks != last:
            last, changed = marks, now
        lag = probe.stream_lag()
        lags = running_sink_lags(system) if sinks else {}
        sinks_ok = all(value is not None and value <= SINK_LAG_SETTLED for value in lags.values())
        if lag == 0 and now - changed >= QUIET_SECONDS and sinks_ok:
            return {"settled": True, "seconds": round(now - started, 1), "sink_lag": lags}
        if now - started > timeout:
            progress.done(
                f"{what}: not settled after {timeout:.0f} s (stream worker lag {lag}, "
                f"sinks {lags}); going on"
            )
            return {
                "settled": False,
                "seconds": round(now - started, 1),
                "stream_worker_lag": lag,
                "sink_lag": lags,
            }
        progress.update(
            f"{what}: stream worker lag {lag}, sinks {lags or '-'}, {now - started:.0f} s"
        )
        time.sleep(1.0)


# ---------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------


def process_pids(
    system: System, fleet: DeviceFleet, direct: DirectTraffic | None
) -> dict[str, int]:
    pids = {
        **system.pids(),
        **stack_pids(system.settings),
        **fleet.pids(),
        "benchmark": os.getpid(),
    }
    if direct is not None and (pid := direct.pid()) is not None:
        pids["1:1 load"] = pid
    return pids


def kind_of(process: str) -> str:
    if process.startswith("ingress-"):
        return "ingress"
    if process.startswith("receivers"):
        return "device clients"
    return process


def by_kind(values: Mapping[str, float], digits: int = 3) -> dict[str, float]:
    totals: dict[str, float] = {}
    for name, value in values.items():
        totals[kind_of(name)] = totals.get(kind_of(name), 0.0) + value
    return {name: round(value, digits) for name, value in totals.items()}


def cpu_seconds_between(start: CpuSnapshot, end: CpuSnapshot) -> dict[str, float]:
    return {
        name: end.processes[name] - start.processes[name]
        for name in end.processes
        if name in start.processes
    }


def deliveries(report: SendReport, collected: Sequence[Collected]) -> dict[str, Any]:
    """What the connected devices got of the accepted messages of one script."""
    latencies: list[float] = []
    kinds: Counter[str] = Counter()
    doubled_kinds: Counter[str] = Counter()
    closed: Counter[str] = Counter()
    loop_lag: list[float] = []
    for result in collected:
        latencies.extend(result.latencies)
        kinds.update(result.kinds)
        doubled_kinds.update(result.doubled_kinds)
        closed.update(result.closed_codes)
        loop_lag.extend(result.loop_lag_s)
    throughout = sum(result.connected_throughout for result in collected)
    expected = len(report.messages) * throughout
    missed = sum(result.missed for result in collected)
    return {
        "sent": report.sends,
        "accepted": len(report.messages),
        "send_errors": dict(report.errors),
        "unanswered": report.unanswered,
        "commands_rejected_so_far": dict(report.rejected),
        "send_to_accepted_ms": percentiles_ms(report.accept_s),
        "sender_schedule_lag_ms": percentiles_ms(report.schedule_lag_s),
        "devices": sum(result.devices for result in collected),
        "devices_connected_throughout": throughout,
        "devices_closed": dict(closed),
        "deliveries_expected": expected,
        "delivered": sum(result.delivered for result in collected),
        "missed": missed,
        "miss_rate": round(missed / expected, 6) if expected else None,
        "doubled": sum(result.doubled for result in collected),
        "frames_by_kind": dict(kinds),
        "doubled_by_kind": dict(doubled_kinds),
        "send_to_live_delivery_ms": percentiles_ms(latencies),
        "receiver_loop_lag_ms": percentiles_ms(loop_lag),
    }


@dataclass(slots=True)
class Scenario:
    """One system under test and the load processes attached to it."""

    system: System
    catalog: TopicCatalog
    probe: Probe
    fleet: DeviceFleet
    direct: DirectTraffic | None
    options: Options
    progress: Progress
    scripts: int = 0

    def pids(self) -> dict[str, int]:
        return process_pids(self.system, self.fleet, self.direct)

    def run_script(
        self,
        name: str,
        steps: Sequence[tuple[str, str]],
        rate: float,
        *,
        direct_rate: float = 0.0,
    ) -> tuple[SendReport, list[Collected], dict[str, Any] | None]:
        """Run one sender script (with 1:1 traffic alongside if ``direct_rate``), wait for the
        deliveries (at most ``--drain`` seconds after the last send), collect them."""
        options, progress, fleet = self.options, self.progress, self.fleet
        self.scripts += 1
        label = f"{name[:1]}{self.scripts}"
        seconds = len(steps) / rate
        start_at = time.monotonic() + 1.0
        received_before = fleet.received()
        fleet.start_script(Script(label, tuple(steps), rate, start_at))
        if direct_rate and self.direct is not None:
            self.direct.start(direct_rate, start_at, seconds, options.drain)
        sends = sum(action == "send" for action, _ in steps)
        while (now := time.monotonic()) < start_at + seconds:
            got = fleet.received() - received_before
            progress.update(
                f"{name}: {max(0.0, now - start_at):4.1f}/{seconds:.0f} s, {got:,} deliveries"
            )
            time.sleep(0.5)
        report = fleet.script_result(timeout=120)
        expected = len(report.messages) * fleet.connected
        deadline = time.monotonic() + options.drain
        while fleet.received() - received_before < expected and time.monotonic() < deadline:
            got = fleet.received() - received_before
            progress.update(f"{name}: waiting for deliveries, {got:,} of {expected:,}")
            time.sleep(0.2)
        direct = None
        if direct_rate and self.direct is not None:
            result = self.direct.result(timeout=options.drain + 120)
            direct = direct_summary(result, direct_rate, seconds)
        collected = fleet.collect({m.message_id: m.sent_at for m in report.messages})
        if report.sends != sends:
            raise BenchError(f"{name}: the sender made {report.sends} of {sends} sends")
        self.system.check_alive()
        return report, collected, direct

    def group_phase(self, name: str, seconds: float, *, direct_rate: float = 0.0) -> dict[str, Any]:
        options = self.options
        count = max(1, round(seconds * options.rate))
        meter = CpuMeter(self.pids())
        start = meter.snapshot()
        report, collected, direct = self.run_script(
            name, [("send", "")] * count, options.rate, direct_rate=direct_rate
        )
        cpu = CpuMeter.percent(start, meter.snapshot())
        summary = {
            "seconds": round(count / options.rate, 1),
            "rate": options.rate,
            **deliveries(report, collected),
            "cpu_pct_of_one_core_by_kind": by_kind(cpu["processes_pct_of_one_core"], 1),
            "cpu": cpu,
        }
        if direct is not None:
            summary["direct"] = direct
        self.progress.done(phase_line(name, summary))
        return summary

    def records_window(
        self, name: str, steps: Sequence[tuple[str, str]] | None = None
    ) -> dict[str, Any]:
        """Group messages only, between two settled states: records and CPU per message."""
        options, progress, probe = self.options, self.progress, self.probe
        before_settle = settle(
            self.system,
            probe,
            progress,
            f"{name}: settling",
            timeout=options.sink_catch_up,
            sinks=True,
        )
        meter = CpuMeter(self.pids())
        idle_start = meter.snapshot()
        time.sleep(options.idle_seconds)
        idle_end = meter.snapshot()
        idle_wall = idle_end.at - idle_start.at
        idle_rate = {
            name: seconds / idle_wall
            for name, seconds in cpu_seconds_between(idle_start, idle_end).items()
        }
        marks_before = probe.end_offsets()
        cpu_start = meter.snapshot()
        if steps is None:
            steps = [("send", "")] * max(1, round(options.window_seconds * options.rate))
        report, collected, _ = self.run_script(name, steps, options.rate)
        after_settle = settle(
            self.system,
            probe,
            progress,
            f"{name}: waiting for the system to finish",
            timeout=max(options.sink_catch_up, options.settle_timeout),
            sinks=True,
        )
        cpu_end = meter.snapshot()
        marks_after = probe.end_offsets()
        progress.update(f"{name}: counting the records written …")
        written = probe.written(marks_before, marks_after, cap=options.count_cap)
        messages = max(1, len(report.messages))
        wall = cpu_end.at - cpu_start.at
        used = cpu_seconds_between(cpu_start, cpu_end)
        net = {name: seconds - idle_rate.get(name, 0.0) * wall for name, seconds in used.items()}
        topics = written["topics"]
        unit = "records" if written["exact"] else "offsets"
        input_name = self.catalog.messages_in.name.removeprefix(probe.prefix)
        total = sum(entry[unit] or 0 for entry in topics.values())
        inputs = (topics.get(input_name) or {}).get(unit) or 0
        per_message = {
            name: round((entry[unit] or 0) / messages, 3) for name, entry in topics.items()
        }
        bound = INGRESS_NODES + options.records_constant
        dead_letters = {
            name: entry[unit] for name, entry in topics.items() if name.endswith(".dlq")
        }
        result = {
            "messages": len(report.messages),
            "counted": unit,
            "records_per_group_message": round(total / messages, 3),
            "input_records_per_group_message": round(inputs / messages, 3),
            "system_records_per_group_message": round((total - inputs) / messages, 3),
            "records_per_group_message_by_topic": per_message,
            "bytes_per_group_message": round(
                sum(entry["bytes"] or 0 for entry in topics.values()) / messages
            )
            if written["exact"]
            else None,
            "bound": f"{INGRESS_NODES} ingress nodes + {options.records_constant} = {bound}",
            "within_bound": total / messages <= bound,
            "topics": topics,
            "sequenced_by_type": written["sequenced_by_type"],
            "dead_letters": dead_letters,
            "window_wall_seconds": round(wall, 1),
            "cpu_ms_per_group_message_by_kind": by_kind(
                {name: 1000 * seconds / messages for name, seconds in used.items()}
            ),
            "cpu_ms_per_group_message_net_of_idle_by_kind": by_kind(
                {name: 1000 * seconds / messages for name, seconds in net.items()}
            ),
            "idle_cpu_pct_of_one_core_by_kind": by_kind(
                {name: 100 * rate for name, rate in idle_rate.items()}, 1
            ),
            "settled_before": before_settle,
            "settled_after": after_settle,
            "deliveries": deliveries(report, collected),
        }
        self.progress.done(window_line(name, result))
        return result


def phase_line(name: str, phase: dict[str, Any]) -> str:
    latency = phase["send_to_live_delivery_ms"]
    text = (
        f"{name}: {phase['accepted']}/{phase['sent']} accepted, "
        f"{phase['delivered']:,}/{phase['deliveries_expected']:,} delivered to "
        f"{phase['devices_connected_throughout']} devices (missed {phase['missed']}, doubled "
        f"{phase['doubled']}), send→live p50 {latency['p50']} / p95 {latency['p95']} / "
        f"p99 {latency['p99']} / max {latency['max']} ms, frames {phase['frames_by_kind']}, "
        f"receiver loop lag p99 {phase['receiver_loop_lag_ms']['p99']} ms"
    )
    if "direct" in phase:
        direct = phase["direct"]
        text += (
            f"; 1:1 at {direct['target_per_second']:g}/s: p99 "
            f"{direct['send_to_deliver_ms']['p99']} ms, undelivered "
            f"{direct['undelivered_after_drain']}"
        )
    return text


def window_line(name: str, window: dict[str, Any]) -> str:
    return (
        f"{name}: {window['records_per_group_message']} {window['counted']} per group message "
        f"({window['input_records_per_group_message']} input), bound {window['bound']}: "
        f"{'within' if window['within_bound'] else 'EXCEEDED'}; CPU ms per message "
        f"{window['cpu_ms_per_group_message_net_of_idle_by_kind']} (net of idle); "
        + phase_line("deliveries", window["deliveries"])
    )


# ---------------------------------------------------------------------------------------------
# Building the group
# ---------------------------------------------------------------------------------------------


def build_group(
    system: System,
    *,
    catalog: TopicCatalog,
    probe: Probe,
    tag: str,
    conversation_id: str,
    members: int,
    options: Options,
    progress: Progress,
) -> dict[str, Any]:
    settings = system.settings
    before = probe.end_offsets()
    meter = CpuMeter({**system.pids(), **stack_pids(settings)})
    cpu_start = meter.snapshot()
    started = time.monotonic()
    commands = fill(settings, catalog, build_events(tag, conversation_id, members), progress)
    produced = time.monotonic() - started
    last: Marks | None = None
    changed = time.monotonic()
    while True:
        system.check_alive()
        now = time.monotonic()
        marks = probe.end_offsets()
        if marks != last:
            last, changed = marks, now
        lag = probe.stream_lag()
        if lag == 0 and now - changed >= QUIET_SECONDS:
            break
        offsets = sum(marks.values()) - sum(before.values())
        applied = commands - (probe.input_lag() or 0)
        estimate = quadratic_build_estimate(
            members=members,
            commands=commands,
            applied=applied,
            written=offsets,
            lag=lag or 0,
            elapsed=now - started,
            timeout=options.build_timeout,
        )
        if estimate is not None:
            raise BenchError(estimate)
        if now - started > options.build_timeout:
            raise BenchError(
                f"the {members:,}-member group was not built within {options.build_timeout:.0f} "
                f"s: the conversation processor applied {applied:,} of {commands:,} commands and "
                f"the stream worker wrote {offsets:,} offsets "
                "meanwhile (an add that is delivered to every member makes building quadratic). "
                "Raise --build-timeout or build a smaller group."
            )
        progress.update(
            f"building {members:,} members: {applied:,}/{commands:,} commands "
            f"applied, {offsets:,} offsets written, "
            f"stream worker lag {lag}, {now - started:.0f} s"
        )
        time.sleep(1.0)
    seconds = changed - started
    cpu = cpu_seconds_between(cpu_start, meter.snapshot())
    after = probe.end_offsets()
    progress.update("counting the records the build wrote …")
    written = probe.written(before, after, cap=options.count_cap)
    added = written["sequenced_by_type"].get("conversation.member_added", 0)
    first = min(members, MAX_MEMBERS_PER_EVENT)
    unit = "records" if written["exact"] else "offsets"
    total = sum(entry[unit] or 0 for entry in written["topics"].values())
    result = {
        "commands": commands,
        "produce_seconds": round(produced, 1),
        "seconds": round(seconds, 1),
        "commands_per_second": round(commands / seconds, 1) if seconds else None,
        "counted": unit,
        "records": total,
        "records_per_command": round(total / commands, 2),
        "topics": written["topics"],
        "sequenced_by_type": written["sequenced_by_type"],
        "members_in_group": first + added if written["exact"] else None,
        "cpu_seconds_by_kind": by_kind(cpu, 1),
    }
    progress.done(
        f"built a group of {members:,} in {result['seconds']} s "
        f"({commands:,} commands, produced in {result['produce_seconds']} s): {total:,} {unit}, "
        f"{result['records_per_command']} per command; members per the sequenced log "
        f"{result['members_in_group']}"
    )
    if written["exact"] and first + added != members:
        progress.done(
            f"warning: only {first + added:,} of {members:,} members made it into the group "
            "(refused adds: see command.rejected in the owner's sync queue)"
        )
    return result


def quadratic_build_estimate(
    *,
    members: int,
    commands: int,
    applied: int,
    written: int,
    lag: int,
    elapsed: float,
    timeout: float,
) -> str | None:
    """If the adds applied so far are delivered to every member (write diffusion: an add to a
    group of k costs some records per member), the build's cost grows with the square of its
    size: extrapolated from the deliveries done so far (those the conversation processor
    addressed less the stream worker's ``lag``: the user processor is the slower half), the
    reason it cannot finish within ``timeout``; ``None`` while it can (or too little is known)."""
    first = min(members, MAX_MEMBERS_PER_EVENT)
    adds = applied - 1
    if elapsed < 60 or adds < 100 or commands <= 1:
        return None
    # Write diffusion costs a few records per member per add, and the group has at least
    # ``first`` members: an add costing fewer than a quarter of that is not delivered to all.
    if written / applied < first / 4:
        return None
    # Deliveries so far (the creation's to ``first`` members, each add's to every member then).
    delivered = first + adds * first + adds * (adds - 1) // 2
    done = max(1, delivered - lag)
    # An inbox record per delivery addressed, the user processor's records per delivery done.
    per_delivery = 1 + max(0, written - delivered) / done
    remaining = members - first - adds
    still = remaining * (first + adds) + remaining * (remaining - 1) // 2
    seconds = elapsed * (delivered + still) / done
    if seconds <= timeout:
        return None
    return (
        f"building the {members:,}-member group would take about {seconds / 60:,.0f} min "
        f"(--build-timeout {timeout:.0f} s): each add is delivered to every member "
        f"({written / applied:,.0f} offsets per command so far, {per_delivery:.1f} per "
        f"delivery), so the {members - first:,} adds make about "
        f"{(delivered + still) / 1e6:,.1f} M deliveries and "
        f"{per_delivery * (delivered + still) / 1e6:,.0f} M records. Build a group of at most "
        f"{first:,} members (one create), or raise --build-timeout"
    )


# ---------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def scoped_environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the processes started meanwhile (``running_system`` passes
    the benchmark's environment on)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def fresh_system(
    base: Settings, kind: str, options: Options, progress: Progress
) -> Iterator[tuple[System, TopicCatalog, Probe]]:
    """A topic catalog, keyspace, state directory and set of processes of their own."""
    settings = run_settings(base, kind)
    log_dir = Path(tempfile.mkdtemp(prefix=f"imstream-bench-{kind}-"))
    state_dir = log_dir / "streams-state"
    progress.done(f"{kind}: logs in {log_dir}")
    with ExitStack() as stack:
        # The stream worker's state store lives with the logs and goes with the run.
        stack.callback(shutil.rmtree, state_dir, ignore_errors=True)
        stack.enter_context(scoped_environment({"IM_STREAMS__STATE_DIR": str(state_dir)}))
        catalog = stack.enter_context(bench_topics(settings, progress))
        keyspace = stack.enter_context(keyspace_for(settings, progress))
        system = stack.enter_context(
            running_system(settings, keyspace, log_dir, progress, sink_nice=options.sink_nice)
        )
        probe = Probe(settings, catalog)
        stack.callback(probe.close)
        yield system, catalog, probe


def run_size(base: Settings, members: int, options: Options, progress: Progress) -> dict[str, Any]:
    tag = run_tag()
    conversation_id = f"{tag}-group"
    owner = member_id(tag, 0)
    devices = min(options.devices, members - 1)
    body = body_text(options.body_bytes)
    progress.done(f"=== a group of {members:,} members, {devices:,} of them connected ===")
    with ExitStack() as stack:
        system, catalog, probe = stack.enter_context(
            fresh_system(base, f"lg{members}", options, progress)
        )
        build = build_group(
            system,
            catalog=catalog,
            probe=probe,
            tag=tag,
            conversation_id=conversation_id,
            members=members,
            options=options,
            progress=progress,
        )
        fleet = DeviceFleet(
            system,
            conversation_id,
            [member_id(tag, index) for index in range(1, devices + 1)],
            owner,
            processes=options.receiver_processes,
            body=body,
            progress=progress,
        )
        stack.callback(fleet.close)
        direct = None
        if options.direct_rate > 0 and options.direct_pairs > 0:
            direct = DirectTraffic(system, options.direct_pairs, body, progress)
            stack.callback(direct.close)
        scenario = Scenario(system, catalog, probe, fleet, direct, options, progress)
        connected = settle(
            system,
            probe,
            progress,
            "after connecting",
            timeout=options.sink_catch_up,
            sinks=True,
        )
        warm_up = scenario.group_phase("warm-up", options.warm_up_seconds)
        window = scenario.records_window("group-only window")
        mixed = scenario.group_phase(
            "with 1:1 traffic", options.seconds, direct_rate=options.direct_rate
        )
    p99 = mixed["send_to_live_delivery_ms"]["p99"]
    acceptance = {
        "records_per_group_message": window["records_per_group_message"],
        "records_bound": INGRESS_NODES + options.records_constant,
        "records_within_bound": window["within_bound"],
        "p99_ms": p99,
        "p99_bar_ms": options.p99_bar_ms,
        "p99_within_bar": p99 is not None and p99 <= options.p99_bar_ms,
        "missed": mixed["missed"] + window["deliveries"]["missed"],
        "doubled": mixed["doubled"] + window["deliveries"]["doubled"],
        "cpu_ms_per_group_message_net_of_idle_by_kind": window[
            "cpu_ms_per_group_message_net_of_idle_by_kind"
        ],
    }
    progress.done(f"{members:,} members: {acceptance}")
    return {
        "members": members,
        "devices": devices,
        "ingress_nodes": INGRESS_NODES,
        "large_group_threshold": base.streams.large_group_threshold,
        "topic_prefix": system.settings.kafka.topic_prefix,
        "acceptance": acceptance,
        "build": build,
        "connect": {
            "connected": fleet.connected,
            "failed": fleet.failed,
            "seconds": fleet.connect_seconds,
            "receiver_processes": len(fleet.processes) - 1,
            "settled": connected,
        },
        "warm_up": warm_up,
        "group_only_window": window,
        "with_direct_traffic": mixed,
    }


def run_crossing(base: Settings, options: Options, progress: Progress) -> dict[str, Any]:
    """The threshold crossing: below, adds past the threshold, above, removes back under."""
    threshold = base.streams.large_group_threshold
    start, peak, end = threshold - 5, threshold + 10, threshold - 10
    devices = min(options.crossing_devices, end - 2)
    if devices < 1:
        raise BenchError(f"the threshold ({threshold}) is too small for the crossing scenario")
    tag = run_tag()
    conversation_id = f"{tag}-cross"
    owner = member_id(tag, 0)
    body = body_text(options.body_bytes)
    extra = [f"{tag}x{index}" for index in range(peak - start)]
    # Device-less original members removed on the way down, after the extra ones.
    removable = [member_id(tag, index) for index in range(start - 1, devices, -1)]
    up: list[tuple[str, str]] = []
    down: list[tuple[str, str]] = []
    sizes_up: list[int] = []
    sizes_down: list[int] = []
    size = start
    for user in extra:
        size += 1
        up += [("add", user), ("send", ""), ("send", "")]
        sizes_up += [size, size]
    for user in [*reversed(extra), *removable][: peak - end]:
        size -= 1
        down += [("remove", user), ("send", ""), ("send", "")]
        sizes_down += [size, size]
    progress.done(
        f"=== threshold crossing: {start} → {peak} → {end} members around {threshold}, "
        f"{devices} connected ==="
    )
    with ExitStack() as stack:
        system, catalog, probe = stack.enter_context(
            fresh_system(base, "lgcross", options, progress)
        )
        build = build_group(
            system,
            catalog=catalog,
            probe=probe,
            tag=tag,
            conversation_id=conversation_id,
            members=start,
            options=options,
            progress=progress,
        )
        fleet = DeviceFleet(
            system,
            conversation_id,
            [member_id(tag, index) for index in range(1, devices + 1)],
            owner,
            processes=1,
            body=body,
            progress=progress,
        )
        stack.callback(fleet.close)
        scenario = Scenario(system, catalog, probe, fleet, None, options, progress)
        settle(
            system, probe, progress, "after connecting", timeout=options.sink_catch_up, sinks=True
        )
        below = scenario.records_window(f"below the threshold ({start} members)")
        report_up, collected_up, _ = scenario.run_script("crossing up", up, options.rate)
        above = scenario.records_window(f"above the threshold ({peak} members)")
        report_down, collected_down, _ = scenario.run_script("crossing down", down, options.rate)
        below_again = scenario.records_window(f"below the threshold again ({end} members)")
    messages: list[dict[str, Any]] = []
    for report, collected, sizes in (
        (report_up, collected_up, sizes_up),
        (report_down, collected_down, sizes_down),
    ):
        for sent in report.messages:
            index = send_index(sent)
            merged: dict[str, Any] = {"delivered": 0, "missed": 0, "doubled": 0, "kinds": Counter()}
            for result in collected:
                entry = result.per_message.get(sent.message_id, {})
                merged["delivered"] += entry.get("delivered", 0)
                merged["missed"] += entry.get("missed", 0)
                merged["doubled"] += entry.get("doubled", 0)
                merged["kinds"].update(entry.get("kinds", {}))
            messages.append(
                {
                    "phase": report.label,
                    "members_when_sent": sizes[index],
                    "message_id": sent.message_id,
                    **merged,
                    "kinds": dict(merged["kinds"]),
                }
            )
    lost_sends = (report_up.sends - len(report_up.messages)) + (
        report_down.sends - len(report_down.messages)
    )
    by_side: dict[str, dict[str, Any]] = {}
    for message in messages:
        side = "above" if message["members_when_sent"] > threshold else "at or below"
        entry = by_side.setdefault(
            side, {"messages": 0, "delivered": 0, "missed": 0, "doubled": 0, "kinds": Counter()}
        )
        entry["messages"] += 1
        for key in ("delivered", "missed", "doubled"):
            entry[key] += message[key]
        entry["kinds"].update(message["kinds"])
    for entry in by_side.values():
        entry["kinds"] = dict(entry["kinds"])
    incidents = [message for message in messages if message["missed"] or message["doubled"]]
    crossing = {
        "messages": len(messages),
        "sends_not_accepted": lost_sends,
        "membership_changes_ok": report_up.membership_ok + report_down.membership_ok,
        "membership_errors": dict(report_up.membership_errors + report_down.membership_errors),
        "commands_rejected": dict(report_down.rejected),
        "devices_connected_throughout": sum(r.connected_throughout for r in collected_up),
        "missed": sum(message["missed"] for message in messages),
        "doubled": sum(message["doubled"] for message in messages),
        "by_side_of_threshold": by_side,
        "messages_missed_or_doubled": incidents,
        "up": deliveries(report_up, collected_up),
        "down": deliveries(report_down, collected_down),
    }
    exact = (
        crossing["missed"] == 0
        and crossing["doubled"] == 0
        and all(w["deliveries"]["missed"] == 0 for w in (below, above, below_again))
        and all(w["deliveries"]["doubled"] == 0 for w in (below, above, below_again))
    )
    progress.done(
        f"threshold crossing: {len(messages)} messages while crossing, missed "
        f"{crossing['missed']}, doubled {crossing['doubled']}; records per message "
        f"{below['records_per_group_message']} below, {above['records_per_group_message']} "
        f"above, {below_again['records_per_group_message']} below again — "
        + ("every device got every message once" if exact else "NOT exactly once")
        + (
            f"; commands refused: {crossing['commands_rejected']} (the sizes are off)"
            if crossing["commands_rejected"]
            else ""
        )
    )
    return {
        "threshold": threshold,
        "members": {"start": start, "peak": peak, "end": end},
        "devices": devices,
        "exactly_once": exact,
        "build": build,
        "below": below,
        "crossing": crossing,
        "above": above,
        "below_again": below_again,
        "topic_prefix": system.settings.kafka.topic_prefix,
    }


def send_index(message: SentMessage) -> int:
    """The message's place among its script's sends (the client_msg_id says it)."""
    return int(message.client_msg_id.split(".")[1])


# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    progress, base = start_run()
    # Kafka and Cassandra (left running): each system keeps its ClickHouse data in a chDB path
    # of its own, so the shared one is not asked about (``ensure_local_stack``).
    ensure_local_stack(base, progress)
    # Every device's socket, on both sides of the loopback, in this machine's processes.
    raise_open_file_limit(4 * options.devices + 8192)
    facts = machine_facts(base)
    started = now_iso()
    sizes: list[dict[str, Any]] = []
    crossing: dict[str, Any] | None = None
    for members in options.members:
        try:
            sizes.append(run_size(base, members, options, progress))
        except BenchError as error:  # the next size (and the crossing) may still run
            progress.done(f"{members:,} members: failed: {error}")
            sizes.append({"members": members, "failed": str(error)})
    if options.crossing:
        crossing = run_crossing(base, options, progress)
    document = {
        "started_at": started,
        "finished_at": now_iso(),
        "machine": facts,
        "parameters": options_document(options),
        "sizes": sizes,
        "threshold_crossing": crossing,
    }
    if options.write:
        write_results("large_group", document, options.output)
        progress.done(f"wrote {options.output}")
    return 0


if __name__ == "__main__":
    run_main(main)
