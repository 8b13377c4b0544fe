"""Browsing snapshots with real agents and real restic: ls (paged, and
answered from fleetd's cache without the agent the second time), find
across snapshots, diff between two."""

from __future__ import annotations


def backup(fleet, e2e, h, group):
    done = e2e.wait_job(fleet, e2e.run(fleet, h.name, group)["id"])
    assert done["status"] == "succeeded", done
    return done


def test_ls_pages_a_directory_and_answers_again_from_the_cache(fleet, e2e):
    web = e2e.host(fleet)
    files = {f"many/f{i:04d}.txt": f"{i}\n" for i in range(1234)}
    files.update({"etc/app.ini": "[app]\n", "top.txt": "top\n"})
    e2e.write_tree(web.src, files)
    group = e2e.group(fleet, web)
    backup(fleet, e2e, web, group)
    snap = e2e.fx.wait_until(
        lambda: fleet.ctl_json("snapshots", web.name), timeout=20, what="the snapshot"
    )[0]

    many = f"{web.src}/many"
    first = fleet.rpc(
        "snapshots.ls", host=web.name, snapshot=snap["short_id"], path=many, limit=500
    )
    assert (first["total"], first["cached"], len(first["entries"])) == (1234, False, 500)
    assert first["entries"][0]["name"] == "f0000.txt" and first["entries"][0]["size_bytes"] == 2
    names = [e["name"] for e in first["entries"]]
    for offset in (500, 1000):
        page = fleet.rpc(
            "snapshots.ls", host=web.name, snapshot=snap["id"], path=many, offset=offset, limit=500
        )
        assert page["cached"] is True and page["offset"] == offset
        names += [e["name"] for e in page["entries"]]
    assert names == [f"f{i:04d}.txt" for i in range(1234)]

    # the source directory through fleetctl: dirs and files, sizes
    listed = fleet.ctl_json("ls", web.name, snap["short_id"], str(web.src))
    e2e.fx.check_json(listed, "listing")  # man/fleetctl.1's JSON OUTPUT
    by_name = {e["name"]: e for e in listed["entries"]}
    assert set(by_name) == {"many", "etc", "top.txt"}
    assert by_name["many"]["type"] == "dir" and by_name["top.txt"]["size_bytes"] == 4
    table = fleet.ctl("ls", web.name, snap["short_id"], str(web.src)).stdout
    assert "many/" in table and "top.txt" in table
    # a file listed is itself
    one = fleet.ctl_json("ls", web.name, "latest", f"{web.src}/etc/app.ini")
    assert [e["name"] for e in one["entries"]] == ["app.ini"]

    # the agent gone, the listings seen are still there; a new one is not
    web.agent.stop()
    e2e.wait_host(fleet, web.name, "offline")
    again = fleet.ctl_json("ls", web.name, snap["short_id"], many)
    assert again["cached"] is True and len(again["entries"]) == 1234
    refused = fleet.ctl("ls", web.name, snap["short_id"], f"{web.src}/etc", expect=1)
    assert "offline" in refused.stderr


