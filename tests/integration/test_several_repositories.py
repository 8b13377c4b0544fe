"""A host using several repositories, on a real fleetd with raw sockets
standing in for the agents: config.update with every repository, one init
for each, groups that back up into one and copy into another, the copy job
a backup makes, the per-repository queue around copies, repos detach, and
reports naming their repository."""

from __future__ import annotations

import contextlib
import itertools
import json

import pytest

from fleet.common import protocol


def ts(second: int) -> str:
    return f"2026-12-02T00:00:{second:02d}Z"


class FakeAgent:
    """An agent link: takes commands, reports under its own seqs, waits for acks."""

    def __init__(self, ws):
        self.ws = ws
        self.seq = itertools.count(1)
        self.pending = []

    def next_of(self, kind, timeout=10):
        for i, frame in enumerate(self.pending):
            if frame["type"] == kind:
                return self.pending.pop(i)
        while True:
            frame = json.loads(self.ws.recv(timeout=timeout))
            if frame["type"] == kind:
                return frame
            self.pending.append(frame)

    def report(self, kind, data):
        """A reliable frame, returned once fleetd has committed it (acked)."""
        seq = next(self.seq)
        self.ws.send(protocol.encode(kind, data, seq=seq))
        while self.next_of("ack")["data"]["seq"] < seq:
            pass

    def take(self, kind, timeout=10):
        """The next command.run, which must be of this kind: accepted, started."""
        data = self.next_of("command.run", timeout)["data"]
        assert data["kind"] == kind, data
        self.ws.send(
            protocol.encode("command.result", {"job_id": data["job_id"], "accepted": True})
        )
        self.report("job.started", {"job_id": data["job_id"], "kind": kind, "started_at": ts(0)})
        return data

    def finish(self, job_id, status="succeeded", summary=None):
        done = {"job_id": job_id, "status": status, "exit_code": 0, "finished_at": ts(1)}
        if summary is not None:
            done["summary"] = summary
        self.report("job.finished", done)

    def inits(self, count):
        """Take and end `count` init jobs: the repository ids they were for."""
        ids = []
        for _ in range(count):
            data = self.take("init")
            ids.append(data.get("repository_id"))
            self.finish(data["job_id"])
        return ids

    def assert_nothing_sent(self, fleet):
        """No command.run came: a round trip through fleetd shows it."""
        fleet.rpc("auth.whoami")
        assert not [f for f in self.pending if f["type"] == "command.run"], self.pending
        self.ws.send(json.dumps({"v": 1, "type": "no.such", "id": "probe", "data": {}}))
        while True:
            frame = json.loads(self.ws.recv(timeout=10))
            assert frame["type"] != "command.run", frame
            if frame["type"] == "error" and frame["data"].get("re") == "probe":
                return
            self.pending.append(frame)


def make_repo(fleet, fx, **secrets):
    name = fx.uniq("r")
    fleet.rpc(
        "repos.create",
        name=name,
        url=secrets.get("url", f"/srv/{name}"),
        password=secrets.get("password", f"pw-{name}"),
        env=secrets.get("env", {}),
    )
    return name


def make_host(fleet, fx, default, *attached):
    """An enrolled host using `default` and `attached`: (name, agent token)."""
    name = fx.uniq("h")
    token = fx.enroll_agent(fleet, name, hostname=name)["agent_token"]
    fleet.rpc("repos.use", name=default, hosts=[name])
    for repo in attached:
        fleet.rpc("repos.attach", name=repo, hosts=[name])
    return name, token


@contextlib.contextmanager
def connected(fleet, fx, token, **hello):
    """An agent link after hello and welcome; .config: its first config.update."""
    with fx.ws_connect(fleet.url, "/agent", token) as ws:
        agent = FakeAgent(ws)
        ws.send(fx.agent_hello(**hello))
        agent.next_of("welcome")
        agent.config = agent.next_of("config.update")["data"]
        yield agent


def ids_of(config):
    return {r["name"]: r["id"] for r in config["repositories"]}


def jobs_of(fleet, host, kind):
    return fleet.rpc("jobs.list", host=host, kind=kind)


def show(fleet, job_id):
    return fleet.rpc("jobs.show", id=job_id)


def snap(sid):
    return {"id": sid, "short_id": sid[:8], "time": ts(0), "hostname": "box", "paths": ["/etc"]}


# -- 1, 2: what the agent is told, and one init per repository --------------------


