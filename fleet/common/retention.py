"""Retention policies: validation, restic's forget flags, and the buckets a
group's schedules can never fill. Pure."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any, Optional

COUNTS = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")
KEYS = (*COUNTS, "keep_within")
# restic's duration: years, months, days, hours, each optional, in this order
_WITHIN = re.compile(r"^(?=\d)(\d+y)?(\d+m)?(\d+d)?(\d+h)?\Z")


class RetentionError(ValueError):
    pass


def normalize(policy: Any) -> dict[str, Any]:
    """Validate a policy; drop unset entries (0, "" or None).

    Raises RetentionError naming the bad entry.
    """
    if policy is None:
        return {}
    if not isinstance(policy, dict):
        raise RetentionError("retention must be an object")
    out: dict[str, Any] = {}
    for key, value in policy.items():
        if key not in KEYS:
            raise RetentionError(f"unknown retention rule {key!r} (known: {', '.join(KEYS)})")
        if value is None or value == "" or (type(value) is int and value == 0):
            continue  # unset (False is not 0 here: it is refused below)
        if key == "keep_within":
            if not isinstance(value, str) or not _WITHIN.match(value):
                raise RetentionError(
                    f"keep_within {value!r} is not a restic duration such as 7d, 1y6m or 2d12h"
                )
        elif not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise RetentionError(f"{key} must be a whole number of snapshots, got {value!r}")
        out[key] = value
    return {k: out[k] for k in KEYS if k in out}


def forget_args(policy: dict[str, Any]) -> tuple[str, ...]:
    """The `restic forget` flags for a normalized policy, in a stable order."""
    args: list[str] = []
    for key in KEYS:
        if key in policy:
            args += ["--" + key.replace("_", "-"), str(policy[key])]
    return tuple(args)


def describe(policy: dict[str, Any]) -> str:
    """'daily 7, weekly 4' for tables; 'keep all' when empty."""
    if not policy:
        return "keep all"
    return ", ".join(f"{k[5:]} {policy[k]}" for k in KEYS if k in policy)


# the span of one bucket of each keep-<period> rule; a month at its
# shortest, so that a monthly schedule fills keep-monthly
BUCKETS = (
    ("keep_hourly", "hour", dt.timedelta(hours=1)),
    ("keep_daily", "day", dt.timedelta(days=1)),
    ("keep_weekly", "week", dt.timedelta(days=7)),
    ("keep_monthly", "month", dt.timedelta(days=28)),
    ("keep_yearly", "year", dt.timedelta(days=365)),
)


def _span(delta: dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            n = seconds // size
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds} s"


def unfillable(policy: dict[str, Any], gap: Optional[dt.timedelta]) -> list[str]:
    """Warnings for the keep-<period> rules of a normalized policy that the
    group's schedules cannot fill: `gap` is the shortest time between two of
    their fires (None: no enabled schedule backs the group up). keep-hourly
    24 on a daily schedule keeps 24 daily snapshots, 24 days, not a day of
    hourly ones."""
    if gap is None:
        if any(key in policy for key, _, _ in BUCKETS):
            return [
                "no enabled schedule backs this group up: its retention applies to backups run by hand only"
            ]
        return []
    out = []
    for key, period, span in BUCKETS:
        count = policy.get(key)
        if count and gap > span:
            out.append(
                f"{key.replace('_', '-')} {count}: its schedules fire at most once every "
                f"{_span(gap)}, so the {count} {key[5:]} snapshots it keeps span "
                f"{_span(gap * count)} or more, not {count} {period}{'s' if count != 1 else ''}"
            )
    return out
