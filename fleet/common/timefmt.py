"""Times as Fleet stores and sends them: naive UTC datetimes inside, RFC 3339
strings to the second on the wire and in JSON output. Pure, CPython 3.9+."""

from __future__ import annotations

import datetime as dt
from typing import Optional

WIRE = "%Y-%m-%dT%H:%M:%SZ"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def now_iso() -> str:
    """The protocol's timestamps: UTC, to the second, RFC 3339."""
    return utcnow().strftime(WIRE)


def iso(value: Optional[dt.datetime]) -> Optional[str]:
    return None if value is None else value.strftime(WIRE)


def parse_ts(value: str, default: Optional[dt.datetime] = None) -> dt.datetime:
    """A peer's RFC 3339 time, to the second; a malformed one becomes
    `default` (now when not given): it is a label, not a reason to refuse a frame."""
    try:
        return dt.datetime.strptime(value[:19], "%Y-%m-%dT%H:%M:%S")
    except (ValueError, TypeError):
        return default if default is not None else utcnow()
