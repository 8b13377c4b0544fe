"""fleet.server.scheduling.drills on a real SQLite file, with the time
given; and the agent's drill helpers (fleet.agent.drill): the sample, the
include patterns, the verdict against the live files."""

from __future__ import annotations

import datetime as dt
import os
import random
from pathlib import Path

import pytest

from fleet.agent import drill
from fleet.common.drills import parse_sample
from fleet.server.scheduling import drills
from fleet.server.store.db import open_database
from fleet.server.store.models import Host, HostRepository, Job, Repository, Snapshot, SourceGroup

T0 = dt.datetime(2026, 5, 4, 0, 30)


@pytest.fixture
def setup(tmp_path: Path):
    database = open_database(tmp_path / "fleet.db")
    main = Repository.create(name="main", url_enc=b"u", password_enc=b"p", aad="x")
    web = Host.create(name="web-01", online=True)
    HostRepository.create(host=web, repository=main, position=0)
    group = SourceGroup.create(
        host=web, name="www", includes=["/var/www"], drill_cron="0 3 * * 0", drill_sample="5%"
    )
    yield main, web, group
    database.close()


def snap(web: Host, repo: Repository, sid: str, at: dt.datetime, tag: str = "www") -> None:
    Snapshot.create(
        host=web,
        repository=repo,
        snapshot_id=sid,
        short_id=sid[:8],
        time=at,
        hostname="web-01",
        paths=["/var/www"],
        tags=[tag],
    )


def drill_jobs() -> list[Job]:
    return list(Job.select().where(Job.kind == "drill").order_by(Job.id))


def test_a_due_drill_takes_the_groups_latest_snapshot_once(setup):
    main, web, group = setup
    assert drills.next_due() == dt.datetime.min  # not computed yet: look now
    drills.run_due([], T0)  # 2026-05-04 is a Monday: next Sunday 03:00
    assert drills.next_due() == dt.datetime(2026, 5, 10, 3, 0)
    drills.run_due([], dt.datetime(2026, 5, 10, 3, 0))
    assert drill_jobs() == []  # no snapshot yet: nothing to prove
    assert drills.next_due() == dt.datetime(2026, 5, 17, 3, 0)
    snap(web, main, "a" * 64, dt.datetime(2026, 5, 15, 1))
    snap(web, main, "b" * 64, dt.datetime(2026, 5, 16, 1))
    snap(web, main, "c" * 64, dt.datetime(2026, 5, 16, 2), tag="other")  # another group's
    drills.run_due([], dt.datetime(2026, 5, 17, 3, 0))
    (job,) = drill_jobs()
    assert (job.group_id, job.repository_id, job.actor_kind) == (group.id, main.id, "system")
    assert job.params == {"snapshot": "b" * 64, "sample": "5%", "tag": "www", "group": "www"}
    # still queued a week later: not made twice
    drills.run_due([], dt.datetime(2026, 5, 24, 3, 0))
    assert len(drill_jobs()) == 1
    # no cron: no drill, and nothing due
    SourceGroup.update(drill_cron=None).execute()
    assert drills.next_due() is None


@pytest.mark.parametrize(
    ("value", "files", "k"),
    [("20", 100, 20), ("20", 7, 7), ("1%", 1000, 10), ("0.5%", 10, 1), ("100%", 3000, 1000)],
)
def test_the_sample_size(value, files, k):
    assert drill.sample_size(value, files) == k


@pytest.mark.parametrize("bad", ["0", "-1", "0%", "101%", "lots", "5 %", "1e3"])
def test_a_bad_sample_is_refused(bad):
    with pytest.raises(ValueError):
        parse_sample(bad)


def test_the_reservoir_keeps_a_bounded_uniform_sample_and_a_byte_budget():
    reservoir = drill.Reservoir(size=100, rng=random.Random(3))
    for i in range(100_000):
        reservoir.add(drill.FileNode(f"/srv/f{i:06d}", 1, None))
    assert reservoir.seen == 100_000 and len(reservoir.kept) == 100
    # a uniform sample: its items are spread over the whole listing
    picked = sorted(int(n.path[-6:]) for n in reservoir.kept)
    assert picked[0] < 10_000 and picked[-1] > 90_000
    assert len(reservoir.choose("0.05%")) == 50  # of all seen, from the reservoir
    big = drill.Reservoir(rng=random.Random(1))
    for name, size in (("vm.img", 8 << 30), ("a", 10), ("b", 20)):
        big.add(drill.FileNode(f"/srv/{name}", size, None))
    assert [n.path for n in big.choose("3")] == ["/srv/a", "/srv/b"]  # the image gives way


def test_the_scratch_directory_goes_even_with_read_only_directories(tmp_path):
    scratch = tmp_path / "fleet-drill-x"
    locked = scratch / "go" / "pkg"
    locked.mkdir(parents=True)
    (locked / "mod.go").write_text("package x\n")
    locked.chmod(0o555)
    (scratch / "go").chmod(0o555)
    drill.remove(str(scratch))
    assert not scratch.exists()


def test_the_sample_is_drawn_from_the_files_and_its_paths_are_exact_patterns():
    files = [drill.FileNode(f"/srv/f{i}", i, None) for i in range(50)]
    chosen = drill.choose(files, "10", random.Random(7))
    assert len(chosen) == 10 and len(set(chosen)) == 10 and set(chosen) <= set(files)
    assert drill.include_pattern("/srv/a[1]*?.txt") == "/srv/a\\[1]\\*\\?.txt"


def test_the_verdict_compares_with_the_live_file_only_when_it_looks_unchanged(tmp_path):
    live = tmp_path / "live"
    scratch = tmp_path / "scratch"
    live.mkdir()
    nodes = []
    for name, content in (("same", b"same bytes"), ("rotted", b"good bytes"), ("edited", b"v1")):
        path = live / name
        path.write_bytes(content)
        stamp = os.stat(path).st_mtime_ns
        mtime = (
            dt.datetime.fromtimestamp(stamp // 10**9, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
            + f".{stamp % 10**9:09d}Z"
        )
        nodes.append(drill.FileNode(str(path), len(content), mtime))
        restored = scratch / str(path).lstrip("/")
        restored.parent.mkdir(parents=True, exist_ok=True)
        restored.write_bytes(content)
    # the live "rotted" file changes under the same size and time: a mismatch;
    # the "edited" one changes its size: a newer version, not compared
    rotted = live / "rotted"
    st = os.stat(rotted)
    rotted.write_bytes(b"bad  bytes")
    os.utime(rotted, ns=(st.st_atime_ns, st.st_mtime_ns))
    (live / "edited").write_bytes(b"version 2")
    gone = drill.FileNode(str(live / "never-restored"), 3, None)
    verdict = drill.check(str(scratch), [*nodes, gone])
    assert verdict["files"] == 4 and verdict["live_checked"] == 2
    assert verdict["mismatches"] == 2
    assert any("rotted: differs from the live file" in p for p in verdict["problems"])
    assert any("never-restored: not restored" in p for p in verdict["problems"])
    assert verdict["bytes"] == len(b"same bytes") + len(b"good bytes") + len(b"v1")
