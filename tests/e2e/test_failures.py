"""Failures in the middle of a backup (issue 4): real fleetd, agents and restic.

- the link between agent and fleetd cut while a backup streams its log;
- fleetd SIGKILLed mid-backup and started again on the same data dir;
- the agent SIGKILLed mid-backup: restarted (the job is lost, the stale
  restic lock is reported and unlocked), or gone for good (lost by timeout);
- a hundred agents reconnecting after a fleetd restart.

The backups that must survive a failure run a pre-hook that prints 1000
numbered lines, waits for a gate file the test creates once the failure is in
place, then prints 1000 more: the second half, restic's own output and the
job's end are produced while fleetd cannot be reached, so they can only
arrive through the agent's spool. Backups that must be killed in restic read
a 16 GiB sparse file (no disk, tens of seconds of hashing).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types
import uuid
from pathlib import Path

import pytest

AGENT_PYTHON = "3.13"  # the agents here run from the zipapp under the newest Python
HALF = 1000  # hook lines before the gate, and after it
HOOK_LINE = re.compile(r"line (\d+)")
SMALL_TREE = {
    "etc/app.conf": "setting = 1\n",
    "data/a.bin": os.urandom(32 * 1024),
    "data/b.txt": "b\n" * 100,
}
MANY = 100
MANY_AGENTS = Path(__file__).with_name("many_agents.py")


# -- helpers ------------------------------------------------------------------------


def assert_delivered_once(e2e, fleet, job_id: int) -> dict:
    """The stored log of a gated backup: seq 1..N, every hook line exactly once and
    in order, the agent's note and restic's summary once; returns the job."""
    job = e2e.show(fleet, job_id)
    lines = e2e.log_lines(fleet, job_id)
    seqs = [ln["seq"] for ln in lines]
    if seqs != list(range(1, len(seqs) + 1)):
        missing = sorted(set(range(1, max(seqs) + 1)) - set(seqs))
        repeated = sorted({s for s in seqs if seqs.count(s) > 1})
        raise AssertionError(f"seqs not 1..N: missing {missing[:20]}, repeated {repeated[:20]}")
    assert {ln["job"] for ln in lines} == {job_id}
    assert job["log_lines"] == len(lines)
    payloads = [ln["payload"] for ln in lines]
    hook = [p for p in payloads if HOOK_LINE.fullmatch(p)]
    expected = [f"line {i}" for i in range(1, 2 * HALF + 1)]
    if hook != expected:
        numbers = [int(p.split()[1]) for p in hook]
        missing = sorted(set(range(1, 2 * HALF + 1)) - set(numbers))
        repeated = sorted({n for n in numbers if numbers.count(n) > 1})
        raise AssertionError(
            f"{len(hook)} hook lines: missing {missing[:20]}, repeated {repeated[:20]}"
        )
    assert sum(p.startswith("fleet-agent: running pre-hook:") for p in payloads) == 1
    events = [json.loads(ln["payload"]) for ln in lines if ln["stream"] == "event"]
    summaries = [ev for ev in events if ev.get("message_type") == "summary"]
    assert len(summaries) == 1, summaries
    assert job["summary"] and summaries[0]["snapshot_id"] == job["summary"]["snapshot_id"]
    # the summary comes after the whole hook
    assert payloads.index(f"line {2 * HALF}") < next(
        i for i, ln in enumerate(lines) if ln["stream"] == "event" and '"summary"' in ln["payload"]
    )
    return job


def assert_snapshot_reported(e2e, fleet, h, job: dict) -> None:
    """restic holds exactly the snapshot the job made, and fleetd was told of it."""
    proc = e2e.restic(h.repo, h.password, "snapshots", "--json")
    assert proc.returncode == 0, proc.stderr
    snaps = json.loads(proc.stdout)
    assert len(snaps) == 1 and snaps[0]["id"].startswith(job["summary"]["snapshot_id"]), snaps
    # job.finished comes first; the full snapshot list follows it
    e2e.fx.wait_until(
        lambda: [s["id"] for s in fleet.ctl_json("snapshots", h.name)] == [snaps[0]["id"]],
        timeout=20,
        interval=0.1,
        what="fleetd to list the job's snapshot",
    )


def gated_backup(e2e, fleet, h) -> tuple[int, Path]:
    """Queue a gated backup of a small tree; returns (job id, gate)."""
    e2e.write_tree(h.src, SMALL_TREE)
    gate = h.base / "gate"
    group = e2e.group(fleet, h, "--pre-hook", e2e.gated_hook(gate, HALF))
    return e2e.run(fleet, h.name, group)["id"], gate


def wait_first_half(e2e, fleet, job_id: int) -> dict:
    """The job runs and fleetd stored the hook's first half (and the agent's note)."""
    return e2e.fx.wait_until(
        lambda: (
            (j := e2e.show(fleet, job_id))["status"] == "running"
            and j["log_lines"] >= HALF + 1
            and j
        ),
        timeout=30,
        interval=0.1,
        what=f"job {job_id} to store the hook's first {HALF} lines",
    )


def restic_backups(path: Path) -> list[int]:
    """pids of live `restic backup` processes whose arguments name `path`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = [
                a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0")
            ]
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # gone meanwhile, or not ours to read
        restic = state != "Z" and argv and os.path.basename(argv[0]) == "restic"
        if restic and "backup" in argv and str(path) in argv:
            pids.append(int(entry.name))
    return pids


