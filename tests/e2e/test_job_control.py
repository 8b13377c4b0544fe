"""Cancel, queueing, offline hosts, agent shutdown mid-job: real agents and restic."""

from __future__ import annotations

import json
import os


def running_with_progress(e2e, fleet, job_id: int) -> dict:
    """Wait until restic itself is at work (fleetd holds a progress report)."""
    return e2e.fx.wait_until(
        lambda: (
            (j := e2e.show(fleet, job_id))["status"] in e2e.FINAL
            or (j["status"] == "running" and j.get("progress") and j)
        ),
        timeout=30,
        interval=0.1,
        what=f"job {job_id} to report progress",
    )


def big_sparse_file(path, size: int = 16 << 30) -> None:
    """Many GiB that cost no disk: restic reads (and hashes) them at ~300 MB/s."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.truncate(size)


def test_cancel_a_running_restic_backup(fleet, e2e):
    h = e2e.host(fleet)
    big_sparse_file(h.src / "big" / "huge.img")
    e2e.write_tree(h.src, {"small/a.txt": "a\n"})
    big = e2e.group(fleet, h, "--include", h.src / "big")
    small = e2e.group(fleet, h, "--include", h.src / "small")
    job = e2e.run(fleet, h.name, big)
    shown = running_with_progress(e2e, fleet, job["id"])
    assert shown["status"] == "running", shown
    assert 0 <= shown["progress"]["percent_done"] < 1

    result = fleet.ctl("jobs", "cancel", job["id"])
    assert f"job {job['id']}: cancel sent to {h.name}" in result.stderr
    done = e2e.wait_job(fleet, job["id"], timeout=15)
    assert done["status"] == "cancelled", done
    assert done["finished_at"] and done["summary"] is None

    code, _, err = e2e.fleetctl(fleet, "jobs", "tail", str(job["id"]))
    assert code == 1, err
    assert f"job {job['id']} cancelled" in err
    result = fleet.ctl("jobs", "cancel", job["id"], expect=None)
    assert result.exit_code != 0 and "already ended" in result.stderr

    # restic was interrupted (SIGINT), not killed: no snapshot and no stale lock
    proc = e2e.restic(h.repo, h.password, "snapshots", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout) == []
    proc = e2e.restic(h.repo, h.password, "list", "locks", "--no-lock")
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout

    # and the agent is free again: the next backup runs (created well after the
    # cancelled job's end: see test_job_queued_behind_a_failed_one_runs)
    code, out, err = e2e.fleetctl(fleet, "run", h.name, small, "--follow")
    assert code == 0, f"{out}\n{err}"
    snaps = json.loads(e2e.restic(h.repo, h.password, "snapshots", "--json").stdout)
    assert [s["tags"] for s in snaps] == [[small]]


def test_stop_or_cancel_during_a_pre_hook_is_prompt(fleet, e2e):
    """A hook is a shell with children: stopping it must reach all of them."""
    h = e2e.host(fleet)
    slow = e2e.group(fleet, h, "--pre-hook", "sleep 30; echo slept")

    # SIGTERM to the agent while a hook runs: it stops the hook, reports, exits 0
    job = e2e.run(fleet, h.name, slow)
    e2e.wait_job(fleet, job["id"], ("running",), timeout=20)
    assert h.agent.stop(timeout=10) == 0
    assert e2e.show(fleet, job["id"])["status"] == "cancelled"

    # fleetctl jobs cancel while a hook runs
    e2e.start(fleet, h)
    job = e2e.run(fleet, h.name, slow)
    e2e.fx.wait_until(
        lambda: any("running pre-hook" in ln["payload"] for ln in e2e.log_lines(fleet, job["id"])),
        timeout=20,
        what="the pre-hook to start",
    )
    fleet.ctl("jobs", "cancel", job["id"])
    # --cancel-grace 2: SIGINT, then SIGTERM 2 s later, then SIGKILL
    done = e2e.wait_job(fleet, job["id"], timeout=8)
    assert done["status"] == "cancelled", done
    assert not any(ln["payload"] == "slept" for ln in e2e.log_lines(fleet, job["id"]))


def test_job_queued_behind_a_failed_one_runs(fleet, e2e):
    h = e2e.host(fleet)
    e2e.write_tree(h.src, {"a.txt": "a\n"})
    bad = e2e.group(fleet, h, "--include", h.base / "missing")
    good = e2e.group(fleet, h)
    first = e2e.run(fleet, h.name, bad)
    second = e2e.run(fleet, h.name, good)
    assert e2e.wait_job(fleet, first["id"])["status"] == "failed"
    done = e2e.wait_job(fleet, second["id"], timeout=6)
    assert done["status"] == "succeeded", done


def test_second_run_waits_behind_the_first(fleet, e2e):
    h = e2e.host(fleet)
    e2e.write_tree(h.src, {"a.txt": os.urandom(1024)})
    group = e2e.group(fleet, h, "--pre-hook", "sleep 1")
    first = e2e.run(fleet, h.name, group)
    second = e2e.run(fleet, h.name, group)
    third = e2e.run(fleet, h.name, group)
    assert second["queued_behind"] >= 1 and third["queued_behind"] >= 2

    def both_states() -> dict:
        status = {j["id"]: j["status"] for j in e2e.jobs(fleet, h.name, kind="backup")}
        return (status[first["id"]], status[second["id"]]) == ("running", "queued") and status

    seen = e2e.fx.wait_until(both_states, timeout=20, interval=0.1, what="running + queued")
    assert seen[third["id"]] == "queued"
    result = fleet.ctl("jobs", "cancel", third["id"])  # still queued: cancelled at once
    assert e2e.show(fleet, third["id"])["status"] == "cancelled", result.stderr

    a = e2e.wait_job(fleet, first["id"])
    b = e2e.wait_job(fleet, second["id"])
    assert (a["status"], b["status"]) == ("succeeded", "succeeded"), (a, b)
    assert b["started_at"] >= a["finished_at"]
    c = e2e.show(fleet, third["id"])
    assert c["status"] == "cancelled" and c["started_at"] is None and c["log_lines"] == 0

    snaps = json.loads(e2e.restic(h.repo, h.password, "snapshots", "--json").stdout)
    made = {a["summary"]["snapshot_id"], b["summary"]["snapshot_id"]}
    assert {s["short_id"] for s in snaps} == made
    # the list is refreshed after the jobs end, not before
    e2e.fx.wait_until(
        lambda: {s["id"] for s in fleet.ctl_json("snapshots", h.name)} == {s["id"] for s in snaps},
        timeout=20,
        interval=0.1,
        what="fleetd to list both snapshots",
    )


def test_job_for_an_offline_host_waits_for_its_agent(fleet, e2e):
    h = e2e.host(fleet)
    e2e.write_tree(h.src, {"a.txt": "a\n"})
    group = e2e.group(fleet, h)
    assert h.agent.stop() == 0
    e2e.wait_host(fleet, h.name, "offline", timeout=10)

    job = e2e.run(fleet, h.name, group)
    assert job["status"] == "queued"
    code, _, err = e2e.fleetctl(fleet, "run", h.name, group)  # the human form says so too
    assert code == 0 and "queued" in err
    assert e2e.show(fleet, job["id"])["status"] == "queued"

    e2e.start(fleet, h)
    done = e2e.wait_job(fleet, job["id"], timeout=30)
    assert done["status"] == "succeeded", done
    later = e2e.jobs(fleet, h.name, kind="backup")[-1]
    assert e2e.wait_job(fleet, later["id"], timeout=30)["status"] == "succeeded"
    snaps = json.loads(e2e.restic(h.repo, h.password, "snapshots", "--json").stdout)
    assert len(snaps) == 2


def test_sigterm_during_a_backup_reports_it_cancelled(fleet, e2e):
    h = e2e.host(fleet)
    big_sparse_file(h.src / "huge.img")
    group = e2e.group(fleet, h)
    job = e2e.run(fleet, h.name, group)
    running_with_progress(e2e, fleet, job["id"])
    assert h.agent.stop(timeout=15) == 0
    # the agent interrupted restic and delivered the job's end before exiting
    done = e2e.show(fleet, job["id"])
    assert done["status"] == "cancelled", done
    assert h.agent.count(f"job {job['id']} (backup) cancelled") == 1
    proc = e2e.restic(h.repo, h.password, "list", "locks", "--no-lock")
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout


def test_a_failed_backup_is_retried_as_its_group_says(fleet, e2e):
    h = e2e.host(fleet)
    flag = h.base / "second-try"
    # the first attempt fails in its pre-hook and leaves a mark; the retry then passes
    hook = f"if [ -e {flag} ]; then exit 0; fi; touch {flag}; exit 1"
    group = e2e.group(fleet, h, "--pre-hook", hook, "--retries", "2", "--retry-delay", "1s")
    first = e2e.run(fleet, h.name, group)
    done = e2e.wait_job(fleet, first["id"])
    assert done["status"] == "failed"
    retry = e2e.fx.wait_until(
        lambda: [j for j in e2e.jobs(fleet, h.name, kind="backup") if j["id"] > first["id"]],
        timeout=30,
        what="the retry job",
    )[0]
    done = e2e.wait_job(fleet, retry["id"], timeout=60)
    assert done["status"] == "succeeded", done
    assert len(e2e.jobs(fleet, h.name, kind="backup")) == 2  # no third attempt after a success


def test_a_hung_hook_or_a_backup_past_its_timeout_is_stopped_and_fails(fleet, e2e):
    """A hook or a backup that never ends must not hold the host's queue for
    ever: past its limit it is stopped (as a cancel stops it) and fails,
    saying so, and the next job runs."""
    h = e2e.host(fleet)
    e2e.write_tree(h.src, {"a.txt": "a\n"})
    hung = e2e.group(fleet, h, "--pre-hook", "sleep 600", "--hook-timeout", "2s")
    job = e2e.wait_job(fleet, e2e.run(fleet, h.name, hung)["id"], timeout=60)
    assert job["status"] == "failed"
    assert "pre-hook ran longer than 2 s" in job["error"], job
    slow = e2e.group(fleet, h, "--pre-hook", "sleep 600", "--timeout", "3s")
    shown = fleet.ctl("groups", "show", h.name, slow).stdout
    assert "backup 3 s" in shown and "hooks 30 min (default)" in shown
    job = e2e.wait_job(fleet, e2e.run(fleet, h.name, slow)["id"], timeout=60)
    assert job["status"] == "failed"
    assert "ran longer than its timeout of 3 s" in job["error"], job
    # the host is free again: a plain backup runs
    plain = e2e.group(fleet, h)
    assert e2e.wait_job(fleet, e2e.run(fleet, h.name, plain)["id"])["status"] == "succeeded"
