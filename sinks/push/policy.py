"""Whether and how a push job reaches a user: mutes, quiet hours and staleness.

:func:`decide` is a pure function of the job, the recipient's preferences and the time: the
caller loads the preferences (the conversation's mute from the user's conversation list, the
user's mute and quiet hours from the profile) and passes ``now``, so every rule is testable on
its own.

- A muted user or conversation (a mute with no end, or one that has not ended yet) gets nothing.
- A job older than the notification TTL gets nothing: a replayed backlog must not buzz phones
  for messages long read elsewhere, and the providers would drop it after the TTL anyway.
- Inside the user's quiet hours (local wall-clock time in the user's IANA time zone, a window
  that may wrap midnight) the push still goes out, quietly: no sound, APNs priority 5 and the
  passive interruption level, FCM normal priority — the notification and the badge are there in
  the morning, nothing wakes the user.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time
from enum import StrEnum
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from schemas.events import PushJob


@dataclass(frozen=True, slots=True)
class Mute:
    """A mute; ``until`` None means until the user unmutes."""

    until: datetime | None = None

    def active_at(self, now: datetime) -> bool:
        return self.until is None or now < self.until


@dataclass(frozen=True, slots=True)
class QuietHours:
    """A daily window of local wall-clock time, ``start`` included, ``end`` excluded. A window
    whose end is not after its start wraps midnight (22:00 to 07:00); ``start == end`` is empty.
    Wall-clock time is what the user set, so the window follows daylight-saving changes."""

    start: time
    end: time
    time_zone: str
    """An IANA time zone name, e.g. ``Europe/Berlin``."""

    def __post_init__(self) -> None:
        if self.start.tzinfo is not None or self.end.tzinfo is not None:
            raise ValueError("quiet hours are local wall-clock times: give them without tzinfo")
        try:
            ZoneInfo(self.time_zone)
        except (ZoneInfoNotFoundError, ValueError) as error:
            raise ValueError(f"unknown time zone {self.time_zone!r}") from error

    def contains(self, now: datetime) -> bool:
        local = now.astimezone(ZoneInfo(self.time_zone)).time().replace(tzinfo=None)
        if self.start == self.end:
            return False
        if self.start < self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end


@dataclass(frozen=True, slots=True)
class RecipientPreferences:
    """What the recipient chose, as far as this job is concerned."""

    user_mute: Mute | None = None
    conversation_mute: Mute | None = None
    """The mute of the job's conversation."""
    quiet_hours: QuietHours | None = None
    locale: str = "en"
    """A BCP 47 tag (``de-AT``) or POSIX locale (``de_AT``); it picks the title template."""


class Delivery(StrEnum):
    ALERT = "alert"
    QUIET = "quiet"
    """Delivered without sound or wake-up: the user is in quiet hours."""
    SKIP = "skip"


class DecisionReason(StrEnum):
    USER_MUTED = "user-muted"
    CONVERSATION_MUTED = "conversation-muted"
    EXPIRED = "expired"
    QUIET_HOURS = "quiet-hours"


@dataclass(frozen=True, slots=True)
class PushDecision:
    delivery: Delivery
    reason: DecisionReason | None
    ttl_seconds: int
    """How much longer the push is worth delivering (what the provider is told to keep it)."""

    @property
    def send(self) -> bool:
        return self.delivery is not Delivery.SKIP


def decide(
    job: PushJob, preferences: RecipientPreferences, *, now: datetime, ttl_seconds: int
) -> PushDecision:
    """Whether to push ``job`` to its user at ``now`` (timezone-aware), and how."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    age = (now - job.occurred_at).total_seconds()
    remaining = int(ttl_seconds - max(age, 0.0))
    if preferences.user_mute is not None and preferences.user_mute.active_at(now):
        return PushDecision(Delivery.SKIP, DecisionReason.USER_MUTED, remaining)
    if preferences.conversation_mute is not None and preferences.conversation_mute.active_at(now):
        return PushDecision(Delivery.SKIP, DecisionReason.CONVERSATION_MUTED, remaining)
    if remaining <= 0:
        return PushDecision(Delivery.SKIP, DecisionReason.EXPIRED, 0)
    if preferences.quiet_hours is not None and preferences.quiet_hours.contains(now):
        return PushDecision(Delivery.QUIET, DecisionReason.QUIET_HOURS, remaining)
    return PushDecision(Delivery.ALERT, None, remaining)
