"""What a notification says: preview modes, localised titles, counts, collapse ids."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from core.push_settings import PreviewMode
from schemas.events import CustomBody, MediaBody, PushJob, TextBody
from sinks.push.notification import (
    PREVIEW_MAX_CHARS,
    PushNotification,
    build_notification,
    resolve_locale,
)
from sinks.push.policy import DecisionReason, Delivery, PushDecision
from tests.sinks.push.support import make_job

ALERT = PushDecision(Delivery.ALERT, None, 600)


def from_alice(
    job: PushJob, preview: PreviewMode, conversation_name: str | None = None
) -> PushNotification:
    """``job``'s alert in English, sent by Alice (in ``conversation_name``, for a group)."""
    return build_notification(
        job,
        ALERT,
        preview=preview,
        locale="en",
        sender_name="Alice",
        conversation_name=conversation_name,
    )


def test_full_preview_shows_sender_and_text() -> None:
    job = make_job(body=TextBody(text="Lunch at noon?"), unread_total=5, conversation_seq=42)
    notification = from_alice(job, PreviewMode.FULL)
    assert notification.title == "Message from Alice"
    assert notification.body == "Lunch at noon?"
    assert notification.badge == 5
    assert notification.collapse_id == job.conversation_id
    assert notification.thread_id == job.conversation_id
    assert notification.ttl_seconds == 600
    assert not notification.quiet
    assert notification.data() == {
        "conversation_id": job.conversation_id,
        "conversation_seq": "42",
        "message_id": job.message_id,
    }


def test_sender_preview_hides_the_text() -> None:
    notification = from_alice(make_job(body=TextBody(text="secret")), PreviewMode.SENDER)
    assert notification.title == "Message from Alice"
    assert notification.body is None


def test_no_preview_hides_sender_text_and_group() -> None:
    notification = from_alice(
        make_job(body=TextBody(text="secret"), merged_count=3), PreviewMode.NONE, "Project X"
    )
    assert notification.title == "3 new messages"
    assert notification.body is None
    assert "Alice" not in notification.title
    assert "Project X" not in notification.title


def test_group_title_names_the_conversation_and_counts() -> None:
    one = from_alice(make_job(), PreviewMode.FULL, "Team")
    several = from_alice(make_job(merged_count=4), PreviewMode.FULL, "Team")
    assert one.title == "Alice in Team"
    assert several.title == "4 messages from Alice in Team"


@pytest.mark.parametrize(
    ("locale", "title"),
    [
        ("de", "Nachricht von Alice"),
        ("de-AT", "Nachricht von Alice"),
        ("de_CH.UTF-8", "Nachricht von Alice"),
        ("fr-CA", "Message de Alice"),
        ("ja-JP", "Message from Alice"),  # no Japanese templates: English
        ("", "Message from Alice"),
        (None, "Message from Alice"),
    ],
)
def test_title_is_localised_with_english_fallback(locale: str | None, title: str) -> None:
    notification = build_notification(
        make_job(), ALERT, preview=PreviewMode.SENDER, locale=locale, sender_name="Alice"
    )
    assert notification.title == title


def test_localised_generic_title_and_media_preview() -> None:
    photo = MediaBody(url="https://cdn.example.com/p.jpg", mime="image/jpeg", size_bytes=10)
    generic = build_notification(
        make_job(merged_count=2), ALERT, preview=PreviewMode.NONE, locale="de"
    )
    media = build_notification(
        make_job(body=photo), ALERT, preview=PreviewMode.FULL, locale="fr", sender_name="Zoé"
    )
    assert generic.title == "2 neue Nachrichten"
    assert media.title == "Message de Zoé"
    assert media.body == "Photo"
    assert resolve_locale("DE") == "de"


def test_long_text_is_cut_and_custom_or_missing_bodies_show_nothing() -> None:
    long_text = build_notification(
        make_job(body=TextBody(text="x" * 1000)), ALERT, preview=PreviewMode.FULL, locale="en"
    )
    custom = build_notification(
        make_job(body=CustomBody(kind="location", data={"lat": 1.0})),
        ALERT,
        preview=PreviewMode.FULL,
        locale="en",
    )
    assert long_text.body is not None
    assert len(long_text.body) == PREVIEW_MAX_CHARS
    assert long_text.body.endswith("…")
    assert custom.body is None
    assert custom.title == "Message from alice"  # no display name: the sender's id


def test_quiet_decision_makes_a_quiet_notification() -> None:
    quiet = PushDecision(Delivery.QUIET, DecisionReason.QUIET_HOURS, 100)
    notification = build_notification(make_job(), quiet, preview=PreviewMode.FULL, locale="en")
    assert notification.quiet


def test_a_skip_decision_builds_nothing() -> None:
    skip = PushDecision(Delivery.SKIP, DecisionReason.USER_MUTED, 100)
    with pytest.raises(ValueError, match="not to send"):
        build_notification(make_job(), skip, preview=PreviewMode.FULL, locale="en")


def test_job_without_body_in_full_mode_has_title_only() -> None:
    job = make_job().model_copy(update={"body": None, "occurred_at": datetime.now(UTC)})
    notification = build_notification(job, ALERT, preview=PreviewMode.FULL, locale="en")
    assert notification.body is None
    assert notification.title == "Message from alice"
