"""The push sink over the real Kafka and the fake providers: pushes reach offline users' devices,
rejected tokens are removed, moved tokens detached, undeliverable jobs dead-lettered, and the
outcome records agree with what the fakes themselves counted."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from core.connections import kafka_config
from core.lag import group_lag
from core.push_settings import PushProviderSettings
from core.settings import Settings
from pipelines.processes import consumer_groups
from pipelines.stack.manager import LocalStack
from schemas import events as ev
from schemas.topics import TopicCatalog, device_key, topic_catalog, user_key
from sinks.push import sink as sink_module
from sinks.push.errors import DeadLetterCode
from sinks.push.reliability import PushDispatcher
from sinks.push.sink import READY_MESSAGE, PushSink, _preferences
from tests.sinks.clickhouse_support import (
    Outgoing,
    committed_offsets,
    end_offsets,
    new_prefix,
    prefixed_settings,
    produce,
)
from tests.sinks.push.fakes.apns import FakeApns
from tests.sinks.push.fakes.fcm import FakeFcm
from tests.sinks.push.fakes.script import Reply
from tests.sinks.push.support import APNS_DEBUG_TOPIC, APNS_TOPIC, FCM_APP

pytestmark = pytest.mark.stack

TENANT = "acme"
#: How long a condition may take to become true (a group join, a few deliveries).
WITHIN = 30.0


@pytest.fixture
def sink_settings(
    settings: Settings,
    local_stack: LocalStack,
    kafka_admin: AdminClient,
    apns_settings: dict[str, Any],
    fcm_settings: dict[str, Any],
) -> Iterator[Settings]:
    """The push topics under a prefix of this test's own (deleted after); both providers on
    their fakes, with retries in tens of milliseconds."""
    prefixed = prefixed_settings(settings, new_prefix("push"))
    prefixed = with_push(prefixed, {**apns_settings, **fcm_settings})
    catalog = topic_catalog(prefixed)
    topics = [
        catalog.push_jobs,
        catalog.push_tokens,
        catalog.push_outcomes,
        catalog.dead_letter_of(catalog.push_jobs),
    ]
    futures = kafka_admin.create_topics(
        [NewTopic(t.name, num_partitions=t.partitions, config=t.configs()) for t in topics]
    )
    for future in futures.values():
        future.result(timeout=30)
    try:
        yield prefixed
    finally:
        for future in kafka_admin.delete_topics([t.name for t in topics]).values():
            future.result(timeout=60)


def with_push(settings: Settings, providers: dict[str, Any]) -> Settings:
    push = PushProviderSettings.model_validate(
        {
            **providers,
            "max_attempts": 3,
            "backoff_base_seconds": 0.01,
            "backoff_cap_seconds": 0.05,
            "request_timeout_seconds": 3,
            "drain_seconds": 5,
        }
    )
    return settings.model_copy(update={"push": push})


@dataclass
class Running:
    sink: PushSink
    settings: Settings
    catalog: TopicCatalog


@pytest.fixture
async def start_sink() -> AsyncIterator[Callable[[Settings], Any]]:
    """Starts the sink in this event loop (the fakes' too) and stops it at the end of the test,
    as SIGTERM does."""
    started: list[tuple[asyncio.Event, asyncio.Task[None], PushDispatcher]] = []

    async def start(settings: Settings) -> Running:
        dispatcher = PushDispatcher.from_settings(settings.push)
        # The default group (under the test's own prefix): the one `imstream status` reads.
        sink = PushSink(settings, dispatcher)
        stop = asyncio.Event()
        task = asyncio.create_task(sink.run(stop))
        started.append((stop, task, dispatcher))
        ready = asyncio.create_task(sink.ready.wait())
        await asyncio.wait([ready, task], timeout=WITHIN, return_when="FIRST_COMPLETED")
        if task.done():
            task.result()
        assert sink.ready.is_set(), "the push sink did not get its partitions"
        return Running(sink, settings, topic_catalog(settings))

    yield start
    for stop, task, dispatcher in started:
        stop.set()
        await asyncio.wait_for(task, WITHIN)
        await dispatcher.close()


def registered(
    user: str,
    device: str,
    provider: ev.PushProvider,
    token: str,
    *,
    at: datetime | None = None,
    tenant: str = TENANT,
    app_id: str | None = None,
) -> Outgoing:
    event = ev.PushTokenRegistered.new(
        tenant_id=tenant,
        actor=ev.Actor(user_id=user, device_id=device),
        occurred_at=at or datetime.now(UTC),
        payload=ev.PushTokenRegisteredPayload(
            user_id=user,
            device_id=device,
            provider=provider,
            token=token,
            app_id=app_id or (APNS_TOPIC if provider is ev.PushProvider.APNS else FCM_APP),
        ),
    )
    return Outgoing("", device_key(tenant, user, device), ev.encode_event(event))


def job(
    user: str, conversation_id: str, *, unread_total: int = 3, tenant: str = TENANT
) -> ev.PushJob:
    message_id = str(uuid.uuid4())
    return ev.PushJob(
        job_id=ev.derived_event_id(message_id, f"push/{user}"),
        tenant_id=tenant,
        user_id=user,
        conversation_id=conversation_id,
        conversation_seq=9,
        message_id=message_id,
        sender_id="alice",
        body=ev.TextBody(text="see you at eight"),
        merged_count=1,
        unread_total=unread_total,
        occurred_at=datetime.now(UTC),
    )


def send_tokens(settings: Settings, *records: Outgoing) -> None:
    topic = topic_catalog(settings).push_tokens.name
    produce(settings, [Outgoing(topic, r.key, r.value) for r in records])


def send_jobs(settings: Settings, *jobs: ev.PushJob) -> None:
    topic = topic_catalog(settings).push_jobs.name
    produce(
        settings,
        [
            Outgoing(topic, user_key(j.tenant_id, j.user_id), j.model_dump_json().encode())
            for j in jobs
        ],
    )


def read_all(settings: Settings, topic: str) -> list[Message]:
    """Every record of ``topic`` now (blocking)."""
    consumer = Consumer(
        kafka_config(
            settings,
            **{
                "group.id": f"t-read-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
            },
        )
    )
    try:
        partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
        ends = end_offsets(settings, [topic])
        remaining = {p for p in partitions if ends[(topic, p)] > 0}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        messages: list[Message] = []
        while remaining:
            for message in consumer.consume(500, timeout=1.0):
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        remaining.discard(message.partition() or 0)
                    continue
                messages.append(message)
        return messages
    finally:
        consumer.close()


async def outcomes(settings: Settings) -> list[ev.PushOutcomeRecord]:
    messages = await asyncio.to_thread(
        read_all, settings, topic_catalog(settings).push_outcomes.name
    )
    return [ev.PushOutcomeRecord.model_validate_json(m.value() or b"") for m in messages]


async def token_events(settings: Settings) -> list[ev.Event]:
    messages = await asyncio.to_thread(read_all, settings, topic_catalog(settings).push_tokens.name)
    return [ev.parse_event(m.value() or b"") for m in messages if m.value() is not None]


async def eventually(check: Callable[[], Any], what: str) -> None:
    """Await ``check()`` (sync or async) until it is truthy."""
    deadline = asyncio.get_running_loop().time() + WITHIN
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert asyncio.get_running_loop().time() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.1)


async def outcomes_of(
    settings: Settings, job_ids: set[str], count: int
) -> list[ev.PushOutcomeRecord]:
    """The outcome records of these jobs, once there are ``count`` of them."""
    found: list[ev.PushOutcomeRecord] = []

    async def enough() -> bool:
        found[:] = [o for o in await outcomes(settings) if o.job_id in job_ids]
        return len(found) >= count

    await eventually(enough, f"{count} outcome records")
    return found


def removals(events: list[ev.Event]) -> list[ev.PushTokenRemovedPayload]:
    return [e.payload for e in events if isinstance(e, ev.PushTokenRemoved)]


def apns_token() -> str:
    return secrets.token_hex(32)


def fcm_token() -> str:
    return f"fcm-{secrets.token_urlsafe(24)}"


async def test_offline_users_get_their_pushes_and_outcomes_match_the_fakes(
    sink_settings: Settings,
    start_sink: Callable[[Settings], Any],
    fake_apns: FakeApns,
    fake_fcm: FakeFcm,
) -> None:
    iphone, pixel = apns_token(), fcm_token()
    send_tokens(
        sink_settings,
        registered("ios-user", "iphone", ev.PushProvider.APNS, iphone),
        registered("android-user", "pixel", ev.PushProvider.FCM, pixel),
    )
    running: Running = await start_sink(sink_settings)
    to_ios, to_android = (
        job("ios-user", "conv-a", unread_total=4),
        job("android-user", "conv-b", unread_total=7),
    )
    nobody = job("tokenless-user", "conv-c")
    send_jobs(sink_settings, to_ios, to_android, nobody)

    found = await outcomes_of(sink_settings, {to_ios.job_id, to_android.job_id, nobody.job_id}, 3)

    (apns,) = fake_apns.stats.for_token(iphone)
    assert apns.headers["apns-collapse-id"] == "conv-a"
    assert apns.payload["aps"]["badge"] == 4
    # The default preview says who wrote, not what: a lock screen is public.
    assert apns.payload["aps"]["alert"] == {"title": "Message from alice"}
    (fcm,) = fake_fcm.stats.for_token(pixel)
    assert "see you" not in json.dumps(fcm.payload)
    assert fcm.payload["message"]["notification"] == {"title": "Message from alice"}
    assert fcm.payload["message"]["android"]["collapse_key"] == "conv-b"
    assert fcm.payload["message"]["android"]["notification"]["notification_count"] == 7
    assert fcm.payload["message"]["data"]["conversation_id"] == "conv-b"
    by_job = {o.job_id: o for o in found}
    assert (by_job[to_ios.job_id].outcome, by_job[to_ios.job_id].device_id) == ("sent", "iphone")
    assert by_job[to_ios.job_id].provider is ev.PushProvider.APNS
    assert by_job[to_ios.job_id].status_code == 200
    assert (by_job[to_android.job_id].outcome, by_job[to_android.job_id].attempt) == ("sent", 1)
    skipped = by_job[nobody.job_id]
    assert (skipped.outcome, skipped.reason, skipped.attempt) == ("skipped", "no-device-token", 0)
    assert skipped.device_id is None and skipped.provider is None
    # The outcome records agree with the fakes' own counts, per provider.
    assert (
        sum(o.outcome == "sent" and o.provider == "apns" for o in found) == fake_apns.stats.accepted
    )
    assert (
        sum(o.outcome == "sent" and o.provider == "fcm" for o in found) == fake_fcm.stats.accepted
    )
    # Each job's offset is committed once its outcomes are acknowledged.
    jobs_topic = running.catalog.push_jobs.name
    ends = end_offsets(sink_settings, [jobs_topic])
    busy = [tp for tp, end in ends.items() if end > 0]
    await eventually(
        lambda: (
            committed_offsets(sink_settings, running.sink.group_id, busy)
            == {tp: ends[tp] for tp in busy}
        ),
        "every job's offset committed",
    )
    # `imstream status` reads the same group: nothing left to do.
    (group,) = consumer_groups(sink_settings)["push-sink"].items()
    assert group[0] == running.sink.group_id
    assert group_lag(sink_settings, *group) == 0


async def test_a_job_that_overtakes_its_users_token_registration_still_reaches_the_device(
    sink_settings: Settings,
    start_sink: Callable[[Settings], Any],
    fake_apns: FakeApns,
) -> None:
    """The registration and the job travel on different topics: a job read before the sink's
    token table has the registration must wait for it, not be skipped as tokenless."""
    await start_sink(sink_settings)
    late_jobs = []
    for index in range(5):
        token = apns_token()
        user = f"new-user-{index}"
        # Back to back, as a device registering right before its user's first message.
        send_tokens(sink_settings, registered(user, "iphone", ev.PushProvider.APNS, token))
        late = job(user, f"conv-{index}")
        send_jobs(sink_settings, late)
        late_jobs.append((late, token))

    found = await outcomes_of(sink_settings, {late.job_id for late, _ in late_jobs}, 5)

    assert sorted((o.outcome, o.device_id) for o in found) == [("sent", "iphone")] * 5
    for _, token in late_jobs:
        assert len(fake_apns.stats.for_token(token)) == 1


def window_around(now: datetime, zone: str) -> ev.QuietHoursSetting:
    """Quiet hours from an hour before ``now`` to an hour after, in ``zone``'s wall-clock time
    (wrapping midnight when they straddle it)."""
    local = now.astimezone(ZoneInfo(zone))
    return ev.QuietHoursSetting(
        start=(local - timedelta(hours=1)).strftime("%H:%M"),
        end=(local + timedelta(hours=1)).strftime("%H:%M"),
        time_zone=zone,
    )


async def test_quiet_hours_and_locale_from_the_job_shape_the_notification(
    sink_settings: Settings,
    start_sink: Callable[[Settings], Any],
    fake_apns: FakeApns,
    fake_fcm: FakeFcm,
) -> None:
    now = datetime.now(UTC)
    sleeping, german, loud = apns_token(), apns_token(), apns_token()
    android = fcm_token()
    send_tokens(
        sink_settings,
        registered("sleeper", "iphone", ev.PushProvider.APNS, sleeping),
        registered("sleeper", "pixel", ev.PushProvider.FCM, android),
        registered("jonas", "iphone", ev.PushProvider.APNS, german),
        registered("owl", "iphone", ev.PushProvider.APNS, loud),
    )
    await start_sink(sink_settings)
    inside = job("sleeper", "conv-q").model_copy(
        update={"quiet_hours": window_around(now, "Asia/Tokyo")}
    )
    in_german = job("jonas", "conv-de").model_copy(update={"locale": "de-AT"})
    # Quiet hours that ended an hour ago: an ordinary push.
    outside = job("owl", "conv-o").model_copy(
        update={"quiet_hours": window_around(now - timedelta(hours=3), "Europe/Berlin")}
    )
    send_jobs(sink_settings, inside, in_german, outside)

    found = await outcomes_of(sink_settings, {inside.job_id, in_german.job_id, outside.job_id}, 4)
    assert sorted((o.user_id, o.device_id, o.outcome) for o in found) == [
        ("jonas", "iphone", "sent"),
        ("owl", "iphone", "sent"),
        ("sleeper", "iphone", "sent"),
        ("sleeper", "pixel", "sent"),
    ]
    (quiet,) = fake_apns.stats.for_token(sleeping)
    assert quiet.headers["apns-priority"] == "5"
    assert "sound" not in quiet.payload["aps"]
    assert quiet.payload["aps"]["interruption-level"] == "passive"
    (quiet_android,) = fake_fcm.stats.for_token(android)
    assert quiet_android.payload["message"]["android"]["priority"] == "NORMAL"
    assert "default_sound" not in quiet_android.payload["message"]["android"]["notification"]
    (ordinary,) = fake_apns.stats.for_token(loud)
    assert ordinary.headers["apns-priority"] == "10"
    assert ordinary.payload["aps"]["sound"] == "default"
    assert ordinary.payload["aps"]["alert"]["title"] == "Message from alice"
    (localised,) = fake_apns.stats.for_token(german)
    assert localised.payload["aps"]["alert"] == {"title": "Nachricht von alice"}
    assert localised.headers["apns-priority"] == "10"


async def test_rejected_tokens_are_removed_and_never_tried_again(
    sink_settings: Settings,
    start_sink: Callable[[Settings], Any],
    fake_apns: FakeApns,
    fake_fcm: FakeFcm,
) -> None:
    gone_iphone, gone_pixel, kept_iphone = apns_token(), fcm_token(), apns_token()
    now = datetime.now(UTC)
    invalid_since = int((now - timedelta(minutes=1)).timestamp() * 1000)
    fake_apns.script.set(gone_iphone, Reply(410, "Unregistered", timestamp_ms=invalid_since))
    fake_fcm.script.set(gone_pixel, Reply(404, "UNREGISTERED"))
    # Registered again after the provider found it invalid: a new registration, kept.
    fake_apns.script.set(kept_iphone, Reply(410, "Unregistered", timestamp_ms=invalid_since))
    send_tokens(
        sink_settings,
        registered(
            "bob", "old-iphone", ev.PushProvider.APNS, gone_iphone, at=now - timedelta(hours=1)
        ),
        registered(
            "bob", "old-pixel", ev.PushProvider.FCM, gone_pixel, at=now - timedelta(hours=1)
        ),
        registered("carol", "iphone", ev.PushProvider.APNS, kept_iphone, at=now),
    )
    await start_sink(sink_settings)
    first = [job("bob", "conv-1"), job("carol", "conv-1")]
    send_jobs(sink_settings, *first)
    found = await outcomes_of(sink_settings, {j.job_id for j in first}, 3)
    assert sorted((o.device_id, o.outcome, o.reason) for o in found) == [
        ("iphone", "invalid_token", "Unregistered"),
        ("old-iphone", "invalid_token", "Unregistered"),
        ("old-pixel", "invalid_token", "UNREGISTERED"),
    ]

    async def bob_removed() -> bool:
        return len(removals(await token_events(sink_settings))) >= 2

    await eventually(bob_removed, "bob's two tokens removed")
    removed = removals(await token_events(sink_settings))
    assert sorted((r.user_id, r.device_id, r.token, r.reason) for r in removed) == sorted(
        [
            ("bob", "old-iphone", gone_iphone, ev.PushTokenRemovalReason.PROVIDER_REJECTED),
            ("bob", "old-pixel", gone_pixel, ev.PushTokenRemovalReason.PROVIDER_REJECTED),
        ]
    )

    second = [job("bob", "conv-1"), job("carol", "conv-1")]
    send_jobs(sink_settings, *second)
    again = {o.user_id: o for o in await outcomes_of(sink_settings, {j.job_id for j in second}, 2)}
    assert (again["bob"].outcome, again["bob"].reason) == ("skipped", "no-device-token")
    assert again["carol"].device_id == "iphone"  # kept, so tried again
    assert len(fake_apns.stats.for_token(gone_iphone)) == 1
    assert len(fake_fcm.stats.for_token(gone_pixel)) == 1
    assert len(fake_apns.stats.for_token(kept_iphone)) == 2


async def detached(settings: Settings, user: str, reason: ev.PushTokenRemovalReason) -> bool:
    return any(
        r.user_id == user and r.reason == reason for r in removals(await token_events(settings))
    )


async def test_a_token_the_same_user_registers_on_a_new_device_moves_to_it(
    sink_settings: Settings,
    start_sink: Callable[[Settings], Any],
    fake_apns: FakeApns,
) -> None:
    """A reinstall: the app gets a new device id, the phone keeps its token, the user is the
    same. The token moves; the old device id is detached."""
    shared = apns_token()
    now = datetime.now(UTC)
    moved = ev.PushTokenRemovalReason.MOVED
    send_tokens(
        sink_settings,
        registered("dave", "phone", ev.PushProvider.APNS, shared, at=now - timedelta(minutes=2)),
        registered("dave", "phone-2", ev.PushProvider.APNS, shared, at=now - timedelta(minutes=1)),
    )
    running: Running = await start_sink(sink_settings)
    await eventually(lambda: detached(sink_settings, "dave", moved), "dave's phone detached")
    # While it runs: another reinstall.
    send_tokens(sink_settings, registered("dave", "phone-3", ev.PushProvider.APNS, shared))

    async def twice() -> bool:
        found = removals(await token_events(sink_settings))
        return sum(r.reason == moved for r in found) == 2

    await eventually(twice, "phone-2 detached while following")
    assert [t.device_id for t in running.sink.tokens.targets(TENANT, "dave")] == ["phone-3"]
    removed = removals(await token_events(sink_settings))
    assert sorted((r.device_id, r.reason) for r in removed) == [
        ("phone", moved),
        ("phone-2", moved),
    ]
    pending = job("dave", "conv-9")
    send_jobs(sink_settings, pending)
    (found,) = await outcomes_of(sink_settings, {pending.job_id}, 1)
    assert (found.outcome, found.device_id) == ("sent", "phone-3")
    assert len(fake_apns.stats.for_token(shared)) == 1


def daves_phone_then_mallorys_laptop(settings: Settings, *, mallorys_tenant: str = TENANT) -> str:
    """A fresh APNs token registered by dave's phone, and a minute later by mallory's laptop
    (of ``mallorys_tenant``): the token."""
    shared = apns_token()
    now = datetime.now(UTC)
    send_tokens(
        settings,
        registered("dave", "phone", ev.PushProvider.APNS, shared, at=now - timedelta(minutes=2)),
        registered(
            "mallory",
            "laptop",
            ev.PushProvider.APNS,
            shared,
            at=now - timedelta(minutes=1),
            tenant=mallorys_tenant,
        ),
    )
    return shared


async def test_another_users_registration_of_a_held_token_is_refused(
    sink_settings: Settings,
    start_sink: Callable[[Settings], Any],
    fake_apns: FakeApns,
) -> None:
    """Push-token takeover within a tenant: mallory registers the token of dave's phone (seen
    in a log, a screenshot, a hostile app). dave keeps getting his pushes; mallory's claim is
    refused (``claim-refused``) and her messages do not land on dave's phone. Before the sink
    starts and while it runs."""
    shared = daves_phone_then_mallorys_laptop(sink_settings)
    running: Running = await start_sink(sink_settings)
    refused = "claim-refused"

    async def one_removed() -> bool:
        return len(removals(await token_events(sink_settings))) >= 1

    await eventually(one_removed, "the claim made before the start refused")
    send_tokens(sink_settings, registered("mallory", "tablet", ev.PushProvider.APNS, shared))

    async def both_refused() -> bool:
        return len(removals(await token_events(sink_settings))) >= 2

    await eventually(both_refused, "the claim made while following refused")
    removed = removals(await token_events(sink_settings))
    assert sorted((r.user_id, r.device_id, r.reason) for r in removed) == [
        ("mallory", "laptop", refused),
        ("mallory", "tablet", refused),
    ]
    assert [t.device_id for t in running.sink.tokens.targets(TENANT, "dave")] == ["phone"]
    assert running.sink.tokens.targets(TENANT, "mallory") == []

    jobs = [job("dave", "conv-9"), job("mallory", "conv-9")]
    send_jobs(sink_settings, *jobs)
    found = {o.user_id: o for o in await outcomes_of(sink_settings, {j.job_id for j in jobs}, 2)}
    assert (found["dave"].outcome, found["dave"].device_id) == ("sent", "phone")
    assert (found["mallory"].outcome, found["mallory"].reason) == ("skipped", "no-device-token")
    assert len(fake_apns.stats.for_token(shared)) == 1


async def test_a_refused_claim_is_challenged_and_the_echo_takes_the_token(
    sink_settings: Settings,
    start_sink: Callable[[Settings], Any],
    fake_apns: FakeApns,
) -> None:
    """dave's phone passed to erin without dave logging out: erin's registration is refused,
    the sink sends the token a silent challenge, the app on the phone (signed in as erin)
    echoes it, and the token moves to erin — dave's pushes stop landing on erin's phone. More
    claims within the interval send no more challenges."""
    proving = with_push(
        sink_settings,
        {**sink_settings.push.model_dump(mode="json"), "token_proof_secret": "test-secret"},
    )
    shared = apns_token()
    send_tokens(
        proving,
        registered(
            "dave", "phone", ev.PushProvider.APNS, shared, at=datetime.now(UTC) - timedelta(days=1)
        ),
    )
    running: Running = await start_sink(proving)
    send_tokens(proving, registered("erin", "phone-e", ev.PushProvider.APNS, shared))
    await eventually(lambda: fake_apns.stats.for_token(shared), "the challenge pushed")
    (challenge,) = fake_apns.stats.for_token(shared)
    assert challenge.headers["apns-push-type"] == "background"
    assert challenge.headers["apns-topic"] == APNS_TOPIC
    assert challenge.payload["aps"] == {"content-available": 1}
    assert challenge.payload["imstream_device_id"] == "phone-e"
    proof = challenge.payload["imstream_token_challenge"]
    # More claims (mallory's, erin's own again) within the interval: no more challenges.
    send_tokens(
        proving,
        registered("mallory", "laptop", ev.PushProvider.APNS, shared),
        registered("erin", "phone-e", ev.PushProvider.APNS, shared),
    )

    async def three_refused() -> bool:
        found = removals(await token_events(proving))
        return sum(r.reason == "claim-refused" for r in found) == 3

    await eventually(three_refused, "three claims refused")
    assert len(fake_apns.stats.for_token(shared)) == 1

    echo = registered("erin", "phone-e", ev.PushProvider.APNS, shared)
    event = ev.parse_event(echo.value or b"")
    assert isinstance(event, ev.PushTokenRegistered)
    proven = event.model_copy(update={"payload": event.payload.model_copy(update={"proof": proof})})
    send_tokens(proving, Outgoing("", echo.key, ev.encode_event(proven)))
    await eventually(
        lambda: [t.device_id for t in running.sink.tokens.targets(TENANT, "erin")] == ["phone-e"],
        "the token moved to erin",
    )
    assert running.sink.tokens.targets(TENANT, "dave") == []
    jobs = [job("dave", "conv-9"), job("erin", "conv-9")]
    send_jobs(proving, *jobs)
    found = {o.user_id: o for o in await outcomes_of(proving, {j.job_id for j in jobs}, 2)}
    assert (found["dave"].outcome, found["dave"].reason) == ("skipped", "no-device-token")
    assert (found["erin"].outcome, found["erin"].device_id) == ("sent", "phone-e")
    moved = [r for r in removals(await token_events(proving)) if r.reason == "moved"]
    assert [(r.user_id, r.device_id) for r in moved] == [("dave", "phone")]


async def test_the_challenges_remembered_are_bounded(
    sink_settings: Settings,
    start_sink: Callable[[Settings], Any],
    fake_apns: FakeApns,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Claims of many tokens each get their challenge, and the sink remembers only the last
    ``CHALLENGES_TRACKED`` (here 2): no claimant grows its memory."""
    monkeypatch.setattr(sink_module, "CHALLENGES_TRACKED", 2)
    proving = with_push(
        sink_settings,
        {**sink_settings.push.model_dump(mode="json"), "token_proof_secret": "test-secret"},
    )
    tokens = [apns_token() for _ in range(5)]
    earlier = datetime.now(UTC) - timedelta(hours=1)
    send_tokens(
        proving,
        *(
            registered(f"owner-{i}", "phone", ev.PushProvider.APNS, token, at=earlier)
            for i, token in enumerate(tokens)
        ),
    )
    running: Running = await start_sink(proving)
    send_tokens(
        proving,
        *(registered("mallory", f"d-{i}", ev.PushProvider.APNS, t) for i, t in enumerate(tokens)),
    )
    await eventually(
        lambda: all(len(fake_apns.stats.for_token(t)) == 1 for t in tokens), "5 challenges"
    )
    assert len(running.sink._challenged) == 2


