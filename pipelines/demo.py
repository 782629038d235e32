"""``imstream demo``: simulated users chatting through a running imstream, via the public protocol.

Every user is one device with the client SDK (``client.sdk``). The demo creates 1:1
conversations and groups, sends messages at a target rate for a while, waits for every member's
device to receive every message, and prints what happened: sent, accepted, delivered live,
delivered by sync, duplicates seen by clients (must be 0), lost (must be 0), and the send →
deliver latency. It exits 1 when anything was lost or doubled.

With ``offline_users`` (``--offline-users N``) N more users are members of the conversations but
never connect: each registers a push token for its one device through the REST API (half APNs,
half FCM; all FCM when the tenant has no iOS app configured), so the messages sent to them
become push jobs. They are not counted as lost. The
summary then also says how many push jobs the stream stage owes them (one per (user,
conversation) per ``IM_STREAMS__PUSH_COLLAPSE_SECONDS``, replayed here from each message's
``occurred_at`` exactly as the user processor collapses them) and the push outcomes of the
demo's tenant by provider and kind, read through the ClickHouse sink's analytics HTTP API
(``push_outcomes_per_minute``), less what the same window held before the demo started. It exits
1 as well when the outcomes do not cover the expected jobs within ``push_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import uvloop

from client.sdk import Client, Received
from core.auth import issue_token
from core.principals import StaffRole
from core.settings import Settings
from pipelines.staff_cli import StaffCredential, call_analytics
from schemas.events import CommandRejected, ConversationCreated, MessageSent, PushProvider

#: How long a create may be refused for a member the tenant does not know yet (they signed in
#: a moment ago: their announcement is on its way), and how long its outcome may take.
ADMISSION_TIMEOUT_SECONDS = 30.0
#: ``command.rejected``'s reason for a member the tenant does not know (streams/conversations.py).
UNKNOWN_USER = "unknown-user"

#: Push outcomes that end a job's delivery to a device (``failed`` and ``throttled`` are retried).
FINAL_OUTCOMES = frozenset({"sent", "invalid_token", "skipped"})


@dataclass(frozen=True)
class DemoOptions:
    url: str
    tenant: str = "demo"
    users: int = 20
    conversations: int = 10
    group_size: int = 5
    rate: float = 20.0
    duration: float = 30.0
    drain_timeout: float = 30.0
    seed: int = 1
    #: Users that never connect and get push notifications instead (half APNs, half FCM).
    offline_users: int = 0
    #: The ClickHouse sink's analytics API; None: ``IM_SINKS__ANALYTICS_HOST``/``_PORT``.
    analytics_url: str | None = None
    #: The app ids the offline devices' tokens name (one of the tenant's apps,
    #: ``IM_PUSH__TENANT_APPS``); None: none, so the tenant's default app.
    apns_app_id: str | None = None
    fcm_app_id: str | None = None
    #: The collapse window the stream stage runs with; None: ``IM_STREAMS__PUSH_COLLAPSE_SECONDS``.
    push_collapse_seconds: float | None = None
    #: How long to wait for the push outcomes to cover the expected jobs.
    push_timeout: float = 60.0


@dataclass
class DemoResult:
    sent: int = 0
    accepted: int = 0
    expected: int = 0
    delivered_live: int = 0
    delivered_sync: int = 0
    duplicates: int = 0
    lost: int = 0
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    offline_users: int = 0
    collapse_seconds: float = 0.0
    #: Push jobs the stream stage owes the offline users, by provider.
    pushes_expected: Counter[str] = field(default_factory=Counter)
    #: Push delivery attempts of this run by (provider, outcome), from the analytics API.
    push_outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: Push jobs the stream stage planned for the tenant in this run, from the analytics API.
    push_jobs_planned: int = 0

    @property
    def pushes_settled(self) -> int:
        """Attempts that ended a job's delivery to a device (sent, rejected token, skipped for a
        provider); a job that reached no device (provider empty) is none of the demo's."""
        return sum(
            n
            for (provider, outcome), n in self.push_outcomes.items()
            if provider and outcome in FINAL_OUTCOMES
        )

    @property
    def pushes_sent(self) -> int:
        return sum(n for (_, outcome), n in self.push_outcomes.items() if outcome == "sent")

    @property
    def pushes_missing(self) -> int:
        return max(0, sum(self.pushes_expected.values()) - self.pushes_settled)

    @property
    def delivered(self) -> int:
        return self.delivered_live + self.delivered_sync

    def percentile_ms(self, fraction: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        index = min(len(ordered) - 1, max(0, int(fraction * len(ordered) + 0.5) - 1))
        return round(ordered[index] * 1000, 1)

    def lines(self) -> list[str]:
        p50, p95, p99 = (self.percentile_ms(f) for f in (0.50, 0.95, 0.99))
        return [
            f"sent                 {self.sent}",
            f"accepted             {self.accepted}",
            f"deliveries expected  {self.expected} (every member's device, sender included)",
            f"delivered live       {self.delivered_live}",
            f"delivered by sync    {self.delivered_sync}",
            f"duplicates seen      {self.duplicates}",
            f"lost                 {self.lost}",
            f"send→deliver latency p50 {p50} ms · p95 {p95} ms · p99 {p99} ms",
            f"duration             {self.seconds:.1f} s",
            *(self.push_lines() if self.offline_users else []),
        ]

    def push_lines(self) -> list[str]:
        expected = self.pushes_expected
        by_provider = " · ".join(f"{p} {expected[p]}" for p in sorted(expected)) or "none"
        outcomes = " · ".join(
            f"{provider or 'no device'} {outcome} {n}"
            for (provider, outcome), n in sorted(self.push_outcomes.items())
        )
        return [
            f"offline users        {self.offline_users} (signed in once; offline, a push token)",
            f"push jobs expected   {sum(expected.values())} for offline recipients "
            f"({by_provider}; one per user and conversation per {self.collapse_seconds:g} s)",
            f"push jobs planned    {self.push_jobs_planned} (by the stream stage, from analytics)",
            f"push outcomes        {outcomes or 'none'}",
            f"pushes sent          {self.pushes_sent}",
            f"pushes missing       {self.pushes_missing}",
        ]


class _Tracker:
    """What every device received, against what was sent to it."""

    def __init__(self) -> None:
        self.sent_at: dict[str, float] = {}
        self.audience: dict[str, list[str]] = {}
        self.seen: dict[str, set[str]] = {}
        #: Per message, the members that never connect (they get pushes, not deliveries).
        self.offline_audience: dict[str, list[str]] = {}
        #: Per message as stored: (conversation id, conversation seq, occurred_at).
        self.stored: dict[str, tuple[str, int, datetime]] = {}
        self.result = DemoResult()

    def on_accepted(
        self, event_id: str, members: list[str], sent_at: float, offline: list[str]
    ) -> None:
        self.sent_at[event_id] = sent_at
        self.audience[event_id] = members
        self.offline_audience[event_id] = offline
        self.result.accepted += 1
        self.result.expected += len(members)

    def on_received(self, user: str, item: Received) -> None:
        if not isinstance(item.event, MessageSent):
            return
        seen = self.seen.setdefault(user, set())
        if item.event.event_id in seen:
            self.result.duplicates += 1
            return
        seen.add(item.event.event_id)
        payload = item.event.payload
        if payload.conversation_seq is not None:
            self.stored[item.event.event_id] = (
                payload.conversation_id,
                payload.conversation_seq,
                item.event.occurred_at,
            )
        if item.live:
            self.result.delivered_live += 1
        else:
            self.result.delivered_sync += 1
        sent_at = self.sent_at.get(item.event.event_id)
        if sent_at is not None:
            self.result.latencies.append(time.monotonic() - sent_at)

    def pushes_expected(self, window: timedelta) -> Counter[tuple[str, str]]:
        """Push jobs per (offline user, conversation): the user processor's collapse replayed —
        in ``conversation_seq`` order, a push when none was made for the pair yet or the last one
        was at least ``window`` before this message's ``occurred_at``."""
        messages: dict[tuple[str, str], list[tuple[int, datetime]]] = {}
        for event_id, offline in self.offline_audience.items():
            stored = self.stored.get(event_id)
            if stored is None:  # never delivered to an online member: counted as lost
                continue
            conversation_id, seq, occurred_at = stored
            for user in offline:
                messages.setdefault((user, conversation_id), []).append((seq, occurred_at))
        jobs: Counter[tuple[str, str]] = Counter()
        for pair, ordered in messages.items():
            last_push: datetime | None = None
            for _seq, occurred_at in sorted(ordered):
                if last_push is not None and occurred_at - last_push < window:
                    continue
                jobs[pair] += 1
                last_push = occurred_at
        return jobs

    def missing(self) -> int:
        return sum(
            1
            for event_id, members in self.audience.items()
            for user in members
            if event_id not in self.seen.get(user, set())
        )


async def run_demo(
    settings: Settings, options: DemoOptions, progress: Callable[[str], None]
) -> DemoResult:
    rng = random.Random(options.seed)
    run = uuid.uuid4().hex[:6]
    users = [f"demo-{run}-u{i}" for i in range(options.users)]
    offline_users = [f"demo-{run}-o{i}" for i in range(options.offline_users)]
    providers = _push_providers(settings, options, offline_users, progress)
    everyone = users + offline_users
    secret = settings.auth.jwt_secret.get_secret_value()

    def token(user: str) -> str:
        return issue_token(
            secret,
            user_id=user,
            tenant_id=options.tenant,
            issuer=settings.auth.jwt_issuer,
            audience=settings.auth.jwt_audience,
        )

    clients = {
        user: Client(options.url, tenant_id=options.tenant, device_id="demo", token=token(user))
        for user in users
    }
    tracker = _Tracker()
    tracker.result.offline_users = options.offline_users
    started = time.monotonic()
    readers: list[asyncio.Task[None]] = []
    analytics = _PushOutcomes(
        options.analytics_url
        or f"http://{settings.sinks.analytics_host}:{settings.sinks.analytics_port}",
        options.tenant,
        since=datetime.now(UTC) - timedelta(minutes=1),
        # The API wants a staff token: the demo reads as an analyst of its own tenant.
        headers=StaffCredential.of(settings, StaffRole.ANALYST, tenant=options.tenant).header,
    )
    try:
        if offline_users:
            await analytics.take_baseline()
            await asyncio.gather(
                *(
                    _register_offline_device(
                        options,
                        user,
                        token(user),
                        providers[user],
                        options.apns_app_id
                        if providers[user] is PushProvider.APNS
                        else options.fcm_app_id,
                    )
                    for user in offline_users
                )
            )
            progress(f"{len(offline_users)} offline users registered push tokens")
        await asyncio.gather(*(client.connect() for client in clients.values()))
        progress(f"{len(clients)} users connected to {options.url}")

        outcomes = _CreateOutcomes()

        async def read(user: str, client: Client) -> None:
            async for item in client.events():
                tracker.on_received(user, item)
                outcomes.on_received(item)

        readers = [asyncio.create_task(read(u, c)) for u, c in clients.items()]
        conversations = await _create_conversations(
            options, rng, users, everyone, clients, outcomes=outcomes
        )
        progress(f"{len(conversations)} conversations created")
        await _send_at_rate(
            options, rng, conversations, clients, tracker=tracker, progress=progress
        )
        await _drain(options, clients, tracker, progress)
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*(client.close() for client in clients.values()))
        for task in readers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    result = tracker.result
    result.lost = tracker.missing()
    if offline_users:
        window = (
            settings.streams.push_collapse_seconds
            if options.push_collapse_seconds is None
            else options.push_collapse_seconds
        )
        result.collapse_seconds = window
        for (user, _conversation), jobs in tracker.pushes_expected(
            timedelta(seconds=window)
        ).items():
            result.pushes_expected[providers[user].value] += jobs
        await _wait_for_push_outcomes(analytics, result, options.push_timeout, progress)
    result.seconds = time.monotonic() - started
    return result


