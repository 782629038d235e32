"""The push sink (``imstream run push-sink``): APNs and FCM notifications for users with no online
device, from the push jobs the stream stage plans.

Reads ``im.push.jobs`` (key ``tenant/user``) as consumer group ``<prefix>imstream-push-sink``,
``read_committed``, and keeps a token table (``sinks.push.tokens``) from ``im.push.tokens`` (key
``tenant/user/device``): every partition read from the beginning to its end before the first job
is served (assigned, not a group: every replica needs every token), then followed. Per job:

- the user's devices with a token are the targets (a job that finds none first waits for the
  token table to read up to the token topic's end as of then: a job can overtake its user's
  registration, since they travel on different topics); :func:`~sinks.push.policy.decide` (the
  recipient's quiet hours from the job; the user's and the conversation's mutes were applied
  upstream, where a muted user gets no job) and
  :func:`~sinks.push.notification.build_notification` (the tenant's preview mode, the job's
  locale; the sender's id as the sender's name) make the notification, and the dispatcher
  delivers it to every target at once — retries, backoff, circuit breakers and the per-provider
  bound live there;
- every attempt becomes a ``PushOutcomeRecord`` on ``im.push.outcomes`` (the ClickHouse sink
  stores them in ``push_outcomes``). A job that reaches no device is one record with ``attempt``
  0 and ``outcome`` ``skipped``: reason ``no-device-token``, or the policy's (``expired``, …). A
  device whose provider this deployment has no credentials for is ``skipped`` with reason
  ``provider-not-configured`` — never a dead letter, so a developer box without keys is quiet;
- a token the provider rejects for good becomes a ``push_token.removed`` (reason
  ``provider-rejected``) on ``im.push.tokens`` and leaves the table at once (no second push is
  tried to it) — unless the device registered the token again after the provider's
  ``token_invalid_since``, or holds another token by now;
- a job a device could not get (retries exhausted, rejected, circuit open) goes to the push-jobs
  dead-letter topic once, with the first such device's code in ``imstream.error.code``;
- a token registration that brings a token another device of the same user and tenant holds
  detaches the other device: a ``push_token.removed`` (reason ``moved``) for it; one that brings
  a token a device of another user holds is refused: a ``push_token.removed`` (reason
  ``claim-refused``) for the claimant (``sinks.push.tokens``);
- where a push goes comes from the tenant's settings (``IM_PUSH__TENANT_APPS``): the APNs topic
  is one of the tenant's bundle ids, the FCM project the tenant's; a token whose app is none of
  the tenant's is ``skipped`` with reason ``app-not-configured``.

Delivery guarantee: **at least once per device and job.** A job's offset is committed only once
its outcome records, token removals and dead letter are acknowledged by Kafka (``acks=all``), and
offsets are committed in order per partition (the first job still open holds back the ones after
it). A crash, a rebalance or a stop before that sends the job again; the device shows it once,
since every push of a conversation carries the conversation as its collapse id (APNs
``apns-collapse-id``, FCM collapse key): the repeat replaces the first. The outcome rows of a job
sent again replace the first run's in ``push_outcomes`` (same job, device and attempt). Key: the
user (``tenant/user``).

Jobs in flight are bounded (``IM_PUSH__JOBS_IN_FLIGHT``); while that many are open the sink
reads no more. SIGTERM/SIGINT: no more jobs are read, open ones get ``IM_PUSH__DRAIN_SECONDS``
to finish, the finished ones are committed and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from datetime import time as wall_time
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from pydantic import ValidationError

from core import kafka_loop
from core.backoff import Backoff
from core.connections import (
    consume_ready,
    kafka_consumer_config,
    kafka_producer_config,
    sink_session_config,
)
from core.groups import push_sink_group
from core.push_settings import TenantPushApps
from core.readiness import ReadyFile
from core.records import PROCESSING_FAILED, InputRecord, dead_letter
from core.settings import Settings
from schemas.errors import SchemaError, schema_error
from schemas.events import (
    MAX_NAME_CHARS,
    PushAttemptOutcome,
    PushJob,
    PushOutcomeRecord,
    PushProvider,
    PushTokenRegistered,
    PushTokenRemovalReason,
    PushTokenRemoved,
    PushTokenRemovedPayload,
    derived_event_id,
    encode_event,
    parse_event,
)
from schemas.topics import TopicCatalog, device_key, topic_catalog, user_key
from sinks.push.errors import PushConfigError
from sinks.push.notification import PushNotification, PushTarget, build_notification
from sinks.push.outcome import PushOutcome
from sinks.push.policy import QuietHours, RecipientPreferences, decide
from sinks.push.proof import token_proofs
from sinks.push.reliability import DeliveryReport, PushDispatcher
from sinks.push.tokens import Detach, Holder, TokenTable

log = logging.getLogger(__name__)

READY_MESSAGE = "push sink ready"
PROGRESS_INTERVAL = 10.0
#: Exit code of credentials that cannot work (EX_CONFIG); a fatal Kafka error is ``EXIT_FATAL``.
EXIT_CONFIG = 78
#: How long one poll waits for the first record.
POLL_SECONDS = 0.5
#: Records per read of the token topic.
TOKEN_BATCH = 1000
#: How long a job with no token waits for the token table to read up to the topic's end.
TOKEN_CATCH_UP_SECONDS = 5.0
KAFKA_TIMEOUT_SECONDS = 10.0
#: ``reason`` of a job that reaches no device, and of a device whose provider has no credentials.
NO_DEVICE_TOKEN = "no-device-token"
PROVIDER_NOT_CONFIGURED = "provider-not-configured"
#: ``reason`` of a device whose token is for an app its tenant's settings do not name (a token
#: registered before the settings changed, or written around the ingress).
APP_NOT_CONFIGURED = "app-not-configured"
#: The log tag of a registration refused because another user's device holds the token.
CLAIM_REFUSED = "claim-refused"
#: Tokens whose last challenge time is remembered (the oldest forgotten beyond it).
CHALLENGES_TRACKED = 10_000


@dataclass
class SinkStats:
    jobs: int = 0
    pushes_sent: int = 0
    attempts: int = 0
    skipped: int = 0
    tokens_removed: int = 0
    tokens_moved: int = 0
    claims_refused: int = 0
    challenges_sent: int = 0
    dead_lettered: int = 0
    commits: int = 0


@dataclass(frozen=True, slots=True)
class _Output:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] = ()


@dataclass
class _JobResult:
    outputs: list[_Output] = field(default_factory=list)
    removed: list[Holder] = field(default_factory=list)


class _Progress:
    """Per partition, the offsets read and not yet done, in order: the committable offset is
    just past the last offset before the first one still open. Locked: rebalance callbacks run
    on the consumer's thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[tuple[str, int], OrderedDict[int, bool]] = {}
        self._ready: dict[tuple[str, int], int] = {}

    def started(self, tp: tuple[str, int], offset: int) -> None:
        with self._lock:
            self._open.setdefault(tp, OrderedDict())[offset] = False

    def done(self, tp: tuple[str, int], offset: int) -> None:
        with self._lock:
            offsets = self._open.get(tp)
            if offsets is None or offset not in offsets:
                return  # revoked meanwhile: its new owner sends the job again
            offsets[offset] = True
            while offsets:
                first = next(iter(offsets))
                if not offsets[first]:
                    break
                del offsets[first]
                self._ready[tp] = first + 1

    def take_ready(self, only: set[tuple[str, int]] | None = None) -> dict[tuple[str, int], int]:
        """The committable offsets not yet taken (of ``only`` these partitions)."""
        with self._lock:
            taken = {tp: offset for tp, offset in self._ready.items() if only is None or tp in only}
            for tp in taken:
                del self._ready[tp]
            return taken

    def forget(self, partitions: set[tuple[str, int]]) -> None:
        with self._lock:
            for tp in partitions:
                self._open.pop(tp, None)
                self._ready.pop(tp, None)


