"""A host with several repositories: a group backing up into a second one,
and a group whose snapshots are copied into another (3-2-1), with real
agents and real restic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def make_repo(fleet: Any, tmp_path: Path, name: str, password: str) -> Path:
    path = tmp_path / name
    secret = tmp_path / f"{name}.pw"
    secret.write_text(password + "\n")
    fleet.ctl("repos", "create", name, "--url", str(path), "--password-file", str(secret))
    return path


def snapshot_ids(e2e: Any, repo: Path, password: str) -> list[dict]:
    proc = e2e.restic(repo, password, "snapshots", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_copy_of_each_new_snapshot_lands_in_the_second_repository(fleet, e2e, tmp_path):
    web = e2e.host(fleet)
    offsite_pw = "offsite-pw-4b1d"
    offsite = make_repo(fleet, tmp_path, "offsite", offsite_pw)
    e2e.write_tree(web.src, {"index.html": "<h1>copied</h1>\n", "big.bin": b"\x01" * 300_000})
    group = e2e.group(
        fleet, web, "--copy-to", "offsite", "--keep-last", "5", "--copy-keep-last", "2"
    )
    shown = fleet.ctl_json("groups", "show", web.name, group)
    assert shown["copy_to"] == "offsite" and shown["copy_retention"] == {"keep_last": 2}
    assert "offsite" in [r["name"] for r in e2e.host_info(fleet, web.name)["repositories"]]

    backup = e2e.wait_job(fleet, e2e.run(fleet, web.name, group)["id"])
    assert backup["status"] == "succeeded", backup
    # the copy follows, a job of its own into the second repository
    copy = e2e.fx.wait_until(
        lambda: [j for j in e2e.jobs(fleet, web.name) if j["kind"] == "copy"],
        timeout=30,
        what="the copy job",
    )[0]
    copy = e2e.wait_job(fleet, copy["id"])
    assert copy["status"] == "succeeded", (copy, e2e.log_lines(fleet, copy["id"]))
    assert (copy["repository"], copy["from_repository"], copy["group"]) == (
        "offsite",
        fleet.ctl_json("repo", "show", web.name)["name"],
        group,
    )
    # restic itself: the copy is there, recorded as the host's and the group's
    (copied,) = snapshot_ids(e2e, offsite, offsite_pw)
    (original,) = snapshot_ids(e2e, web.repo, web.password)
    assert copied["original"] == original["id"]
    assert copied["hostname"] == web.name and copied["tags"] == [group]
    # both sides are visible in fleetd
    listed = e2e.fx.wait_until(
        lambda: (s := fleet.ctl_json("snapshots", web.name)) and len(s) == 2 and s,
        timeout=20,
        what="both snapshots listed",
    )
    by_repo = {s["repository"]: s["id"] for s in listed}
    assert by_repo["offsite"] == copied["id"] and original["id"] in by_repo.values()
    only = fleet.ctl_json("snapshots", web.name, "--repo", "offsite")
    assert [s["id"] for s in only] == [copied["id"]]
    table = fleet.ctl("snapshots", web.name).stdout
    assert "REPOSITORY" in table and "offsite" in table

    # a copy run by hand copies what the second repository lacks: nothing new
    again = e2e.wait_job(fleet, fleet.ctl_json("run", web.name, group, "--copy")["id"])
    assert again["status"] == "succeeded", again
    assert len(snapshot_ids(e2e, offsite, offsite_pw)) == 1

    # forget of the second repository keeps the copy's own retention (2), the
    # first keeps 5
    for n in range(3):
        e2e.write_tree(web.src, {f"more-{n}.txt": f"{n}\n"})
        done = e2e.wait_job(fleet, e2e.run(fleet, web.name, group)["id"])
        assert done["status"] == "succeeded", done
    e2e.fx.wait_until(
        lambda: (
            len(snapshot_ids(e2e, offsite, offsite_pw)) == 4
            and not [
                j
                for j in e2e.jobs(fleet, web.name)
                if j["status"] in ("queued", "running", "dispatched")
            ]
        ),
        timeout=60,
        what="four copies",
    )
    run = fleet.ctl_json("maintenance", "run", "offsite", "forget")
    for job_id in run["jobs"]:
        done = e2e.wait_job(fleet, job_id)
        assert done["status"] == "succeeded", (done, e2e.log_lines(fleet, job_id))
        assert done["repository"] == "offsite"
    assert len(snapshot_ids(e2e, offsite, offsite_pw)) == 2
    assert len(snapshot_ids(e2e, web.repo, web.password)) == 4


def test_a_group_backs_up_into_the_repository_it_names(fleet, e2e, tmp_path):
    web = e2e.host(fleet)
    second_pw = "second-pw-77e0"
    second = make_repo(fleet, tmp_path, "second", second_pw)
    e2e.write_tree(web.src, {"a.txt": "a\n"})
    plain = e2e.group(fleet, web, name="plain")
    named = e2e.group(fleet, web, "--repo", "second", name="named")
    assert fleet.ctl_json("groups", "show", web.name, named)["repository"] == "second"
    # fleetd inits the new repository on the host (auto-init), then the backup runs
    for group in (plain, named):
        done = e2e.wait_job(fleet, e2e.run(fleet, web.name, group)["id"])
        assert done["status"] == "succeeded", (done, e2e.log_lines(fleet, done["id"]))
    inits = [j for j in e2e.jobs(fleet, web.name, kind="init") if j["repository"] == "second"]
    assert [j["status"] for j in inits] == ["succeeded"]
    assert [s["tags"] for s in snapshot_ids(e2e, second, second_pw)] == [["named"]]
    assert [s["tags"] for s in snapshot_ids(e2e, web.repo, web.password)] == [["plain"]]
    detail = e2e.fx.wait_until(
        lambda: (
            (h := e2e.host_info(fleet, web.name))
            and all(r["stats"] for r in h["repositories"])
            and h
        ),
        timeout=30,
        what="sizes of both repositories",
    )
    assert [
        (r["name"], r["default"], r["stats"]["snapshot_count"]) for r in detail["repositories"]
    ] == [
        (fleet.ctl_json("repo", "show", web.name)["name"], True, 1),
        ("second", False, 1),
    ]
    # a repository a group names cannot be taken away from the host
    code, _, err = e2e.fleetctl(fleet, "repos", "detach", "second", web.name)
    assert code != 0 and "named" in err and "groups edit" in err
    fleet.ctl("groups", "edit", web.name, named, "--repo", "")
    fleet.ctl("repos", "detach", "second", web.name)
    assert [r["name"] for r in e2e.host_info(fleet, web.name)["repositories"]] == [
        fleet.ctl_json("repo", "show", web.name)["name"]
    ]
    assert [s for s in fleet.ctl_json("snapshots", web.name) if s["repository"] == "second"] == []
