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
import shutil
import sys
from typing import Any, NamedTuple, Optional

from ..common.drills import parse_sample

MAX_SAMPLE = 1000  # files one drill restores at most (each is an --include)
MAX_BYTES = 1 << 30  # what one drill restores at most: larger files give way to others


class FileNode(NamedTuple):
    path: str
    size: int
    mtime: Optional[str]  # as restic printed it (RFC 3339, nanoseconds)


def sample_size(value: str, files: int) -> int:
    count, percent = parse_sample(value)
    k = count if count is not None else math.ceil(files * (percent or 0) / 100)
    return max(0, min(k, files, MAX_SAMPLE))


class Reservoir:
    """A uniform random sample of MAX_SAMPLE of the snapshot's files, kept
    as restic lists them (Algorithm R): memory stays bounded whatever the
    snapshot holds, and `seen` counts them all for a percentage."""

    def __init__(self, size: int = MAX_SAMPLE, rng: Optional[random.Random] = None) -> None:
        self.size = size
        self.rng = rng or random.SystemRandom()
        self.kept: list[FileNode] = []
        self.seen = 0

    def add(self, node: FileNode) -> None:
        self.seen += 1
        if len(self.kept) < self.size:
            self.kept.append(node)
            return
        slot = self.rng.randrange(self.seen)
        if slot < self.size:
            self.kept[slot] = node

    def choose(self, value: str, max_bytes: int = MAX_BYTES) -> list[FileNode]:
        """The sample a drill restores: as many files as `value` asks of all
        those seen, drawn from the reservoir, within max_bytes."""
        k = sample_size(value, self.seen)
        order = list(self.kept)
        self.rng.shuffle(order)
        chosen: list[FileNode] = []
        total = 0
        for node in order:
            if len(chosen) == k:
                break
            if total + node.size <= max_bytes:
                chosen.append(node)
                total += node.size
        return sorted(chosen)


def choose(
    files: list[FileNode], value: str, rng: Optional[random.Random] = None
) -> list[FileNode]:
    reservoir = Reservoir(rng=rng)
    for node in files:
        reservoir.add(node)
    return reservoir.choose(value)


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


def remove(scratch: str) -> None:
    """The scratch directory, whatever it holds: restored directories may
    be read-only (0555), which an unprivileged agent must open up first."""

    def opened(fn: Any, path: str, _: Any) -> None:
        try:
            os.chmod(os.path.dirname(path), 0o700)
            if os.path.isdir(path) and not os.path.islink(path):
                os.chmod(path, 0o700)
            fn(path)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(scratch, onexc=opened)
    else:  # pragma: no cover - before 3.12 the hook had this name
        shutil.rmtree(scratch, onerror=opened)
