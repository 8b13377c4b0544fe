"""Named repositories on a real fleetd: repos create/list/show/edit/delete/use,
the per-host `repo set` over them, secrets never in output or in the
database file, and the settings pushed to every agent that uses one."""

from __future__ import annotations

import json

import pytest

from fleet.common import protocol


@pytest.fixture
def secret_file(tmp_path):
    def make(text: str, name: str = "pw"):
        path = tmp_path / f"{name}-{abs(hash(text))}"
        path.write_text(text)
        return path

    return make


def _hosts(fleet, fx, count=2):
    names = [fx.uniq("rh") for _ in range(count)]
    for name in names:
        fleet.ctl("enroll", name)
    return names


def _next(ws, kind):
    while True:
        frame = json.loads(ws.recv(timeout=10))
        if frame["type"] == kind:
            return frame


def _finish(ws, job_id, kind, first_seq=1):
    """Take a job and end it, as an agent would (its reports under seqs
    first_seq and the next)."""
    ws.send(protocol.encode("command.result", {"job_id": job_id, "accepted": True}))
    for frame, data in (
        ("job.started", {"job_id": job_id, "kind": kind, "started_at": "2026-12-02T00:00:00Z"}),
        (
            "job.finished",
            {
                "job_id": job_id,
                "status": "succeeded",
                "exit_code": 0,
                "finished_at": "2026-12-02T00:00:01Z",
            },
        ),
    ):
        ws.send(protocol.encode(frame, data, seq=first_seq))
        first_seq += 1


def test_create_list_show_redacted_and_no_secret_in_the_database(fleet, fx, secret_file):
    name = fx.uniq("shared")
    password = f"pw-{fx.uniq('s')}"
    key = f"AKIA{fx.uniq('k')}"
    env = secret_file(
        f"# the bucket's keys\nAWS_ACCESS_KEY_ID={key}\n\nAWS_SECRET_ACCESS_KEY=a=b\n", "env"
    )
    made = fleet.ctl_json(
        "repos",
        "create",
        name,
        "--url",
        "rest:https://backup:hunter2@rest.example/fleet",
        "--password-file",
        secret_file(password + "\n"),
        "--env-file",
        env,
    )
    assert made["name"] == name and made["hosts"] == []
    assert made["url"] == "rest:https://backup:********@rest.example/fleet"
    assert made["password"] == "********"
    assert made["env"] == {"AWS_ACCESS_KEY_ID": "********", "AWS_SECRET_ACCESS_KEY": "********"}
    assert fleet.ctl_json("repos", "show", name) == made
    assert made in fleet.ctl_json("repos", "list")
    table = fleet.ctl("repos", "list").stdout + fleet.ctl("repos", "show", name).stdout
    assert name in table and "rest.example" in table
    for text in (json.dumps(made), table):
        assert password not in text and key not in text and "hunter2" not in text
    raw = fx.store_bytes(fleet.data_dir)
    assert name.encode() in raw  # the look finds what is there in plain text
    for secret in (password, key, "hunter2"):
        assert secret.encode() not in raw


def test_bad_input_is_refused_and_changes_nothing(fleet, fx, secret_file):
    name = fx.uniq("bad")
    pw = secret_file("pw\n")
    fleet.ctl("repos", "create", name, "--url", "relative/path", "--password-file", pw, expect=2)
    fleet.ctl(
        "repos", "create", name, "--url", "/srv/r", "--password-file", secret_file(""), expect=2
    )
    bad_env = secret_file("NOT A PAIR\n", "env")
    result = fleet.ctl(
        "repos",
        "create",
        name,
        "--url",
        "/srv/r",
        "--password-file",
        pw,
        "--env-file",
        bad_env,
        expect=2,
    )
    assert "expected KEY=VALUE" in result.stderr
    fleet.ctl("repos", "create", "-bad-name", "--url", "/srv/r", "--password-file", pw, expect=2)
    assert name not in {r["name"] for r in fleet.ctl_json("repos", "list")}
    fleet.ctl("repos", "create", name, "--url", "/srv/r", "--password-file", pw)
    result = fleet.ctl("repos", "create", name, "--url", "/srv/x", "--password-file", pw, expect=1)
    assert "exists already" in result.stderr
    assert fleet.ctl_json("repos", "show", name)["url"] == "/srv/r"
    fleet.ctl("repos", "show", fx.uniq("none"), expect=4)
    fleet.ctl("repos", "use", name, fx.uniq("no-such-host"), expect=4)
    fleet.ctl("repos", "edit", name, expect=2)  # nothing to change


def test_hosts_share_a_repository_and_it_cannot_be_deleted_while_used(fleet, fx, secret_file):
    web, db = _hosts(fleet, fx)
    name = fx.uniq("shared")
    fleet.ctl("repos", "create", name, "--url", "/srv/shared", "--password-file", secret_file("p"))
    used = fleet.ctl_json("repos", "use", name, web, db)
    assert sorted(used["changed"]) == sorted([web, db]) and used["hosts"] == sorted([web, db])
    assert fleet.ctl_json("repos", "use", name, web)["changed"] == []  # already so
    for host in (web, db):
        shown = fleet.ctl_json("repo", "show", host)
        assert (shown["host"], shown["name"], shown["url"]) == (host, name, "/srv/shared")
        info = fleet.ctl_json("hosts", "show", host)
        assert info["repo"] is True and info["repository"] == name

    result = fleet.ctl("repos", "delete", name, "--yes", expect=1)
    assert web in result.stderr and db in result.stderr
    other = fx.uniq("other")
    fleet.ctl("repos", "create", other, "--url", "/srv/other", "--password-file", secret_file("q"))
    fleet.ctl("repos", "use", other, web, db)
    assert fleet.ctl_json("repos", "show", name)["hosts"] == []
    fleet.ctl("repos", "delete", name, "--yes")
    fleet.ctl("repos", "show", name, expect=4)
    assert fleet.ctl_json("repo", "show", web)["name"] == other


