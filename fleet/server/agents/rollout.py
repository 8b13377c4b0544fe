"""Agent upgrades rolled out host by host (fleetctl agents upgrade).

A rollout is rows in the store: the rollout, and a row per host in the order
it goes, in batches of N. fleetd drives it, not the operator's connection:
one task per running rollout, taken up again when fleetd starts.

A batch: each host still pending is sent agent.upgrade, or skipped (offline,
or an agent too old to upgrade itself: the rollout cannot reach it, which is
no verdict on the new agent). Then the batch waits until each host sent it
has come back: upgraded (a hello with the new version), or failed (it
refused, its checks failed, it rolled back, or no hello with the new
version within the rollout's timeout). A busy agent is asked again every
BUSY_RETRY seconds within that time. The next batch goes only when none
failed; the first failure halts the rollout, and the hosts after it are
left as they were (pending).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

from ...common import protocol
from ...common.timefmt import iso
from ..events import (
    AgentHello,
    Bus,
    HostRemoved,
    RolloutChanged,
    RolloutStarted,
    UpgradeAnswered,
)
from ..store.db import Store, StoreClosed
from ..store.models import Host, Rollout, RolloutHost, utcnow
from ..store.queries import hot

log = logging.getLogger("fleetd.rollout")

RECONNECT_GRACE = 90.0  # seconds agents get to come back to a restarted fleetd
FEATURE = "upgrade"  # what an agent says in hello when it can upgrade itself
BUSY_RETRY = 5.0  # seconds before a busy agent is asked again
FINAL = ("upgraded", "current", "skipped", "failed")


# -- pure: versions and the plan ------------------------------------------------


def version_key(version: str) -> tuple:
    """An order on versions: dotted numbers compared as numbers ('0.10.0' >
    '0.9.1'); a piece with letters after its number sorts after the bare
    number's predecessors but before it ('1.0rc1' < '1.0')."""
    key = []
    for piece in re.split(r"[.+-]", version):
        match = re.match(r"(\d*)(.*)", piece)
        number, rest = match.group(1), match.group(2)  # type: ignore[union-attr]
        key.append((int(number) if number else -1, 0 if rest else 1, rest))
    return tuple(key)


def compare(version: Optional[str], served: Optional[str]) -> str:
    """An agent's version against the one fleetd serves: current, behind,
    ahead, or unknown (no agent has said hello, or none is served)."""
    if not version or not served:
        return "unknown"
    if version == served:
        return "current"
    return "behind" if version_key(version) < version_key(served) else "ahead"


@dataclass(frozen=True)
class Planned:
    host_id: int
    name: str
    version: Optional[str]
    batch: int  # 0: at the version already, nothing to do
    status: str  # pending | current


