"""Restore with real agents and real restic: a directory back byte for
byte, include filters, in place behind a confirmation, and a dead host's
files onto its replacement through a shared repository."""

from __future__ import annotations

import subprocess
from pathlib import Path

TREE = {
    "index.html": "<h1>restored</h1>\n",
    "conf/app.ini": "[app]\nname = fleet\n",
    "conf/nested/deep.txt": "deep\n",
    "big.bin": bytes(range(256)) * 2000,
}


def backed_up(fleet, e2e, h) -> tuple[str, str]:
    """A group of h's src, backed up; (group, snapshot id) once fleetd lists it."""
    e2e.write_tree(h.src, TREE)
    group = e2e.group(fleet, h)
    done = e2e.wait_job(fleet, e2e.run(fleet, h.name, group)["id"])
    assert done["status"] == "succeeded", done
    snap = e2e.fx.wait_until(
        lambda: fleet.ctl_json("snapshots", h.name, "--group", group),
        timeout=20,
        what="the snapshot in fleetd's list",
    )[0]
    return group, snap["id"]


def same_tree(a: Path, b: Path) -> None:
    proc = subprocess.run(["diff", "-r", str(a), str(b)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_restore_brings_a_directory_back_byte_for_byte(fleet, e2e, tmp_path):
    web = e2e.host(fleet)
    group, snapshot = backed_up(fleet, e2e, web)
    target = tmp_path / "restored"
    code, out, err = e2e.fleetctl(
        fleet, "restore", web.name, snapshot[:8], "--target", target, "--verify", "--follow"
    )
    assert code == 0, out + err
    assert "succeeded" in err
    same_tree(web.src, target / str(web.src).lstrip("/"))
    (job,) = [j for j in e2e.jobs(fleet, web.name) if j["kind"] == "restore"]
    shown = e2e.show(fleet, job["id"])
    assert shown["restore"] == {
        "snapshot": snapshot,
        "from_host": web.name,
        "target": str(target),
        "includes": [],
        "excludes": [],
        "verify": True,
        "dry_run": False,
    }
    audit = fleet.ctl_json("audit", "--action", "restore.run")
    assert any(a["detail"]["job"] == job["id"] for a in audit)

    # latest of the group, only what an include names
    only = tmp_path / "only-conf"
    include = str(web.src / "conf")
    code, out, err = e2e.fleetctl(
        fleet,
        "restore",
        web.name,
        "latest",
        "--group",
        group,
        "--target",
        only,
        "--include",
        include,
        "--follow",
    )
    assert code == 0, out + err
    restored = only / str(web.src).lstrip("/")
    assert sorted(p.relative_to(restored).as_posix() for p in restored.rglob("*")) == [
        "conf",
        "conf/app.ini",
        "conf/nested",
        "conf/nested/deep.txt",
    ]
    # everything but what an exclude names
    most = tmp_path / "most"
    code, out, err = e2e.fleetctl(
        fleet, "restore", web.name, snapshot, "--target", most, "--exclude", "*.bin", "--follow"
    )
    assert code == 0, out + err
    restored = most / str(web.src).lstrip("/")
    assert (restored / "conf/nested/deep.txt").read_text() == TREE["conf/nested/deep.txt"]
    assert not (restored / "big.bin").exists()
    # an include that restores nothing: a warning naming it
    code, out, err = e2e.fleetctl(
        fleet,
        "restore",
        web.name,
        "latest",
        "--target",
        tmp_path / "none",
        "--include",
        str(web.src / "no-such-file"),
        "--follow",
        "--strict",
    )
    assert code == 1 and "nothing restored for" in err, out + err


def test_a_dry_run_says_what_would_be_written_and_writes_nothing(fleet, e2e, tmp_path):
    web = e2e.host(fleet)
    group, snapshot = backed_up(fleet, e2e, web)
    target = tmp_path / "dry"
    code, out, err = e2e.fleetctl(
        fleet, "restore", web.name, snapshot, "--target", target, "--dry-run", "--follow"
    )
    assert code == 0, out + err
    assert not target.exists()
    (job,) = [j for j in e2e.jobs(fleet, web.name) if j["kind"] == "restore"]
    shown = e2e.show(fleet, job["id"])
    assert shown["restore"]["dry_run"] is True
    assert shown["summary"]["dry_run"] == {
        "files": 4,
        "dirs": shown["summary"]["dry_run"]["dirs"],
        "bytes": sum(len(v) for v in TREE.values()),
        "overwrites": 0,
    }
    lines = [x["payload"] for x in e2e.log_lines(fleet, job["id"])]
    assert any(f"would write {target}{web.src}/conf/app.ini" in x for x in lines)
    # in place: no question asked (nothing is written), each file counted as overwritten
    code, out, err = e2e.fleetctl(
        fleet,
        "restore",
        web.name,
        snapshot,
        "--target",
        "/",
        "--include",
        str(web.src / "conf"),
        "--dry-run",
        "--follow",
    )
    assert code == 0, out + err
    (_, last) = [j for j in e2e.jobs(fleet, web.name) if j["kind"] == "restore"]
    counted = e2e.show(fleet, last["id"])["summary"]["dry_run"]
    assert (counted["files"], counted["overwrites"]) == (2, 2)
    # an exclude leaves its matches out, as restic would
    code, out, err = e2e.fleetctl(
        fleet,
        "restore",
        web.name,
        snapshot,
        "--target",
        target,
        "--exclude",
        "*.bin",
        "--exclude",
        "nested",
        "--dry-run",
        "--json",
        "--follow",
    )
    assert code == 0, out + err
    (*_, last) = [j for j in e2e.jobs(fleet, web.name) if j["kind"] == "restore"]
    assert e2e.show(fleet, last["id"])["summary"]["dry_run"]["files"] == 2  # index, app.ini
    # and restic, really restoring with the same excludes, writes those two
    real = tmp_path / "real"
    code, out, err = e2e.fleetctl(
        fleet,
        "restore",
        web.name,
        snapshot,
        "--target",
        real,
        "--exclude",
        "*.bin",
        "--exclude",
        "nested",
        "--follow",
    )
    assert code == 0, out + err
    written = sorted(p.name for p in real.rglob("*") if p.is_file())
    assert written == ["app.ini", "index.html"]


def test_bad_restores_are_refused_with_nothing_queued(fleet, e2e, tmp_path):
    web = e2e.host(fleet)
    group, snapshot = backed_up(fleet, e2e, web)
    before = len(e2e.jobs(fleet, web.name))
    cases = [
        (("restore", web.name, "ffffffff", "--target", tmp_path / "x"), 4, "no snapshot"),
        (("restore", web.name, "not-hex", "--target", tmp_path / "x"), 2, "not a snapshot id"),
        (("restore", web.name, snapshot, "--target", "relative/dir"), 2, "not an absolute"),
        (
            (
                "restore",
                web.name,
                snapshot,
                "--target",
                tmp_path,
                "--include",
                "/a",
                "--exclude",
                "b",
            ),
            2,
            "not both",
        ),
        (
            ("restore", web.name, "latest", "--group", "nope", "--target", tmp_path),
            4,
            "no snapshot",
        ),
        (("restore", web.name, snapshot, "--target", "/"), 1, "not confirmed"),  # no terminal
        (("restore", "no-such-host", snapshot, "--target", tmp_path), 4, "no host"),
        (("run", web.name, group, "--json"), 0, ""),  # (a backup still runs: the control)
    ]
    for args, code, text in cases[:-1]:
        got, out, err = e2e.fleetctl(fleet, *args)
        assert got == code and text in err, (args, got, out, err)
    # fleetd refuses / without in_place, whoever asks
    try:
        fleet.rpc("restore.run", host=web.name, snapshot=snapshot, target="/")
        raise AssertionError("restore.run into / without in_place was taken")
    except e2e.fx.RpcError as exc:
        assert exc.code == "bad_request" and "in_place" in str(exc)
    assert len(e2e.jobs(fleet, web.name)) == before


def test_in_place_restore_overwrites_after_confirmation(fleet, e2e):
    web = e2e.host(fleet)
    group, snapshot = backed_up(fleet, e2e, web)
    (web.src / "index.html").write_text("defaced\n")
    (web.src / "conf" / "app.ini").unlink()
    code, out, err = e2e.fleetctl(
        fleet,
        "restore",
        web.name,
        snapshot,
        "--target",
        "/",
        "--include",
        str(web.src),
        "--yes",
        "--follow",
    )
    assert code == 0, out + err
    assert (web.src / "index.html").read_text() == TREE["index.html"]
    assert (web.src / "conf" / "app.ini").read_text() == TREE["conf/app.ini"]


def test_a_dead_hosts_files_go_onto_its_replacement(fleet, e2e, tmp_path):
    repo = tmp_path / "shared"
    password = "shared-restore-pw-71"
    old = e2e.host(fleet, repo=repo, password=password, fresh=True)
    new = e2e.host(fleet, set_repo=False, start=False)
    group, snapshot = backed_up(fleet, e2e, old)
    old.agent.stop()  # the old server is dead
    target = tmp_path / "replacement"
    # the replacement does not use the repository yet: refused, saying how
    code, out, err = e2e.fleetctl(
        fleet, "restore", old.name, snapshot, "--to-host", new.name, "--target", target, "--yes"
    )
    assert code != 0 and "repos attach" in err, out + err
    name = fleet.ctl_json("repo", "show", old.name)["name"]
    fleet.ctl("repos", "use", name, new.name)
    e2e.start(fleet, new, wait_init=True)
    code, out, err = e2e.fleetctl(
        fleet,
        "restore",
        old.name,
        snapshot,
        "--to-host",
        new.name,
        "--target",
        target,
        "--yes",
        "--follow",
    )
    assert code == 0, out + err
    same_tree(old.src, target / str(old.src).lstrip("/"))
    (job,) = [j for j in e2e.jobs(fleet, new.name) if j["kind"] == "restore"]
    assert (
        job["host"] == new.name and e2e.show(fleet, job["id"])["restore"]["from_host"] == old.name
    )