def test_config_update_lists_every_repository_default_first(fleet, fx):
    env_secret = f"env-{fx.uniq('s')}"
    a = make_repo(fleet, fx, password="pw-of-a", env={"AWS_SECRET_ACCESS_KEY": env_secret})
    b = make_repo(fleet, fx, url="rest:https://user:hunter2@rest.example/b", password="pw-of-b")
    host, token = make_host(fleet, fx, a)
    with connected(fleet, fx, token) as agent:
        config = agent.config
        (only,) = config["repositories"]
        assert (only["name"], only["url"], only["password"]) == (a, f"/srv/{a}", "pw-of-a")
        assert only["env"] == {"AWS_SECRET_ACCESS_KEY": env_secret}
        assert isinstance(only["id"], int)
        assert (config["repo_url"], config["repo_password"]) == (f"/srv/{a}", "pw-of-a")
        assert agent.inits(1) == [only["id"]]

        attached = fleet.ctl_json("repos", "attach", b, host)
        assert attached["changed"] == [host] and host in attached["hosts"]
        config = agent.next_of("config.update")["data"]
        assert [r["name"] for r in config["repositories"]] == [a, b]  # the default first
        first, second = config["repositories"]
        assert first["id"] == only["id"] and second["id"] != first["id"]
        assert (second["url"], second["password"]) == (
            "rest:https://user:hunter2@rest.example/b",
            "pw-of-b",
        )
        assert config["repo_url"] == f"/srv/{a}"  # an older agent keeps its default
        assert agent.inits(1) == [second["id"]]

    shown = fleet.ctl_json("repos", "show", b)
    assert shown["url"] == "rest:https://user:********@rest.example/b"
    text = "".join(
        [
            json.dumps(fleet.ctl_json("repos", "show", r)) + fleet.ctl("repos", "show", r).stdout
            for r in (a, b)
        ]
    )
    for secret in ("pw-of-a", "pw-of-b", "hunter2", env_secret):
        assert secret not in text


def test_an_agent_from_before_several_repositories_gets_only_its_defaults_jobs(fleet, fx):
    """Such an agent runs every job on its default repository: a job on
    another (its init, a backup of a group naming it, a copy) fails with a
    message instead of acting on the wrong repository."""
    a, b = make_repo(fleet, fx), make_repo(fleet, fx)
    host, token = make_host(fleet, fx, a, b)
    fleet.rpc("groups.create", host=host, name="etc", includes=["/etc"], repository=b)
    with connected(fleet, fx, token, features=[]) as agent:
        assert len(agent.config["repositories"]) == 2  # sent; this agent reads repo_url only
        assert agent.inits(1) == [ids_of(agent.config)[a]]  # its default's goes out
        inits = {j["repository"]: j for j in jobs_of(fleet, host, "init")}
        failed = fx.wait_until(
            lambda: (j := show(fleet, inits[b]["id"]))["status"] == "failed" and j,
            timeout=10,
            what="the other repository's init to fail",
        )
        assert "predates" in failed["error"] and "upgrade fleet-agent" in failed["error"]
        backup = fleet.rpc("jobs.run", host=host, group="etc")["id"]
        fx.wait_until(
            lambda: show(fleet, backup)["status"] == "failed",
            timeout=10,
            what="the backup into the other repository to fail",
        )
        prune = fleet.rpc("jobs.run", host=host, kind="prune")["id"]
        assert agent.take("prune")["job_id"] == prune  # on its default: sent


def test_one_init_per_repository_and_one_more_for_each_attached(fleet, fx):
    a, b, c = (make_repo(fleet, fx) for _ in range(3))
    host, token = make_host(fleet, fx, a, b)
    with connected(fleet, fx, token) as agent:
        ids = ids_of(agent.config)
        assert sorted(agent.inits(2)) == sorted([ids[a], ids[b]])
        agent.assert_nothing_sent(fleet)
        inits = jobs_of(fleet, host, "init")
        assert sorted(j["repository"] for j in inits) == sorted([a, b])
        assert {show(fleet, j["id"])["repository"] for j in inits} == {a, b}

        fleet.rpc("repos.attach", name=c, hosts=[host])
        ids = ids_of(agent.next_of("config.update")["data"])
        assert agent.inits(1) == [ids[c]]
        agent.assert_nothing_sent(fleet)
        # attached already: nothing changes, no init
        assert fleet.rpc("repos.attach", name=c, hosts=[host])["changed"] == []
        agent.assert_nothing_sent(fleet)
    inits = jobs_of(fleet, host, "init")
    assert sorted(j["repository"] for j in inits) == sorted([a, b, c])
    assert all(j["status"] == "succeeded" for j in inits)


