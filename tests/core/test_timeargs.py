"""The one time-argument parser: the CLI's ages and ISO times, the APIs' RFC 3339 times."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from core.timeargs import EARLIEST, LATEST, in_range, parse_moment

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class ArgumentError(Exception):
    """A caller's own error type, as the CLI commands and the APIs have."""


@pytest.mark.parametrize(
    ("text", "back"),
    [
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("2h", timedelta(hours=2)),
        ("3d", timedelta(days=3)),
        ("1.5h", timedelta(minutes=90)),
        (" 6 h ", timedelta(hours=6)),
        ("0m", timedelta()),
    ],
)
def test_an_age_counts_back_from_the_reference(text: str, back: timedelta) -> None:
    assert parse_moment(text, "--since", relative_to=NOW) == NOW - back


def test_an_age_counts_back_in_utc_from_a_reference_with_an_offset() -> None:
    paris = NOW.astimezone(timezone(timedelta(hours=1)))
    moment = parse_moment("1h", "--since", relative_to=paris)
    assert moment == NOW - timedelta(hours=1)
    assert moment.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-31T08:00", datetime(2026, 1, 31, 8, 0, tzinfo=UTC)),
        ("2026-01-31", datetime(2026, 1, 31, tzinfo=UTC)),
        ("2026-01-31 08:00:00", datetime(2026, 1, 31, 8, 0, tzinfo=UTC)),
        ("2026-01-31T08:00:00Z", datetime(2026, 1, 31, 8, 0, tzinfo=UTC)),
        ("2026-01-31T09:30:00+01:30", datetime(2026, 1, 31, 8, 0, tzinfo=UTC)),
        (" 2026-01-31T08:00:00.250Z ", datetime(2026, 1, 31, 8, 0, 0, 250_000, tzinfo=UTC)),
    ],
)
def test_an_iso_time_is_utc_without_an_offset(text: str, expected: datetime) -> None:
    moment = parse_moment(text, "--since", relative_to=NOW)
    assert moment == expected
    assert moment.utcoffset() == timedelta(0)


def test_the_api_form_wants_an_offset_and_takes_no_age() -> None:
    assert parse_moment("2026-01-31T08:00:00-05:00", "from", zone_required=True) == datetime(
        2026, 1, 31, 13, 0, tzinfo=UTC
    )
    with pytest.raises(ValueError, match=r"from must be an RFC 3339 time with an offset"):
        parse_moment("2026-01-31T08:00:00", "from", zone_required=True)
    with pytest.raises(ValueError, match="RFC 3339") as refused:
        parse_moment("2h", "from", zone_required=True)
    assert "age" not in str(refused.value)


@pytest.mark.parametrize("text", ["yesterday", "", "6x", "-1h", "h", "1h ago", "2026-13-01"])
def test_anything_else_raises_the_callers_error_naming_the_option_and_the_forms(
    text: str,
) -> None:
    with pytest.raises(ArgumentError) as raised:
        parse_moment(text, "--since", relative_to=NOW, invalid=ArgumentError)
    message = str(raised.value)
    assert message.startswith("--since must be an ISO time")
    assert "or an age back from now (90s, 30m, 6h, 2d)" in message
    assert repr(text) in message


@pytest.mark.parametrize(
    "text",
    [
        "1899-12-31T23:59:59Z",
        "2300-01-01T00:00:00Z",
        "0001-01-01T00:00:00+01:00",  # beyond what a datetime holds once in UTC
        "9999-12-31T23:59:59-05:00",
        "100000d",
        "9" * 400 + "d",
    ],
)
def test_times_outside_what_the_audit_stores_are_refused(text: str) -> None:
    with pytest.raises(ArgumentError, match="--since must be between 1900 and 2299 UTC"):
        parse_moment(text, "--since", relative_to=NOW, invalid=ArgumentError)


def test_the_bounds_are_the_audit_range_and_inclusive() -> None:
    assert parse_moment("1900-01-01T00:00:00Z", "from", zone_required=True) == EARLIEST
    assert parse_moment("2299-12-31T23:59:59Z", "to", zone_required=True) == LATEST
    assert in_range(EARLIEST) and in_range(LATEST)
    assert not in_range(LATEST + timedelta(seconds=1))
    assert not in_range(EARLIEST - timedelta(microseconds=1))
    assert not in_range(datetime(2026, 1, 1))  # a naive time is never in range
