"""The APNs sender against the fake APNs (HTTP/2, TLS with the test CA, JWT checked)."""

from __future__ import annotations

import asyncio
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from core.push_settings import ApnsEnvironment, PushProviderSettings
from schemas.events import PushProvider
from sinks.push.apns import ApnsSender
from sinks.push.errors import LocalReason, PushConfigError
from sinks.push.notification import PushTarget
from sinks.push.outcome import OutcomeKind
from tests.sinks.push.fakes.apns import FakeApns
from tests.sinks.push.fakes.script import Reply
from tests.sinks.push.fakes.tls import LocalPki
from tests.sinks.push.support import (
    APNS_DEBUG_TOPIC,
    APNS_TOPIC,
    ApnsKey,
    apns_target,
    make_dispatcher,
    make_job,
    make_notification,
    quiet_now_notification,
    send_once,
)


async def test_sent_with_collapse_thread_badge_type_priority_and_expiry(
    apns_sender: ApnsSender, fake_apns: FakeApns
) -> None:
    job = make_job(conversation_id="conv-42", conversation_seq=9, unread_total=12)
    notification = make_notification(job, ttl_seconds=900)
    target = apns_target()
    before = int(time.time())

    reply = await apns_sender.send(notification, target)

    assert reply.kind is OutcomeKind.SENT
    assert reply.status_code == 200
    (received,) = fake_apns.stats.received
    assert received.token == target.token
    headers = received.headers
    assert headers["apns-collapse-id"] == "conv-42"
    assert headers["apns-push-type"] == "alert"
    assert headers["apns-priority"] == "10"
    assert headers["apns-topic"] == APNS_TOPIC
    assert before + 895 <= int(headers["apns-expiration"]) <= int(time.time()) + 900
    assert headers["apns-id"] == reply.provider_message_id
    aps = received.payload["aps"]
    assert aps["thread-id"] == "conv-42"
    assert aps["badge"] == 12
    assert aps["alert"] == {"title": "Message from Alice", "body": "hello there"}
    assert aps["sound"] == "default"
    assert received.payload["conversation_id"] == "conv-42"
    assert received.payload["conversation_seq"] == "9"
    assert fake_apns.stats.accepted == 1
    assert fake_apns.alpn_protocols == ["h2"]


async def test_quiet_hours_send_at_priority_5_passive_and_silent(
    apns_sender: ApnsSender, fake_apns: FakeApns
) -> None:
    notification = quiet_now_notification()
    assert notification.quiet

    reply = await apns_sender.send(notification, apns_target())

    assert reply.kind is OutcomeKind.SENT
    (received,) = fake_apns.stats.received
    assert received.headers["apns-priority"] == "5"
    assert received.payload["aps"]["interruption-level"] == "passive"
    assert "sound" not in received.payload["aps"]


async def test_410_is_an_invalid_token_with_its_timestamp(
    apns_sender: ApnsSender, fake_apns: FakeApns
) -> None:
    target = apns_target()
    fake_apns.script.set(target.token, Reply(410, "Unregistered", timestamp_ms=1_700_000_000_000))

    reply = await apns_sender.send(make_notification(), target)

    assert reply.kind is OutcomeKind.INVALID_TOKEN
    assert reply.status_code == 410
    assert reply.reason == "Unregistered"
    assert reply.token_invalid_since == datetime.fromtimestamp(1_700_000_000, UTC)
    assert not reply.retryable
    assert fake_apns.stats.rejected == {"Unregistered": 1}


async def test_bad_device_token_is_an_invalid_token(
    apns_sender: ApnsSender, fake_apns: FakeApns
) -> None:
    dispatcher = make_dispatcher({PushProvider.APNS: apns_sender})
    # Not hexadecimal: the fake, like APNs, refuses the token itself.
    target = apns_target(token="not-a-device-token")

    report = await dispatcher.deliver(make_notification(), target)

    assert len(report.outcomes) == 1  # never retried
    final = report.final
    assert final.kind is OutcomeKind.INVALID_TOKEN
    assert final.reason == "BadDeviceToken"
    assert final.status_code == 400
    assert final.token_removed
    assert final.final
    assert final.dead_letter_code is None
    assert fake_apns.stats.rejected == {"BadDeviceToken": 1}


