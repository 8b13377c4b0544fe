"""Parse restic's output. Pure; each function says what it raises.

Written against restic 0.14 (Debian bookworm) and tolerant of the fields
later versions add.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any, Optional

_VERSION = re.compile(r"^restic (\d+\.\d+\.\d+\S*)")
# restic prints times with nanoseconds and a zone: keep seconds, say UTC
_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.\d+)?(Z|[+-]\d\d:\d\d)\Z")


class ParseError(ValueError):
    """restic printed something other than what we expected."""


def version(text: str) -> str:
    """'restic 0.14.0 compiled with go1.19.8 on linux/amd64' -> '0.14.0'. Raises ParseError."""
    match = _VERSION.match(text.strip())
    if not match:
        raise ParseError(f"not restic's version line: {text.strip()[:80]!r}")
    return match.group(1)


def json_line(line: str) -> Optional[dict[str, Any]]:
    """One line of `--json` output as a dict, or None when it is not JSON."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _int(doc: dict[str, Any], key: str) -> int:
    value = doc.get(key) or 0
    return int(value) if isinstance(value, (int, float)) and value >= 0 else 0


def progress(status: dict[str, Any]) -> dict[str, Any]:
    """A backup's `status` message (or a restore's, restic 0.16+: bytes and
    files "restored") as job.progress fields (without job_id)."""
    elapsed = status.get("seconds_elapsed") or 0
    done = _int(status, "bytes_done") or _int(status, "bytes_restored")
    percent = status.get("percent_done") or 0
    return {
        "percent_done": float(percent) if isinstance(percent, (int, float)) else 0.0,
        "files_done": _int(status, "files_done") or _int(status, "files_restored"),
        "total_files": _int(status, "total_files"),
        "bytes_done": done,
        "total_bytes": _int(status, "total_bytes"),
        "eta_seconds": _int(status, "seconds_remaining"),
        "throughput_bps": int(done / elapsed)
        if isinstance(elapsed, (int, float)) and elapsed > 0
        else 0,
    }


def utc_time(value: str) -> str:
    """restic's '2026-11-22T00:03:19.2047Z' (or with an offset) -> '2026-11-22T00:03:19Z'.

    Offsets other than Z are converted. Raises ParseError.
    """
    match = _TIME.match(value)
    if not match:
        raise ParseError(f"not a restic time: {value!r}")
    base, zone = match.groups()
    when = dt.datetime.strptime(base, "%Y-%m-%dT%H:%M:%S")
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        hours, minutes = int(zone[1:3]), int(zone[4:6])
        when -= sign * dt.timedelta(hours=hours, minutes=minutes)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def snapshots(text: str) -> list[dict[str, Any]]:
    """`restic snapshots --json` -> snapshot dicts of the protocol's shape. Raises ParseError."""
    try:
        docs = json.loads(text)
    except ValueError as exc:
        raise ParseError(f"snapshots output is not JSON: {exc}") from None
    if not isinstance(docs, list):
        raise ParseError("snapshots output is not a list")
    out = []
    for doc in docs:
        if not isinstance(doc, dict) or not isinstance(doc.get("id"), str):
            raise ParseError("a snapshot without an id")
        snap: dict[str, Any] = {
            "id": doc["id"],
            "short_id": doc.get("short_id") or doc["id"][:8],
            "time": utc_time(doc.get("time", "")),
            "hostname": doc.get("hostname") or "",
            "paths": list(doc.get("paths") or []),
            "tags": list(doc.get("tags") or []),
        }
        summary = doc.get("summary")  # restic 0.17+
        if isinstance(summary, dict):
            snap["size_bytes"] = _int(summary, "total_bytes_processed")
            snap["file_count"] = _int(summary, "total_files_processed")
        out.append(snap)
    return out