def _push_providers(
    settings: Settings,
    options: DemoOptions,
    offline_users: list[str],
    progress: Callable[[str], None],
) -> dict[str, PushProvider]:
    """Each offline user's push provider: half APNs, half FCM — unless the tenant has no iOS
    app configured (a developer box without IM_PUSH__APNS_TOPIC), where the ingress would
    refuse APNs tokens."""
    apns = options.apns_app_id is not None or bool(
        settings.push.apps_for(options.tenant).app_ids(PushProvider.APNS)
    )
    if offline_users and not apns:
        progress(
            f"tenant {options.tenant!r} has no APNs app (IM_PUSH__APNS_TOPIC, "
            "IM_PUSH__TENANT_APPS): every offline user registers an FCM token"
        )
    return {
        user: PushProvider.APNS if apns and i % 2 == 0 else PushProvider.FCM
        for i, user in enumerate(offline_users)
    }


async def _create_conversations(
    options: DemoOptions,
    rng: random.Random,
    users: list[str],
    everyone: list[str],
    clients: dict[str, Client],
    *,
    outcomes: _CreateOutcomes,
) -> list[tuple[str, list[str]]]:
    """Direct conversations and groups among every user, each created (and later sent in) by a
    connected member, listed first."""
    conversations: list[tuple[str, list[str]]] = []
    for index in range(options.conversations):
        if index % 2 == 0 or options.group_size < 3:
            members = rng.sample(everyone, 2)
            kind = "direct"
        else:
            members = rng.sample(everyone, min(options.group_size, len(everyone)))
            kind = "group"
        online = [member for member in members if member in clients]
        if not online:  # someone connected creates it and sends in it
            members[0] = rng.choice(users)
        elif members[0] not in clients:
            members.remove(online[0])
            members.insert(0, online[0])
        conversation_id = await _create_once_admitted(
            clients[members[0]],
            members[1:],
            kind=kind,
            name=None if kind == "direct" else f"group {index}",
            outcomes=outcomes,
        )
        conversations.append((conversation_id, members))
    return conversations


