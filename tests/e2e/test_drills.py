"""Restore drills with real agents and real restic: a drill of a good
repository proves the group restorable (status, metrics), one that finds a
live file rotted under an unchanged size and time fails naming it, and one
over a damaged pack file fails with restic's own verdict, as status, the
alerts' kind and the job say."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def drill(e2e, fleet, h, group, expect: int) -> dict:
    code, out, err = e2e.fleetctl(fleet, "run", h.name, group, "--drill", "--follow")
    assert code == expect, out + err
    (job,) = [j for j in e2e.jobs(fleet, h.name) if j["kind"] == "drill"][-1:]
    return e2e.show(fleet, job["id"])


def test_a_drill_proves_a_group_restorable_and_catches_damage(fleet, e2e):
    web = e2e.host(fleet)
    files = {
        "etc/app.ini": "[app]\n",
        "etc/odd [name]*.txt": "brackets and stars are exact in a drill\n",
        "data/blob.bin": os.urandom(600_000),
        "data/small.txt": "small\n",
    }
    e2e.write_tree(web.src, files)
    group = e2e.group(fleet, web, "--drill-sample", "100%")
    shown = fleet.ctl_json("groups", "show", web.name, group)
    assert shown["drill_sample"] == "100%" and shown["drill_cron"] is None
    fleet.ctl("run", web.name, group, "--drill", expect=2)  # no snapshot yet
    done = e2e.wait_job(fleet, e2e.run(fleet, web.name, group)["id"])
    assert done["status"] == "succeeded", done
    e2e.fx.wait_until(
        lambda: fleet.ctl_json("snapshots", web.name), timeout=20, what="the snapshot"
    )

    good = drill(e2e, fleet, web, group, 0)
    verdict = good["summary"]["drill"]
    assert (verdict["files"], verdict["mismatches"], verdict["listed"]) == (4, 0, 4)
    assert verdict["live_checked"] == 4  # nothing changed since the snapshot
    assert verdict["bytes"] == sum(len(v) for v in files.values())
    scratch = [line for line in e2e.log_lines(fleet, good["id"]) if "proven:" in line["payload"]]
    assert scratch, "the drill's log says what it proved"
    (g,) = [
        g
        for h in json.loads(fleet.ctl("status", "--json", expect=None).stdout)["hosts"]
        if h["name"] == web.name
        for g in h["groups"]
    ]
    assert g["last_drill_status"] == "succeeded" and g["last_proven_at"]
    assert g["last_proven_snapshot"] == good["summary"]["drill"]["snapshot"]

    # a live file rotted under the same size and time: the drill names it
    rotted = web.src / "etc" / "app.ini"
    st = os.stat(rotted)
    rotted.write_text("[ppa]\n")
    os.utime(rotted, ns=(st.st_atime_ns, st.st_mtime_ns))
    bad = drill(e2e, fleet, web, group, 1)
    assert bad["status"] == "failed" and "app.ini: differs from the live file" in bad["error"]
    assert bad["summary"]["drill"]["mismatches"] == 1
    status = json.loads(fleet.ctl("status", "--json", expect=2).stdout)
    mine = [p for p in status["problems"] if p.get("host") == web.name]
    assert [p["kind"] for p in mine] == ["drill_failed"] and mine[0]["job"] == bad["id"]
    rotted.write_text("[app]\n")  # put right

    # a damaged pack file: restic's --verify refuses the sample
    packs = sorted(web.repo.glob("data/*/*"), key=lambda p: p.stat().st_size)
    biggest = packs[-1]
    biggest.chmod(0o644)
    with open(biggest, "r+b") as f:
        f.seek(biggest.stat().st_size // 2)
        f.write(b"\x00" * 64)
    scratches = set(Path(tempfile.gettempdir()).glob("fleet-drill-*"))
    broken = drill(e2e, fleet, web, group, 1)
    assert broken["status"] == "failed"
    assert "did not restore intact" in broken["error"]
    # the scratch directory it made went, failure or not
    assert set(Path(tempfile.gettempdir()).glob("fleet-drill-*")) == scratches
    made = [x for x in e2e.log_lines(fleet, broken["id"]) if "scratch directory" in x["payload"]]
    assert made, "the drill restored into a scratch directory"


def test_a_drill_cron_is_kept_and_due(fleet, e2e):
    web = e2e.host(fleet)
    e2e.write_tree(web.src, {"a.txt": "a\n"})
    group = e2e.group(fleet, web, "--drill-cron", "0 4 * * 0", "--drill-sample", "5")
    shown = e2e.fx.wait_until(
        lambda: (g := fleet.ctl_json("groups", "show", web.name, group))["next_drill_at"] and g,
        timeout=20,
        what="the next drill's time",
    )
    assert shown["drill_cron"] == "0 4 * * 0" and shown["next_drill_at"].endswith("T04:00:00Z")
    assert "sample 5" in fleet.ctl("groups", "show", web.name, group).stdout
    fleet.ctl("groups", "edit", web.name, group, "--drill-cron", "off", "--drill-sample", "")
    shown = fleet.ctl_json("groups", "show", web.name, group)
    assert (shown["drill_cron"], shown["drill_sample"]) == (None, "20")
    fleet.ctl("groups", "edit", web.name, group, "--drill-cron", "not a cron", expect=2)
    fleet.ctl("groups", "edit", web.name, group, "--drill-sample", "0%", expect=2)