async def test_other_4xx_fails_without_retry_or_token_removal(
    apns_sender: ApnsSender, fake_apns: FakeApns
) -> None:
    dispatcher = make_dispatcher({PushProvider.APNS: apns_sender})
    target = apns_target()
    fake_apns.script.set(target.token, Reply(400, "DeviceTokenNotForTopic"))

    report = await dispatcher.deliver(make_notification(), target)

    assert [o.reason for o in report.outcomes] == ["DeviceTokenNotForTopic"]
    assert report.final.kind is OutcomeKind.FAILED
    assert not report.final.token_removed
    assert report.dead_letter_code == "push-rejected"
    assert len(fake_apns.stats.received) == 1


async def test_wrong_signing_key_is_refused_by_the_fake(
    fake_apns: FakeApns, apns_key: ApnsKey, pki: LocalPki
) -> None:
    other = ApnsKey(
        pem=_new_p8(),
        key_id=apns_key.key_id,
        team_id=apns_key.team_id,
        public_key=apns_key.public_key,
    )
    reply = await send_once(_sender(fake_apns, other, pki), apns_target())
    assert reply.kind is OutcomeKind.FAILED
    assert reply.reason == "InvalidProviderToken"
    assert reply.status_code == 403
    assert not reply.retryable


async def test_unknown_ca_is_a_connection_error(fake_apns: FakeApns, apns_key: ApnsKey) -> None:
    sender = ApnsSender(
        **apns_key.credentials(),
        host=fake_apns.address,
        ca_file=None,  # the system's CAs do not know the test CA
    )
    reply = await send_once(sender, apns_target())
    assert reply.kind is OutcomeKind.FAILED
    assert reply.reason == LocalReason.CONNECTION_ERROR
    assert reply.retryable
    assert fake_apns.stats.received == []