def plan(hosts: list[tuple[int, str, Optional[str]]], served: str, batch: int) -> list[Planned]:
    """(host id, name, agent version) in the order given -> the rollout's
    rows: hosts at the served version have nothing to do, the others go in
    batches of `batch`, in order."""
    if batch < 1:
        raise ValueError("a batch holds one host at least")
    out, n = [], 0
    for host_id, name, version in hosts:
        if version == served:
            out.append(Planned(host_id, name, version, 0, "current"))
            continue
        out.append(Planned(host_id, name, version, n // batch + 1, "pending"))
        n += 1
    return out


def outcome(status: str, hosts: list[dict[str, Any]]) -> str:
    """ok (every host upgraded or current), partial (some skipped or left),
    halted, running, or none (no host picked)."""
    if status in ("halted", "running"):
        return status
    if not hosts:
        return "none"
    if all(h["status"] in ("upgraded", "current") for h in hosts):
        return "ok"
    return "partial"


# -- the store side ----------------------------------------------------------------


def host_line(row: RolloutHost) -> dict[str, Any]:
    return {
        "host": row.host_name,
        "position": row.position,
        "batch": row.batch,
        "from_version": row.from_version,
        "status": row.status,
        "detail": row.detail,
        "sent_at": iso(row.sent_at),
        "finished_at": iso(row.finished_at),
    }


def hosts_to_do(rollout_id: int) -> list[int]:
    """The hosts a rollout has still to upgrade or hear from."""
    return [
        h
        for (h,) in RolloutHost.select(RolloutHost.host)
        .where(
            (RolloutHost.rollout == rollout_id)
            & RolloutHost.status.in_(["pending", "sent"])
            & RolloutHost.host.is_null(False)
        )
        .tuples()
    ]


def rollout_json(r: Rollout, rows: list[RolloutHost]) -> dict[str, Any]:
    hosts = [host_line(row) for row in rows]
    counts: dict[str, int] = {}
    for h in hosts:
        counts[h["status"]] = counts.get(h["status"], 0) + 1
    return {
        "id": r.id,
        "status": r.status,
        "reason": r.reason,
        "outcome": outcome(r.status, hosts),
        "version": r.version,
        "sha256": r.sha256,
        "size_bytes": r.size,
        "selector": r.selector,
        "batch": r.batch,
        "timeout_seconds": r.timeout,
        "created_by": r.created_by,
        "created_at": iso(r.created_at),
        "finished_at": iso(r.finished_at),
        "counts": counts,
        "hosts": hosts,
    }


def create(
    user: str,
    selector: Optional[str],
    batch: int,
    timeout: int,
    agent: dict[str, Any],
    planned: list[Planned],
) -> Rollout:
    r = Rollout.create(
        created_by=user,
        selector=selector,
        batch=batch,
        timeout=timeout,
        version=agent["version"],
        sha256=agent["sha256"],
        size=agent["size_bytes"],
        # nothing to do is done at once
        status="running" if any(p.status == "pending" for p in planned) else "succeeded",
        finished_at=None if any(p.status == "pending" for p in planned) else utcnow(),
    )
    RolloutHost.insert_many(
        [
            {
                "rollout": r.id,
                "host": p.host_id,
                "host_name": p.name,
                "position": i,
                "batch": p.batch,
                "from_version": p.version,
                "status": p.status,
                "finished_at": utcnow() if p.status == "current" else None,
            }
            for i, p in enumerate(planned, 1)
        ]
    ).execute()
    return r


def running() -> Optional[int]:
    """The id of the rollout under way, if any."""
    row = Rollout.select(Rollout.id).where(Rollout.status == "running").first()
    return row.id if row is not None else None


def load(rollout_id: Optional[int]) -> Optional[dict[str, Any]]:
    """A rollout as views show it (None: the latest); None when there is none."""
    query = Rollout.select()
    r = (
        query.where(Rollout.id == rollout_id).first()
        if rollout_id is not None
        else query.order_by(Rollout.id.desc()).first()
    )
    if r is None:
        return None
    rows = list(
        RolloutHost.select().where(RolloutHost.rollout == r.id).order_by(RolloutHost.position)
    )
    return rollout_json(r, rows)


def batch_rows(rollout_id: int) -> list[tuple[int, list[RolloutHost]]]:
    """The batches with work in them (batch > 0), in order."""
    rows = (
        RolloutHost.select()
        .where((RolloutHost.rollout == rollout_id) & (RolloutHost.batch > 0))
        .order_by(RolloutHost.batch, RolloutHost.position)
    )
    batches: dict[int, list[RolloutHost]] = {}
    for row in rows:
        batches.setdefault(row.batch, []).append(row)
    return sorted(batches.items())


def mark(row_id: int, status: str, detail: Optional[str] = None) -> dict[str, Any]:
    """A host of a rollout moves on; its line."""
    row = RolloutHost.get_by_id(row_id)
    row.status, row.detail = status, detail
    if status == "sent":
        row.sent_at = utcnow()
    if status in FINAL:
        row.finished_at = utcnow()
    row.save()
    return host_line(row)


def finish(rollout_id: int, status: str, reason: Optional[str]) -> bool:
    """End a running rollout; False when it had ended already."""
    ended = (
        Rollout.update(status=status, reason=reason, finished_at=utcnow())
        .where((Rollout.id == rollout_id) & (Rollout.status == "running"))
        .execute()
    )
    if not ended:
        return False
    hot.insert_audit(
        utcnow(),
        "system",
        f"agents.rollout_{status}",
        f"rollout {rollout_id}",
        {"reason": reason} if reason else None,
        None,
    )
    return True


# -- the driver ---------------------------------------------------------------------


@dataclass(frozen=True)
class AskAgain:
    """A busy agent's turn to be asked again."""

    host_id: int


@dataclass(frozen=True)
class Halt:
    """An operator halted the rollout."""

    host_id: int = 0


Wake = Union[AgentHello, UpgradeAnswered, AskAgain, HostRemoved, Halt]


@dataclass
class Waiting:
    row_id: int
    name: str
    deadline: float  # time.time() by which it must be back with the new version


class Rollouts:
    """The rollouts under way: one task each, woken by what agents say."""

    def __init__(
        self,
        store: Store,
        bus: Bus,
        agents: Any,
        agent_file: Any,
        reconnect_grace: float = RECONNECT_GRACE,
    ) -> None:
        self.store = store
        self.reconnect_grace = reconnect_grace
        self._hello = asyncio.Event()  # an agent said hello: one awaited may be back
        self.bus = bus
        self.agents = agents  # session.Agents: who is connected, and their features
        self.agent_file = agent_file  # agentfile.AgentFile, or None
        self.tasks: dict[int, asyncio.Task] = {}
        self.queues: dict[int, asyncio.Queue] = {}
        self.halting: dict[int, str] = {}  # rollout -> why, until its driver stops
        # rollouts are driven by one fleetd: the leader among replicas (one
        # alone always is); another one that makes or halts one says so
        self.leading = True
        for kind in (AgentHello, UpgradeAnswered, HostRemoved):
            bus.subscribe(kind, self._wake)
        bus.subscribe(RolloutStarted, self._started, local=False)
        bus.subscribe(RolloutChanged, self._ended_elsewhere, local=False)

    def begin(self, rollout_id: int) -> None:
        """A rollout just made: driven here, or by the leader."""
        if self.leading:
            self.start(rollout_id)
        else:
            self.bus.publish([RolloutStarted(rollout_id)])

    def _started(self, event: RolloutStarted) -> None:
        if self.leading:
            self.start(event.rollout_id)

    def _ended_elsewhere(self, event: RolloutChanged) -> None:
        """Halted through another replica (it ended it in the store): the
        driver here stops where it is."""
        task = self.tasks.get(event.rollout_id)
        if event.ended and task is not None:
            task.cancel()

    def _wake(self, event: Wake) -> None:
        if isinstance(event, AgentHello):
            self._hello.set()
        for queue in self.queues.values():
            queue.put_nowait(event)

    async def resume(self) -> None:
        """Take up the rollout fleetd was driving when it stopped, once the
        agents it has still to do are back (they redial a restarted fleetd
        within a minute or so), or RECONNECT_GRACE has passed: an agent not
        back yet is not offline, and would otherwise be skipped."""
        rollout_id = await self.store.read(running)
        if rollout_id is None:
            return
        log.info("taking up agent rollout %s again", rollout_id)
        waiting = await self.store.read(hosts_to_do, rollout_id)
        if await self._all_back(waiting):
            self.start(rollout_id)
        else:
            asyncio.ensure_future(self._start_when_back(rollout_id, waiting))

    async def _all_back(self, hosts: list[int]) -> bool:
        for host_id in hosts:
            if await self.agents.reach(host_id) is None:
                return False
        return True

    async def _start_when_back(self, rollout_id: int, waiting: list[int]) -> None:
        deadline = time.monotonic() + self.reconnect_grace
        while not await self._all_back(waiting):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._hello.clear()
            try:
                await asyncio.wait_for(self._hello.wait(), left)
            except asyncio.TimeoutError:
                break
        self.start(rollout_id)

    def start(self, rollout_id: int) -> None:
        if rollout_id in self.tasks:
            return
        self.queues[rollout_id] = asyncio.Queue()
        task = asyncio.ensure_future(self._drive(rollout_id))
        self.tasks[rollout_id] = task

        def done(t: asyncio.Task) -> None:
            self.tasks.pop(rollout_id, None)
            self.queues.pop(rollout_id, None)
            if not t.cancelled() and t.exception() is not None:
                log.error("agent rollout %s failed", rollout_id, exc_info=t.exception())

        task.add_done_callback(done)

    async def stop(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    async def _mark(
        self, rollout_id: int, row_id: int, status: str, detail: Optional[str] = None
    ) -> None:
        line = await self.store.atomic(mark, row_id, status, detail)
        log.info(
            "rollout %s: %s %s%s",
            rollout_id,
            line["host"],
            status,
            f" ({detail})" if detail else "",
        )
        self.bus.publish([RolloutChanged(rollout_id, line)])

    async def _finish(self, rollout_id: int, status: str, reason: Optional[str]) -> bool:
        if not await self.store.atomic(finish, rollout_id, status, reason):
            return False
        log.info("rollout %s %s%s", rollout_id, status, f": {reason}" if reason else "")
        self.bus.publish([RolloutChanged(rollout_id, ended=True)])
        return True

    async def halt(self, rollout_id: int, reason: str) -> bool:
        """Stop a rollout where it is: no host is sent the upgrade after
        this (those sent it go on with theirs). The driver ends it at its
        next step, not in the middle of one. False: it had ended."""
        task = self.tasks.get(rollout_id)
        if task is None:  # not driven here: ended in the store, and its driver told
            return await self._finish(rollout_id, "halted", reason)
        self.halting[rollout_id] = reason
        self.queues[rollout_id].put_nowait(Halt())
        await asyncio.gather(task, return_exceptions=True)
        return self.halting.pop(rollout_id, None) is None  # the driver took it

    def _frame(self, r: dict[str, Any]) -> dict[str, Any]:
        """agent.upgrade's data (checked against the protocol here, where a
        bad one is fleetd's bug, not at the replica that sends it)."""
        # the agent has a third of the timeout to be welcomed before it rolls
        # itself back, so its old self is back, and says so, well within it
        deadline = max(1, min(protocol.MAX_UPGRADE_DEADLINE, r["timeout_seconds"] // 3))
        data = {
            "version": r["version"],
            "sha256": r["sha256"],
            "size": r["size_bytes"],
            "deadline": deadline,
        }
        protocol.encode("agent.upgrade", data)
        return data

    async def _send(self, host_id: int, frame: dict[str, Any]) -> Optional[str]:
        """Send agent.upgrade, through whichever replica holds the host's
        link; None, or why the host is skipped. (A link that drops as it
        goes: the host is back without the new version, and is sent it
        again, or runs out of time.)"""
        features = await self.agents.reach(host_id)
        if features is None:
            return "offline"
        if FEATURE not in features:
            return "its agent is too old to upgrade itself: replace its file by hand"
        self.agents.upgrade(host_id, frame)
        return None

    async def _drive(self, rollout_id: int) -> None:
        try:
            await self._run(rollout_id)
        except StoreClosed:
            pass  # fleetd stops; the rollout is taken up again at the next start

    async def _run(self, rollout_id: int) -> None:
        queue = self.queues[rollout_id]
        r = await self.store.read(load, rollout_id)
        if r is None or r["status"] != "running":
            return
        if self.agent_file is None or self.agent_file.sha256 != r["sha256"]:
            # fleetd was restarted with another file (or none): the rollout
            # would hand out what it did not promise
            await self._finish(
                rollout_id,
                "halted",
                f"fleetd no longer serves fleet-agent {r['version']} (SHA-256 {r['sha256'][:12]}...)",
            )
            return
        frame = self._frame(r)
        for _, rows in await self.store.read(batch_rows, rollout_id):
            waiting: dict[int, Waiting] = {}
            failed: list[tuple[str, str]] = []
            for row in rows:
                if rollout_id in self.halting:
                    break
                if row.status == "failed":
                    failed.append((row.host_name, row.detail or "failed"))
                if row.status != "sent" and row.status != "pending":
                    continue
                host_id = row.host_id
                if host_id is None:  # removed meanwhile
                    await self._mark(rollout_id, row.id, "skipped", "the host was removed")
                    continue
                if row.status == "pending":
                    if await self.agents.reach(host_id) is not None and await self._current(
                        host_id, r["version"]
                    ):  # there already (sent before a restart, or upgraded by hand)
                        await self._mark(rollout_id, row.id, "upgraded")
                        continue
                    why = await self._send(host_id, frame)
                    if why is not None:
                        await self._mark(rollout_id, row.id, "skipped", why)
                        continue
                    await self._mark(rollout_id, row.id, "sent")
                    sent = time.time()
                else:  # sent before fleetd restarted: its clock runs from then
                    sent = row.sent_at.replace(tzinfo=dt.timezone.utc).timestamp()
                    if await self.agents.reach(host_id) is not None and await self._current(
                        host_id, r["version"]
                    ):
                        await self._mark(rollout_id, row.id, "upgraded")
                        continue
                waiting[host_id] = Waiting(row.id, row.host_name, sent + r["timeout_seconds"])
            failed += await self._wait(rollout_id, r, frame, waiting, queue)
            if rollout_id in self.halting:
                await self._finish(rollout_id, "halted", self.halting.pop(rollout_id))
                return
            if failed:
                name, why = failed[0]
                await self._finish(rollout_id, "halted", f"{name}: {why}")
                return
        await self._finish(rollout_id, "succeeded", None)

    async def _current(self, host_id: int, version: str) -> bool:
        return await self.store.read(agent_version, host_id) == version

    async def _wait(
        self,
        rollout_id: int,
        r: dict[str, Any],
        frame: dict[str, Any],
        waiting: dict[int, Waiting],
        queue: asyncio.Queue,
    ) -> list[tuple[str, str]]:
        """Until every host sent the upgrade is back, failed or out of time."""
        failed: list[tuple[str, str]] = []
        loop = asyncio.get_running_loop()
        version = r["version"]
        while waiting and rollout_id not in self.halting:
            left = min(w.deadline for w in waiting.values()) - time.time()
            try:
                event = await asyncio.wait_for(queue.get(), max(0.0, left))
            except asyncio.TimeoutError:
                now = time.time()
                for host_id, w in list(waiting.items()):
                    if w.deadline <= now:
                        why = f"no hello with fleet-agent {version} within {r['timeout_seconds']} s"
                        await self._mark(rollout_id, w.row_id, "failed", why)
                        failed.append((w.name, why))
                        del waiting[host_id]
                continue
            w = waiting.get(event.host_id)
            if w is None:
                continue
            why: Optional[str] = None
            if isinstance(event, HostRemoved):
                await self._mark(rollout_id, w.row_id, "skipped", "the host was removed")
                del waiting[event.host_id]
                continue
            if isinstance(event, AgentHello):
                if event.version == version:
                    await self._mark(rollout_id, w.row_id, "upgraded")
                    del waiting[event.host_id]
                    continue
                if event.upgrade_failed == version:
                    why = f"rolled back: {event.upgrade_error or 'the new agent failed'}"
                else:  # back as it was, without a word: it may never have got the frame
                    await self._send(event.host_id, frame)
                    continue
            elif isinstance(event, UpgradeAnswered):
                if event.accepted or event.version != version:
                    continue
                if event.code == "busy":
                    loop.call_later(BUSY_RETRY, queue.put_nowait, AskAgain(event.host_id))
                    continue
                why = f"{event.code or 'refused'}: {event.error or 'the agent refused'}"
            elif isinstance(event, AskAgain):
                await self._send(event.host_id, frame)
                continue
            if why is not None:
                await self._mark(rollout_id, w.row_id, "failed", why)
                failed.append((w.name, why))
                del waiting[event.host_id]
        return failed


def agent_version(host_id: int) -> Optional[str]:
    """The version the host's agent last said in hello."""
    host = Host.select(Host.agent_version).where(Host.id == host_id).first()
    return host.agent_version if host is not None else None
