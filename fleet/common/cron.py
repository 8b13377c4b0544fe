"""Cron expressions of schedules: what is accepted, and when they fire.

fleetd (to validate and to show next fire times) and fleet-agent (to fire)
must agree on every instant, whatever croniter version each has, so croniter
is used only for what has not changed across its releases: matching a
five-field expression against local wall-clock times, without a time zone.
Time zones and DST are decided here, by one rule:

- a schedule fires once for each local wall-clock time its expression
  matches, at the first instant that time happens;
- a matching time that a spring-forward skips fires at the end of the gap
  (a 02:30 backup runs at 03:00 that night), once, however many matching
  times the gap swallowed;
- a matching time that a fall-back repeats fires at its first occurrence
  only (a 02:30 backup runs once, not twice; an hourly one has one
  two-hour interval that night).

(croniter 6-7 fire a repeated 02:30 twice; 5 and earlier skip the next
day's run after a fall-back and fire at a non-existent time after a
spring-forward.) Accepted: five fields (minute, hour, day of month, month,
day of week) of numbers, names (jan, mon), `*`, ranges, lists and steps,
with cron's rule that a restricted day of month and day of week match
either; and @hourly, @daily, @weekly, @monthly. Not accepted, because
their meaning differs between cron implementations or croniter releases: a
sixth field (seconds or years), L, W, #, ?, H and R. Pure, CPython 3.9+.
"""

from __future__ import annotations

import datetime as dt
import itertools
import re
from collections.abc import Iterator
from typing import Optional
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

ALIASES = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
}
MAX_LEN = 100
# a field: numbers or three-letter names, with * , - and / between them
FIELD = re.compile(r"^[0-9a-z*,/-]+\Z")
NAMES = re.compile(r"[a-z]+")
MONTHS = {"jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"}
DAYS = {"sun", "mon", "tue", "wed", "thu", "fri", "sat"}
ZONE_NAME = re.compile(r"^[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+)*\Z")
FIELD_NAMES = ("minute", "hour", "day of month", "month", "day of week")
# the longest a matching time can be away: 29 February of a leap year 8 years on
HORIZON = dt.timedelta(days=366 * 8 + 2)


class CronError(ValueError):
    """An expression or a time zone a schedule cannot have; the message says why."""


def normalize(expr: str) -> str:
    """The expression as stored: validated, lower case, single spaces;
    aliases stay as written. Raises CronError."""
    if not isinstance(expr, str) or not expr.strip():
        raise CronError("a cron expression is required")
    if len(expr) > MAX_LEN:
        raise CronError(f"a cron expression is at most {MAX_LEN} characters")
    text = " ".join(expr.lower().split())
    if text.startswith("@"):
        if text not in ALIASES:
            raise CronError(
                f"unknown cron alias {expr.strip()!r}: use @hourly, @daily, @weekly or @monthly"
            )
        return text
    fields = text.split(" ")
    if len(fields) != 5:
        raise CronError(
            f"cron expression {expr.strip()!r} has {len(fields)} field(s), expected 5: "
            "minute hour day-of-month month day-of-week"
        )
    for name, field in zip(FIELD_NAMES, fields):
        if not FIELD.match(field):
            raise CronError(
                f"{name} field {field!r}: only numbers, names, '*', ',', '-' and '/' are accepted"
            )
        allowed = MONTHS if name == "month" else DAYS if name == "day of week" else set()
        for word in NAMES.findall(field):
            if word not in allowed:
                raise CronError(
                    f"{name} field {field!r}: {word!r} is not a {name}"
                    + (" name" if allowed else " (L, W, #, ?, H and R are not accepted)")
                )
    try:
        # a valid expression that can never match (30 February) is refused too
        next_local(text, dt.datetime(2000, 1, 1))
    except CronError:
        raise
    except CroniterBadDateError:
        raise CronError(f"cron expression {expr.strip()!r} never matches") from None
    except Exception as exc:  # croniter's errors say which field is wrong
        raise CronError(f"cron expression {expr.strip()!r}: {exc}") from None
    return text