def test_repo_set_writes_the_repository_named_after_the_host(fleet, fx, secret_file):
    web, db = _hosts(fleet, fx)
    first = fleet.ctl_json(
        "repo", "set", web, "--url", "/srv/a", "--password-file", secret_file("a")
    )
    assert (first["host"], first["name"], first["hosts"]) == (web, web, [web])
    again = fleet.ctl_json(
        "repo", "set", web, "--url", "/srv/b", "--password-file", secret_file("b")
    )
    assert again["name"] == web and again["url"] == "/srv/b"
    assert [r["name"] for r in fleet.ctl_json("repos", "list")].count(web) == 1
    # once another host shares it, repo set leaves it alone and makes the host its own
    fleet.ctl("repos", "use", web, db)
    mine = fleet.ctl_json(
        "repo", "set", web, "--url", "/srv/c", "--password-file", secret_file("c")
    )
    assert mine["name"] == f"{web}-2" and mine["hosts"] == [web]
    assert fleet.ctl_json("repos", "show", web)["url"] == "/srv/b"
    assert fleet.ctl_json("repo", "show", db)["name"] == web
    # web-2 is web's alone: the next repo set changes it, not a third one
    again = fleet.ctl_json(
        "repo", "set", web, "--url", "/srv/d", "--password-file", secret_file("d")
    )
    assert (again["name"], again["url"]) == (f"{web}-2", "/srv/d")
    # a host removed and enrolled again never overwrites its old repository,
    # which nobody uses now and may be the only key to its old backups
    fleet.ctl("repos", "use", f"{web}-2", db)
    fleet.ctl("hosts", "remove", web, "--yes")
    fleet.ctl("enroll", web)
    fresh = fleet.ctl_json(
        "repo", "set", web, "--url", "/srv/e", "--password-file", secret_file("e")
    )
    assert fresh["name"] == f"{web}-3"
    assert fleet.ctl_json("repos", "show", web)["url"] == "/srv/b"


def test_an_edit_reaches_every_agent_that_uses_the_repository(fleet, fx, secret_file):
    web, db = (fx.uniq("rw"), fx.uniq("rw"))
    tokens = {host: fx.enroll_agent(fleet, host)["agent_token"] for host in (web, db)}
    name = fx.uniq("shared")
    fleet.ctl(
        "repos", "create", name, "--url", "/srv/one", "--password-file", secret_file("old-pw")
    )
    fleet.ctl("repos", "use", name, web, db)
    with (
        fx.ws_connect(fleet.url, "/agent", tokens[web]) as a,
        fx.ws_connect(fleet.url, "/agent", tokens[db]) as b,
    ):
        for ws in (a, b):
            ws.send(fx.agent_hello())
            assert _next(ws, "welcome")
            config = _next(ws, "config.update")["data"]
            assert (config["repo_url"], config["repo_password"]) == ("/srv/one", "old-pw")
        # a new repository: initialised by one host at a time (two restic
        # inits at once could leave it with two master keys)
        for ws in (a, b):
            init = _next(ws, "command.run")["data"]
            assert init["kind"] == "init"
            _finish(ws, init["job_id"], "init")
        fleet.ctl(
            "repos", "edit", name, "--url", "/srv/two", "--password-file", secret_file("new-pw")
        )
        for ws in (a, b):
            config = _next(ws, "config.update")["data"]
            assert (config["repo_url"], config["repo_password"]) == ("/srv/two", "new-pw")
        # and fleetd has the changed repository checked: a second init for each
        for host in (web, db):
            fx.wait_until(
                lambda host=host: (
                    len(fleet.ctl_json("jobs", "list", "--host", host, "--kind", "init")) == 2
                ),
                timeout=10,
                what=f"a second init job for {host}",
            )
    renamed = fx.uniq("renamed")
    fleet.ctl("repos", "edit", name, "--rename", renamed)
    assert fleet.ctl_json("repo", "show", web)["name"] == renamed


def test_repo_set_reads_the_environment_from_a_file(fleet, fx, secret_file):
    (host,) = _hosts(fleet, fx, 1)
    key = f"secret-{fx.uniq('k')}"
    env = secret_file(f"AWS_SECRET_ACCESS_KEY={key}\nAWS_REGION=eu-west-1\n", "env")
    result = fleet.ctl(
        "repo",
        "set",
        host,
        "--url",
        "s3:s3.example/b",
        "--password-file",
        secret_file("p"),
        "--env-file",
        env,
        "--env",
        "AWS_REGION=us-east-1",
        "--json",
    )
    shown = json.loads(result.stdout)
    assert shown["env"] == {"AWS_REGION": "********", "AWS_SECRET_ACCESS_KEY": "********"}
    assert key not in result.stdout + result.stderr