async def test_nothing_listening_is_a_retryable_connection_error(
    apns_key: ApnsKey, pki: LocalPki
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    sender = ApnsSender(
        **apns_key.credentials(),
        host=f"127.0.0.1:{free_port}",
        ca_file=pki.ca_file,
    )
    try:
        started = time.monotonic()
        reply = await sender.send(make_notification(), apns_target())
        elapsed = time.monotonic() - started
    finally:
        await sender.close()
    assert reply.reason == LocalReason.CONNECTION_ERROR
    assert reply.provider_unhealthy
    assert elapsed < 0.5  # one attempt, none of aioapns's own sleeping retries


async def test_timed_out_request_is_reset_and_the_connection_stays_usable(
    apns_sender: ApnsSender, fake_apns: FakeApns
) -> None:
    dispatcher = make_dispatcher(
        {PushProvider.APNS: apns_sender}, max_attempts=1, request_timeout_seconds=0.2
    )
    slow, fast = apns_target(), apns_target()
    fake_apns.script.set(slow.token, Reply(delay=0.5))

    timed_out = await dispatcher.deliver(make_notification(), slow)
    await asyncio.sleep(0.5)  # past the moment the slow answer would have come
    after = await dispatcher.deliver(make_notification(), fast)

    assert timed_out.final.reason == LocalReason.TIMEOUT
    assert timed_out.final.latency_ms < 500
    assert timed_out.dead_letter_code == "push-retries-exhausted"
    assert after.delivered
    assert fake_apns.connections_accepted == 1  # the late answer did not break the connection
    assert fake_apns.stats.abandoned == 1  # the client reset the stream


async def test_large_error_bodies_do_not_stall_the_connection(
    apns_sender: ApnsSender, fake_apns: FakeApns
) -> None:
    # Three 40 KB answers exceed HTTP/2's initial 64 KiB window: unless the client returns
    # what it read to the window, the second answer stalls.
    dispatcher = make_dispatcher(
        {PushProvider.APNS: apns_sender}, max_attempts=1, request_timeout_seconds=2.0
    )
    target = apns_target()
    fake_apns.script.set(target.token, Reply(400, "BadExpirationDate", padding=40_000))

    reports = [await dispatcher.deliver(make_notification(), target) for _ in range(3)]
    fresh = await dispatcher.deliver(make_notification(), apns_target())

    assert [report.final.reason for report in reports] == ["BadExpirationDate"] * 3
    assert fresh.delivered
    assert fake_apns.connections_accepted == 1


async def test_error_without_body_still_completes(
    apns_sender: ApnsSender, fake_apns: FakeApns
) -> None:
    dispatcher = make_dispatcher({PushProvider.APNS: apns_sender}, request_timeout_seconds=2.0)
    target = apns_target()
    fake_apns.script.set(target.token, Reply(502, body=False), Reply())

    report = await dispatcher.deliver(make_notification(), target)

    bare, sent = report.outcomes
    assert (bare.kind, bare.status_code, bare.reason) == (OutcomeKind.FAILED, 502, "http-502")
    assert bare.latency_ms < 1000  # answered at the end of its stream, not at the timeout
    assert sent.delivered


async def test_each_app_uses_its_apns_environment(
    fake_apns: FakeApns, apns_key: ApnsKey, pki: LocalPki
) -> None:
    sender = ApnsSender(
        **apns_key.credentials(),
        use_sandbox=False,
        app_environments={APNS_DEBUG_TOPIC: ApnsEnvironment.SANDBOX},
        host=fake_apns.address,
        ca_file=pki.ca_file,
    )
    production = apns_target()
    debug = PushTarget("iphone-debug", PushProvider.APNS, production.token, APNS_DEBUG_TOPIC)
    try:
        replies = [await sender.send(make_notification(), t) for t in (production, debug)]
    finally:
        await sender.close()
    assert sender.environment_of(APNS_TOPIC) is ApnsEnvironment.PRODUCTION
    assert sender.environment_of(APNS_DEBUG_TOPIC) is ApnsEnvironment.SANDBOX
    assert all(reply.kind is OutcomeKind.SENT for reply in replies)
    assert [r.headers["apns-topic"] for r in fake_apns.stats.received] == [
        APNS_TOPIC,
        APNS_DEBUG_TOPIC,
    ]
    assert fake_apns.connections_accepted == 2  # one connection pool per environment


def test_from_settings_reads_the_key_and_explains_what_is_missing(
    tmp_path: Path, apns_key: ApnsKey
) -> None:
    key_path = tmp_path / "AuthKey.p8"
    key_path.write_text(apns_key.pem)
    settings = PushProviderSettings(
        apns_key_path=key_path,
        apns_key_id=apns_key.key_id,
        apns_team_id=apns_key.team_id,
        apns_host="127.0.0.1:8443",
    )
    assert isinstance(ApnsSender.from_settings(settings), ApnsSender)
    with pytest.raises(PushConfigError, match="IM_PUSH__APNS_KEY_PATH"):
        ApnsSender.from_settings(PushProviderSettings())
    with pytest.raises(PushConfigError, match="cannot read the APNs key"):
        ApnsSender.from_settings(settings.model_copy(update={"apns_key_path": tmp_path / "no"}))
    with pytest.raises(PushConfigError, match="host:port"):
        ApnsSender.from_settings(settings.model_copy(update={"apns_host": "127.0.0.1"}))
    key_path.write_text("not a key")
    with pytest.raises(PushConfigError, match=r"\.p8"):
        ApnsSender.from_settings(settings)


def _sender(fake: FakeApns, key: ApnsKey, pki: LocalPki) -> ApnsSender:
    return ApnsSender(
        **key.credentials(),
        host=fake.address,
        ca_file=pki.ca_file,
    )


def _new_p8() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