def zone(name: str) -> dt.tzinfo:
    """The time zone of that IANA name; raises CronError."""
    if name in ("UTC", "Etc/UTC"):
        return dt.timezone.utc
    unknown = CronError(f"unknown time zone {name!r}: give an IANA name such as Europe/Paris")
    if not isinstance(name, str) or not ZONE_NAME.match(name):
        raise unknown  # and no path outside the zone database is opened
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise unknown from None


def next_local(expr: str, after: dt.datetime) -> dt.datetime:
    """The first naive wall-clock time after `after` that `expr` matches."""
    it = croniter(ALIASES.get(expr, expr), after)
    found = it.get_next(dt.datetime)
    if found - after > HORIZON:
        raise CronError(f"cron expression {expr!r} never matches")
    return found


def _exists(local: dt.datetime, tz: dt.tzinfo) -> bool:
    """False for a wall-clock time a spring-forward skips."""
    there = local.replace(tzinfo=tz)
    back = there.astimezone(dt.timezone.utc).astimezone(tz).replace(tzinfo=None)
    return back == local


def _first_instant(local: dt.datetime, tz: dt.tzinfo) -> dt.datetime:
    """UTC (naive) of the first time the wall clock shows `local`, or of
    the end of the gap it falls in."""
    while not _exists(local, tz):  # in a gap: on to its end (gaps are whole minutes)
        local += dt.timedelta(minutes=1)
    return local.replace(tzinfo=tz, fold=0).astimezone(dt.timezone.utc).replace(tzinfo=None)


def fires(expr: str, tz: dt.tzinfo, after: dt.datetime) -> Iterator[dt.datetime]:
    """Fire instants strictly after `after`, as naive UTC (the store's
    times), for ever, by the rule of this module's docstring."""
    # from the wall-clock time at `after`; during a repeated hour's second
    # pass its matches map back to the first pass, before `after`: skipped
    local = after.replace(tzinfo=dt.timezone.utc).astimezone(tz).replace(tzinfo=None)
    last: Optional[dt.datetime] = None
    while True:
        local = next_local(expr, local)
        when = _first_instant(local, tz)
        if when <= after or (last is not None and when <= last):
            continue  # before the start, or a gap's end already fired
        yield when
        last = when


def next_fires(expr: str, tz: dt.tzinfo, after: dt.datetime, count: int = 1) -> list[dt.datetime]:
    """The next `count` fire instants strictly after `after`, as naive UTC."""
    return list(itertools.islice(fires(expr, tz, after), count))


def latest_fire(
    expr: str, tz: dt.tzinfo, after: dt.datetime, upto: dt.datetime
) -> Optional[dt.datetime]:
    """The last fire instant in (after, upto], or None: the one window that a
    run of missed ones comes down to. Looks back from `upto` over a span that
    grows eightfold, so a minutely schedule missed for a year costs an hour
    of fires, not a year of them."""
    span = dt.timedelta(hours=1)
    while True:
        start = max(after, upto - span)
        found = None
        for when in fires(expr, tz, start):
            if when > upto:
                break
            found = when
        if found is not None or start == after:
            return found
        span *= 8


def shortest_gap(
    schedules: list[tuple[str, dt.tzinfo]], after: dt.datetime, count: int = 64
) -> Optional[dt.timedelta]:
    """The shortest time between two fires of these schedules together,
    over each one's next `count` fires (None without a schedule): how often
    a group they back up can get a snapshot at most."""
    times = sorted({when for expr, tz in schedules for when in next_fires(expr, tz, after, count)})
    gaps = [b - a for a, b in zip(times, times[1:])]
    return min(gaps) if gaps else None


def next_fire(expr: str, tz: dt.tzinfo, after: dt.datetime) -> dt.datetime:
    return next_fires(expr, tz, after, 1)[0]


def to_local(when: dt.datetime, tz: dt.tzinfo) -> dt.datetime:
    """A naive UTC instant as aware local time, for showing."""
    return when.replace(tzinfo=dt.timezone.utc).astimezone(tz)
