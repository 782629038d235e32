"""The FCM sender against the fake FCM (v1 API, OAuth token endpoint faked too)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from core.push_settings import PushProviderSettings
from schemas.events import PushProvider
from sinks.push.errors import LocalReason, PushConfigError
from sinks.push.fcm import FcmSender
from sinks.push.notification import PushNotification
from sinks.push.outcome import OutcomeKind
from tests.sinks.push.fakes.fcm import FakeFcm
from tests.sinks.push.fakes.script import Reply
from tests.sinks.push.support import (
    fcm_target,
    make_dispatcher,
    make_job,
    make_notification,
    quiet_now_notification,
    send_once,
)


async def test_sent_with_collapse_key_channel_and_sync_data(
    fcm_sender: FcmSender, fake_fcm: FakeFcm
) -> None:
    job = make_job(conversation_id="conv-7", conversation_seq=1234, unread_total=4)
    notification = make_notification(job, ttl_seconds=600)
    target = fcm_target()

    reply = await fcm_sender.send(notification, target)

    assert reply.kind is OutcomeKind.SENT
    assert reply.provider_message_id is not None
    assert reply.provider_message_id.startswith("projects/imstream-test/messages/")
    (received,) = fake_fcm.stats.received
    message = received.payload["message"]
    assert message["token"] == target.token
    assert message["data"] == {
        "conversation_id": "conv-7",
        "conversation_seq": "1234",
        "message_id": job.message_id,
    }
    android = message["android"]
    assert android["collapse_key"] == "conv-7"
    assert android["priority"] == "HIGH"
    assert 595 <= int(android["ttl"].removesuffix("s")) <= 600
    assert android["notification"]["channel_id"] == "chat-messages"
    assert android["notification"]["tag"] == "conv-7"
    assert android["notification"]["notification_count"] == 4
    assert message["notification"] == {"title": "Message from Alice", "body": "hello there"}
    assert received.headers["authorization"].startswith("Bearer ya29.fake-")
    assert fake_fcm.token_requests == 1
    assert fake_fcm.stats.accepted == 1


async def test_access_token_is_fetched_once_per_thread_and_reused(
    fake_fcm: FakeFcm, fcm_credentials: Path
) -> None:
    # pyfcm keeps a session and an access token per thread: one thread, one token.
    sender = FcmSender(credentials_path=fcm_credentials, endpoint=fake_fcm.endpoint, concurrency=1)
    try:
        for _ in range(5):
            reply = await sender.send(make_notification(), fcm_target())
            assert reply.kind is OutcomeKind.SENT
    finally:
        await sender.close()
    assert fake_fcm.token_requests == 1
    assert fake_fcm.stats.accepted == 5


async def test_quiet_hours_send_at_normal_priority_without_sound(
    fcm_sender: FcmSender, fake_fcm: FakeFcm
) -> None:
    notification = quiet_now_notification()

    assert (await fcm_sender.send(notification, fcm_target())).kind is OutcomeKind.SENT

    android = fake_fcm.stats.received[0].payload["message"]["android"]
    assert android["priority"] == "NORMAL"
    assert android["notification"]["notification_priority"] == "PRIORITY_LOW"
    assert "default_sound" not in android["notification"]


@pytest.mark.parametrize(
    ("scripted", "reason"),
    [
        (Reply(404, "UNREGISTERED"), "UNREGISTERED"),
        (Reply(400, "INVALID_ARGUMENT"), "INVALID_ARGUMENT"),  # names message.token
    ],
)
async def test_unregistered_or_invalid_token_is_an_invalid_token(
    fcm_sender: FcmSender, fake_fcm: FakeFcm, scripted: Reply, reason: str
) -> None:
    dispatcher = make_dispatcher({PushProvider.FCM: fcm_sender})
    target = fcm_target()
    fake_fcm.script.set(target.token, scripted)

    report = await dispatcher.deliver(make_notification(), target)

    assert len(report.outcomes) == 1
    assert report.final.kind is OutcomeKind.INVALID_TOKEN
    assert report.final.reason == reason
    assert report.final.status_code == scripted.status
    assert report.token_removed
    assert report.dead_letter_code is None
    assert fake_fcm.stats.rejected == {reason: 1}


async def test_invalid_argument_about_the_payload_keeps_the_token(
    fcm_sender: FcmSender, fake_fcm: FakeFcm
) -> None:
    dispatcher = make_dispatcher({PushProvider.FCM: fcm_sender})
    target = fcm_target()
    fake_fcm.script.set(target.token, Reply(400, "INVALID_ARGUMENT", field="message.android.ttl"))

    report = await dispatcher.deliver(make_notification(), target)

    assert len(report.outcomes) == 1
    assert report.final.kind is OutcomeKind.FAILED
    assert not report.token_removed
    assert report.dead_letter_code == "push-rejected"


def other_projects_sender(fake_fcm: FakeFcm, credentials: Path) -> FcmSender:
    """A sender configured for a project that is not the fake's (nor the credentials')."""
    return FcmSender(
        credentials_path=credentials,
        project_id="someone-elses-project",
        endpoint=fake_fcm.endpoint,
        concurrency=1,
    )


async def test_explicit_project_id_is_used_in_the_url(
    fake_fcm: FakeFcm, fcm_credentials: Path
) -> None:
    sender = other_projects_sender(fake_fcm, fcm_credentials)
    reply = await send_once(sender, fcm_target())
    assert sender.send_url == f"{fake_fcm.endpoint}/someone-elses-project/messages:send"
    assert reply.kind is OutcomeKind.FAILED
    assert reply.reason == "SENDER_ID_MISMATCH"
    assert not reply.retryable


async def test_refused_access_token_is_an_auth_error(
    fake_fcm: FakeFcm, fcm_credentials: Path
) -> None:
    fake_fcm.client_email = "someone-else@example.com"  # the assertion's issuer no longer fits
    sender = FcmSender(credentials_path=fcm_credentials, endpoint=fake_fcm.endpoint, concurrency=1)
    reply = await send_once(sender, fcm_target())
    assert reply.kind is OutcomeKind.FAILED
    assert reply.reason == LocalReason.AUTH_ERROR
    assert not reply.retryable
    assert fake_fcm.tokens_refused == 1
    assert fake_fcm.stats.received == []


def test_from_settings_explains_what_is_missing(tmp_path: Path, fcm_credentials: Path) -> None:
    settings = PushProviderSettings(fcm_credentials_path=fcm_credentials)
    assert isinstance(FcmSender.from_settings(settings), FcmSender)
    with pytest.raises(PushConfigError, match="IM_PUSH__FCM_CREDENTIALS_PATH"):
        FcmSender.from_settings(PushProviderSettings())
    not_an_account = tmp_path / "user.json"
    not_an_account.write_text('{"type": "authorized_user"}')
    with pytest.raises(PushConfigError, match="service_account"):
        FcmSender.from_settings(
            settings.model_copy(update={"fcm_credentials_path": not_an_account})
        )
    without_project = tmp_path / "no-project.json"
    without_project.write_text('{"type": "service_account"}')
    with pytest.raises(PushConfigError, match="IM_PUSH__FCM_PROJECT_ID"):
        FcmSender.from_settings(
            settings.model_copy(update={"fcm_credentials_path": without_project})
        )


async def test_a_tenants_project_replaces_the_senders_own(
    fake_fcm: FakeFcm, fcm_credentials: Path
) -> None:
    """The target's project (its tenant's, from the settings) is the one the push goes to."""
    sender = other_projects_sender(fake_fcm, fcm_credentials)
    reply = await send_once(sender, replace(fcm_target(), project_id=fake_fcm.project_id))
    assert reply.kind is OutcomeKind.SENT


async def test_a_token_challenge_is_a_data_only_message(
    fcm_sender: FcmSender, fake_fcm: FakeFcm
) -> None:
    challenge = PushNotification.token_challenge("claim-1", "1764230400.mac", "phone-e", 600)
    target = fcm_target()
    reply = await fcm_sender.send(challenge, target)
    assert reply.kind is OutcomeKind.SENT
    (received,) = fake_fcm.stats.received
    message = received.payload["message"]
    assert "notification" not in message
    assert "notification" not in message["android"]
    assert message["data"] == {
        "imstream_token_challenge": "1764230400.mac",
        "imstream_device_id": "phone-e",
    }
