"""Three fleetd replicas on one real PostgreSQL, real agents and restic
(issue 13): agents spread over the replicas, a backup queued on A for an
agent connected through B, followed from C; B is SIGKILLed in the middle
of it. The agent fails over to another replica, the job finishes, its log
is whole with every line once, the leader's ticker goes on, and nothing
is lost."""

from __future__ import annotations

import base64
import json
import re
import shutil
import signal
import types

import pytest

pytestmark = pytest.mark.own_store  # always three replicas on PostgreSQL: run once

HALF = 300  # hook lines before the gate, and after it
HOOK_LINE = re.compile(r"\bline (\d+)$")


@pytest.fixture
def replicas(fx, tmp_path):
    envs = fx.start_replicas(tmp_path / "fleet", 3, public_urls=True)
    yield envs
    for env in envs:
        fx.stop_and_check(env.fleetd)


def host_on(e2e, env) -> types.SimpleNamespace:
    """A host enrolled through `env` (its string lists that replica first,
    then the others), with a repository and its agent running."""
    name = e2e.fx.uniq("rep")
    base = e2e.tmp_path / name
    base.mkdir()
    h = types.SimpleNamespace(name=name, base=base, src=base / "src", agent=e2e.agent(name))
    h.src.mkdir()
    h.repo = base / "repo"
    shutil.copytree(e2e.template.repo, h.repo)
    h.password = e2e.template.password
    (base / "pw").write_text(h.password + "\n")
    proc = h.agent.enroll(env.ctl_json("enroll", name)["enrollment"], hostname=name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    env.ctl("repo", "set", name, "--url", h.repo, "--password-file", base / "pw")
    h.agent.start()
    h.agent.wait_log(f"connected to {env.url}")
    return h


def replica_of(fx, env, host) -> str:
    with fx.store_sql(env.data_dir) as sql:
        return sql('SELECT "session_replica" FROM "host" WHERE "name" = ?', host)[0][0]


def test_a_replica_killed_mid_backup_loses_and_repeats_nothing(fx, e2e, replicas):
    a, b, c = replicas
    hosts = [host_on(e2e, env) for env in replicas]  # one agent through each replica
    assert len({replica_of(fx, a, h.name) for h in hosts}) == 3
    h = hosts[1]  # its agent is connected through B
    (h.src / "data.txt").write_text("kept\n")
    gate = h.base / "gate"
    a.ctl(
        "groups",
        "create",
        h.name,
        "etc",
        "--include",
        h.src,
        "--pre-hook",
        e2e.gated_hook(gate, HALF),
    )

    job = a.ctl_json("run", h.name, "etc")  # queued on A, dispatched by B
    tail = fx.run_fleetctl_proc("jobs", "tail", str(job["id"]), server=c.url, token=c.admin_token)
    e2e.fx.wait_until(
        lambda: len(e2e.log_lines(c, job["id"])) >= HALF,
        timeout=60,
        what="the first half of the hook's lines, stored",
    )
    before = h.agent.count("connected to")
    b.fleetd.proc.send_signal(signal.SIGKILL)  # mid-backup, the hook waiting
    b.fleetd.wait()
    h.agent.wait_log("connected to", before + 1, timeout=30)
    newest = [line for line in h.agent.log().splitlines() if "connected to" in line][-1]
    assert a.url in newest or c.url in newest, newest  # failed over to A or C
    gate.touch()

    done = e2e.wait_job(c, job["id"], timeout=120)
    assert done["status"] == "succeeded", done
    out, err = tail.communicate(timeout=60)
    assert tail.returncode == 0, err

    # the stored log: every line once, in order, seqs contiguous
    stored = e2e.log_lines(a, job["id"])
    assert [line["seq"] for line in stored] == list(range(1, len(stored) + 1))
    hook = [int(m.group(1)) for line in stored if (m := HOOK_LINE.search(line["payload"]))]
    assert hook == list(range(1, 2 * HALF + 1))
    # and the tail on C, which never lost its own link, showed the same
    followed = [int(m.group(1)) for line in out.splitlines() if (m := HOOK_LINE.search(line))]
    assert followed == list(range(1, 2 * HALF + 1))

    # the snapshot is in the repository, once
    proc = e2e.restic(h.repo, h.password, "snapshots", "--json")
    assert proc.returncode == 0 and len(json.loads(proc.stdout)) == 1
    # one job, not a second one made by the failover
    assert [j["id"] for j in e2e.jobs(a, h.name, kind="backup")] == [job["id"]]

    # the ticker moves: a leader sweeps the dead replica (whoever led before)
    fx.wait_until(
        lambda: any("replica" in e.fleetd.log() and "is silent" in e.fleetd.log() for e in (a, c)),
        timeout=40,
        what="the leader to sweep the dead replica",
    )
    with fx.store_sql(a.data_dir) as sql:
        alive = {r[0] for r in sql('SELECT "id" FROM "replica"')}
    assert len(alive) == 2
    # every agent is online, through A or C
    for other in hosts:
        assert a.ctl_json("hosts", "show", other.name)["status"] == "online"
        assert replica_of(fx, a, other.name) in alive


def test_snapshots_are_browsed_through_any_replica(fx, e2e, replicas):
    a, b, c = replicas
    h = host_on(e2e, b)  # its agent holds a link to B only
    files = {f"many/f{i:04d}.txt": f"{i}\n" for i in range(1500)}  # several pages of ls
    secret = "s3cret-" + fx.uniq("dump")
    files["etc/app.ini"] = f"[app]\nkey = {secret}\n"
    e2e.write_tree(h.src, files)
    a.ctl("groups", "create", h.name, "etc", "--include", h.src)
    done = e2e.wait_job(a, a.ctl_json("run", h.name, "etc")["id"], timeout=120)
    assert done["status"] == "succeeded", done
    snap = fx.wait_until(lambda: a.ctl_json("snapshots", h.name), what="the snapshot")[0]

    # ls on A: B asks its agent and passes the pages on, in order, whole
    listed = a.ctl_json("ls", h.name, snap["short_id"], f"{h.src}/many")
    assert listed["cached"] is False
    assert [e["name"] for e in listed["entries"]] == [f"f{i:04d}.txt" for i in range(1500)]
    # find on C, through B too
    found = c.ctl_json("find", h.name, "app.ini")
    assert any(m["path"] == f"{h.src}/etc/app.ini" for m in found["matches"]), found
    # a file's content through C: relayed sealed, never in the store in clear
    code, out, err = e2e.fleetctl(c, "dump", h.name, snap["short_id"], f"{h.src}/etc/app.ini")
    assert code == 0, err
    assert out == f"[app]\nkey = {secret}\n"
    stored = fx.store_bytes(a.data_dir)
    # neither the content nor the base64 of it that the agent's pages carry
    assert secret.encode() not in stored
    assert base64.b64encode(out.encode()) not in stored
    # the agent gone, a new listing is refused as offline, not waited for
    h.agent.stop()
    e2e.wait_host(a, h.name, "offline")
    refused = a.ctl("ls", h.name, snap["short_id"], f"{h.src}/etc", expect=1)
    assert "offline" in refused.stderr
