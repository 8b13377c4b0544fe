"""A template reaches real agents: hosts enrolled with a label get the
repository, group and schedule it defines, their agents init the
repository and apply the schedule, and one command backs them all up with
real restic."""

from __future__ import annotations

import json
import shutil


def test_a_template_configures_real_agents_that_back_up(fleet, e2e, tmp_path, fx):
    tag = fx.uniq("tpl").replace("-", "")
    repo_dir = tmp_path / "shared-repo"
    shutil.copytree(e2e.template.repo, repo_dir)  # initialised once for the session
    pw = tmp_path / "pw"
    pw.write_text(e2e.template.password + "\n")
    repo = "r" + tag
    fleet.ctl("repos", "create", repo, "--url", repo_dir, "--password-file", pw)
    src = tmp_path / "srv"
    e2e.write_tree(src, {"site/index.html": "<h1>hello</h1>\n", "site/big.tmp": "scratch\n"})
    spec = tmp_path / "web.json"
    spec.write_text(
        json.dumps(
            {
                "repositories": [repo],
                "groups": {
                    "site": {
                        "includes": [str(src)],
                        "excludes": ["*.tmp"],
                        "retention": {"keep_last": 3},
                    }
                },
                "schedules": {"nightly": {"cron": "0 2 * * *", "groups": ["site"]}},
            }
        )
    )
    fleet.ctl("templates", "set", "web" + tag, "--selector", f"batch={tag}", "-f", spec)

    hosts = [e2e.host(fleet, set_repo=False, start=False) for _ in range(2)]
    for h in hosts:
        fleet.ctl("hosts", "label", h.name, f"batch={tag}")
        e2e.start(fleet, h, wait_init=True)  # the template's repository, pushed and checked
    for h in hosts:
        shown = fx.wait_until(
            lambda h=h: (
                (s := fleet.ctl_json("hosts", "show", h.name))["schedule_lagging"] is False and s
            ),
            timeout=20,
            what=f"{h.name}'s agent to apply the template's schedule",
        )
        assert shown["repository"] == repo and shown["applied_schedule_version"] >= 1
    result = fleet.ctl_json("run", "--selector", f"batch={tag}", "site")
    assert sorted(j["host"] for j in result["jobs"]) == sorted(h.name for h in hosts)
    for job in result["jobs"]:
        done = e2e.wait_job(fleet, job["id"], timeout=90)
        assert done["status"] == "succeeded", done
    proc = e2e.restic(repo_dir, e2e.template.password, "snapshots", "--json", "--tag", "site")
    assert proc.returncode == 0, proc.stderr
    snaps = json.loads(proc.stdout)
    assert sorted(s["hostname"] for s in snaps) == sorted(h.name for h in hosts)
    assert all(s["paths"] == [str(src)] for s in snaps)

    # a change to the template reaches the running agents: a new schedule version, applied
    before = {h.name: fleet.ctl_json("hosts", "show", h.name)["schedule_version"] for h in hosts}
    doc = json.loads(spec.read_text())
    doc["schedules"]["nightly"]["cron"] = "30 3 * * *"
    spec.write_text(json.dumps(doc))
    fleet.ctl("templates", "set", "web" + tag, "--selector", f"batch={tag}", "-f", spec)
    for h in hosts:
        shown = fx.wait_until(
            lambda h=h: (
                (s := fleet.ctl_json("hosts", "show", h.name))["applied_schedule_version"]
                > before[h.name]
                and s
            ),
            timeout=20,
            what=f"{h.name}'s agent to apply the changed schedule",
        )
        assert shown["schedule_lagging"] is False