def big_sparse_file(path: Path, size: int = 16 << 30) -> None:
    """Many GiB that cost no disk: restic reads (and hashes) them for tens of seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.truncate(size)


def restic_locks(e2e, h) -> list[str]:
    proc = e2e.restic(h.repo, h.password, "list", "locks", "--no-lock")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def kill_agent_mid_backup(e2e, fleet, h, subreaper) -> int:
    """Start a backup of a huge file, SIGKILL the agent while restic reads it,
    check restic died with it and left its lock; returns the job id."""
    big_sparse_file(h.src / "big" / "huge.img")
    group = e2e.group(fleet, h, "--include", h.src / "big")
    job_id = e2e.run(fleet, h.name, group)["id"]
    pids = e2e.fx.wait_until(
        lambda: (
            e2e.show(fleet, job_id)["status"] == "running"
            and (h.repo / "locks").is_dir()
            and any((h.repo / "locks").iterdir())
            and restic_backups(h.src / "big")
        ),
        timeout=30,
        interval=0.1,
        what="restic to be backing up, holding its lock",
    )
    assert len(pids) == 1, pids
    h.agent.kill()  # SIGKILL: no chance to interrupt restic or report anything
    assert h.agent.proc.returncode == -signal.SIGKILL
    # PR_SET_PDEATHSIG: restic was killed with the agent instead of running on unseen.
    # Orphaned, it is this process's child to collect; unless a thread of the dying
    # agent (asyncio's child watcher) reaped it first: then it is simply gone.
    status = subreaper.reap(pids[0])
    if status is not None:
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    assert not restic_backups(h.src / "big")
    # and, killed, it could not remove its lock
    assert len(restic_locks(e2e, h)) == 1
    return job_id


# -- (a) the link cut mid-backup ----------------------------------------------------------


def test_link_cut_mid_backup_loses_and_duplicates_nothing(fleetd_factory, e2e, relay):
    fleet = fleetd_factory("--public-url", relay.url)
    relay.retarget(fleet.fleetd.port)
    h = e2e.host(fleet)
    assert h.agent.identity["server_url"] == relay.url  # the agent dials the relay
    job_id, gate = gated_backup(e2e, fleet, h)
    wait_first_half(e2e, fleet, job_id)

    relayed = relay.connections
    downs = h.agent.count("link to ")
    relay.cut()
    h.agent.wait_log("link to ", downs + 1, timeout=10)
    gate.touch()  # the rest of the job happens while fleetd is out of reach
    h.agent.wait_log(f"job {job_id} (backup) succeeded", timeout=60)

    # fleetd saw none of it; the agent holds it all in its spool
    e2e.wait_host(fleet, h.name, "offline", timeout=10)
    shown = e2e.show(fleet, job_id)
    assert shown["status"] == "running" and shown["log_lines"] == HALF + 1, shown
    assert e2e.agent_status(h)["unacknowledged_frames"] > HALF

    relay.restore()
    done = e2e.wait_job(fleet, job_id, timeout=60)
    assert done["status"] == "succeeded" and done["exit_code"] == 0, done
    assert relay.connections > relayed  # it came back through the relay
    job = assert_delivered_once(e2e, fleet, job_id)
    assert_snapshot_reported(e2e, fleet, h, job)
    e2e.fx.wait_until(
        lambda: e2e.agent_status(h)["unacknowledged_frames"] == 0,
        timeout=10,
        what="fleetd to acknowledge the whole spool",
    )


def test_agent_survives_a_redial_reset_during_the_handshake(fleetd_factory, e2e, relay):
    """A TCP proxy or load balancer in front of a dead fleetd accepts the agent's
    dial and resets it before the upgrade is answered (websockets raises
    InvalidMessage, not OSError): the agent must keep redialling, not exit."""
    fleet = fleetd_factory("--public-url", relay.url)
    relay.retarget(fleet.fleetd.port)
    h = e2e.host(fleet, set_repo=False)
    downs = h.agent.count("link to ")
    connected = h.agent.count("connected to")
    relay.cut(reset=True)
    # the link drops (one "down"), a redial is accepted and reset (a second one)
    h.agent.wait_log("link to ", downs + 1, timeout=10)
    e2e.fx.wait_until(lambda: relay.refused >= 1, timeout=10, what="a redial to be reset")
    h.agent.wait_log("link to ", downs + 2, timeout=10)
    relay.restore()
    h.agent.wait_log("connected to", connected + 1, timeout=30)
    e2e.wait_host(fleet, h.name, "online")


# -- (b) fleetd SIGKILLed mid-backup ---------------------------------------------------


def test_fleetd_killed_mid_backup_loses_and_duplicates_nothing(fleetd_factory, e2e, fx):
    fleet = fleetd_factory()
    h = e2e.host(fleet)
    job_id, gate = gated_backup(e2e, fleet, h)
    # killed while the first half streams in, or just after
    fx.wait_until(
        lambda: (j := e2e.show(fleet, job_id))["status"] == "running" and j["log_lines"] >= 1,
        timeout=30,
        interval=0.05,
        what=f"job {job_id} to start logging",
    )
    old = fleet.fleetd
    downs = h.agent.count("link to ")
    assert old.stop(signal.SIGKILL) == -signal.SIGKILL
    h.agent.wait_log("link to ", downs + 1, timeout=10)
    gate.touch()
    h.agent.wait_log(f"job {job_id} (backup) succeeded", timeout=60)
    assert e2e.agent_status(h)["unacknowledged_frames"] > HALF

    new = fx.Fleetd(
        old.data_dir, old.log_path.with_name("fleetd-restarted.log"), listen=f"127.0.0.1:{old.port}"
    ).start()
    fleet.fleetd = new  # teardown: SIGTERM must exit 0 and its log hold no traceback
    assert new.port == old.port
    done = e2e.wait_job(fleet, job_id, timeout=60)
    assert done["status"] == "succeeded" and done["exit_code"] == 0, done
    job = assert_delivered_once(e2e, fleet, job_id)
    assert_snapshot_reported(e2e, fleet, h, job)
    e2e.wait_host(fleet, h.name, "online")
    assert "Traceback" not in old.log()


# -- (c) the agent SIGKILLed mid-backup -------------------------------------------------


def test_agent_killed_mid_backup_job_lost_lock_reported_and_unlocked(fleet, e2e, subreaper):
    h = e2e.host(fleet)
    e2e.write_tree(h.src, {"small/a.txt": "a\n"})
    small = e2e.group(fleet, h, "--include", h.src / "small")
    job_id = kill_agent_mid_backup(e2e, fleet, h, subreaper)
    e2e.wait_host(fleet, h.name, "offline", timeout=10)
    assert e2e.show(fleet, job_id)["status"] == "running"  # fleetd cannot know yet

    e2e.start(fleet, h)
    done = e2e.wait_job(fleet, job_id, timeout=20)
    assert done["status"] == "lost", done
    assert "restarted" in done["error"], done
    # the agent reported the stale lock at start
    info = e2e.fx.wait_until(
        lambda: (i := e2e.host_info(fleet, h.name))["repo_locks"] and i,
        timeout=20,
        interval=0.1,
        what="the stale lock to be reported",
    )
    assert info["repo_locks"] == 1, info

    code, out, err = e2e.fleetctl(fleet, "repo", "unlock", h.name, "--follow")
    assert code == 0, f"{out}\n{err}"
    # the unlock job reports the locks before it ends
    assert e2e.host_info(fleet, h.name)["repo_locks"] == 0
    assert restic_locks(e2e, h) == []

    code, out, err = e2e.fleetctl(fleet, "run", h.name, small, "--follow")
    assert code == 0, f"{out}\n{err}"
    snaps = json.loads(e2e.restic(h.repo, h.password, "snapshots", "--json").stdout)
    assert [s["tags"] for s in snaps] == [[small]]


def test_agent_killed_for_good_job_lost_after_timeout(fleetd_factory, e2e, subreaper):
    fleet = fleetd_factory("--lost-after", "3", "--heartbeat-interval", "1")
    h = e2e.host(fleet)
    job_id = kill_agent_mid_backup(e2e, fleet, h, subreaper)
    done, took = e2e.timed(
        lambda: (j := e2e.show(fleet, job_id))["status"] != "running" and j, timeout=12
    )
    assert done["status"] == "lost", done
    assert "offline" in done["error"], done
    # lost once the host stayed away for --lost-after, not at the disconnect
    assert 1.0 <= took <= 10, took
    assert e2e.host_info(fleet, h.name)["status"] == "offline"


# -- (d) a hundred agents and a fleetd restart -----------------------------------------------


class Lines:
    """A process's stdout lines, each with the monotonic time it arrived."""

    def __init__(self, proc: subprocess.Popen, stderr: Path) -> None:
        self.proc = proc
        self.stderr = stderr
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            with self._lock:
                self.lines.append((time.monotonic(), line.rstrip("\n")))

    def since(self, t0: float, prefix: str) -> list[tuple[float, list[str]]]:
        """(time, words) of the lines starting with `prefix` that arrived after t0."""
        if self.proc.poll() is not None:
            raise AssertionError(
                f"many_agents.py exited {self.proc.returncode}; last lines {self.lines[-5:]}; "
                f"stderr:\n{self.stderr.read_text(errors='replace')[-3000:]}"
            )
        with self._lock:
            return [(t, ln.split()) for t, ln in self.lines if t > t0 and ln.startswith(prefix)]

    def per_agent(self, t0: float, prefix: str) -> dict[int, list[tuple[float, list[str]]]]:
        out: dict[int, list[tuple[float, list[str]]]] = {}
        for t, words in self.since(t0, prefix + " "):
            out.setdefault(int(words[1]), []).append((t, words))
        return out