class PushSink:
    """The token table, the job consumer and the producer; ``run`` until ``stop`` is set."""

    def __init__(
        self,
        settings: Settings,
        dispatcher: PushDispatcher,
        *,
        catalog: TopicCatalog | None = None,
        group_id: str | None = None,
        ready_file: ReadyFile | None = None,
    ) -> None:
        self.settings = settings
        self.push = settings.push
        #: Announced at the first assignment of the jobs.
        self.ready_file = ready_file or ReadyFile(None)
        self.dispatcher = dispatcher
        self.catalog = catalog or topic_catalog(settings)
        self.group_id = group_id or push_sink_group(settings)
        self.proofs = token_proofs(self.push)
        self.tokens = TokenTable(self.proofs)
        #: When each token last got a challenge (monotonic), oldest first; bounded.
        self._challenged: OrderedDict[tuple[str, PushProvider, str], float] = OrderedDict()
        self.stats = SinkStats()
        self.ready = asyncio.Event()
        self._progress = _Progress()
        self._assignment = kafka_loop.Assignment()
        self._jobs: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._catch_up_lock = asyncio.Lock()
        #: When the token table last held every token record then written.
        self._tokens_current_at: datetime | None = None
        self.producer = Producer(
            kafka_producer_config(
                settings, **{"enable.idempotence": True, "acks": "all", "linger.ms": 5}
            )
        )
        self.token_consumer = Consumer(
            kafka_consumer_config(
                settings, f"{self.group_id}-tokens", **{"enable.partition.eof": True}
            )
        )
        self.job_consumer = Consumer(
            kafka_consumer_config(settings, self.group_id, **sink_session_config(settings))
        )

    # -- the process --

    async def run(self, stop: asyncio.Event) -> None:
        """Load the token table, then serve jobs until ``stop`` is set (see the module)."""
        self._loop = asyncio.get_running_loop()
        poller = asyncio.create_task(self._poll_producer())
        follower: asyncio.Task[None] | None = None
        try:
            loaded = await asyncio.to_thread(self._load_tokens, stop)
            if not loaded:
                return
            follower = asyncio.create_task(self._follow_tokens(stop))
            await self._serve_jobs(stop, follower)
        finally:
            if follower is not None:
                stop.set()
                # Its failure, if any, was raised through _serve_jobs already.
                with contextlib.suppress(kafka_loop.FatalError):
                    await follower
            await self._drain()
            await asyncio.to_thread(self._close_consumers)
            await asyncio.to_thread(self.producer.flush, 10)
            poller.cancel()
            for task in self._background:
                task.cancel()
            self._report(final=True)

    def _close_consumers(self) -> None:
        self._commit_ready()
        self.job_consumer.close()
        self.token_consumer.close()

    # -- the token table --

    def _load_tokens(self, stop: asyncio.Event) -> bool:
        """Read every partition of the token topic from the beginning to its end (blocking, on a
        worker thread, before anything else runs); then write the detaches still due."""
        topic = self.catalog.push_tokens.name
        metadata = self.token_consumer.list_topics(topic, timeout=30).topics.get(topic)
        if metadata is None or metadata.error is not None:
            raise kafka_loop.FatalError(f"topic {topic} is missing: run `imstream topics apply`")
        remaining: set[int] = set()
        for partition in metadata.partitions:
            low, high = _watermarks(self.token_consumer, TopicPartition(topic, partition))
            if high > low:
                remaining.add(partition)
        self.token_consumer.assign(
            [TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.partitions]
        )
        started = time.monotonic()
        # The latest record of every device (what compaction keeps), applied in the order they
        # happened: a reload reaches the state the events' times dictate, whatever order the
        # partitions were read in (a claim of another user never wins by being read first).
        latest: dict[bytes, PushTokenRegistered | PushTokenRemoved] = {}
        records = 0
        while remaining and not stop.is_set():
            for message in self.token_consumer.consume(TOKEN_BATCH, timeout=POLL_SECONDS):
                error = kafka_loop.consumer_error(message, what="token consumer", logger=log)
                if error is not None:
                    if kafka_loop.is_partition_end(error):
                        remaining.discard(message.partition() or 0)
                    continue
                records += 1
                key = message.key() or b""
                event = _token_event(message)
                if event is None:
                    latest.pop(key, None)
                else:
                    latest[key] = event
        if stop.is_set():
            return False
        # A detach whose removal is not in the topic yet (written by nobody, or lost): the
        # device's latest record is still the registration it lost. Write it, unless the device
        # holds a token after all (the removal would then forget the registration).
        due = self.tokens.load(latest.values())
        pending = [d for d in due if self.tokens.entry(d.holder) is None]
        for detach in pending:
            self._produce_detach(detach)
        log.info(
            "token table loaded: %d tokens from %d records in %.1fs; %d tokens detached",
            len(self.tokens),
            records,
            time.monotonic() - started,
            len(pending),
        )
        return True

    async def _follow_tokens(self, stop: asyncio.Event) -> None:
        """Keep the table up to date; a registration that moves a token detaches its holder."""
        while not stop.is_set():
            messages = await asyncio.to_thread(
                self.token_consumer.consume, TOKEN_BATCH, POLL_SECONDS
            )
            for message in messages:
                error = kafka_loop.consumer_error(message, what="token consumer", logger=log)
                if error is not None:
                    continue
                event = _token_event(message)
                if event is None:
                    continue
                for detach in self.tokens.apply(event):
                    self._produce_detach(detach)
                    refused_now = detach.entry.event_id == event.event_id
                    if detach.reason is PushTokenRemovalReason.CLAIM_REFUSED and refused_now:
                        self._challenge(detach)

    async def _tokens_caught_up(self, since: datetime) -> None:
        """Wait (at most ``TOKEN_CATCH_UP_SECONDS``) until the table holds every token record
        written before now; at once when it was caught up after ``since`` already."""
        async with self._catch_up_lock:
            if self._tokens_current_at is not None and self._tokens_current_at >= since:
                return
            asked_at = datetime.now(UTC)
            try:
                ends = await asyncio.to_thread(self._token_ends)
            except KafkaException as error:
                log.warning("token topic's end unknown (%s): a job may be skipped", error)
                return
            deadline = time.monotonic() + TOKEN_CATCH_UP_SECONDS
            while time.monotonic() < deadline:
                behind = await asyncio.to_thread(self._token_partitions_behind, ends)
                if not behind:
                    self._tokens_current_at = asked_at
                    return
                await asyncio.sleep(0.01)
            log.warning(
                "the token table did not catch up with %s within %.0f s; a job may be skipped",
                self.catalog.push_tokens.name,
                TOKEN_CATCH_UP_SECONDS,
            )

    def _token_ends(self) -> dict[int, tuple[int, int]]:
        """Each token partition's (low, high) watermarks, asked of the broker now."""
        topic = self.catalog.push_tokens.name
        return {
            partition: _watermarks(self.token_consumer, TopicPartition(topic, partition))
            for partition in range(self.catalog.push_tokens.partitions)
        }

    def _token_partitions_behind(self, ends: dict[int, tuple[int, int]]) -> list[int]:
        topic = self.catalog.push_tokens.name
        positions = self.token_consumer.position([TopicPartition(topic, p) for p in ends])
        return [
            tp.partition
            for tp in positions
            if ends[tp.partition][1] > ends[tp.partition][0] and tp.offset < ends[tp.partition][1]
        ]

    def _produce_detach(self, detach: Detach) -> None:
        """The old holder's ``push_token.removed`` (reason ``moved``); not awaited: a lost one
        is written again when a sink next loads the table and finds the token still shared."""
        removal = detach.removal()
        holder = detach.holder
        if detach.reason is PushTokenRemovalReason.CLAIM_REFUSED:
            log.info(
                "[%s] %s claimed a token another user's device holds",
                CLAIM_REFUSED,
                _name(holder),
            )
            self.stats.claims_refused += 1
        else:
            log.info("token of %s moved to another device; detaching it", _name(holder))
            self.stats.tokens_moved += 1
        self._produce(
            _Output(
                self.catalog.push_tokens.name,
                device_key(holder.tenant_id, holder.user_id, holder.device_id),
                encode_event(removal),
            ),
            on_delivery=_log_failure,
        )

    def _challenge(self, refused: Detach) -> None:
        """Send the token a refused claim names a challenge (``sinks.push.proof``), in the
        background: if the claimant's device is the one the token reaches, its app echoes it and
        takes the token. At most one per token per ``token_challenge_interval_seconds``; only
        while following (a reload sends none: the claimant registers again)."""
        if self.proofs is None:
            return
        claimant, claim, holder_entry = refused.holder, refused.entry, refused.moved_by
        key = (claimant.tenant_id, claim.provider, claim.token)
        now = time.monotonic()
        last = self._challenged.get(key)
        if last is not None and now - last < self.push.token_challenge_interval_seconds:
            log.info("token challenge for %s not sent: one went out just now", _name(claimant))
            return
        self._challenged[key] = now
        self._challenged.move_to_end(key)
        while len(self._challenged) > CHALLENGES_TRACKED:
            self._challenged.popitem(last=False)
        challenge = self.proofs.issue(
            tenant_id=claimant.tenant_id,
            user_id=claimant.user_id,
            device_id=claimant.device_id,
            provider=claim.provider,
            token=claim.token,
            issued_at=claim.registered_at,
        )
        # The holder's app: the token is known to work with it.
        target = _routed(
            holder_entry.target(claimant.device_id), self.push.apps_for(claimant.tenant_id)
        )
        if target is None or target.provider not in self.dispatcher.providers:
            return
        notification = PushNotification.token_challenge(
            claim.event_id, challenge, claimant.device_id, self.push.token_proof_ttl_seconds
        )
        task = asyncio.create_task(self._send_challenge(notification, target, claimant))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_challenge(
        self, notification: PushNotification, target: PushTarget, claimant: Holder
    ) -> None:
        report = await self._deliver(notification, target)
        delivered = report is not None and report.delivered
        self.stats.challenges_sent += int(delivered)
        log.info(
            "token challenge for %s %s",
            _name(claimant),
            "sent" if delivered else "not delivered",
        )

    # -- jobs --

    async def _serve_jobs(self, stop: asyncio.Event, follower: asyncio.Task[None]) -> None:
        kafka_loop.subscribe(
            self.job_consumer, [self.catalog.push_jobs.name], self._on_assign, self._on_revoke
        )
        limit = self.push.jobs_in_flight
        last_report = time.monotonic()
        while not stop.is_set():
            if follower.done():
                follower.result()  # the token table stopped following: raise why
                raise kafka_loop.FatalError("the token table stopped following its topic")
            await asyncio.to_thread(self._commit_ready)
            free = limit - len(self._jobs)
            if free <= 0:
                await asyncio.wait(self._jobs, timeout=POLL_SECONDS, return_when="FIRST_COMPLETED")
                continue
            messages = await asyncio.to_thread(consume_ready, self.job_consumer, free, POLL_SECONDS)
            for message in messages:
                self._start_job(message)
            if time.monotonic() - last_report >= PROGRESS_INTERVAL:
                self._report()
                last_report = time.monotonic()

    def _start_job(self, message: Message) -> None:
        if kafka_loop.consumer_error(message, what="job consumer", logger=log) is not None:
            return
        record = kafka_loop.input_record(message)
        self._progress.started((record.topic, record.partition), record.offset)
        task = asyncio.create_task(self._job(record))
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    async def _job(self, record: InputRecord) -> None:
        """One job, start to acknowledged outputs; then its offset may be committed."""
        try:
            result = await self._deliver_job(record)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a bug must not stop the sink: the job is kept as a dead letter
            log.exception(
                "push job %s[%d]@%d failed", record.topic, record.partition, record.offset
            )
            result = _JobResult([self._dead_letter(record, PROCESSING_FAILED, repr(error))])
        await self._produce_acked(result.outputs)
        self.stats.jobs += 1
        self._progress.done((record.topic, record.partition), record.offset)

    async def _deliver_job(self, record: InputRecord) -> _JobResult:
        try:
            job = _parse_job(record.value or b"")
        except SchemaError as error:
            log.warning(
                "undecodable push job %s[%d]@%d: %s",
                record.topic,
                record.partition,
                record.offset,
                error.message,
            )
            return _JobResult([self._dead_letter(record, str(error.code), error.message)])
        result = _JobResult()
        targets = self.tokens.targets(job.tenant_id, job.user_id)
        if not targets:
            # A job can overtake its user's token registration: they travel on different
            # topics. Read the token topic up to its end as of now before calling it tokenless.
            await self._tokens_caught_up(job.occurred_at)
            targets = self.tokens.targets(job.tenant_id, job.user_id)
        now = datetime.now(UTC)
        preferences = _preferences(job)
        decision = decide(job, preferences, now=now, ttl_seconds=self.push.notification_ttl_seconds)
        if not targets or not decision.send:
            reason = NO_DEVICE_TOKEN if not targets else str(decision.reason)
            result.outputs.append(self._skipped(job, None, reason, now))
            return result
        notification = build_notification(
            job,
            decision,
            preview=self.push.preview_for(job.tenant_id),
            locale=preferences.locale,
        )
        apps = self.push.apps_for(job.tenant_id)
        routed = [_routed(target, apps) for target in targets]
        reports = await asyncio.gather(
            *(self._deliver(notification, target) for target in routed if target is not None)
        )
        delivered = iter(reports)
        dead_letter_codes: list[str] = []
        for target, route in zip(targets, routed, strict=True):
            if route is None:
                reason = (
                    APP_NOT_CONFIGURED
                    if target.provider in self.dispatcher.providers
                    else PROVIDER_NOT_CONFIGURED
                )
                result.outputs.append(self._skipped(job, target, reason, now))
                continue
            report = next(delivered)
            if report is None:
                result.outputs.append(self._skipped(job, target, PROVIDER_NOT_CONFIGURED, now))
                continue
            result.outputs += [self._outcome(job, outcome) for outcome in report.outcomes]
            self.stats.attempts += len(report.outcomes)
            self.stats.pushes_sent += report.delivered
            if report.token_removed:
                removal = self._token_rejected(job, target, report)
                if removal is not None:
                    result.outputs.append(removal)
            if report.dead_letter_code is not None:
                dead_letter_codes.append(f"{report.dead_letter_code}:{target.device_id}")
        if dead_letter_codes:
            code = dead_letter_codes[0].split(":", 1)[0]
            result.outputs.append(
                self._dead_letter(record, code, "not delivered to " + ", ".join(dead_letter_codes))
            )
        return result

    async def _deliver(
        self, notification: PushNotification, target: PushTarget
    ) -> DeliveryReport | None:
        """The delivery report; None when the target's provider has no credentials here."""
        if target.provider not in self.dispatcher.providers:
            return None
        try:
            return await self.dispatcher.deliver(notification, target)
        except PushConfigError:
            return None

    def _token_rejected(
        self, job: PushJob, target: PushTarget, report: DeliveryReport
    ) -> _Output | None:
        """The ``push_token.removed`` for a token the provider rejected, if still due: the device
        still holds it and did not register it again after the provider found it invalid."""
        holder = Holder(job.tenant_id, job.user_id, target.device_id)
        entry = self.tokens.entry(holder)
        if entry is None or entry.token != target.token:
            return None
        invalid_since = report.final.token_invalid_since
        if invalid_since is not None and entry.registered_at > invalid_since:
            log.info("token of %s registered again since it was rejected; kept", _name(holder))
            return None
        self.tokens.drop(holder, target.token)
        self.stats.tokens_removed += 1
        removal = PushTokenRemoved.new(
            tenant_id=job.tenant_id,
            event_id=derived_event_id(job.job_id, f"rejected/{target.device_id}"),
            payload=PushTokenRemovedPayload(
                user_id=job.user_id,
                device_id=target.device_id,
                provider=target.provider,
                token=target.token,
                app_id=target.app_id,
                reason=PushTokenRemovalReason.PROVIDER_REJECTED,
            ),
        )
        return _Output(
            self.catalog.push_tokens.name,
            device_key(job.tenant_id, job.user_id, target.device_id),
            encode_event(removal),
        )

    def _outcome(self, job: PushJob, outcome: PushOutcome) -> _Output:
        status = outcome.status_code
        return self._outcome_output(
            job,
            device_id=outcome.device_id,
            provider=outcome.provider,
            attempt=outcome.attempt,
            outcome=PushAttemptOutcome(outcome.kind.value),
            status_code=status if status is not None and 100 <= status <= 599 else None,
            reason=outcome.reason[:MAX_NAME_CHARS] or None,
            attempted_at=outcome.finished_at - timedelta(milliseconds=outcome.latency_ms),
        )

    def _skipped(
        self, job: PushJob, target: PushTarget | None, reason: str, now: datetime
    ) -> _Output:
        self.stats.skipped += 1
        return self._outcome_output(
            job,
            device_id=target.device_id if target is not None else None,
            provider=target.provider if target is not None else None,
            attempt=0,
            outcome=PushAttemptOutcome.SKIPPED,
            reason=reason,
            attempted_at=now,
        )

    def _outcome_output(self, job: PushJob, **attempt: Any) -> _Output:
        """The outcome record of one attempt at ``job`` (what was tried, and how it ended)."""
        record = PushOutcomeRecord(
            job_id=job.job_id,
            tenant_id=job.tenant_id,
            user_id=job.user_id,
            conversation_id=job.conversation_id,
            message_id=job.message_id,
            job_occurred_at=job.occurred_at,
            **attempt,
        )
        return _Output(
            self.catalog.push_outcomes.name,
            user_key(record.tenant_id, record.user_id),
            record.model_dump_json().encode(),
        )

    def _dead_letter(self, record: InputRecord, code: str, message: str) -> _Output:
        self.stats.dead_lettered += 1
        log.warning(
            "dead-lettering push job %s[%d]@%d: [%s] %s",
            record.topic,
            record.partition,
            record.offset,
            code,
            message[:300],
        )
        output = dead_letter(self.catalog, self.catalog.push_jobs, record, code, message)
        return _Output(output.topic, output.key, output.value, tuple(output.headers))

    # -- producing --

    async def _produce_acked(self, outputs: Sequence[_Output]) -> None:
        """Produce ``outputs`` and return once Kafka acknowledged every one; a failed one is
        produced again (the idempotent producer's own retries came to nothing) until it is
        acknowledged or the sink closes — then the job stays uncommitted."""
        remaining = list(outputs)
        backoff = Backoff(0.5, 30.0)
        while remaining:
            loop = asyncio.get_running_loop()
            futures = []
            for output in remaining:
                future: asyncio.Future[KafkaError | None] = loop.create_future()
                self._produce(output, on_delivery=_resolve(loop, future))
                futures.append(future)
            errors = await asyncio.gather(*futures)
            failed = [o for o, e in zip(remaining, errors, strict=True) if e is not None]
            if failed:
                delay = backoff.next()
                log.warning(
                    "%d of %d records not acknowledged (%s); producing them again in %.1fs",
                    len(failed),
                    len(remaining),
                    next(e for e in errors if e is not None),
                    delay,
                )
                await asyncio.sleep(delay)
            remaining = failed

    def _produce(self, output: _Output, *, on_delivery: Any) -> None:
        while True:
            try:
                self.producer.produce(
                    output.topic,
                    key=output.key,
                    value=output.value,
                    headers=list(output.headers) or None,
                    on_delivery=on_delivery,
                )
                return
            except BufferError:
                self.producer.poll(0.05)

    async def _poll_producer(self) -> None:
        """Serve the producer's delivery callbacks (on a worker thread; they hop back to the
        loop)."""
        while True:
            await asyncio.to_thread(self.producer.poll, 0.2)

    # -- commits and rebalances (on the job consumer's thread) --

    def _commit_ready(self) -> None:
        self._commit(self._progress.take_ready(set(self._assignment.partitions)))

    def _commit(self, offsets: dict[tuple[str, int], int]) -> None:
        """Commit policy: a retriable failure is left to the next commit, which covers these
        offsets too (offsets only grow per partition); the job loop must not stall on it."""
        try:
            outcome = kafka_loop.commit_offsets(
                self.job_consumer, offsets, held=self._assignment.partitions, logger=log
            )
        except kafka_loop.RetriableCommitError as exc:
            log.warning("commit failed (%s); the jobs are committed with later ones", exc)
            return
        if outcome is kafka_loop.Commit.COMMITTED:
            self.stats.commits += 1

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assignment.assign(partitions)
        log.info("assigned %s", sorted(tp.partition for tp in partitions))
        if not self.ready.is_set() and self._loop is not None:
            self._loop.call_soon_threadsafe(self.ready.set)
            detail = (
                f"group {self.group_id}, {len(self.tokens)} tokens of "
                f"{self.catalog.push_tokens.name}"
            )
            log.info("%s: %s", READY_MESSAGE, detail)
            self.ready_file.announce(detail)

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        # What is done is committed while the partitions are still ours; jobs still open are
        # sent again by the next owner.
        self._commit(self._progress.take_ready(gone))
        self._progress.forget(gone)
        self._assignment.revoke(partitions)
        log.info("revoked %s", sorted(tp.partition for tp in partitions))

    async def _drain(self) -> None:
        if self._jobs:
            log.info(
                "waiting up to %.0fs for %d open jobs", self.push.drain_seconds, len(self._jobs)
            )
            _done, pending = await asyncio.wait(set(self._jobs), timeout=self.push.drain_seconds)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
                log.info(
                    "%d jobs not finished: they are sent again after the restart", len(pending)
                )

    def _report(self, *, final: bool = False) -> None:
        stats = self.stats
        log.info(
            "%s%d jobs, %d attempts, %d pushes sent, %d skipped, %d tokens removed, %d moved, "
            "%d claims refused, %d challenges sent, %d dead-lettered; %d tokens, %d jobs open",
            "stopping: " if final else "",
            stats.jobs,
            stats.attempts,
            stats.pushes_sent,
            stats.skipped,
            stats.tokens_removed,
            stats.tokens_moved,
            stats.claims_refused,
            stats.challenges_sent,
            stats.dead_lettered,
            len(self.tokens),
            len(self._jobs),
        )


