"""Repository maintenance end to end: real agents (the zipapp), real restic."""

from __future__ import annotations

import json


def restic_snapshots(e2e, h) -> list[dict]:
    proc = e2e.restic(h.repo, h.password, "snapshots", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def restic_lines(e2e, h, *args, raw=False):
    """restic's output (no lock taken): its lines, or the whole text."""
    proc = e2e.restic(h.repo, h.password, *args, "--no-lock")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout if raw else proc.stdout.split()


def test_forget_applies_retention_then_check_and_a_failed_check_is_remembered(fleet, e2e):
    h = e2e.host(fleet, fresh=True)
    repo = fleet.ctl_json("repo", "show", h.name)["name"]
    group = e2e.group(fleet, h, "--keep-last", "1")
    for n in range(3):
        e2e.write_tree(h.src, {f"f{n}.txt": f"version {n}\n"})
        code, out, err = e2e.fleetctl(fleet, "run", h.name, group, "--follow")
        assert code == 0, f"{out}\n{err}"
    assert len(restic_snapshots(e2e, h)) == 3

    shown = fleet.ctl_json("maintenance", "show", repo)
    assert shown["forget"]["cron"] == "30 4 * * *" and shown["forget"]["next_at"]
    assert shown["last"] == {"forget": None, "prune": None, "check": None}

    code, out, err = e2e.fleetctl(fleet, "maintenance", "run", repo, "forget", "--follow")
    assert code == 0, f"{out}\n{err}"
    kept = restic_snapshots(e2e, h)
    assert len(kept) == 1 and kept[0]["tags"] == [group]
    # the host's list follows (the forget refreshes it)
    e2e.fx.wait_until(
        lambda: [s["id"] for s in fleet.ctl_json("snapshots", h.name)] == [kept[0]["id"]],
        timeout=20,
        what="the snapshot list after forget",
    )
    for action in ("prune", "check"):
        code, out, err = e2e.fleetctl(fleet, "maintenance", "run", repo, action, "--follow")
        assert code == 0, f"{action}: {out}\n{err}"
    shown = fleet.ctl_json("maintenance", "show", repo)
    assert [shown["last"][a]["status"] for a in ("forget", "prune", "check")] == ["succeeded"] * 3
    assert shown["check_failed"] is False

    # a data pack gone: the check fails, and maintenance show remembers it. A
    # pack of data blobs only, and a check of the structure only: restic
    # retries a missing pack it must read for minutes before it gives up
    fleet.ctl("maintenance", "set", repo, "--check-subset", "")
    data_pack = next(
        pack["id"]
        for index in restic_lines(e2e, h, "list", "index")
        for pack in json.loads(restic_lines(e2e, h, "cat", "index", index, raw=True))["packs"]
        if all(blob["type"] == "data" for blob in pack["blobs"])
    )
    (h.repo / "data" / data_pack[:2] / data_pack).unlink()
    code, out, err = e2e.fleetctl(fleet, "maintenance", "run", repo, "check", "--follow")
    assert code == 1, f"{out}\n{err}"
    shown = fleet.ctl_json("maintenance", "show", repo)
    assert shown["check_failed"] is True and shown["last"]["check"]["status"] == "failed"
    result = fleet.ctl("maintenance", "show", repo)
    assert f"warning: the last check of {repo} failed" in result.stderr


def test_maintenance_set_validates_and_moves_the_next_time(fleet, e2e):
    h = e2e.host(fleet, start=False)
    repo = fleet.ctl_json("repo", "show", h.name)["name"]
    changed = fleet.ctl_json(
        "maintenance",
        "set",
        repo,
        "--prune",
        "off",
        "--check",
        "15 2 * * 1",
        "--check-subset",
        "1/10",
    )
    assert changed["prune"] == {"cron": None, "next_at": None}
    assert changed["check"]["cron"] == "15 2 * * 1" and changed["check"]["next_at"].endswith(
        "T02:15:00Z"
    )
    assert changed["check_subset"] == "1/10"
    fleet.ctl("maintenance", "set", repo, "--forget", "61 * * * *", expect=2)
    fleet.ctl("maintenance", "set", repo, "--check-subset", "150%", expect=2)
    fleet.ctl("maintenance", "set", repo, expect=2)
    assert fleet.ctl_json("maintenance", "show", repo)["forget"]["cron"] == "30 4 * * *"
    # nobody online to run it
    result = fleet.ctl("maintenance", "run", repo, "prune", expect=1)
    assert "no host using repository" in result.stderr
