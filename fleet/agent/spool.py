"""The agent's spool: every frame fleetd must not miss, stored before it is sent.

A frame gets the next per-agent `seq` when it is appended and leaves when
fleetd acknowledges that seq (cumulatively). After a reconnect, or a crash
of the agent, `pending()` yields what is still unacknowledged, in order.

The spool is bounded: past `max_bytes`, the oldest job log lines make room,
and the last one dropped of each job becomes a marker line saying how many
went. Job starts and ends, snapshot reports and schedule fires are never
dropped, even when that means going over the bound.

stdlib sqlite3, so the agent stays free of compiled dependencies.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

Frame = tuple[int, str, dict[str, Any]]  # (seq, type, data)

DEFAULT_MAX_BYTES = 64 * 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (seq INTEGER PRIMARY KEY, type TEXT NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
# columns added since the first agents; a spool of an older agent gains them in place
_ADDED = (
    ("size", "INTEGER NOT NULL DEFAULT 0"),
    ("dropped", "INTEGER NOT NULL DEFAULT 0"),  # > 0: a marker standing for this many log lines
)


def marker(data: dict[str, Any], count: int) -> dict[str, Any]:
    """The job.log line that stands in for `count` dropped lines of its job."""
    return {
        **data,
        "stream": "stderr",
        "payload": f"fleet-agent: {count} log line(s) dropped here: the spool was full while fleetd was unreachable",
    }


class Spool:
    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL survives a crash of the agent; only a power cut can
        # take the last commits, and a job running then is lost anyway.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(frames)")}
        for name, decl in _ADDED:
            if name not in columns:
                self._db.execute(f"ALTER TABLE frames ADD COLUMN {name} {decl}")
                if name == "size":
                    self._db.execute("UPDATE frames SET size = length(data)")
        self._db.execute("CREATE INDEX IF NOT EXISTS frames_logs ON frames (type, seq)")
        path.chmod(0o600)
        self._bytes = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM frames").fetchone()[0]
        self.dropped_total = 0  # log lines dropped since start, for the agent's own log

    def close(self) -> None:
        self._db.close()

    @property
    def size(self) -> int:
        return self._bytes

    def last_seq(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key='last_seq'").fetchone()
        return row[0] if row else 0

    def append(self, type_: str, data: dict[str, Any], supersede: bool = False) -> int:
        """Store a frame under the next seq; returns that seq once it is committed.

        supersede: frames of the same type still waiting are dropped first
        (a newer snapshot list makes older ones pointless).
        """
        text = json.dumps(data, separators=(",", ":"))
        with self._db:  # one transaction
            self._db.execute("BEGIN IMMEDIATE")
            if supersede:
                freed = self._db.execute(
                    "SELECT COALESCE(SUM(size), 0) FROM frames WHERE type = ?", (type_,)
                ).fetchone()[0]
                self._db.execute("DELETE FROM frames WHERE type = ?", (type_,))
                self._bytes -= freed
            if self._bytes + len(text) > self.max_bytes:
                # make room for a tenth of the bound at once, not a line at a time
                self._evict(self._bytes + len(text) - self.max_bytes + self.max_bytes // 10)
            seq = self.last_seq() + 1
            self._db.execute(
                "INSERT INTO frames (seq, type, data, size) VALUES (?, ?, ?, ?)",
                (seq, type_, text, len(text)),
            )
            # not an upsert: SQLite older than 3.24 (still on some servers) lacks it
            self._db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('last_seq', ?)", (seq,)
            )
        self._bytes += len(text)
        return seq

    def _evict(self, need: int) -> None:
        """Drop the oldest log lines until `need` bytes are free (inside append's transaction)."""
        freed = 0
        # job -> [(seq, data, size, dropped)]; older markers are taken too
        # and the lines they stood for fold into the new one
        victims: dict[int, list[tuple[int, dict[str, Any], int, int]]] = {}
        rows = self._db.execute(
            "SELECT seq, data, size, dropped FROM frames WHERE type='job.log' ORDER BY seq"
        )
        for seq, text, size, dropped in rows:
            data = json.loads(text)
            victims.setdefault(data["job_id"], []).append((seq, data, size, dropped))
            freed += size
            if freed >= need:
                break
        for lines in victims.values():
            *gone, (last_seq, last_data, _, _) = lines
            count = sum(n or 1 for _, _, _, n in lines)
            self._db.executemany("DELETE FROM frames WHERE seq = ?", [(s,) for s, _, _, _ in gone])
            stand_in = json.dumps(marker(last_data, count), separators=(",", ":"))
            self._db.execute(
                "UPDATE frames SET data = ?, size = ?, dropped = ? WHERE seq = ?",
                (stand_in, len(stand_in), count, last_seq),
            )
            self._bytes -= sum(size for _, _, size, _ in lines) - len(stand_in)
            self.dropped_total += sum(1 for _, _, _, n in lines if not n)

    def first_pending(self) -> int:
        """The oldest unacknowledged seq, or 0 when the spool is empty."""
        row = self._db.execute("SELECT MIN(seq) FROM frames").fetchone()
        return row[0] or 0

    def pending(self, after: int = 0, limit: int = 1000) -> list[Frame]:
        rows = self._db.execute(
            "SELECT seq, type, data FROM frames WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
        ).fetchall()
        return [(seq, type_, json.loads(data)) for seq, type_, data in rows]

    def ack(self, seq: int) -> int:
        """Drop every frame up to seq; returns how many left the spool."""
        with self._db:
            freed = self._db.execute(
                "SELECT COALESCE(SUM(size), 0) FROM frames WHERE seq <= ?", (seq,)
            ).fetchone()[0]
            cur = self._db.execute("DELETE FROM frames WHERE seq <= ?", (seq,))
        self._bytes -= freed
        return cur.rowcount

    def count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM frames").fetchone()[0]