# -- 3: groups naming repositories ----------------------------------------------


def test_groups_copy_to_attaches_and_bad_copies_are_refused(fleet, fx):
    a, b, c = (make_repo(fleet, fx) for _ in range(3))
    host, _ = make_host(fleet, fx, a)
    made = fleet.ctl_json("groups", "create", host, "etc", "--include", "/etc", "--copy-to", b)
    assert (made["attached"], made["copy_to"], made["repository"]) == ([b], b, None)
    assert made["copy_retention"] is None
    assert host in fleet.ctl_json("repos", "show", b)["hosts"]
    names = [r["name"] for r in fleet.ctl_json("hosts", "show", host)["repositories"]]
    assert names == [a, b]
    text = fleet.ctl("groups", "create", host, "var", "--include", "/var", "--copy-to", c)
    assert f"{host} now uses repository {c} too" in text.stderr

    # into the repository its backups go to already: the default, or its own
    refused = fleet.ctl(
        "groups", "create", host, "same", "--include", "/etc", "--copy-to", a, expect=2
    )
    assert "where its backups go already" in refused.stderr
    d = make_repo(fleet, fx)
    refused = fleet.ctl(
        "groups", "create", host, "same", "--include", "/etc", "--repo", d, "--copy-to", d, expect=2
    )
    assert "where its backups go already" in refused.stderr
    assert fleet.ctl_json("repos", "show", d)["hosts"] == []  # not attached by the refusal
    with pytest.raises(fx.RpcError) as err:
        fleet.rpc("groups.edit", host=host, name="etc", repository=b)
    assert err.value.code == "bad_request" and b in err.value.message

    # a copy retention with nothing to copy to
    refused = fleet.ctl(
        "groups", "create", host, "lone", "--include", "/etc", "--copy-keep-daily", "3", expect=2
    )
    assert "needs a repository to copy to" in refused.stderr
    with pytest.raises(fx.RpcError) as err:
        fleet.rpc(
            "groups.edit", host=host, name="var", copy_to="", copy_retention={"keep_daily": 2}
        )
    assert err.value.code == "bad_request"
    assert {g["name"] for g in fleet.rpc("groups.list", host=host)} == {"etc", "var"}
    assert fleet.rpc("groups.show", host=host, name="var")["copy_to"] == c

    kept = fleet.rpc("groups.edit", host=host, name="etc", copy_retention={"keep_daily": 3})
    assert kept["copy_retention"]["keep_daily"] == 3 and kept["attached"] == []
    cleared = fleet.rpc("groups.edit", host=host, name="etc", clear_copy_retention=True)
    assert cleared["copy_retention"] is None and cleared["copy_to"] == b


# -- 4: a backup's copy ----------------------------------------------------------