def add_backup_summary(snaps: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Give the snapshot a backup just made its size and file count: restic
    before 0.17 keeps no summary in the snapshot itself."""
    made = str(summary.get("snapshot_id") or "")
    for snap in snaps:
        if made and "size_bytes" not in snap and snap["id"].startswith(made):
            snap["size_bytes"] = _int(summary, "total_bytes_processed")
            snap["file_count"] = _int(summary, "total_files_processed")


def _stats_doc(text: str) -> dict[str, Any]:
    """`restic stats --json` output, of any mode. Raises ParseError."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ParseError(f"stats output is not JSON: {exc}") from None
    if not isinstance(doc, dict) or "total_size" not in doc:
        raise ParseError("stats output has no total_size")
    return doc


def stats(text: str) -> dict[str, int]:
    """`restic stats --json` -> {size_bytes, file_count, snapshot_count}. Raises ParseError."""
    doc = _stats_doc(text)
    return {
        "size_bytes": _int(doc, "total_size"),
        "file_count": _int(doc, "total_file_count"),
        "snapshot_count": _int(doc, "snapshots_count"),
    }


def wrong_password(stderr: str) -> bool:
    """restic could not open the repository with the password it was given."""
    return "wrong password or no key found" in stderr.lower()


def raw_stats(text: str) -> dict[str, int]:
    """`restic stats --json --mode raw-data` -> {raw_size_bytes, snapshot_count}:
    what the repository stores after deduplication (and compression, from
    restic 0.14 on a version 2 repository). Raises ParseError."""
    doc = _stats_doc(text)
    return {
        "raw_size_bytes": _int(doc, "total_size"),
        "snapshot_count": _int(doc, "snapshots_count"),
    }


def growth(summary: dict[str, Any]) -> dict[str, int]:
    """What one backup adds to the repository's sizes, from its summary:
    restore size (what the new snapshot restores) and stored data (what it
    added after deduplication; packed, when restic 0.17 and later say)."""
    added = "data_added_packed" if "data_added_packed" in summary else "data_added"
    return {
        "size_bytes": _int(summary, "total_bytes_processed"),
        "file_count": _int(summary, "total_files_processed"),
        "raw_size_bytes": _int(summary, added),
    }


def already_initialized(stderr: str) -> bool:
    """`restic init` on an existing repository: the soft success of auto-init."""
    text = stderr.lower()
    return "config file already exists" in text or "already initialized" in text


# -- browsing: ls, find, diff (one stdout line at a time) ------------------------

_NODE_TYPES = ("file", "dir", "symlink", "dev", "chardev", "fifo", "socket", "irregular")
_FOUND = re.compile(r"^Found matching entries in snapshot ([0-9a-f]{8,64}) from (.+)\Z")
_MODIFIERS = {"+": "added", "-": "removed", "M": "modified", "T": "type", "U": "metadata"}


def _time_or_none(value: Any) -> Optional[str]:
    try:
        return utc_time(value) if isinstance(value, str) else None
    except ParseError:
        return None


def ls_node(line: str, directory: str) -> Optional[dict[str, Any]]:
    """A line of `restic ls --json SNAPSHOT DIR` as a listing entry, or None
    (the snapshot line, a line that is not JSON). DIR's own node comes with
    `self` true: a listing of a file is that file alone."""
    doc = json_line(line)
    if doc is None or doc.get("struct_type", "node") != "node":
        return None
    path, name = doc.get("path"), doc.get("name")
    if not isinstance(path, str) or not isinstance(name, str):
        return None
    kind = doc.get("type")
    return {
        "self": path == directory,
        "name": name,
        "type": kind if kind in _NODE_TYPES else "other",
        "size": _int(doc, "size") if kind == "file" else None,
        "mode": str(doc.get("permissions") or "")[:16],
        "mtime": _time_or_none(doc.get("mtime")),
        "uid": _int(doc, "uid"),
        "gid": _int(doc, "gid"),
    }


class FindState:
    """`restic find PATTERN` (text: 0.14's --json prints every match as one
    line, unbounded): a header per snapshot, then its matching paths."""

    def __init__(self) -> None:
        self.snapshot: Optional[str] = None

    def line(self, line: str) -> Optional[dict[str, Any]]:
        """A match {snapshot, path}, or None (a header, a blank line)."""
        text = line.rstrip("\n")
        found = _FOUND.match(text)
        if found:
            self.snapshot = found.group(1)
            return None
        if self.snapshot is None or not text.startswith("/"):
            return None
        return {"snapshot": self.snapshot, "path": text}


def diff_line(line: str) -> Optional[dict[str, Any]]:
    """A line of `restic diff --json`: a change {path, change}, the
    statistics {statistics: {...}}, or None."""
    doc = json_line(line)
    if doc is None:
        return None
    if doc.get("message_type") == "change" and isinstance(doc.get("path"), str):
        modifier = str(doc.get("modifier") or "")
        return {"path": doc["path"], "change": _MODIFIERS.get(modifier, modifier[:8] or "other")}
    if doc.get("message_type") == "statistics":
        stats: dict[str, Any] = {"changed_files": _int(doc, "changed_files")}
        for side in ("added", "removed"):
            part = doc.get(side) if isinstance(doc.get(side), dict) else {}
            stats[side] = {k: _int(part, k) for k in ("files", "dirs", "others", "bytes")}
        return {"statistics": stats}
    return None
