"""fleet.common.cron: the expressions schedules accept, and when they fire,
across DST changes in both directions and for the expressions the docs use."""

from __future__ import annotations

import datetime as dt

import pytest

from fleet.common import cron

PARIS = cron.zone("Europe/Paris")
NEW_YORK = cron.zone("America/New_York")
UTC = cron.zone("UTC")


def local_fires(expr: str, tz, after_utc: dt.datetime, n: int) -> list[str]:
    fires = cron.next_fires(cron.normalize(expr), tz, after_utc, n)
    return [cron.to_local(w, tz).isoformat() for w in fires]


@pytest.mark.parametrize(
    "expr, after, expected",
    [
        # the expressions the man page and README show
        ("0 2 * * *", dt.datetime(2026, 1, 1), ["2026-01-01T02:00:00", "2026-01-02T02:00:00"]),
        (
            "*/15 * * * *",
            dt.datetime(2026, 1, 1, 0, 1),
            ["2026-01-01T00:15:00", "2026-01-01T00:30:00"],
        ),
        ("30 3 * * sun", dt.datetime(2026, 1, 1), ["2026-01-04T03:30:00", "2026-01-11T03:30:00"]),
        (
            "0 22 * * mon-fri",
            dt.datetime(2026, 1, 2, 23),
            ["2026-01-05T22:00:00", "2026-01-06T22:00:00"],
        ),
        ("0 4 1 * *", dt.datetime(2026, 1, 15), ["2026-02-01T04:00:00", "2026-03-01T04:00:00"]),
        ("0 */6 * * *", dt.datetime(2026, 1, 1, 1), ["2026-01-01T06:00:00", "2026-01-01T12:00:00"]),
        ("@hourly", dt.datetime(2026, 1, 1, 0, 30), ["2026-01-01T01:00:00", "2026-01-01T02:00:00"]),
        ("@daily", dt.datetime(2026, 1, 1, 0, 30), ["2026-01-02T00:00:00", "2026-01-03T00:00:00"]),
        ("@weekly", dt.datetime(2026, 1, 1), ["2026-01-04T00:00:00", "2026-01-11T00:00:00"]),
        ("@monthly", dt.datetime(2026, 1, 1), ["2026-02-01T00:00:00", "2026-03-01T00:00:00"]),
        # cron's rule: a restricted day of month OR a restricted day of week
        (
            "0 0 1,15 * mon",
            dt.datetime(2026, 1, 1),
            ["2026-01-05T00:00:00", "2026-01-12T00:00:00", "2026-01-15T00:00:00"],
        ),
        # 7 is Sunday too; a leap day waits for its year
        ("0 0 * * 7", dt.datetime(2026, 1, 1), ["2026-01-04T00:00:00"]),
        ("0 0 29 2 *", dt.datetime(2026, 1, 1), ["2028-02-29T00:00:00", "2032-02-29T00:00:00"]),
    ],
)
def test_documented_expressions_fire_when_cron_would(expr, after, expected) -> None:
    got = local_fires(expr, UTC, after, len(expected))
    assert got == [e + "+00:00" for e in expected]


def test_fires_are_strictly_after_the_start() -> None:
    on_the_dot = dt.datetime(2026, 1, 1, 2, 0)
    assert cron.next_fire("0 2 * * *", UTC, on_the_dot) == dt.datetime(2026, 1, 2, 2, 0)
    assert cron.next_fire("0 2 * * *", UTC, on_the_dot - dt.timedelta(seconds=1)) == on_the_dot


def test_spring_forward_fires_a_skipped_time_once_at_the_end_of_the_gap() -> None:
    # Paris, 29 March 2026: 02:00 -> 03:00
    assert local_fires("30 2 * * *", PARIS, dt.datetime(2026, 3, 28, 12), 3) == [
        "2026-03-29T03:00:00+02:00",
        "2026-03-30T02:30:00+02:00",
        "2026-03-31T02:30:00+02:00",
    ]
    # 02:00, 02:30 and 03:00 all land on 03:00: one fire, not three
    assert local_fires("*/30 1-3 * * *", PARIS, dt.datetime(2026, 3, 28, 23), 4) == [
        "2026-03-29T01:00:00+01:00",
        "2026-03-29T01:30:00+01:00",
        "2026-03-29T03:00:00+02:00",
        "2026-03-29T03:30:00+02:00",
    ]


