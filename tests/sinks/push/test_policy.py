"""The delivery decision: mutes, quiet hours in the user's time zone, staleness."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import pytest

from sinks.push.policy import (
    DecisionReason,
    Delivery,
    Mute,
    QuietHours,
    RecipientPreferences,
    decide,
)
from tests.sinks.push.support import make_job

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
TTL = 3600


def test_no_preferences_alert() -> None:
    decision = decide(make_job(occurred_at=NOW), RecipientPreferences(), now=NOW, ttl_seconds=TTL)
    assert decision.delivery is Delivery.ALERT
    assert decision.send
    assert decision.ttl_seconds == TTL


def test_user_mute_skips_until_it_ends() -> None:
    job = make_job(occurred_at=NOW)
    muted = RecipientPreferences(user_mute=Mute(until=NOW + timedelta(minutes=5)))
    decision = decide(job, muted, now=NOW, ttl_seconds=TTL)
    assert decision.delivery is Delivery.SKIP
    assert decision.reason is DecisionReason.USER_MUTED
    assert not decision.send
    later = decide(job, muted, now=NOW + timedelta(minutes=5), ttl_seconds=TTL)
    assert later.delivery is Delivery.ALERT


def test_conversation_mute_without_end_skips() -> None:
    decision = decide(
        make_job(occurred_at=NOW),
        RecipientPreferences(conversation_mute=Mute()),
        now=NOW + timedelta(days=365),
        ttl_seconds=10 * 365 * 86400,
    )
    assert decision.delivery is Delivery.SKIP
    assert decision.reason is DecisionReason.CONVERSATION_MUTED


def test_ended_conversation_mute_alerts() -> None:
    preferences = RecipientPreferences(conversation_mute=Mute(until=NOW - timedelta(seconds=1)))
    decision = decide(make_job(occurred_at=NOW), preferences, now=NOW, ttl_seconds=TTL)
    assert decision.delivery is Delivery.ALERT


def test_job_older_than_ttl_is_skipped_and_remaining_ttl_shrinks() -> None:
    job = make_job(occurred_at=NOW - timedelta(seconds=600))
    fresh = decide(job, RecipientPreferences(), now=NOW, ttl_seconds=TTL)
    assert fresh.ttl_seconds == TTL - 600
    stale = decide(job, RecipientPreferences(), now=NOW, ttl_seconds=600)
    assert stale.delivery is Delivery.SKIP
    assert stale.reason is DecisionReason.EXPIRED


NIGHT = QuietHours(start=time(22, 0), end=time(7, 0), time_zone="Europe/Berlin")


@pytest.mark.parametrize(
    ("utc_time", "quiet"),
    [
        # Berlin is UTC+1 in January: 22:00 local is 21:00 UTC, 07:00 local is 06:00 UTC.
        (datetime(2026, 1, 15, 20, 59, tzinfo=UTC), False),
        (datetime(2026, 1, 15, 21, 0, tzinfo=UTC), True),
        (datetime(2026, 1, 15, 23, 30, tzinfo=UTC), True),  # 00:30 local, after midnight
        (datetime(2026, 1, 16, 5, 59, tzinfo=UTC), True),
        (datetime(2026, 1, 16, 6, 0, tzinfo=UTC), False),
        # In July Berlin is UTC+2: the same local window is an hour earlier in UTC.
        (datetime(2026, 7, 15, 20, 0, tzinfo=UTC), True),
        (datetime(2026, 7, 16, 5, 0, tzinfo=UTC), False),
    ],
)
def test_quiet_hours_wrap_midnight_in_the_users_zone(utc_time: datetime, quiet: bool) -> None:
    assert NIGHT.contains(utc_time) is quiet
    decision = decide(
        make_job(occurred_at=utc_time),
        RecipientPreferences(quiet_hours=NIGHT),
        now=utc_time,
        ttl_seconds=TTL,
    )
    assert decision.delivery is (Delivery.QUIET if quiet else Delivery.ALERT)
    assert decision.send


def test_same_instant_is_quiet_in_one_zone_and_not_another() -> None:
    instant = datetime(2026, 1, 15, 14, 0, tzinfo=UTC)  # 23:00 in Tokyo, 09:00 in New York
    tokyo = QuietHours(start=time(22, 0), end=time(7, 0), time_zone="Asia/Tokyo")
    new_york = QuietHours(start=time(22, 0), end=time(7, 0), time_zone="America/New_York")
    assert tokyo.contains(instant)
    assert not new_york.contains(instant)


def test_daytime_window_does_not_wrap() -> None:
    siesta = QuietHours(start=time(13, 0), end=time(15, 0), time_zone="Europe/Madrid")
    assert siesta.contains(datetime(2026, 1, 15, 13, 30, tzinfo=UTC))  # 14:30 local
    assert not siesta.contains(datetime(2026, 1, 15, 23, 30, tzinfo=UTC))


def test_empty_window_is_never_quiet() -> None:
    empty = QuietHours(start=time(8, 0), end=time(8, 0), time_zone="UTC")
    assert not empty.contains(datetime(2026, 1, 15, 8, 0, tzinfo=UTC))


def test_mute_wins_over_quiet_hours() -> None:
    preferences = RecipientPreferences(user_mute=Mute(), quiet_hours=NIGHT)
    night = datetime(2026, 1, 15, 23, 0, tzinfo=UTC)
    decision = decide(make_job(occurred_at=night), preferences, now=night, ttl_seconds=TTL)
    assert decision.reason is DecisionReason.USER_MUTED


def test_unknown_time_zone_is_refused_when_loaded() -> None:
    with pytest.raises(ValueError, match="unknown time zone"):
        QuietHours(start=time(22, 0), end=time(7, 0), time_zone="Mars/Olympus_Mons")


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        decide(make_job(), RecipientPreferences(), now=datetime(2026, 1, 1), ttl_seconds=TTL)