def test_a_succeeded_backup_is_followed_by_a_copy_of_its_snapshot(fleet, fx):
    a, b, c = (make_repo(fleet, fx) for _ in range(3))
    host, token = make_host(fleet, fx, a)
    fleet.rpc("groups.create", host=host, name="etc", includes=["/etc"], copy_to=b)
    fleet.rpc("groups.create", host=host, name="own", includes=["/srv"], repository=c, copy_to=b)
    with connected(fleet, fx, token) as agent:
        ids = ids_of(agent.config)
        assert list(ids) == [a, b, c]
        agent.inits(3)
        for group, source in (("etc", a), ("own", c)):
            backup = fleet.rpc("jobs.run", host=host, group=group)["id"]
            assert agent.take("backup")["job_id"] == backup
            sid = f"{'f' * 56}{backup:08d}"
            status = "succeeded" if group == "etc" else "warning"  # both made a snapshot
            agent.finish(backup, status, summary={"snapshot_id": sid, "files_new": 1})
            copies = [j for j in jobs_of(fleet, host, "copy") if j["group"] == group]
            assert len(copies) == 1, copies
            copy = show(fleet, copies[0]["id"])
            assert (copy["repository"], copy["from_repository"]) == (b, source)
            assert copy["status"] in ("queued", "dispatched")
            assert copy["params"] == {"group": group, "tag": group, "snapshots": [sid]}
            command = agent.take("copy")
            assert command["job_id"] == copy["id"]
            assert (command["repository_id"], command["from_repository_id"]) == (
                ids[b],
                ids[source],
            )
            assert (command["snapshots"], command["group"], command["tag"]) == ([sid], group, group)
            # a copy's own end (even naming a snapshot) makes no copy of the copy
            agent.finish(command["job_id"], summary={"snapshot_id": "c" * 64})
            assert len(jobs_of(fleet, host, "copy")) == (1 if group == "etc" else 2)

        # no snapshot made, none named: no copy
        for status, summary in (
            ("failed", {"snapshot_id": "d" * 64}),
            ("succeeded", {"files_new": 0}),
            ("succeeded", None),
        ):
            backup = fleet.rpc("jobs.run", host=host, group="etc")["id"]
            agent.take("backup")
            agent.finish(backup, status=status, summary=summary)
            assert show(fleet, backup)["status"] == status
            assert len(jobs_of(fleet, host, "copy")) == 2, (status, summary)

        # copies on their own schedule: none after a backup
        timed = fleet.rpc("groups.edit", host=host, name="etc", copy_cron="0 3 1 1 *")
        assert timed["copy_cron"] == "0 3 1 1 *"
        backup = fleet.rpc("jobs.run", host=host, group="etc")["id"]
        agent.take("backup")
        agent.finish(backup, summary={"snapshot_id": "e" * 64})
        assert len(jobs_of(fleet, host, "copy")) == 2

        # a failed copy is retried as its group says, between the same repositories
        fleet.rpc("groups.edit", host=host, name="own", retries=1, retry_delay=3600)
        copy = fleet.rpc("jobs.run", host=host, group="own", kind="copy")["id"]
        agent.take("copy")
        agent.finish(copy, status="failed")
        (retry,) = [j for j in jobs_of(fleet, host, "copy") if j["id"] > copy]
        retry = show(fleet, retry["id"])
        assert (retry["status"], retry["repository"], retry["from_repository"]) == (
            "queued",
            b,
            c,
        )
        assert retry["due_at"] is not None and retry["params"]["attempt"] == 2
        agent.assert_nothing_sent(fleet)


def test_forget_of_each_repository_by_the_retention_kept_there(fleet, fx):
    """The groups backing up into a repository are forgotten there by their
    retention; those copying into it, by their copy's (else their own)."""
    a, b = make_repo(fleet, fx), make_repo(fleet, fx)
    host, token = make_host(fleet, fx, a)
    own = {"keep_daily": 7}
    fleet.rpc(
        "groups.create",
        host=host,
        name="etc",
        includes=["/etc"],
        retention=own,
        copy_to=b,
        copy_retention={"keep_monthly": 12},
    )
    fleet.rpc("groups.create", host=host, name="srv", includes=["/srv"], retention=own, copy_to=b)
    fleet.rpc("groups.create", host=host, name="var", includes=["/var"], retention=own)
    with connected(fleet, fx, token) as agent:
        agent.inits(2)
        for repo, expected in (
            (a, {"etc": own, "srv": own, "var": own}),
            (b, {"etc": {"keep_monthly": 12}, "srv": own}),
        ):
            made = fleet.rpc("maintenance.run", name=repo, action="forget")["jobs"]
            jobs = [show(fleet, j) for j in made]
            assert {j["group"]: j["params"]["retention"] for j in jobs} == expected, jobs
            assert {j["repository"] for j in jobs} == {repo}
            for _ in jobs:
                command = agent.take("forget")
                assert command["repository_id"] == ids_of(agent.config)[repo]
                assert command["tag"] == command["group"]
                agent.finish(command["job_id"])


# -- 5: the per-repository queue around copies -------------------------------------