def test_fall_back_fires_a_repeated_time_once() -> None:
    # Paris, 25 October 2026: 03:00 -> 02:00; the 02:xx hour happens twice
    assert local_fires("30 2 * * *", PARIS, dt.datetime(2026, 10, 24, 10), 3) == [
        "2026-10-25T02:30:00+02:00",
        "2026-10-26T02:30:00+01:00",  # not skipped (croniter 5 skipped it)
        "2026-10-27T02:30:00+01:00",
    ]
    hourly = local_fires("0 * * * *", PARIS, dt.datetime(2026, 10, 24, 22, 30), 4)
    assert hourly == [
        "2026-10-25T01:00:00+02:00",
        "2026-10-25T02:00:00+02:00",  # once: not again at 02:00+01:00
        "2026-10-25T03:00:00+01:00",
        "2026-10-25T04:00:00+01:00",
    ]


def test_a_start_inside_the_repeated_hour_does_not_fire_its_first_pass_again() -> None:
    # 02:10+01:00, the second pass: 02:30 already fired at 02:30+02:00
    second_pass = dt.datetime(2026, 10, 25, 1, 10)  # UTC
    assert cron.to_local(second_pass, PARIS).isoformat() == "2026-10-25T02:10:00+01:00"
    assert local_fires("30 2 * * *", PARIS, second_pass, 1) == ["2026-10-26T02:30:00+01:00"]


def test_new_york_both_ways() -> None:
    assert local_fires("15 2 * * *", NEW_YORK, dt.datetime(2026, 3, 7, 12), 2) == [
        "2026-03-08T03:00:00-04:00",
        "2026-03-09T02:15:00-04:00",
    ]
    assert local_fires("15 1 * * *", NEW_YORK, dt.datetime(2026, 10, 31, 12), 2) == [
        "2026-11-01T01:15:00-04:00",
        "2026-11-02T01:15:00-05:00",
    ]


def test_a_year_of_half_hours_through_both_dst_changes() -> None:
    for tz in (PARIS, NEW_YORK):
        new_year = dt.datetime(2026, 1, 1, tzinfo=tz).astimezone(dt.timezone.utc)
        start = new_year.replace(tzinfo=None) - dt.timedelta(seconds=1)
        fires = cron.next_fires("*/30 * * * *", tz, start, 366 * 48)
        in_2026 = [f for f in fires if cron.to_local(f, tz).year == 2026]
        assert all(b > a for a, b in zip(fires, fires[1:]))  # never backwards, never twice
        # every wall-clock half hour of the year once; the two that
        # spring-forward skips fire with 03:00, as one
        assert len(in_2026) == 365 * 48 - 2


@pytest.mark.parametrize(
    "expr, words",
    [
        ("", "required"),
        ("* * * *", "4 field(s), expected 5"),
        ("* * * * * *", "6 field(s), expected 5"),
        ("0 0 L * *", "not accepted"),
        ("0 0 * * 5#2", "only numbers"),
        ("0 0 ? * 1", "only numbers"),
        ("H 2 * * *", "not accepted"),
        ("@reboot", "use @hourly, @daily, @weekly or @monthly"),
        ("61 * * * *", "out of range"),
        ("0 24 * * *", "out of range"),
        ("0 0 31 2 *", "never matches"),
        ("0 0 * * funday", "not a day of week name"),
        ("0 0 * foo *", "not a month name"),
        ("0 " * 60, "at most 100 characters"),
    ],
)
def test_bad_expressions_are_refused_with_the_reason(expr, words) -> None:
    with pytest.raises(cron.CronError) as err:
        cron.normalize(expr)
    assert words in str(err.value)


def test_accepted_expressions_are_stored_normalized() -> None:
    assert cron.normalize("  0   2 * *  MON-fri ") == "0 2 * * mon-fri"
    assert cron.normalize("@DAILY") == "@daily"


@pytest.mark.parametrize("name", ["Mars/Olympus", "../../etc/passwd", "", "Europe/", "a" * 300])
def test_unknown_time_zones_are_refused(name) -> None:
    with pytest.raises(cron.CronError, match="unknown time zone"):
        cron.zone(name)