class DemoError(Exception):
    """The demo could not set up its conversations: what was refused, and why."""


class _CreateOutcomes:
    """Whether each create went through (``conversation.created`` reached its creator) or was
    refused (``command.rejected``), as the creator's events tell."""

    def __init__(self) -> None:
        self.outcomes: dict[str, asyncio.Future[str | None]] = {}
        #: Outcomes that came before anyone waited for them (None: created).
        self.early: dict[str, str | None] = {}

    def waiting(self, conversation_id: str) -> asyncio.Future[str | None]:
        future = asyncio.get_running_loop().create_future()
        if conversation_id in self.early:
            future.set_result(self.early.pop(conversation_id))
        else:
            self.outcomes[conversation_id] = future
        return future

    def on_received(self, item: Received) -> None:
        event = item.event
        if isinstance(event, ConversationCreated):
            conversation_id, reason = event.payload.conversation_id, None
        elif isinstance(event, CommandRejected) and event.payload.conversation_id is not None:
            conversation_id, reason = event.payload.conversation_id, event.payload.reason
        else:
            return
        future = self.outcomes.pop(conversation_id, None)
        if future is None:
            self.early[conversation_id] = reason
        elif not future.done():
            future.set_result(reason)


async def _create_once_admitted(
    owner: Client,
    members: list[str],
    *,
    kind: str,
    name: str | None,
    outcomes: _CreateOutcomes,
) -> str:
    """Create the conversation, again while a member is not yet known to the tenant: a user who
    has just signed in is announced a moment later (docs/streams.md "Admission")."""
    # A direct conversation's id is derived from its members; a group's is chosen once, so a
    # second attempt is the same conversation.
    requested = None if kind == "direct" else uuid.uuid4().hex
    deadline = time.monotonic() + ADMISSION_TIMEOUT_SECONDS
    while True:
        conversation_id = await owner.create_conversation(
            members, kind=kind, name=name, conversation_id=requested
        )
        outcome = outcomes.waiting(conversation_id)
        reason = await asyncio.wait_for(outcome, ADMISSION_TIMEOUT_SECONDS)
        if reason is None:
            return conversation_id
        if reason != UNKNOWN_USER or time.monotonic() > deadline:
            raise DemoError(f"creating conversation {conversation_id} was refused: {reason}")
        await asyncio.sleep(0.2)