async def test_a_token_of_another_tenant_is_neither_detached_nor_reached(
    sink_settings: Settings,
    start_sink: Callable[[Settings], Any],
    fake_apns: FakeApns,
) -> None:
    """Push-token takeover across tenants: a user of tenant ``rival`` registers the token of a
    phone of tenant ``acme`` (both on the deployment's one app). acme's device keeps its token
    and its pushes, nothing is written for it, and rival's messages do not reach the phone: the
    claims are refused in rival."""
    shared = daves_phone_then_mallorys_laptop(sink_settings, mallorys_tenant="rival")
    running: Running = await start_sink(sink_settings)
    send_tokens(
        sink_settings,
        registered("mallory", "tablet", ev.PushProvider.APNS, shared, tenant="rival"),
    )

    async def two_removals() -> bool:
        return len(removals(await token_events(sink_settings))) >= 2

    await eventually(two_removals, "both of rival's claims answered")
    removed = removals(await token_events(sink_settings))
    assert sorted((r.user_id, r.device_id, r.reason) for r in removed) == [
        ("mallory", "laptop", "claim-refused"),
        ("mallory", "tablet", "claim-refused"),
    ]
    jobs = [job("dave", "conv-9"), job("mallory", "conv-9", tenant="rival")]
    send_jobs(sink_settings, *jobs)
    found = {o.user_id: o for o in await outcomes_of(sink_settings, {j.job_id for j in jobs}, 2)}
    assert (found["dave"].outcome, found["dave"].device_id) == ("sent", "phone")
    assert (found["mallory"].outcome, found["mallory"].reason) == ("skipped", "no-device-token")
    assert [t.device_id for t in running.sink.tokens.targets(TENANT, "dave")] == ["phone"]
    assert len(fake_apns.stats.for_token(shared)) == 1