def test_copies_hold_both_their_repositories_in_the_queue(fleet, fx):
    """web copies from the shared repository into the copy one, which db
    uses too: db's prune of either waits for a copy, and a copy for it."""
    shared, copies = make_repo(fleet, fx), make_repo(fleet, fx)
    web, web_token = make_host(fleet, fx, shared)
    db, db_token = make_host(fleet, fx, shared, copies)
    fleet.rpc("groups.create", host=web, name="etc", includes=["/etc"], copy_to=copies)
    fleet.rpc("groups.create", host=db, name="etc", includes=["/etc"])
    with connected(fleet, fx, web_token) as a:
        a.inits(2)
        with connected(fleet, fx, db_token) as b:
            b.inits(2)

            # a prune of the copy's source waits while the copy runs ...
            copy = fleet.rpc("jobs.run", host=web, group="etc", kind="copy")["id"]
            command = a.take("copy")
            assert command["job_id"] == copy and "snapshots" not in command
            prune = fleet.rpc("jobs.run", host=db, kind="prune")
            assert prune["status"] == "queued" and prune["repository"] == shared
            b.assert_nothing_sent(fleet)
            assert show(fleet, prune["id"])["waiting_for"] == (
                f"repository {shared}: copy job {copy} of {web} runs"
            )
            # ... while a backup into it does not (a copy only reads it)
            backup = fleet.rpc("jobs.run", host=web, group="etc")
            assert backup["status"] == "queued"  # web is busy with its copy
            a.finish(copy)
            assert b.take("prune")["job_id"] == prune["id"]
            a.assert_nothing_sent(fleet)  # its backup waits for db's prune now
            b.finish(prune["id"])
            assert a.take("backup")["job_id"] == backup["id"]
            a.finish(backup["id"])  # no snapshot_id: no copy

            # a copy waits while a prune of its destination runs on another host
            dest_prune = fleet.rpc("jobs.run", host=db, kind="prune", repository=copies)
            assert dest_prune["repository"] == copies
            assert b.take("prune")["repository_id"] == ids_of(b.config)[copies]
            copy = fleet.rpc("jobs.run", host=web, group="etc", kind="copy")
            assert copy["status"] == "queued"
            assert (copy["repository"], copy["from_repository"]) == (copies, shared)
            a.assert_nothing_sent(fleet)
            assert show(fleet, copy["id"])["waiting_for"] == (
                f"repository {copies}: prune job {dest_prune['id']} of {db} runs"
            )
            listed = {j["id"]: j for j in jobs_of(fleet, web, "copy")}
            assert listed[copy["id"]]["waiting_for"].startswith(f"repository {copies}: prune job")
            b.finish(dest_prune["id"])
            assert a.take("copy")["job_id"] == copy["id"]
            a.finish(copy["id"])


def test_a_job_held_by_a_host_detached_meanwhile_frees_its_repository(fleet, fx):
    shared, other = make_repo(fleet, fx), make_repo(fleet, fx)
    web, web_token = make_host(fleet, fx, shared, other)
    db, db_token = make_host(fleet, fx, shared)
    fleet.rpc("groups.create", host=db, name="etc", includes=["/etc"])
    with connected(fleet, fx, web_token) as a:
        a.inits(2)
        with connected(fleet, fx, db_token) as b:
            b.inits(1)
            prune = fleet.rpc("jobs.run", host=web, kind="prune")["id"]
            assert a.take("prune")["job_id"] == prune
            backup = fleet.rpc("jobs.run", host=db, group="etc")["id"]
            b.assert_nothing_sent(fleet)  # it waits for the prune
            fleet.rpc("repos.detach", name=shared, hosts=[web])  # the prune runs on
            a.finish(prune)
            assert show(fleet, backup).get("waiting_for") is None  # it may go (or went)
            assert b.take("backup", timeout=3)["job_id"] == backup


# -- 6: repos detach --------------------------------------------------------------


def test_detach_refusals_and_the_default_passing_on(fleet, fx):
    a, b, c = make_repo(fleet, fx), make_repo(fleet, fx), make_repo(fleet, fx)
    host, _ = make_host(fleet, fx, a, b, c)  # never connected: its jobs stay queued
    lone, _ = make_host(fleet, fx, a)
    fleet.rpc("groups.create", host=host, name="etc", includes=["/etc"])
    fleet.rpc("groups.create", host=host, name="db", includes=["/srv/db"], repository=b, copy_to=c)

    refused = fleet.ctl("repos", "detach", b, host, expect=1)
    assert "group(s) db name repository" in refused.stderr and host in refused.stderr
    refused = fleet.ctl("repos", "detach", a, lone, expect=1)
    assert "the only one" in refused.stderr
    # refused for one host: none of those named is detached
    fleet.ctl("repos", "detach", a, host, lone, expect=1)
    assert sorted(fleet.ctl_json("repos", "show", a)["hosts"]) == sorted([host, lone])

    backup = fleet.rpc("jobs.run", host=host, group="etc")
    prune = fleet.rpc("jobs.run", host=host, kind="prune")
    check = fleet.rpc("jobs.run", host=host, kind="check", repository=b)
    copy = fleet.rpc("jobs.run", host=host, group="db", kind="copy")
    assert (backup["repository"], prune["repository"]) == (a, a)
    assert (copy["from_repository"], copy["repository"]) == (b, c)
    assert all(j["status"] == "queued" for j in (backup, copy, prune, check))

    done = fleet.ctl_json("repos", "detach", a, host)
    assert done["changed"] == [host] and done["hosts"] == [lone]
    shown = fleet.ctl_json("hosts", "show", host)
    assert shown["repository"] == b and [r["name"] for r in shown["repositories"]] == [b, c]
    moved = show(fleet, backup["id"])
    assert (moved["status"], moved["repository"]) == ("queued", b)
    ended = show(fleet, prune["id"])
    assert ended["status"] == "cancelled" and a in ended["error"], ended
    for job, repo in ((check, b), (copy, c)):  # the other repositories' jobs stay
        kept = show(fleet, job["id"])
        assert (kept["status"], kept["repository"]) == ("queued", repo)
    assert fleet.ctl_json("repos", "detach", a, host)["changed"] == []  # not used: no-op