def test_find_and_diff_across_snapshots(fleet, e2e):
    web = e2e.host(fleet)
    e2e.write_tree(web.src, {"etc/app.ini": "[app]\n", "etc/old.ini": "old\n", "a.txt": "a\n"})
    group = e2e.group(fleet, web)
    first = backup(fleet, e2e, web, group)
    (web.src / "etc" / "old.ini").unlink()
    (web.src / "a.txt").write_text("changed\n")
    e2e.write_tree(web.src, {"etc/new.ini": "new\n"})
    second = backup(fleet, e2e, web, group)
    snaps = e2e.fx.wait_until(
        lambda: (s := fleet.ctl_json("snapshots", web.name)) and len(s) == 2 and s,
        timeout=20,
        what="both snapshots",
    )
    # which is which by the backups that made them: fleetd keeps snapshot
    # times to the second, and two backups may fall in the same one
    by_id = {s["short_id"]: s for s in snaps}
    old = by_id[first["summary"]["snapshot_id"][:8]]
    new = by_id[second["summary"]["snapshot_id"][:8]]
    tied = old["taken_at"] == new["taken_at"]  # then "newest first" cannot tell them apart

    # the whole fleet's snapshots, with filters
    def ids(*args):
        rows = fleet.ctl_json("snapshots", *args)
        return [r["short_id"] for r in rows if r["host"] == web.name]

    if not tied:
        assert ids() == [new["short_id"], old["short_id"]]
        assert ids("--limit", "1", web.name) == [new["short_id"]]
    assert sorted(ids()) == sorted([new["short_id"], old["short_id"]])
    assert ids("--since", "1h") == ids("--since", "2000-01-01") == ids()
    assert ids("--since", "2099-01-01T00:00:00Z") == []
    assert ids("--tag", group) == ids("--group", group) == ids()
    assert ids("--tag", "no-such-tag") == []
    assert web.name in fleet.ctl("snapshots").stdout  # the HOST column
    fleet.ctl("snapshots", "--since", "last tuesday", expect=2)

    found = fleet.ctl_json("find", web.name, "*.ini")
    e2e.fx.check_json(found, "find result")
    by_snapshot = {}
    for m in found["matches"]:
        by_snapshot.setdefault(m["snapshot"], set()).add(m["path"].rsplit("/", 1)[-1])
    assert by_snapshot == {
        old["short_id"]: {"app.ini", "old.ini"},
        new["short_id"]: {"app.ini", "new.ini"},
    }
    assert all(m["snapshot_taken_at"] for m in found["matches"])
    assert fleet.ctl_json("find", web.name, "nothing-like-this")["matches"] == []

    d = fleet.ctl_json("diff", web.name, old["short_id"], new["short_id"])
    e2e.fx.check_json(d, "diff")
    changes = {c["path"].removeprefix(str(web.src)): c["change"] for c in d["changes"]}
    assert changes["/etc/old.ini"] == "removed"
    assert changes["/etc/new.ini"] == "added"
    assert changes["/a.txt"] == "modified"
    assert d["statistics"]["removed"]["files"] == 1 and d["statistics"]["added"]["files"] == 1
    text = fleet.ctl("diff", web.name, old["short_id"], new["short_id"]).stdout
    assert f"-  {web.src}/etc/old.ini" in text and f"+  {web.src}/etc/new.ini" in text
    # bad input: a clear error, nothing asked of the agent
    fleet.ctl("diff", web.name, old["short_id"], "ffffffff", expect=4)
    fleet.ctl("ls", web.name, old["short_id"], "relative/path", expect=2)
    fleet.ctl("find", web.name, "", expect=2)


def test_dump_streams_a_file_byte_for_byte(fleet, e2e, tmp_path):
    import hashlib
    import os

    web = e2e.host(fleet)
    blob = os.urandom(4_000_000)  # 21 chunks: past the 16 the agent sends unasked
    e2e.write_tree(web.src, {"data/blob.bin": blob, "etc/hosts": "127.0.0.1 localhost\n"})
    group = e2e.group(fleet, web)
    backup(fleet, e2e, web, group)
    # to standard output, as `fleetctl dump ... > file` is used
    import subprocess

    env = e2e.fx.clean_env(
        FLEET_SERVER=fleet.url, FLEET_TOKEN=fleet.admin_token, XDG_CONFIG_HOME=str(fleet.config_dir)
    )
    done = subprocess.run(
        [
            str(e2e.fx.REPO_ROOT / "fleetctl"),
            "dump",
            web.name,
            "latest",
            f"{web.src}/data/blob.bin",
        ],
        capture_output=True,
        env=env,
        cwd=e2e.fx.REPO_ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == blob
    assert hashlib.sha256(blob).hexdigest() in done.stderr.decode()
    # to a file; an unknown path fails and leaves no file behind
    target = tmp_path / "hosts"
    fleet.ctl("dump", web.name, "latest", f"{web.src}/etc/hosts", "--output", target)
    assert target.read_text() == "127.0.0.1 localhost\n"
    missing = tmp_path / "missing"
    failed = fleet.ctl(
        "dump", web.name, "latest", f"{web.src}/no/such", "--output", missing, expect=1
    )
    assert "not found" in failed.stderr and not missing.exists()
    # a dump that fails leaves a file already there as it was
    fleet.ctl("dump", web.name, "latest", f"{web.src}/no/such", "--output", target, expect=1)
    assert target.read_text() == "127.0.0.1 localhost\n"
    assert not list(tmp_path.glob("*partial*"))
    audit = fleet.ctl_json("audit", "--action", "snapshot.dump")
    assert any(a["detail"]["path"] == f"{web.src}/etc/hosts" for a in audit)
    # a viewer may browse but not take files
    viewer = fleet.add_user("viewer")
    fleet.ctl(
        "dump",
        web.name,
        "latest",
        f"{web.src}/etc/hosts",
        "-o",
        tmp_path / "v",
        token=viewer.token,
        expect=3,
    )
