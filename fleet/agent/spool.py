"""The agent's spool: every frame fleetd must not miss, stored before it is sent.

A frame gets the next per-agent `seq` when it is appended and leaves when
fleetd acknowledges that seq (cumulatively). After a reconnect, or a crash
of the agent, `pending()` yields what is still unacknowledged, in order.

The spool is bounded: past `max_bytes`, the oldest job log lines make room,
and the last one dropped of each job becomes a marker line saying how many
went. Job starts and ends, snapshot reports and schedule fires are never
dropped, even when that means going over the bound.

Beside the frames it keeps what the scheduler must not lose with them: the
last fire of each schedule (`fires`), written in the transaction that
spools the fire, so a restart neither fires twice nor skips; and the
backups the agent runs on its own while fleetd is out of reach
(`local_jobs`), until their start is spooled, and the uids of those it
ever took on (`taken`), so that none is run twice.

stdlib sqlite3, so the agent stays free of compiled dependencies.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

Frame = tuple[int, str, dict[str, Any]]  # (seq, type, data)


class SpoolDamaged(Exception):
    """The spool cannot be read (a frame that is not JSON, a file that is not
    a database): resending or redialling cannot help, a person must look."""

    def __init__(self, path: Path, what: str) -> None:
        super().__init__(
            f"{path} is damaged ({what}): stop the agent and move it aside to start "
            "a new one; what it held that fleetd had not acknowledged is lost"
        )


class Mark(NamedTuple):
    """Where a schedule stands: the form it has (`key`), and the time its
    next fire is counted from: its last fire, or (`fired` false) the time
    it took that form."""

    key: str
    last: str
    fired: bool = False


DEFAULT_MAX_BYTES = 64 * 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (seq INTEGER PRIMARY KEY, type TEXT NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS fires (schedule_id INTEGER PRIMARY KEY, key TEXT NOT NULL, last TEXT NOT NULL, fired INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS local_jobs (job_id INTEGER PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS taken (uid TEXT PRIMARY KEY, job_id INTEGER NOT NULL);
"""
TAKEN_KEPT = 1000  # uids of fire backups the agent took on itself, remembered
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
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError):  # locked, unreadable: not damage
                raise
            self._db.close()
            raise SpoolDamaged(path, str(exc)) from None
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

    def _decode(self, text: str, where: str) -> dict[str, Any]:
        """Stored data (`where`: what holds it, for the message); SpoolDamaged
        when it is not a JSON object."""
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise SpoolDamaged(self.path, f"{where} is not JSON")
        return data

    @property
    def size(self) -> int:
        return self._bytes

    def last_seq(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key='last_seq'").fetchone()
        return row[0] if row else 0

    def append(
        self,
        type_: str,
        data: dict[str, Any],
        supersede: Union[bool, dict[str, Any]] = False,
        drop_local: Optional[int] = None,
    ) -> int:
        """Store a frame under the next seq; returns that seq once it is committed.

        supersede: frames of the same type still waiting are dropped first
        (a newer snapshot list makes older ones pointless); a dict: only
        those whose data holds these values (the same repository's). drop_local: the
        local job this frame starts leaves the queue in the same transaction.
        """
        with self._db:  # one transaction
            self._db.execute("BEGIN IMMEDIATE")
            if drop_local is not None:
                self._db.execute("DELETE FROM local_jobs WHERE job_id = ?", (drop_local,))
            return self._insert(type_, data, supersede)

    def _insert(
        self, type_: str, data: dict[str, Any], supersede: Union[bool, dict[str, Any]] = False
    ) -> int:
        """append's work, inside the caller's transaction."""
        text = json.dumps(data, separators=(",", ":"))
        if supersede is True:
            freed = self._db.execute(
                "SELECT COALESCE(SUM(size), 0) FROM frames WHERE type = ?", (type_,)
            ).fetchone()[0]
            self._db.execute("DELETE FROM frames WHERE type = ?", (type_,))
            self._bytes -= freed
        elif supersede:
            match = dict(supersede)
            for seq, old, size in self._db.execute(
                "SELECT seq, data, size FROM frames WHERE type = ?", (type_,)
            ).fetchall():
                held = self._decode(old, f"frame {seq}")
                if all(held.get(k) == v for k, v in match.items()):
                    self._db.execute("DELETE FROM frames WHERE seq = ?", (seq,))
                    self._bytes -= size
        if self._bytes + len(text) > self.max_bytes:
            # make room for a tenth of the bound at once, not a line at a time
            self._evict(self._bytes + len(text) - self.max_bytes + self.max_bytes // 10)
        seq = self.last_seq() + 1
        self._db.execute(
            "INSERT INTO frames (seq, type, data, size) VALUES (?, ?, ?, ?)",
            (seq, type_, text, len(text)),
        )
        # not an upsert: SQLite older than 3.24 (still on some servers) lacks it
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('last_seq', ?)", (seq,))
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
            data = self._decode(text, f"frame {seq}")
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

    # -- the scheduler's state ------------------------------------------------

    def marks(self) -> dict[int, Mark]:
        """schedule id -> its mark."""
        rows = self._db.execute("SELECT schedule_id, key, last, fired FROM fires")
        return {sid: Mark(key, last, bool(fired)) for sid, key, last, fired in rows}

    def set_marks(self, marks: dict[int, Mark]) -> None:
        """Replace every mark (a new schedule set: gone schedules lose theirs)."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM fires")
            self._db.executemany(
                "INSERT INTO fires (schedule_id, key, last, fired) VALUES (?, ?, ?, ?)",
                [(sid, m.key, m.last, int(m.fired)) for sid, m in marks.items()],
            )

    def fire(
        self,
        schedule_id: int,
        key: str,
        last: str,
        frame: dict[str, Any],
        local: Sequence[dict[str, Any]] = (),
        coalesce: Optional[dict[int, dict[str, Any]]] = None,
    ) -> int:
        """One fire, in one transaction: the schedule's new mark, the
        schedule.fire frame, the local jobs it makes (each with its job_id)
        and the queued local jobs it was folded into (job_id -> new data).
        Returns the frame's seq."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT OR REPLACE INTO fires (schedule_id, key, last, fired) VALUES (?, ?, ?, 1)",
                (schedule_id, key, last),
            )
            self._queue_local(local, coalesce or {})
            return self._insert("schedule.fire", frame)

    def new_local_ids(self, count: int) -> list[int]:
        """Ids for jobs the agent makes itself: negative, never reused."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute("SELECT value FROM meta WHERE key='local_job'").fetchone()
            last = row[0] if row else 0
            self._db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('local_job', ?)", (last + count,)
            )
        return [-(last + n) for n in range(1, count + 1)]

    def local_jobs(self) -> list[dict[str, Any]]:
        """The local jobs not yet started, oldest first."""
        rows = self._db.execute("SELECT job_id, data FROM local_jobs ORDER BY job_id DESC")
        return [self._decode(data, f"local job {job_id}") for job_id, data in rows]

    def queue_local(
        self, local: Sequence[dict[str, Any]], coalesce: dict[int, dict[str, Any]]
    ) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._queue_local(local, coalesce)

    def _queue_local(
        self, local: Sequence[dict[str, Any]], coalesce: dict[int, dict[str, Any]]
    ) -> None:
        """New local jobs (each taken, for good) and the queued ones that later
        fires were folded into, inside the caller's transaction."""
        for job in local:
            self._db.execute(
                "INSERT INTO local_jobs (job_id, data) VALUES (?, ?)",
                (job["job_id"], json.dumps(job, separators=(",", ":"))),
            )
            self._db.execute(
                "INSERT OR REPLACE INTO taken (uid, job_id) VALUES (?, ?)",
                (job["uid"], job["job_id"]),
            )
        for job_id, data in coalesce.items():
            self._db.execute(
                "UPDATE local_jobs SET data = ? WHERE job_id = ?",
                (json.dumps(data, separators=(",", ":")), job_id),
            )
        if local:
            self._db.execute(
                "DELETE FROM taken WHERE rowid <= (SELECT MAX(rowid) FROM taken) - ?",
                (TAKEN_KEPT,),
            )

    def taken(self, uid: str) -> bool:
        """Did the agent take this fire backup on itself (queued, run or running)?"""
        return self._db.execute("SELECT 1 FROM taken WHERE uid = ?", (uid,)).fetchone() is not None

    def pending_fires(self) -> list[Frame]:
        """The schedule.fire frames fleetd has not acknowledged, in order."""
        rows = self._db.execute(
            "SELECT seq, type, data FROM frames WHERE type = 'schedule.fire' ORDER BY seq"
        ).fetchall()
        return [(seq, type_, self._decode(data, f"frame {seq}")) for seq, type_, data in rows]

    def drop_local(self, job_id: int) -> None:
        with self._db:
            self._db.execute("DELETE FROM local_jobs WHERE job_id = ?", (job_id,))

    # -- frames -----------------------------------------------------------------

    def first_pending(self) -> int:
        """The oldest unacknowledged seq, or 0 when the spool is empty."""
        row = self._db.execute("SELECT MIN(seq) FROM frames").fetchone()
        return row[0] or 0

    def pending(self, after: int = 0, limit: int = 1000) -> list[Frame]:
        rows = self._db.execute(
            "SELECT seq, type, data FROM frames WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
        ).fetchall()
        return [(seq, type_, self._decode(data, f"frame {seq}")) for seq, type_, data in rows]

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
