"""The settings group wires both senders to their endpoints: here, the fakes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.push_settings import PreviewMode, PushProviderSettings
from schemas.events import PushProvider
from sinks.push.apns import ApnsSender
from sinks.push.fcm import FcmSender
from sinks.push.reliability import PushDispatcher, build_senders
from tests.sinks.push.fakes.apns import FakeApns
from tests.sinks.push.fakes.fcm import FakeFcm
from tests.sinks.push.support import apns_target, fcm_target, make_notification


async def test_dispatcher_from_settings_delivers_through_both_fakes(
    fake_apns: FakeApns,
    fake_fcm: FakeFcm,
    apns_settings: dict[str, Any],
    fcm_settings: dict[str, Any],
) -> None:
    settings = PushProviderSettings.model_validate(
        {
            **apns_settings,
            **fcm_settings,
            "fcm_channel_id": "direct-messages",
            "concurrency": 2,
            "request_timeout_seconds": 2,
        }
    )
    dispatcher = PushDispatcher.from_settings(settings)
    try:
        apns = await dispatcher.deliver(make_notification(), apns_target())
        fcm = await dispatcher.deliver(make_notification(), fcm_target())
    finally:
        await dispatcher.close()

    assert dispatcher.providers == {PushProvider.APNS, PushProvider.FCM}
    assert apns.delivered
    assert fcm.delivered
    assert fake_apns.stats.accepted == 1
    assert fake_fcm.stats.accepted == 1
    android = fake_fcm.stats.received[0].payload["message"]["android"]
    assert android["notification"]["channel_id"] == "direct-messages"


def test_only_configured_providers_get_a_sender(fcm_credentials: Path) -> None:
    assert build_senders(PushProviderSettings()) == {}
    senders = build_senders(PushProviderSettings(fcm_credentials_path=fcm_credentials))
    assert set(senders) == {PushProvider.FCM}
    assert isinstance(senders[PushProvider.FCM], FcmSender)
    assert not any(isinstance(sender, ApnsSender) for sender in senders.values())


def test_preview_mode_per_tenant_with_a_default() -> None:
    settings = PushProviderSettings.model_validate(
        {"default_preview": "sender", "tenant_previews": {"bank": "none"}}
    )
    assert settings.preview_for("bank") is PreviewMode.NONE
    assert settings.preview_for("acme") is PreviewMode.SENDER


def test_a_tokens_app_is_one_of_its_tenants_never_another() -> None:
    settings = PushProviderSettings.model_validate(
        {
            "apns_topic": "com.example.chat",
            "tenant_apps": {
                "acme": {
                    "apns_topics": ["com.acme.chat", "com.acme.chat.beta"],
                    "fcm_app_ids": ["1:1:android:a"],
                    "fcm_project_id": "acme-chat",
                },
                "bare": {},
            },
        }
    )
    acme = settings.apps_for("acme")
    assert acme.resolve(PushProvider.APNS, None) == "com.acme.chat"
    assert acme.resolve(PushProvider.APNS, "com.acme.chat.beta") == "com.acme.chat.beta"
    assert acme.resolve(PushProvider.APNS, "com.example.chat") is None
    assert acme.resolve(PushProvider.FCM, None) == "1:1:android:a"
    assert acme.resolve(PushProvider.FCM, "1:2:android:b") is None
    assert acme.fcm_project_id == "acme-chat"
    # Not listed: the deployment's app. Listed with none: none (its own apps replace the default).
    other = settings.apps_for("other")
    assert other.resolve(PushProvider.APNS, None) == "com.example.chat"
    assert other.resolve(PushProvider.APNS, "com.acme.chat") is None
    assert settings.apps_for("bare").resolve(PushProvider.APNS, None) is None
    # FCM addresses a project: with no FCM app ids listed, the app id selects nothing.
    assert other.resolve(PushProvider.FCM, "anything") == "anything"


def test_the_default_preview_shows_who_wrote_not_what() -> None:
    assert PushProviderSettings().preview_for("acme") is PreviewMode.SENDER
