"""Run now, live and stored logs, failing backups, secret hygiene: real restic."""

from __future__ import annotations

import json
import os
import re
import shutil

JOB_QUEUED = re.compile(r"job (\d+) queued")


def job_id_from(stderr: str) -> int:
    match = JOB_QUEUED.search(stderr)
    assert match, stderr
    return int(match.group(1))


def ndjson(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def assert_contiguous(lines: list[dict], job_id: int) -> None:
    seqs = [line["seq"] for line in lines]
    assert seqs == list(range(1, len(seqs) + 1)), f"seqs not 1..N in order: {seqs}"
    assert all(line["job"] == job_id for line in lines)


def test_run_now_makes_a_restic_snapshot(fleet, e2e):
    h = e2e.host(fleet, fresh=True)
    # fleetd's auto-init created the repository
    init = e2e.jobs(fleet, h.name, kind="init")
    assert [j["status"] for j in init] == ["succeeded"] and init[0]["actor"] == "system"
    assert (h.repo / "config").is_file()
    assert any(
        "created restic repository" in line["payload"]
        for line in e2e.log_lines(fleet, init[0]["id"])
    )
    e2e.write_tree(
        h.src,
        {
            "etc/app.conf": "setting = 1\n",
            "data/blob.bin": os.urandom(64 * 1024),
            "data/cache.tmp": "scratch\n",
            "cache.tmp": "scratch\n",
        },
    )
    group = e2e.group(fleet, h, "--exclude", "*.tmp")

    code, out, err = e2e.fleetctl(fleet, "run", h.name, group, "--follow")
    assert code == 0, f"{out}\n{err}"
    job_id = job_id_from(err)
    assert f"job {job_id} succeeded" in err
    assert "saved" in out  # the summary, rendered

    job = e2e.show(fleet, job_id)
    assert job["status"] == "succeeded" and job["exit_code"] == 0
    assert job["kind"] == "backup" and job["group"] == group and job["actor"] == "admin"
    summary = job["summary"]
    assert summary["message_type"] == "summary"
    made = summary["snapshot_id"]
    assert made

    # what restic itself says is in the repository
    proc = e2e.restic(h.repo, h.password, "snapshots", "--json")
    assert proc.returncode == 0, proc.stderr
    snaps = json.loads(proc.stdout)
    assert len(snaps) == 1
    snap = snaps[0]
    assert snap["id"].startswith(made)
    assert snap["paths"] == [str(h.src)]
    assert snap["tags"] == [group]
    proc = e2e.restic(h.repo, h.password, "ls", "--json", "latest")
    assert proc.returncode == 0, proc.stderr
    paths = {doc["path"] for doc in ndjson(proc.stdout) if doc.get("struct_type") == "node"}
    assert str(h.src / "etc/app.conf") in paths
    assert str(h.src / "data/blob.bin") in paths
    assert not [p for p in paths if p.endswith(".tmp")], paths

    # fleetd's projection of it: the agent reports the job's end first, the
    # snapshot from restic's summary with it, and refreshes the whole list
    # (the full ids, restic 0.14 names the new one by its short id) just after
    listed = e2e.fx.wait_until(
        lambda: (
            (ls := fleet.ctl_json("snapshots", h.name))
            and [s["id"] for s in ls] == [snap["id"]]
            and ls
        ),
        timeout=20,
        interval=0.1,
        what="fleetd to list the backup's snapshot",
    )
    assert listed[0]["tags"] == [group] and listed[0]["paths"] == [str(h.src)]
    assert listed[0]["size_bytes"] == summary["total_bytes_processed"]
    assert listed[0]["file_count"] == summary["total_files_processed"] == 2
    assert fleet.ctl_json("snapshots", h.name, "--group", group) == listed
    assert fleet.ctl_json("snapshots", h.name, "--group", "other") == []
    info = e2e.host_info(fleet, h.name)
    assert info["last_backup"] == {
        "job": job_id,
        "status": "succeeded",
        "created_at": job["created_at"],
        "finished_at": job["finished_at"],
    }

    # repository sizes, as hosts show says them
    stats = e2e.fx.wait_until(
        lambda: e2e.host_info(fleet, h.name)["repo_stats"],
        timeout=20,
        interval=0.1,
        what="the repository's sizes",
    )
    assert stats["snapshot_count"] == 1 and stats["file_count"] >= 2
    assert stats["size_bytes"] == summary["total_bytes_processed"]
    assert stats["raw_size_bytes"] > 0 and stats["measured_at"]


def test_sizes_tell_stored_data_from_restore_size(fleet, e2e):
    """Three backups of the same 2 MiB: 6 MiB to restore, about 2 MiB
    stored; measured by restic stats once, grown from the summaries after."""
    h = e2e.host(fleet)
    e2e.write_tree(h.src, {"blob.bin": os.urandom(2 << 20)})
    group = e2e.group(fleet, h)
    for n in range(1, 4):
        code, out, err = e2e.fleetctl(fleet, "run", h.name, group, "--follow")
        assert code == 0, f"{out}\n{err}"
        stats = e2e.fx.wait_until(
            lambda n=n: (
                (s := e2e.host_info(fleet, h.name)["repo_stats"]) and s["snapshot_count"] == n and s
            ),
            timeout=30,
            interval=0.1,
            what=f"sizes after backup {n}",
        )
    assert stats["size_bytes"] == 3 * (2 << 20)
    raw = json.loads(e2e.restic(h.repo, h.password, "stats", "--json", "--mode", "raw-data").stdout)
    # the first backup's figure was measured; the next two added only what they stored
    assert raw["total_size"] <= stats["raw_size_bytes"] < raw["total_size"] + (64 << 10)
    assert 2.9 < stats["dedup_ratio"] < 3.1
    out = fleet.ctl("hosts", "show", h.name).stdout
    assert "stored (deduplication 3" in out and "6.0 MiB to restore in 3 snapshot(s)" in out


def test_live_tail_and_stored_log_agree(fleet, e2e):
    h = e2e.host(fleet)
    e2e.write_tree(h.src, {f"f{i}.txt": f"file {i}\n" * 100 for i in range(20)})
    group = e2e.group(fleet, h, "--pre-hook", "echo pre-hook ran; sleep 1")
    job = e2e.run(fleet, h.name, group)
    # a tail started while the job is queued or running: stored lines, then live ones
    tail = e2e.popen_fleetctl(fleet, "jobs", "tail", str(job["id"]), "--json")
    code, out, err = e2e.fx.finish(tail, timeout=60)
    assert code == 0, err
    live = ndjson(out)
    assert_contiguous(live, job["id"])

    stored = e2e.log_lines(fleet, job["id"])
    assert_contiguous(stored, job["id"])
    assert stored == live
    assert e2e.show(fleet, job["id"])["log_lines"] == len(stored)
    streams = {line["stream"] for line in stored}
    assert {"stdout", "event"} <= streams
    assert any(line["payload"] == "pre-hook ran" for line in stored)
    events = [json.loads(line["payload"]) for line in stored if line["stream"] == "event"]
    summaries = [e for e in events if e.get("message_type") == "summary"]
    assert len(summaries) == 1 and summaries[0]["snapshot_id"]

    # a tail started after the end: the stored log, then the outcome
    code, out, err = e2e.fleetctl(fleet, "jobs", "tail", str(job["id"]), "--json")
    assert code == 0, err
    assert ndjson(out) == stored
    assert f"job {job['id']} succeeded" in err


def test_missing_include_fails_with_restics_words(fleet, e2e):
    h = e2e.host(fleet)
    missing = h.base / "no-such-dir"
    group = e2e.group(fleet, h, "--include", missing)
    code, out, err = e2e.fleetctl(fleet, "run", h.name, group, "--follow")
    assert code == 1, f"{out}\n{err}"
    job_id = job_id_from(err)
    assert f"job {job_id} failed" in err
    assert "do not exist" in err  # the last line of the error, printed by --follow

    job = e2e.show(fleet, job_id)
    assert job["status"] == "failed"
    assert job["exit_code"] not in (0, 3, None)
    assert "all target directories/files do not exist" in job["error"]
    lines = e2e.log_lines(fleet, job_id)
    assert any(
        line["stream"] == "stderr" and f"{missing} does not exist" in line["payload"]
        for line in lines
    ), lines
    assert fleet.ctl_json("snapshots", h.name) == []
    assert e2e.host_info(fleet, h.name)["last_backup"]["status"] == "failed"


def test_one_missing_include_of_several_is_a_warning_naming_it(fleet, e2e):
    """restic skips an include path that is not there and exits 0: the job
    says so instead of a silent success, and status shows it."""
    h = e2e.host(fleet)
    e2e.write_tree(h.src, {"kept.txt": "kept\n"})
    missing = h.base / "gone-dir"
    group = e2e.group(fleet, h, "--include", h.src, "--include", missing)
    code, out, err = e2e.fleetctl(fleet, "run", h.name, group, "--follow")
    assert code == 0, f"{out}\n{err}"  # a warning: 0 without --strict
    job = e2e.show(fleet, job_id_from(err))
    assert job["status"] == "warning" and str(missing) in job["error"]
    assert job["summary"]["snapshot_id"]  # what is there was backed up
    status = json.loads(fleet.ctl("status", "--json", expect=None).stdout)
    (p,) = [p for p in status["problems"] if p.get("host") == h.name]
    assert p["kind"] == "backup_warning" and str(missing) in p["message"]


def test_wrong_repository_password_fails_init_and_the_backup(fleet, e2e, tmp_path):
    # an existing repository (a copy of the session's) and the wrong password for it
    repo = tmp_path / "foreign-repo"
    shutil.copytree(e2e.template.repo, repo)
    h = e2e.host(fleet, repo=repo, password="not-the-password", wait_init=False)
    # fleetd's auto-init finds a repository there, and the password does not open it
    (init,) = e2e.fx.wait_until(
        lambda: e2e.jobs(fleet, h.name, kind="init"), timeout=20, what="an init job"
    )
    init = e2e.wait_job(fleet, init["id"])
    assert init["status"] == "failed", init
    assert "the password does not open it" in init["error"]
    payloads = [line["payload"] for line in e2e.log_lines(fleet, init["id"])]
    assert any("already initialized; checking that the password opens it" in p for p in payloads)
    assert any("wrong password or no key found" in p for p in payloads)
    assert not any('"chunker_polynomial"' in p for p in payloads)  # restic's config stays out
    e2e.write_tree(h.src, {"a.txt": "a\n"})
    group = e2e.group(fleet, h)
    code, out, err = e2e.fleetctl(fleet, "run", h.name, group, "--follow")
    assert code == 1, f"{out}\n{err}"
    assert "wrong password or no key found" in err
    job = e2e.show(fleet, job_id_from(err))
    assert job["status"] == "failed"
    assert "wrong password or no key found" in job["error"]
    proc = e2e.restic(repo, e2e.template.password, "snapshots", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout) == []
    assert fleet.ctl_json("snapshots", h.name) == []


def test_an_existing_repository_with_the_right_password_passes_init(fleet, e2e):
    h = e2e.host(fleet)  # a copy of the session's repository, with its password
    (init,) = e2e.jobs(fleet, h.name, kind="init")
    assert init["status"] == "succeeded"
    payloads = [line["payload"] for line in e2e.log_lines(fleet, init["id"])]
    assert "fleet-agent: the password opens the repository" in payloads


def restic_cmdlines(restic: str, marker: str) -> list[str]:
    """Command lines of running restic processes whose argv holds `marker`."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                argv = fh.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if argv and argv[0] == restic and marker in argv:
            found.append(" ".join(argv))
    return found


def test_repository_password_is_never_shown(fleet, e2e):
    h = e2e.host(fleet)
    password = h.password
    assert len(password) >= 12  # distinctive: a match is a leak, not a coincidence
    e2e.write_tree(h.src, {"a.txt": "a\n"})
    # a hook that prints its whole environment into the job log
    good = e2e.group(fleet, h, "--pre-hook", "env; echo RESTIC_PASSWORD=$RESTIC_PASSWORD")
    bad = e2e.group(fleet, h, "--include", h.base / "missing")

    # while restic runs, its command line (world-readable in /proc) is watched too
    follow = e2e.popen_fleetctl(fleet, "run", h.name, good, "--follow", "--json")
    cmdlines: list[str] = []
    e2e.fx.wait_until(
        lambda: (
            cmdlines.extend(restic_cmdlines(e2e.RESTIC, str(h.src)))
            or cmdlines
            or follow.poll() is not None
        ),
        timeout=60,
        interval=0.01,
        what="restic backup to run",
    )
    code, _, err = e2e.fx.finish(follow, timeout=60)
    assert code == 0, err
    assert cmdlines, "never saw restic backup's command line"
    code, _, err = e2e.fleetctl(fleet, "run", h.name, bad, "--follow", "--json")
    assert code == 1, err

    jobs = e2e.jobs(fleet, h.name)
    assert [j["kind"] for j in jobs] == ["init", "backup", "backup"]
    seen = {f"restic argv {i}": cmdline for i, cmdline in enumerate(cmdlines)}
    assert not [c for c in cmdlines if str(h.repo) in c], cmdlines  # the URL neither
    for j in jobs:
        seen[f"jobs show {j['id']}"] = fleet.ctl("jobs", "show", j["id"], "--json").stdout
        seen[f"jobs log {j['id']}"] = fleet.ctl("jobs", "log", j["id"], "--json").stdout
        seen[f"jobs log {j['id']} (text)"] = fleet.ctl("jobs", "log", j["id"]).stdout
    hook_log = seen[f"jobs log {jobs[1]['id']}"]
    # the hook's environment did reach the log (so the check below means something)
    assert '"payload": "PATH=' in hook_log and '"payload": "RESTIC_PASSWORD=' in hook_log
    for args in (
        ("jobs", "list", "--host", h.name, "--json"),
        ("hosts", "show", h.name, "--json"),
        ("repo", "show", h.name, "--json"),
        ("snapshots", h.name, "--json"),
    ):
        seen[" ".join(args)] = fleet.ctl(*args).stdout
    status = h.agent.cli("status", "--state-dir", h.agent.state_dir, "--json")
    seen["fleet-agent status"] = status.stdout + status.stderr
    assert h.agent.stop() == 0
    seen["agent log"] = h.agent.log()
    seen["fleetd log"] = fleet.fleetd.log()
    leaks = [where for where, text in seen.items() if password in text]
    assert not leaks, f"the repository password shows in: {leaks}"