async def _send_at_rate(
    options: DemoOptions,
    rng: random.Random,
    conversations: list[tuple[str, list[str]]],
    clients: dict[str, Client],
    *,
    tracker: _Tracker,
    progress: Callable[[str], None],
) -> None:
    """Messages at ``options.rate`` per second for ``options.duration``, each from a connected
    member of a random conversation; returns once every send is answered."""
    interval = 1.0 / options.rate
    sending = asyncio.Semaphore(256)
    pending: set[asyncio.Task[None]] = set()

    async def send_one(conversation_id: str, members: list[str], sender: str) -> None:
        async with sending:
            sent_at = time.monotonic()
            accepted = await clients[sender].send(conversation_id, f"hello at {sent_at:.3f}")
            online = [member for member in members if member in clients]
            offline = [member for member in members if member not in clients]
            tracker.on_accepted(accepted.event_id, online, sent_at, offline)

    begin = time.monotonic()
    next_at = begin
    last_report = begin
    while time.monotonic() - begin < options.duration:
        conversation_id, members = rng.choice(conversations)
        senders = [member for member in members if member in clients]
        task = asyncio.create_task(send_one(conversation_id, members, rng.choice(senders)))
        pending.add(task)
        task.add_done_callback(pending.discard)
        tracker.result.sent += 1
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        if time.monotonic() - last_report >= 2.0:
            last_report = time.monotonic()
            result = tracker.result
            progress(
                f"{last_report - begin:5.1f}s sent {result.sent} accepted {result.accepted} "
                f"delivered {result.delivered}/{result.expected}"
            )
    await asyncio.gather(*pending)


async def _drain(
    options: DemoOptions,
    clients: dict[str, Client],
    tracker: _Tracker,
    progress: Callable[[str], None],
) -> None:
    """Waits (at most ``options.drain_timeout``) for every delivery, then a second for late
    duplicates."""
    deadline = time.monotonic() + options.drain_timeout
    while tracker.missing() and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        missing = tracker.missing()
        if missing:
            # A device that missed a live event gets it by syncing.
            await asyncio.gather(*(client.sync() for client in clients.values()))
            progress(f"waiting for {missing} deliveries …")
    await asyncio.sleep(1.0)  # late duplicates would show here