def test_a_group_never_copies_into_the_repository_it_backs_up_into(fleet, fx):
    def effective(host):
        g = fleet.rpc("groups.show", host=host, name="etc")
        return g["repository"] or fleet.rpc("hosts.show", host=host)["repository"], g["copy_to"]

    for change in ("use", "detach"):
        a, b = make_repo(fleet, fx), make_repo(fleet, fx)
        host, _ = make_host(fleet, fx, a)
        fleet.rpc("groups.create", host=host, name="etc", includes=["/etc"], copy_to=b)
        with contextlib.suppress(fx.RpcError):  # refusing is one way out
            if change == "use":
                fleet.rpc("repos.use", name=b, hosts=[host])
            else:
                fleet.rpc("repos.detach", name=a, hosts=[host])
        backs_up_into, copies_into = effective(host)
        assert backs_up_into != copies_into, change
        copy = fleet.rpc("jobs.run", host=host, group="etc", kind="copy")
        assert copy["repository"] != copy["from_repository"], change


# -- 7: reports naming their repository --------------------------------------------


def test_snapshot_reports_per_repository(fleet, fx):
    a, b, gone = (make_repo(fleet, fx) for _ in range(3))
    host, token = make_host(fleet, fx, a, b, gone)
    with connected(fleet, fx, token) as agent:
        ids = ids_of(agent.config)
        agent.inits(3)
        fleet.rpc("repos.detach", name=gone, hosts=[host])
        assert gone not in ids_of(agent.next_of("config.update")["data"])

        def listed(**kw):
            return {s["id"]: s["repository"] for s in fleet.rpc("snapshots.list", host=host, **kw)}

        def report(second, *sids, repository=None, **extra):
            page = {"snapshots": [snap(sid) for sid in sids], "report_at": ts(second), **extra}
            if repository is not None:
                page["repository_id"] = repository
            agent.report("snapshots.report", page)  # returns once acked

        # a repository the host no longer uses, or none at all: skipped, yet acked
        report(1, "z1", repository=ids[gone])
        report(1, "n1", repository=10**9)
        assert listed() == {}
        report(2, "b1", repository=ids[b])
        report(3, "a1", "a2", repository=ids[a])
        assert listed() == {"b1": b, "a1": a, "a2": a}
        assert listed(repository=b) == {"b1": b}
        # the last page of a later report of one repository leaves the other's
        report(4, "a2", repository=ids[a], last=True)
        assert listed() == {"b1": b, "a2": a}
        report(5, repository=ids[b])
        assert listed() == {"a2": a}
        # an older agent's report names none: the host's default
        report(6, "a3", last=False)
        report(7, "b2", repository=ids[b])
        assert listed() == {"a2": a, "a3": a, "b2": b}
        # detached: what fleetd knew of the host's snapshots there goes
        fleet.rpc("repos.detach", name=b, hosts=[host])
        assert listed() == {"a2": a, "a3": a}