#: Broker answers that mean "not yet" (a partition without a leader just after the topic was
#: created or while the broker starts), not "never".
_TRANSIENT = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
    }
)


def _watermarks(consumer: Consumer, partition: TopicPartition) -> tuple[int, int]:
    """A partition's (low, high) watermarks asked of the broker, retried while its answer is
    transient, for up to ``KAFKA_TIMEOUT_SECONDS``."""
    deadline = time.monotonic() + KAFKA_TIMEOUT_SECONDS
    while True:
        try:
            low, high = consumer.get_watermark_offsets(
                partition, timeout=KAFKA_TIMEOUT_SECONDS, cached=False
            )
            return int(low), int(high)
        except KafkaException as exc:
            error = exc.args[0]
            transient = isinstance(error, KafkaError) and (
                error.retriable() or error.code() in _TRANSIENT
            )
            if not transient or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _routed(target: PushTarget, apps: TenantPushApps) -> PushTarget | None:
    """``target`` as the tenant's settings route it: its APNs topic one of the tenant's apps,
    its FCM project the tenant's; None when its app is none of the tenant's. The app id in the
    token record is only a choice among the tenant's apps, never a topic of its own."""
    app_id = apps.resolve(target.provider, target.app_id)
    if app_id is None:
        return None
    project_id = apps.fcm_project_id if target.provider is PushProvider.FCM else None
    return replace(target, app_id=app_id, project_id=project_id)