async def test_the_apns_topic_and_fcm_project_come_from_the_tenants_settings(
    sink_settings: Settings,
    start_sink: Callable[[Settings], Any],
    fake_apns: FakeApns,
    fake_fcm: FakeFcm,
) -> None:
    """A token record names an app, but only as a choice among its tenant's: ``beta``'s users
    get pushes under beta's bundle id, never under acme's even when their record names it (a
    record written around the ingress, or before the settings changed), and beta's Android
    pushes go through beta's FCM project, not the deployment's."""
    routed = with_push(
        sink_settings,
        {
            **sink_settings.push.model_dump(mode="json"),
            "fcm_project_id": "deployment-project",
            "tenant_apps": {
                TENANT: {"apns_topics": [APNS_TOPIC]},
                "beta": {"apns_topics": [APNS_DEBUG_TOPIC], "fcm_project_id": fake_fcm.project_id},
            },
        },
    )
    foreign, own, android = apns_token(), apns_token(), fcm_token()
    send_tokens(
        routed,
        registered("bea", "iphone", ev.PushProvider.APNS, foreign, tenant="beta"),
        registered(
            "bo", "iphone", ev.PushProvider.APNS, own, tenant="beta", app_id=APNS_DEBUG_TOPIC
        ),
        registered("bo", "pixel", ev.PushProvider.FCM, android, tenant="beta"),
    )
    await start_sink(routed)
    jobs = [job("bea", "conv-1", tenant="beta"), job("bo", "conv-1", tenant="beta")]
    send_jobs(routed, *jobs)

    found = {
        (o.user_id, o.device_id): o for o in await outcomes_of(routed, {j.job_id for j in jobs}, 3)
    }
    assert (found["bea", "iphone"].outcome, found["bea", "iphone"].reason) == (
        "skipped",
        "app-not-configured",
    )
    assert fake_apns.stats.for_token(foreign) == []
    assert found["bo", "iphone"].outcome == "sent"
    (pushed,) = fake_apns.stats.for_token(own)
    assert pushed.headers["apns-topic"] == APNS_DEBUG_TOPIC
    assert found["bo", "pixel"].outcome == "sent"
    assert len(fake_fcm.stats.for_token(android)) == 1