@pytest.fixture(scope="module")
def hundred(tmp_path_factory, fx):
    """100 real agents in one process (many_agents.py); fleetd SIGTERMed once they
    are all up and started again on the same port and data dir once every agent
    saw it gone (a dropped link and a refused redial). What was seen, for the tests."""
    base = tmp_path_factory.mktemp("hundred")
    fleet = fx.start_fleet(base / "fleet")
    proc = None
    try:
        tag = uuid.uuid4().hex[:6]
        with fx.ws_connect(fleet.url, "/ctl", fleet.admin_token) as ws:
            names = [f"many-{i:03d}-{tag}" for i in range(MANY)]
            enrollments = [fx.rpc_on(ws, "enroll.create", host=n)["enrollment"] for n in names]
        spec = base / "spec.json"
        spec.write_text(
            json.dumps(
                [
                    {"enrollment": e, "state_dir": str(base / f"agent{i}")}
                    for i, e in enumerate(enrollments)
                ]
            )
        )
        with open(base / "many_agents.log", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, str(MANY_AGENTS), str(spec)],
                cwd=fx.REPO_ROOT,
                env=fx.clean_env(PYTHONPATH=str(fx.REPO_ROOT)),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        out = Lines(proc, base / "many_agents.log")
        t_begin = 0.0

        def online() -> set[str]:
            return {h["name"] for h in fleet.rpc("hosts.list") if h["status"] == "online"}

        fx.wait_until(
            lambda: out.since(t_begin, f"enrolled {MANY}"), timeout=60, what="the enrollments"
        )
        fx.wait_until(
            lambda: len(out.per_agent(t_begin, "up")) == MANY, timeout=60, what="100 agents up"
        )
        fx.wait_until(lambda: online() >= set(names), timeout=30, what="100 hosts online")

        old = fleet.fleetd
        t_stop = time.monotonic()
        assert old.stop() == 0, old.log()
        assert "Traceback" not in old.log(), old.log()
        # every agent saw the link drop and a redial fail before fleetd is back
        downs = fx.wait_until(
            lambda: (
                (d := out.per_agent(t_stop, "down"))
                and len(d) == MANY
                and all(len(v) >= 2 for v in d.values())
                and d
            ),
            timeout=20,
            what="every agent to lose its link and fail a redial",
        )
        new = fx.Fleetd(
            old.data_dir, base / "fleetd-restarted.log", listen=f"127.0.0.1:{old.port}"
        ).start()
        fleet.fleetd = new
        t_start = time.monotonic()
        ups = fx.wait_until(
            lambda: len(u := out.per_agent(t_stop, "up")) == MANY and u,
            timeout=60,
            interval=0.1,
            what="100 agents up again",
        )
        fx.wait_until(lambda: online() >= set(names), timeout=30, what="100 hosts online again")
        seen = types.SimpleNamespace(
            t_stop=t_stop,
            t_start=t_start,
            second_up={i: v[0][0] for i, v in ups.items()},
            # the backoff each agent chose after the drop, then after its first failed redial
            delays=[[float(words[2]) for _, words in downs[i][:2]] for i in range(MANY)],
            gave_up=out.since(0, "gave-up"),
            log=base / "many_agents.log",
        )
        proc.send_signal(signal.SIGTERM)
        seen.exit_code = proc.wait(30)
        yield seen
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        fx.stop_and_check(fleet.fleetd)


def test_hundred_agents_come_back_after_a_fleetd_restart(hundred):
    assert hundred.gave_up == [], hundred.gave_up
    assert hundred.exit_code == 0, hundred.log.read_text()[-3000:]
    assert sorted(hundred.second_up) == list(range(MANY))
    back = max(hundred.second_up.values()) - hundred.t_start
    assert back < 60, back
    # the redials after the first failed one were jittered, within the 1-60 s of the design...
    second = [d[1] for d in hundred.delays]
    assert all(1.0 <= d <= 60.0 for d in second), second
    assert max(second) - min(second) >= 0.3, second
    # ... so the fleet came back spread out, not in one burst
    times = sorted(hundred.second_up.values())
    assert times[-1] - times[0] >= 0.3, times[-1] - times[0]


def test_first_redial_after_a_fleetd_restart_is_jittered(hundred):
    first = [d[0] for d in hundred.delays]
    assert max(first) - min(first) >= 0.1, f"every agent redials after {sorted(set(first))} s"
