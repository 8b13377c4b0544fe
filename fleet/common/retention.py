"""Retention policies: validation and restic's forget flags. Pure."""

from __future__ import annotations

import re
from typing import Any

COUNTS = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")
KEYS = (*COUNTS, "keep_within")
# restic's duration: years, months, days, hours, each optional, in this order
_WITHIN = re.compile(r"^(?=\d)(\d+y)?(\d+m)?(\d+d)?(\d+h)?$")


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
