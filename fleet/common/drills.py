"""What a restore drill restores: a sample of a snapshot's files, a count
("20") or a percentage of them ("1%"). Shared by fleetd (which checks a
group's setting) and the agent (which draws the sample)."""

from __future__ import annotations

import re
from typing import Optional

DEFAULT_SAMPLE = "20"
_SAMPLE = re.compile(r"^(?:([1-9]\d{0,5})|(\d{1,3}(?:\.\d{1,3})?)%)\Z")


def parse_sample(value: str) -> tuple[Optional[int], Optional[float]]:
    """'20' -> (20, None); '1%' -> (None, 1.0). Raises ValueError."""
    match = _SAMPLE.match(value.strip())
    if not match:
        raise ValueError(f"drill sample {value!r} is not a count (20) or a percentage (1%)")
    if match.group(1):
        return int(match.group(1)), None
    percent = float(match.group(2))
    if not 0 < percent <= 100:
        raise ValueError(f"drill sample {value!r}: a percentage is above 0 and at most 100")
    return None, percent
