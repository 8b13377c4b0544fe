"""The agent's spool: every frame fleetd must not miss, stored before it is sent.

A frame gets the next per-agent `seq` when it is appended and leaves when
fleetd acknowledges that seq (cumulatively). After a reconnect, or a crash
of the agent, `pending()` yields what is still unacknowledged, in order.
stdlib sqlite3, so the agent stays free of compiled dependencies.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

Frame = tuple[int, str, dict[str, Any]]  # (seq, type, data)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (seq INTEGER PRIMARY KEY, type TEXT NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class Spool:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL survives a crash of the agent; only a power cut can
        # take the last commits, and a job running then is lost anyway.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        path.chmod(0o600)

    def close(self) -> None:
        self._db.close()

    def last_seq(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key='last_seq'").fetchone()
        return row[0] if row else 0

    def append(self, type_: str, data: dict[str, Any]) -> int:
        """Store a frame under the next seq; returns that seq once it is committed."""
        with self._db:  # one transaction
            self._db.execute("BEGIN IMMEDIATE")
            seq = self.last_seq() + 1
            self._db.execute(
                "INSERT INTO frames (seq, type, data) VALUES (?, ?, ?)",
                (seq, type_, json.dumps(data, separators=(",", ":"))),
            )
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES ('last_seq', ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (seq,),
            )
        return seq

    def pending(self, after: int = 0, limit: int = 1000) -> list[Frame]:
        rows = self._db.execute(
            "SELECT seq, type, data FROM frames WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
        ).fetchall()
        return [(seq, type_, json.loads(data)) for seq, type_, data in rows]

    def ack(self, seq: int) -> int:
        """Drop every frame up to seq; returns how many left."""
        with self._db:
            cur = self._db.execute("DELETE FROM frames WHERE seq <= ?", (seq,))
        return cur.rowcount

    def count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM frames").fetchone()[0]