async def _register_offline_device(
    options: DemoOptions, user: str, token: str, provider: PushProvider, app_id: str | None
) -> None:
    """The user's one device signs in once (so that the tenant knows the user and others may
    name them as a member: docs/streams.md "Admission"), registers a push token and goes
    offline for the rest of the run."""
    client = Client(options.url, tenant_id=options.tenant, device_id="phone", token=token)
    # APNs device tokens are 32 bytes in hex; FCM's are opaque strings.
    push_token = uuid.uuid4().hex * 2 if provider is PushProvider.APNS else f"fcm-{uuid.uuid4()}"
    try:
        await client.connect()
        await client.register_push_token(provider, push_token, app_id)
    finally:
        await client.close()


class _PushOutcomes:
    """The tenant's push outcomes through the analytics API, less what the window already held
    when the demo started (an earlier run of the same tenant in the same minutes)."""

    def __init__(
        self,
        base_url: str,
        tenant: str,
        *,
        since: datetime,
        headers: Callable[[], dict[str, str]],
    ) -> None:
        self.headers = headers
        self.params = {"tenant": tenant, "from": since.isoformat().replace("+00:00", "Z")}
        self.outcomes_url = f"{base_url.rstrip('/')}/v1/analytics/push_outcomes_per_minute"
        self.jobs_url = f"{base_url.rstrip('/')}/v1/analytics/push_jobs_per_minute"
        self.baseline: Counter[tuple[str, str]] = Counter()
        self.jobs_baseline = 0

    async def take_baseline(self) -> None:
        self.baseline = await self.read_all()
        self.jobs_baseline = await self.read_all_jobs()

    async def read_all(self) -> Counter[tuple[str, str]]:
        answer = await self._get(self.outcomes_url)
        counts: Counter[tuple[str, str]] = Counter()
        for row in answer["rows"]:
            counts[(str(row["provider"]), str(row["outcome"]))] += int(row["attempts"])
        return counts

    async def read_all_jobs(self) -> int:
        answer = await self._get(self.jobs_url)
        return sum(int(row["jobs"]) for row in answer["rows"])

    async def _get(self, url: str) -> dict[str, Any]:
        return await asyncio.to_thread(
            call_analytics, "GET", url, self.headers(), params=self.params, timeout=10
        )

    async def read(self) -> Counter[tuple[str, str]]:
        """This run's attempts by (provider, outcome)."""
        counts = await self.read_all()
        counts.subtract(self.baseline)
        return +counts

    async def read_jobs(self) -> int:
        """This run's push jobs, as the ClickHouse audit holds them."""
        return await self.read_all_jobs() - self.jobs_baseline


async def _wait_for_push_outcomes(
    analytics: _PushOutcomes,
    result: DemoResult,
    within: float,
    progress: Callable[[str], None],
) -> None:
    """Until the outcomes settle every expected push job (or ``within`` seconds); then once
    more after a second, so that extra attempts (a retry, a job sent twice) show too."""
    deadline = time.monotonic() + within
    last_report = 0.0
    expected = sum(result.pushes_expected.values())
    while True:
        result.push_outcomes = await analytics.read()
        result.push_jobs_planned = await analytics.read_jobs()
        settled = not result.pushes_missing and result.push_jobs_planned >= expected
        if settled or time.monotonic() > deadline:
            break
        if time.monotonic() - last_report >= 2.0:
            last_report = time.monotonic()
            progress(f"waiting for {result.pushes_missing} push outcomes …")
        await asyncio.sleep(0.5)
    await asyncio.sleep(1.0)
    result.push_outcomes = await analytics.read()
    result.push_jobs_planned = await analytics.read_jobs()


def main_demo(
    settings: Settings,
    options: DemoOptions,
    *,
    echo: Callable[[str], None],
    progress: Callable[[str], None],
) -> int:
    """Run the demo, print its summary; 0 when nothing was lost or doubled (and, with offline
    users, every expected push job has its outcome)."""
    result = uvloop.run(run_demo(settings, options, progress))
    for line in result.lines():
        echo(line)
    ok = result.lost == 0 and result.duplicates == 0
    echo("OK: nothing lost, nothing doubled" if ok else "FAILED: messages lost or doubled")
    if result.offline_users and result.pushes_missing:
        echo(
            f"FAILED: {result.pushes_missing} push jobs without an outcome (is push-sink running?)"
        )
        return 1
    return 0 if ok else 1
