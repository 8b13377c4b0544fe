"""Two hosts, one repository: real agents (the zipapp) and real restic.

Backups from several hosts into one repository run at the same time, and
each host's snapshots stay its own: recorded under its Fleet name, listed
for it alone."""

from __future__ import annotations

import json


def test_two_hosts_back_up_into_one_repository_at_once(fleet, e2e, tmp_path):
    repo = tmp_path / "shared-repo"
    password = "shared-repo-pw-9c2e"
    web = e2e.host(fleet, repo=repo, password=password, fresh=True)
    db = e2e.host(fleet, set_repo=False, start=False)
    name = fleet.ctl_json("repo", "show", web.name)["name"]
    fleet.ctl("repos", "use", name, db.name)
    e2e.start(fleet, db, wait_init=True)  # the existing repository, its password checked
    assert fleet.ctl_json("repos", "show", name)["hosts"] == sorted([web.name, db.name])

    gate = tmp_path / "gate"
    hook = f"n=0; while [ ! -e '{gate}' ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done"
    jobs = {}
    for h, files in ((web, {"index.html": "<h1>web</h1>\n"}), (db, {"dump.sql": "select 1;\n"})):
        e2e.write_tree(h.src, files)
        group = e2e.group(fleet, h, "--pre-hook", hook, name="data")
        jobs[h.name] = e2e.run(fleet, h.name, group)["id"]
    # both run at once (the pre-hooks hold them), then restic runs for both
    for job_id in jobs.values():
        e2e.wait_job(fleet, job_id, ("running",))
    gate.touch()
    for job_id in jobs.values():
        done = e2e.wait_job(fleet, job_id)
        assert done["status"] == "succeeded", done

    proc = e2e.restic(repo, password, "snapshots", "--json")
    assert proc.returncode == 0, proc.stderr
    by_host = {s["hostname"]: s for s in json.loads(proc.stdout)}
    assert set(by_host) == {web.name, db.name}  # recorded under their Fleet names
    assert by_host[web.name]["paths"] == [str(web.src)]
    assert by_host[db.name]["paths"] == [str(db.src)]
    for h in (web, db):
        # the full refresh (restic snapshots --host) lists its own snapshot only,
        # though both hosts share the repository and the group name
        want = [by_host[h.name]["id"]]
        listed = e2e.fx.wait_until(
            lambda h=h, want=want: (
                (s := fleet.ctl_json("snapshots", h.name)) and [x["id"] for x in s] == want and s
            ),
            timeout=20,
            what=f"the refreshed snapshot list of {h.name}",
        )
        assert listed[0]["hostname"] == h.name and listed[0]["tags"] == ["data"]


def test_a_prune_waits_for_another_hosts_backup_into_the_repository(fleet, e2e, tmp_path):
    """restic's prune needs the repository to itself: fleetd holds it until
    the backup of the other host ends (restic would otherwise refuse it as
    locked), then it runs and succeeds."""
    repo = tmp_path / "shared-repo"
    password = "shared-repo-pw-77aa"
    web = e2e.host(fleet, repo=repo, password=password, fresh=True)
    db = e2e.host(fleet, set_repo=False, start=False)
    name = fleet.ctl_json("repo", "show", web.name)["name"]
    fleet.ctl("repos", "use", name, db.name)
    e2e.start(fleet, db, wait_init=True)

    gate = tmp_path / "gate"
    hook = f"n=0; while [ ! -e '{gate}' ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done"
    e2e.write_tree(web.src, {"a.txt": "a\n"})
    group = e2e.group(fleet, web, "--pre-hook", hook)
    backup = e2e.run(fleet, web.name, group)["id"]
    e2e.wait_job(fleet, backup, ("running",))
    prune = fleet.rpc("jobs.run", host=db.name, kind="prune")["id"]
    shown = e2e.show(fleet, prune)
    assert shown["status"] == "queued"
    assert shown["waiting_for"] == f"repository {name}: backup job {backup} of {web.name} runs"

    gate.touch()
    assert e2e.wait_job(fleet, backup)["status"] == "succeeded"
    done = e2e.wait_job(fleet, prune)
    assert done["status"] == "succeeded", done
    assert done["started_at"] >= e2e.show(fleet, backup)["finished_at"]