def _name(holder: Holder) -> str:
    return f"{holder.tenant_id}/{holder.user_id}/{holder.device_id}"


def _resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future[KafkaError | None]) -> Any:
    def delivered(error: KafkaError | None, _message: Message) -> None:
        loop.call_soon_threadsafe(_settle, future, error)

    return delivered


def _settle(future: asyncio.Future[KafkaError | None], error: KafkaError | None) -> None:
    if not future.done():
        future.set_result(error)


def _log_failure(error: KafkaError | None, _message: Message) -> None:
    if error is not None:
        log.warning("token removal not acknowledged: %s", error)


def _preferences(job: PushJob) -> RecipientPreferences:
    """The recipient's preferences as the job carries them. Both mutes were applied upstream:
    the user processor plans no job for a muted user or conversation. Quiet hours this sink
    cannot apply (a time zone its tz database lacks) are logged and ignored: the push goes out,
    with sound, rather than not at all."""
    quiet_hours: QuietHours | None = None
    if job.quiet_hours is not None:
        setting = job.quiet_hours
        try:
            quiet_hours = QuietHours(
                start=wall_time.fromisoformat(setting.start),
                end=wall_time.fromisoformat(setting.end),
                time_zone=setting.time_zone,
            )
        except ValueError as error:
            log.warning("quiet hours of job %s ignored: %s", job.job_id, error)
    return RecipientPreferences(quiet_hours=quiet_hours, locale=job.locale)


def _parse_job(raw: bytes) -> PushJob:
    try:
        return PushJob.model_validate_json(raw)
    except ValidationError as error:
        raise schema_error(error, raw, what="record", known_types=()) from None


def _token_event(message: Message) -> PushTokenRegistered | PushTokenRemoved | None:
    """The token event of a record; None for a tombstone or a record that is none (the CQL sink
    dead-letters those)."""
    raw = message.value()
    if raw is None:
        return None
    try:
        event = parse_event(raw)
    except SchemaError as error:
        log.warning(
            "token record %s[%d]@%d ignored: %s",
            message.topic(),
            message.partition(),
            message.offset(),
            error.message,
        )
        return None
    return event if isinstance(event, PushTokenRegistered | PushTokenRemoved) else None
