"""Time arguments: the one reader of a point in time given by an operator or an API client.

The CLI takes an age back from now (``90s``, ``30m``, ``6h``, ``2d``, ``1.5h``) or an ISO 8601
time (UTC when it has no offset); the HTTP APIs take an RFC 3339 time with an offset only (a
machine client says what it means, and an age would make an answer depend on when it was asked).
Either way the result is in UTC and inside the range the ClickHouse audit stores.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

#: The range ClickHouse's DateTime64 supports (the audit's column type): a time outside it is
#: stored as nonsense, so neither the audit nor a query argument goes beyond it.
EARLIEST = datetime(1900, 1, 1, tzinfo=UTC)
LATEST = datetime(2299, 12, 31, 23, 59, 59, tzinfo=UTC)

_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_ISO_EXAMPLE = "an ISO time (2026-01-31T08:00, UTC without an offset)"
_RFC3339_EXAMPLE = "an RFC 3339 time with an offset (2026-01-31T08:00:00Z)"
_AGE_EXAMPLE = " or an age back from now (90s, 30m, 6h, 2d)"


def in_range(moment: datetime) -> bool:
    """Whether ``moment`` is an aware time the audit can store."""
    return moment.tzinfo is not None and EARLIEST <= moment <= LATEST


def parse_moment(
    text: str,
    name: str,
    *,
    relative_to: datetime | None = None,
    zone_required: bool = False,
    invalid: Callable[[str], Exception] = ValueError,
) -> datetime:
    """The point in time ``text`` names, in UTC, between :data:`EARLIEST` and :data:`LATEST`.

    An age (``<number><s|m|h|d>``) counts back from ``relative_to`` and is accepted only when
    it is given; ``zone_required`` refuses an ISO time without an offset instead of reading it
    as UTC. Anything else raises ``invalid(message)``, the message naming the option or
    parameter ``name`` and the forms it takes, so that each caller raises its own error type
    with its own stable code.
    """
    value = text.strip()
    age = _AGE.fullmatch(value) if relative_to is not None else None
    moment: datetime | None
    try:
        if age is not None and relative_to is not None:
            amount = timedelta(**{_UNITS[age.group(2)]: float(age.group(1))})
            moment = relative_to.astimezone(UTC) - amount
        else:
            moment = _iso(value, zone_required)
    except OverflowError:
        raise invalid(_out_of_range(name, text)) from None
    if moment is None:
        forms = _RFC3339_EXAMPLE if zone_required else _ISO_EXAMPLE
        forms += _AGE_EXAMPLE if relative_to is not None else ""
        raise invalid(f"{name} must be {forms}; got {text!r}")
    if not in_range(moment):
        raise invalid(_out_of_range(name, text))
    return moment


def _iso(value: str, zone_required: bool) -> datetime | None:
    """``value`` as an ISO time in UTC; None when it is none (or has no offset and needs one);
    OverflowError when the offset carries it beyond what a datetime holds."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None if zone_required else moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _out_of_range(name: str, text: str) -> str:
    return f"{name} must be between {EARLIEST.year} and {LATEST.year} UTC; got {text!r}"