async def test_a_tenant_may_opt_in_to_full_previews(
    sink_settings: Settings,
    start_sink: Callable[[Settings], Any],
    apns_settings: dict[str, Any],
    fake_apns: FakeApns,
) -> None:
    full = with_push(sink_settings, {**apns_settings, "tenant_previews": {"open": "full"}})
    shown, hidden = apns_token(), apns_token()
    send_tokens(
        full,
        registered("olga", "iphone", ev.PushProvider.APNS, shown, tenant="open"),
        registered("hugo", "iphone", ev.PushProvider.APNS, hidden),
    )
    await start_sink(full)
    jobs = [job("olga", "conv-1", tenant="open"), job("hugo", "conv-1")]
    send_jobs(full, *jobs)
    await outcomes_of(full, {j.job_id for j in jobs}, 2)
    (opted_in,) = fake_apns.stats.for_token(shown)
    assert opted_in.payload["aps"]["alert"] == {
        "title": "Message from alice",
        "body": "see you at eight",
    }
    (default,) = fake_apns.stats.for_token(hidden)
    assert default.payload["aps"]["alert"] == {"title": "Message from alice"}


async def test_a_job_that_keeps_failing_goes_to_the_dead_letter_topic_with_its_code(
    sink_settings: Settings,
    start_sink: Callable[[Settings], Any],
    fake_apns: FakeApns,
) -> None:
    broken = apns_token()
    fake_apns.script.set(broken, Reply(500, "InternalServerError"))
    send_tokens(sink_settings, registered("gina", "iphone", ev.PushProvider.APNS, broken))
    running: Running = await start_sink(sink_settings)
    failing = job("gina", "conv-5")
    send_jobs(sink_settings, failing)

    found = await outcomes_of(sink_settings, {failing.job_id}, 3)
    assert [
        (o.attempt, o.outcome, o.status_code) for o in sorted(found, key=lambda o: o.attempt)
    ] == [
        (1, "failed", 500),
        (2, "failed", 500),
        (3, "failed", 500),
    ]
    assert len(fake_apns.stats.for_token(broken)) == 3 == len(found)
    dead_letter_topic = running.catalog.dead_letter_of(running.catalog.push_jobs).name
    (dead,) = await asyncio.to_thread(read_all, sink_settings, dead_letter_topic)
    headers = dict(dead.headers() or [])
    assert headers["imstream.error.code"] == DeadLetterCode.RETRIES_EXHAUSTED.value.encode()
    assert ev.PushJob.model_validate_json(dead.value() or b"") == failing
    assert dead.key() == user_key(TENANT, "gina")


