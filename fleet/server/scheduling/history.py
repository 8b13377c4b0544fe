"""Pruning fleetd's own history: ended jobs and their log lines go once they
are old, so fleet.db does not grow for ever.

The rule: a job that ended (succeeded, warning, failed, cancelled, lost)
more than `days` ago is deleted with its log lines, unless it is among the
`keep` newest ended jobs of its host, source group and kind (jobs without a
group go by host and kind), or is the newest failed or lost one of them (so
the last failure can always be read). Queued, dispatched and running jobs
are never touched. days = 0 keeps everything.

A pass runs at start (after a short delay, so as not to slow the start) and
then once a day, on the ticker. It goes a few hosts at a time, one store
call per ticker round: a read of what may go (on the reader thread), or the
deletion of one batch in its own transaction, queued as big work, so the
writer is never held long and everything else gets in between batches.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

from ...common.timefmt import iso
from ..store.db import Store
from ..store.models import db
from ..store.queries import history as queries

log = logging.getLogger("fleetd.history")

EVERY = dt.timedelta(days=1)
FIRST_DELAY = 300.0  # seconds from start to the first pass
HOSTS_PER_READ = 20  # hosts whose ended jobs one read ranks
BATCH_JOBS = 500  # jobs deleted in one transaction at most
# and log lines, unless one job alone has more (a job's lines go in one statement)
BATCH_LINES = 20_000


@dataclass(frozen=True)
class Policy:
    days: int = 90  # 0: keep for ever
    keep: int = 10

    @property
    def forever(self) -> bool:
        return self.days == 0


def batches(found: list[tuple[int, int]], jobs: int, lines: int) -> Iterator[list[int]]:
    """Job ids from (id, log lines) pairs, in order, in batches of at most
    `jobs` jobs and `lines` lines (a job with more lines goes alone)."""
    batch: list[int] = []
    weight = 0
    for job_id, count in found:
        if batch and (len(batch) >= jobs or weight + count > lines):
            yield batch
            batch, weight = [], 0
        batch.append(job_id)
        weight += count
    if batch:
        yield batch


def _prunable(
    after: int, hosts: int, cutoff: dt.datetime, keep: int
) -> tuple[list[int], list[tuple[int, int]]]:
    """(host ids, their prunable jobs' (id, log lines)) of the next `hosts`
    hosts after id `after`."""
    ids = queries.hosts_after(after, hosts)
    return ids, queries.prunable(ids[0], ids[-1], cutoff, keep) if ids else []


def _delete(ids: list[int], cutoff: dt.datetime) -> tuple[int, int]:
    with db.atomic():
        return queries.delete_jobs(ids, cutoff)


class Pass:
    """One pass over every host's history, one store call per step."""

    def __init__(
        self,
        store: Store,
        policy: Policy,
        now: dt.datetime,
        batch_jobs: int = BATCH_JOBS,
        batch_lines: int = BATCH_LINES,
        hosts_per_read: int = HOSTS_PER_READ,
    ) -> None:
        self.store = store
        self.policy = policy
        self.cutoff = now - dt.timedelta(days=policy.days)
        self.batch_jobs = batch_jobs
        self.batch_lines = batch_lines
        self.hosts_per_read = hosts_per_read
        self.after = 0  # hosts up to this id were read
        self.read_all = policy.forever
        self.pending: list[list[int]] = []  # batches read and not yet deleted
        self.jobs = 0
        self.lines = 0
        self.started = time.monotonic()

    @property
    def done(self) -> bool:
        return self.read_all and not self.pending

    async def step(self) -> bool:
        """The pass's next store call; False once there is nothing left."""
        if self.pending:
            jobs, lines = await self.store.bulk(_delete, self.pending[0], self.cutoff)
            del self.pending[0]  # only once deleted: a failed batch is tried again
            self.jobs += jobs
            self.lines += lines
        elif not self.read_all:
            hosts, found = await self.store.read(
                _prunable, self.after, self.hosts_per_read, self.cutoff, self.policy.keep
            )
            self.read_all = len(hosts) < self.hosts_per_read
            if hosts:
                self.after = hosts[-1]
            self.pending = list(batches(found, self.batch_jobs, self.batch_lines))
        return not self.done

    def report(self) -> None:
        log.info(
            "pruned %d jobs and %d log lines (of jobs that ended before %s) in %.1f s",
            self.jobs,
            self.lines,
            iso(self.cutoff),
            time.monotonic() - self.started,
        )


async def prune(store: Store, policy: Policy, now: dt.datetime, **sizes: int) -> Pass:
    """A whole pass at once (the ticker runs one a step at a time)."""
    run = Pass(store, policy, now, **sizes)
    while await run.step():
        pass
    return run


class HistoryPruning:
    """The ticker's source: a pass FIRST_DELAY after start, then every day.
    While a pass is under way it is due at once, a step per ticker round, so
    retries and lost jobs are never held up behind a long pass."""

    name = "history pruning"

    def __init__(
        self, store: Store, policy: Policy, started_at: dt.datetime, delay: float = FIRST_DELAY
    ) -> None:
        self.store = store
        self.policy = policy
        self.next_pass = started_at + dt.timedelta(seconds=delay)
        self.current: Optional[Pass] = None
        self.passes = 0  # passes finished (for tests)

    async def next_due(self, now: dt.datetime) -> Optional[dt.datetime]:
        if self.policy.forever:
            return None
        return now if self.current is not None else self.next_pass

    async def run_due(self, now: dt.datetime) -> None:
        if self.current is None:
            self.current = Pass(self.store, self.policy, now)
            self.next_pass = now + EVERY
        if not await self.current.step():
            self.current.report()
            self.current = None
            self.passes += 1