def test_stats_of_a_repository_the_host_does_not_use_are_skipped(fleet, fx):
    a, gone = make_repo(fleet, fx), make_repo(fleet, fx)
    host, token = make_host(fleet, fx, a, gone)
    stats = {"size_bytes": 1000, "snapshot_count": 3}
    with connected(fleet, fx, token) as agent:
        ids = ids_of(agent.config)
        agent.inits(2)
        fleet.rpc("repos.detach", name=gone, hosts=[host])
        agent.next_of("config.update")
        agent.report("repo.stats", {**stats, "repository_id": ids[gone]})
        fleet.rpc("repos.attach", name=gone, hosts=[host])
        shown = {r["name"]: r["stats"] for r in fleet.rpc("hosts.show", host=host)["repositories"]}
        assert shown[gone] is None, shown


def test_stats_of_a_deleted_repository_do_not_wedge_the_agent(fx, tmp_path):
    env = fx.start_fleet(tmp_path / "fleetd")  # its own: the failure logs a traceback
    try:
        a, gone = make_repo(env, fx), make_repo(env, fx)
        host, token = make_host(env, fx, a, gone)
        with connected(env, fx, token) as agent:
            ids = ids_of(agent.config)
            agent.inits(2)
            env.rpc("repos.detach", name=gone, hosts=[host])
            env.rpc("repos.delete", name=gone)
            # spooled before the detach, sent after it
            agent.report(
                "repo.stats", {"size_bytes": 1, "snapshot_count": 1, "repository_id": ids[gone]}
            )
            agent.report("repo.locks", {"count": 0})
        fx.stop_and_check(env.fleetd)
    finally:
        env.fleetd.kill()


# -- 8: jobs.run on a named repository ----------------------------------------------


def test_run_on_a_named_repository(fleet, fx):
    a, b, other = (make_repo(fleet, fx) for _ in range(3))
    host, _ = make_host(fleet, fx, a, b)
    with pytest.raises(fx.RpcError) as err:
        fleet.rpc("jobs.run", host=host, kind="check", repository=other)
    assert err.value.code == "not_found" and other in err.value.message
    missing = fleet.ctl("repo", "init", host, "--repo", other, expect=4)
    assert other in missing.stderr
    with pytest.raises(fx.RpcError) as err:
        fleet.rpc("jobs.run", host=host, kind="check", repository=fx.uniq("none"))
    assert err.value.code == "not_found"
    assert jobs_of(fleet, host, "check") == [] and jobs_of(fleet, host, "init") == []

    check = fleet.rpc("jobs.run", host=host, kind="check", repository=b)
    assert show(fleet, check["id"])["repository"] == b
    unlock = fleet.rpc("jobs.run", host=host, kind="unlock")
    assert show(fleet, unlock["id"])["repository"] == a  # none named: the default
    init = fleet.ctl_json("repo", "init", host, "--repo", b)
    assert (init["kind"], init["repository"]) == ("init", b)
    fleet.rpc("groups.create", host=host, name="etc", includes=["/etc"])
    with pytest.raises(fx.RpcError) as err:  # a group's job goes where the group does
        fleet.rpc("jobs.run", host=host, group="etc", repository=b)
    assert err.value.code == "bad_request"


# -- 8: job kinds an older agent does not know ---------------------------------------


def test_a_restore_or_drill_for_an_agent_that_predates_them_fails_without_blocking(fleet, fx):
    """An agent whose hello does not say 'restore' or 'drills' would drop
    the command unanswered (its decoder refuses the kind) and the host's
    queue would wait on it for ever: fleetd fails such a job at once,
    saying why, and the next job goes."""
    repo = make_repo(fleet, fx)
    host, token = make_host(fleet, fx, repo)
    fleet.rpc("groups.create", host=host, name="etc", includes=["/etc"])
    with connected(fleet, fx, token) as agent:  # features: repositories only
        (rid,) = agent.inits(1)
        sid = "4f2a9c1e" * 8
        page = {"snapshots": [{**snap(sid), "tags": ["etc"]}], "report_at": ts(2)}
        agent.report("snapshots.report", {**page, "repository_id": rid})
        restore = fleet.rpc("restore.run", host=host, snapshot="4f2a9c1e", target="/srv/r")
        drill = fleet.rpc("jobs.run", host=host, group="etc", kind="drill")
        for job in (restore, drill):
            done = fx.wait_until(
                lambda job=job: (j := show(fleet, job["id"]))["status"] == "failed" and j,
                timeout=10,
                what=f"job {job['id']} failed",
            )
            assert "predates" in done["error"] and "upgrade fleet-agent" in done["error"]
        backup = fleet.rpc("jobs.run", host=host, group="etc")
        assert agent.take("backup")["job_id"] == backup["id"]  # the queue goes on