async def test_a_provider_without_credentials_is_skipped_not_dead_lettered(
    sink_settings: Settings,
    start_sink: Callable[[Settings], Any],
    apns_settings: dict[str, Any],
    fake_apns: FakeApns,
) -> None:
    only_apns = with_push(sink_settings, apns_settings)
    iphone, pixel = apns_token(), fcm_token()
    send_tokens(
        only_apns,
        registered("hana", "iphone", ev.PushProvider.APNS, iphone),
        registered("hana", "pixel", ev.PushProvider.FCM, pixel),
    )
    running: Running = await start_sink(only_apns)
    pending = job("hana", "conv-2")
    send_jobs(only_apns, pending)

    found = {o.device_id: o for o in await outcomes_of(only_apns, {pending.job_id}, 2)}
    assert (found["iphone"].outcome, found["iphone"].attempt) == ("sent", 1)
    assert (found["pixel"].outcome, found["pixel"].reason) == ("skipped", "provider-not-configured")
    assert len(fake_apns.stats.for_token(iphone)) == 1
    dead_letter_topic = running.catalog.dead_letter_of(running.catalog.push_jobs).name
    assert end_offsets(only_apns, [dead_letter_topic]) == {(dead_letter_topic, 0): 0}


async def test_the_process_records_skips_without_credentials_and_stops_on_sigterm(
    sink_settings: Settings, tmp_path: Path
) -> None:
    """``imstream run push-sink`` on a developer box with no APNs/FCM credentials: ready, every
    device ``skipped`` (no dead letters), and a clean stop on SIGTERM."""
    ios = registered("ivan", "iphone", ev.PushProvider.APNS, apns_token())
    send_tokens(sink_settings, ios)
    log_path = tmp_path / "push-sink.log"
    environment = {
        **{key: value for key, value in os.environ.items() if not key.startswith("IM_PUSH__")},
        "IM_KAFKA__BOOTSTRAP_SERVERS": sink_settings.kafka.bootstrap_servers,
        "IM_KAFKA__TOPIC_PREFIX": sink_settings.kafka.topic_prefix,
    }
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pipelines",
            "run",
            "push-sink",
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        await eventually(lambda: READY_MESSAGE in log_path.read_text(), "the READY line")
        pending = job("ivan", "conv-3")
        send_jobs(sink_settings, pending)
        (skipped,) = await outcomes_of(sink_settings, {pending.job_id}, 1)
        assert (skipped.device_id, skipped.outcome, skipped.reason) == (
            "iphone",
            "skipped",
            "provider-not-configured",
        )
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), WITHIN)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    output = log_path.read_text()
    assert code == 0, output
    assert "push sink stopped" in output
    catalog = topic_catalog(sink_settings)
    dead_letter_topic = catalog.dead_letter_of(catalog.push_jobs).name
    assert end_offsets(sink_settings, [dead_letter_topic]) == {(dead_letter_topic, 0): 0}
    ends = end_offsets(sink_settings, [catalog.push_jobs.name])
    busy = [tp for tp, end in ends.items() if end > 0]
    group = f"{sink_settings.kafka.topic_prefix}imstream-push-sink"
    assert committed_offsets(sink_settings, group, busy) == {tp: ends[tp] for tp in busy}


def test_quiet_hours_in_a_zone_this_sink_does_not_know_are_ignored_not_fatal() -> None:
    """The ingress checked the zone against its own tz database; a sink with an older one still
    sends the push (with sound) rather than failing the job."""
    unknown = job("kai", "conv-z").model_copy(
        update={
            "quiet_hours": ev.QuietHoursSetting(
                start="22:00", end="07:00", time_zone="Mars/Olympus_Mons"
            ),
            "locale": "fr-CA",
        }
    )
    preferences = _preferences(unknown)
    assert (preferences.quiet_hours, preferences.locale) == (None, "fr-CA")
    known = _preferences(
        unknown.model_copy(update={"quiet_hours": window_around(datetime.now(UTC), "UTC")})
    )
    assert known.quiet_hours is not None
    assert known.quiet_hours.contains(datetime.now(UTC))
