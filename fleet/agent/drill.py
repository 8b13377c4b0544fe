"""Restore drills: proof that a group's latest snapshot restores.

A drill lists the snapshot's files (`restic ls`), picks a random sample (a
count, or a percentage of the files), restores it into a scratch directory
with `restic restore --verify` (restic reads every restored file back and
checks it against the snapshot's content hashes), checks each file's size,
and compares it with the live file when that one looks unchanged since the
snapshot (same size and modification time: then the bytes must match too,
or one side rotted). The scratch directory goes whatever happens. The
verdict is the job's summary: files, bytes, mismatches, seconds.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import os
import random
import re
from typing import Any, NamedTuple, Optional

from ..common.drills import parse_sample

MAX_SAMPLE = 1000  # files one drill restores at most (each is an --include)
MAX_LISTED = 2_000_000  # files of the snapshot looked at for the sample


class FileNode(NamedTuple):
    path: str
    size: int
    mtime: Optional[str]  # as restic printed it (RFC 3339, nanoseconds)


def sample_size(value: str, files: int) -> int:
    count, percent = parse_sample(value)
    k = count if count is not None else math.ceil(files * (percent or 0) / 100)
    return max(0, min(k, files, MAX_SAMPLE))


def choose(
    files: list[FileNode], value: str, rng: Optional[random.Random] = None
) -> list[FileNode]:
    k = sample_size(value, len(files))
    return sorted((rng or random.SystemRandom()).sample(files, k))


def include_pattern(path: str) -> str:
    """An exact path as a restic include pattern: its wildcard characters
    escaped (restic matches includes as patterns)."""
    return re.sub(r"([\\*?\[])", r"\\\1", path)


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mtime_ns(value: Optional[str]) -> Optional[int]:
    """restic's '2026-12-03T13:45:03.80663851Z' (or +01:00) as ns since the epoch."""
    if not value:
        return None
    match = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)$", value)
    if not match:
        return None
    base, frac, zone = match.groups()
    when = dt.datetime.strptime(base, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.timezone.utc)
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        when -= sign * dt.timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
    return int(when.timestamp()) * 1_000_000_000 + int((frac or "0").ljust(9, "0"))


def check(scratch: str, sample: list[FileNode]) -> dict[str, Any]:
    """Each restored file against the snapshot's size, and against the live
    file when that one is unchanged by size and time: the verdict."""
    mismatches: list[str] = []
    restored_bytes = live_checked = 0
    for node in sample:
        restored = os.path.join(scratch, node.path.lstrip("/"))
        try:
            size = os.path.getsize(restored)
        except OSError:
            mismatches.append(f"{node.path}: not restored")
            continue
        restored_bytes += size
        if size != node.size:
            mismatches.append(f"{node.path}: restored {size} bytes, the snapshot has {node.size}")
            continue
        try:
            live = os.stat(node.path)
        except OSError:
            continue  # gone from the host since: nothing to compare with
        if live.st_size != node.size or live.st_mtime_ns != mtime_ns(node.mtime):
            continue  # changed since the snapshot: a difference proves nothing
        live_checked += 1
        try:
            same = sha256(restored) == sha256(node.path)
        except OSError:
            continue
        if not same:
            mismatches.append(
                f"{node.path}: differs from the live file, though its size and time did not change"
            )
    return {
        "files": len(sample),
        "bytes": restored_bytes,
        "live_checked": live_checked,
        "mismatches": len(mismatches),
        "problems": mismatches[:20],
    }
