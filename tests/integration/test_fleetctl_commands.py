"""Every fleetctl command of issue 2, in table form and with --json, against a real fleetd."""

from __future__ import annotations

import datetime as dt
import json
import warnings

import pytest

from fleet import __version__
from fleet.common import protocol


def _seconds_from_now(stamp: str) -> float:
    when = dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    return (when - dt.datetime.now(dt.timezone.utc)).total_seconds()


@pytest.fixture
def pwfile(tmp_path):
    def make(text: str):
        path = tmp_path / f"pw-{abs(hash(text))}"
        path.write_text(text)
        return path

    return make


# -- whoami, enroll, hosts -----------------------------------------------------------


def test_whoami_table_and_json(fleet):
    table = fleet.ctl("whoami")
    for word in ("user", "admin", "role", "server", fleet.url, "server version", __version__):
        assert word in table.stdout
    me = fleet.ctl_json("whoami")
    assert me == {
        "user": "admin",
        "role": "admin",
        "token": "it",
        "token_expires_at": me["token_expires_at"],
        "server_version": __version__,
        "server": fleet.url,
    }


def test_enroll_prints_the_agent_command(fleet, fx):
    host = fx.uniq("web")
    result = fleet.ctl("enroll", host)
    line = result.stdout.strip()
    assert "\n" not in line
    assert line.startswith("fleet-agent enroll fleet1:")
    doc = protocol.parse_enrollment(line.split()[-1])
    assert doc["url"] == fleet.url
    assert "sha256" not in doc  # no TLS, nothing to pin
    assert doc["token"].startswith("enroll_")
    assert f"run this on {host}" in result.stderr and "single use" in result.stderr


def test_enroll_json(fleet, fx):
    host = fx.uniq("db")
    result = fleet.ctl_json("enroll", host, "--expires", "10m")
    assert result["host"] == host
    assert result["server_url"] == fleet.url
    assert result["command"] == f"fleet-agent enroll {result['enrollment']}"
    assert protocol.parse_enrollment(result["enrollment"])["url"] == fleet.url
    assert 540 < _seconds_from_now(result["expires_at"]) <= 600
    default = fleet.ctl_json("enroll", fx.uniq("db"))
    assert 3500 < _seconds_from_now(default["expires_at"]) <= 3600
    # each call issues a fresh token
    again = fleet.ctl_json("enroll", host)
    assert again["enrollment"] != result["enrollment"]


def test_enroll_refuses_bad_input(fleet):
    assert "name" in fleet.ctl("enroll", "bad/name", expect=2).stderr
    fleet.ctl("enroll", "-leading-dash-is-an-option", expect=2)
    assert "at least 60" in fleet.ctl("enroll", "shortlived", "--expires", "30s", expect=2).stderr
    fleet.ctl("enroll", "h", "--expires", "soon", expect=2)


def test_hosts_list_show_remove(fleet, fx, pwfile):
    host = fx.uniq("app")
    fleet.ctl("enroll", host)

    rows = fleet.ctl_json("hosts", "list")
    row = next(h for h in rows if h["name"] == host)
    assert row["status"] == "pending"
    assert row["last_backup"] is None and row["last_seen_at"] is None
    assert [h["name"] for h in rows] == sorted(h["name"] for h in rows)
    table = fleet.ctl("hosts", "list").stdout
    assert "HOST" in table and "STATUS" in table
    assert any(host in line and "pending" in line for line in table.splitlines())

    shown = fleet.ctl_json("hosts", "show", host)
    assert shown["name"] == host and shown["status"] == "pending"
    assert shown["repo"] is False and shown["groups"] == []
    assert shown["enrolled_at"] is None
    fleet.ctl("repo", "set", host, "--url", "/srv/r", "--password-file", pwfile("pw\n"))
    fleet.ctl("groups", "create", host, "home", "--include", "/home")
    shown = fleet.ctl_json("hosts", "show", host)
    assert shown["repo"] is True and shown["groups"] == ["home"]
    table = fleet.ctl("hosts", "show", host).stdout
    assert host in table and "source groups" in table and "home" in table

    fleet.ctl("hosts", "show", fx.uniq("ghost"), expect=4)
    removed = fleet.ctl("hosts", "remove", host, "--yes")
    assert f"removed host {host}" in removed.stderr
    missing = fleet.ctl("hosts", "show", host, expect=4)
    assert host in missing.stderr
    assert host not in [h["name"] for h in fleet.ctl_json("hosts", "list")]
    fleet.ctl("hosts", "remove", host, "--yes", expect=4)

    # a host enrolled again under the same name starts from nothing
    fleet.ctl("enroll", host)
    again = fleet.ctl_json("hosts", "show", host)
    assert again["repo"] is False and again["groups"] == []


def test_hosts_remove_asks_first(fleet, fx):
    host = fx.uniq("keep")
    fleet.ctl("enroll", host)
    fleet.ctl("hosts", "remove", host, input="n\n", expect=1)
    fleet.ctl("hosts", "show", host)  # still there
    fleet.ctl("hosts", "remove", host, input="y\n")
    fleet.ctl("hosts", "show", host, expect=4)


def test_hosts_list_empty_message(fleetd_factory):
    env = fleetd_factory()
    assert env.ctl_json("hosts", "list") == []
    assert "no hosts yet" in env.ctl("hosts", "list").stdout


# -- repo ----------------------------------------------------------------------------


def test_repo_set_and_show_with_a_password_file_and_env(fleet, fx, pwfile):
    host = fx.uniq("repo")
    fleet.ctl("enroll", host)
    secret = f"pw-{fx.uniq('x')}"
    env_value = f"AKIA{fx.uniq('y')}"
    result = fleet.ctl_json(
        "repo",
        "set",
        host,
        "--url",
        "s3:s3.amazonaws.com/bucket/one",
        "--password-file",
        pwfile(secret + "\n"),
        "--env",
        f"AWS_ACCESS_KEY_ID={env_value}",
        "--env",
        "AWS_SECRET_ACCESS_KEY=also=has=equals",
    )
    assert result["host"] == host
    assert result["url"] == "s3:s3.amazonaws.com/bucket/one"
    assert result["password"] == "********"
    assert result["env"] == {"AWS_ACCESS_KEY_ID": "********", "AWS_SECRET_ACCESS_KEY": "********"}

    shown = fleet.ctl_json("repo", "show", host)
    assert shown["url"] == result["url"] and shown["env"] == result["env"]
    assert shown["password"] == "********"
    table = fleet.ctl("repo", "show", host).stdout
    assert "s3:s3.amazonaws.com/bucket/one" in table
    assert "AWS_ACCESS_KEY_ID=********" in table
    for out in (json.dumps(result), json.dumps(shown), table):
        assert secret not in out and env_value not in out and "also=has" not in out

    plain = fleet.ctl(
        "repo", "set", host, "--url", "/srv/restic/x", "--password-file", pwfile("p2")
    )
    assert f"repository of {host} set to /srv/restic/x" in plain.stderr
    shown = fleet.ctl_json("repo", "show", host)
    assert shown["url"] == "/srv/restic/x" and shown["env"] == {}


def test_repo_set_reads_the_password_from_stdin(fleet, fx):
    host = fx.uniq("stdin")
    fleet.ctl("enroll", host)
    result = fleet.ctl_json(
        "repo",
        "set",
        host,
        "--url",
        "rest:https://backup.example/r",
        "--password-file",
        "-",
        input="from-stdin-pw\n",
    )
    assert result["url"] == "rest:https://backup.example/r"
    assert "from-stdin-pw" not in json.dumps(result)
    assert fleet.ctl_json("repo", "show", host)["password"] == "********"


def test_repo_set_prompts_when_no_password_file(fleet, fx):
    host = fx.uniq("prompt")
    fleet.ctl("enroll", host)
    code, shown = fx.run_fleetctl_tty(
        "repo",
        "set",
        host,
        "--url",
        "/r",
        answers=("typed-pw", "typed-pw"),
        server=fleet.url,
        token=fleet.admin_token,
        config_dir=fleet.config_dir,
    )
    assert code == 0, shown
    assert "Repository password" in shown and "typed-pw" not in shown
    assert fleet.ctl_json("repo", "show", host)["url"] == "/r"
    # without a terminal: no prompt, no Python warning, exit 2 saying what to give
    for args in (
        ("repo", "set", host, "--url", "/r2"),
        ("repos", "create", fx.uniq("r"), "--url", "/r3"),
        ("users", "add", fx.uniq("u"), "--role", "viewer"),
    ):
        refused = fleet.ctl(*args, expect=2)
        assert "no terminal" in refused.stderr and "Warning" not in refused.stderr, args
    assert fleet.ctl_json("repo", "show", host)["url"] == "/r"


def test_repo_url_credentials_are_redacted(fleet, fx, pwfile):
    host = fx.uniq("cred")
    fleet.ctl("enroll", host)
    url = "rest:https://backup:url-secret-42@rest.example:8000/repo"
    result = fleet.ctl_json("repo", "set", host, "--url", url, "--password-file", pwfile("pw"))
    assert "url-secret-42" not in json.dumps(result)
    assert result["url"] == "rest:https://backup:********@rest.example:8000/repo"
    assert "url-secret-42" not in fleet.ctl("repo", "show", host).stdout
    audit = fleet.ctl_json("audit", "--action", "repo.set")
    assert "url-secret-42" not in json.dumps(audit)


def test_repo_refusals(fleet, fx, pwfile, tmp_path):
    host = fx.uniq("bad")
    fleet.ctl("enroll", host)
    pw = pwfile("pw")
    bad_url = fleet.ctl(
        "repo", "set", host, "--url", "relative/path", "--password-file", pw, expect=2
    )
    assert "relative/path" in bad_url.stderr
    fleet.ctl("repo", "set", host, "--url", "ftp://x/y", "--password-file", pw, expect=2)
    fleet.ctl(
        "repo", "set", host, "--url", "/r", "--password-file", pw, "--env", "NOEQUALS", expect=2
    )
    fleet.ctl(
        "repo", "set", host, "--url", "/r", "--password-file", pw, "--env", "1BAD=x", expect=2
    )
    empty = fleet.ctl("repo", "set", host, "--url", "/r", "--password-file", pwfile(""), expect=2)
    assert "empty" in empty.stderr
    fleet.ctl("repo", "set", host, "--url", "/r", "--password-file", tmp_path / "missing", expect=2)
    fleet.ctl(
        "repo",
        "set",
        host,
        "--url",
        "/r",
        "--password-file",
        pw,
        "--password-file",
        pw,
        "--bogus",
        expect=2,
    )
    # nothing was stored by any of these
    assert "no repository" in fleet.ctl("repo", "show", host, expect=4).stderr

    ghost = fx.uniq("ghost")
    assert (
        ghost
        in fleet.ctl("repo", "set", ghost, "--url", "/r", "--password-file", pw, expect=4).stderr
    )
    fleet.ctl("repo", "show", ghost, expect=4)


# -- groups --------------------------------------------------------------------------


def test_groups_create_list_show(fleet, fx):
    host = fx.uniq("grp")
    fleet.ctl("enroll", host)
    assert fleet.ctl_json("groups", "list", host) == []
    assert "no source groups" in fleet.ctl("groups", "list", host).stdout

    created = fleet.ctl_json(
        "groups",
        "create",
        host,
        "www",
        "--include",
        "/var/www",
        "--include",
        "/etc/nginx",
        "--include",
        "/var/www",
        "--exclude",
        "*.tmp",
        "--exclude",
        "cache/",
        "--keep-daily",
        "7",
        "--keep-weekly",
        "4",
        "--keep-monthly",
        "0",
        "--keep-within",
        "1y6m",
        "--pre-hook",
        "pg_dump > /var/backups/db.sql",
        "--retries",
        "2",
        "--retry-delay",
        "5m",
    )
    assert created["host"] == host and created["name"] == "www"
    assert created["includes"] == ["/var/www", "/etc/nginx"]  # duplicates dropped
    assert created["excludes"] == ["*.tmp", "cache/"]
    assert created["retention"] == {"keep_daily": 7, "keep_weekly": 4, "keep_within": "1y6m"}
    assert created["pre_hook"] == "pg_dump > /var/backups/db.sql"
    assert created["post_hook"] is None
    assert (created["retries"], created["retry_delay"]) == (2, 300)
    assert created["schedules"] == []

    table = fleet.ctl("groups", "create", host, "etc", "--include", "/etc")
    assert f"created source group {host}/etc (keep all)" in table.stderr

    rows = fleet.ctl_json("groups", "list", host)
    assert [g["name"] for g in rows] == ["etc", "www"]
    listing = fleet.ctl("groups", "list", host).stdout
    assert "GROUP" in listing and "RETENTION" in listing
    assert "/var/www, /etc/nginx" in listing
    assert "daily 7, weekly 4, within 1y6m" in listing

    shown = fleet.ctl_json("groups", "show", host, "www")
    assert created.pop("attached") == []  # what creating it changed: no repository attached
    assert shown == created
    detail = fleet.ctl("groups", "show", host, "www").stdout
    assert f"{host}/www" in detail and "pg_dump" in detail and "2 (every 300 s)" in detail
    fleet.ctl("groups", "show", host, "nope", expect=4)
    fleet.ctl("groups", "list", fx.uniq("ghost"), expect=4)


def test_groups_create_refusals(fleet, fx):
    host = fx.uniq("grpbad")
    fleet.ctl("enroll", host)
    within = fleet.ctl(
        "groups", "create", host, "a", "--include", "/a", "--keep-within", "7x", expect=2
    )
    assert "7x" in within.stderr
    relative = fleet.ctl("groups", "create", host, "b", "--include", "relative/dir", expect=2)
    assert "not absolute" in relative.stderr
    fleet.ctl("groups", "create", host, "c", expect=2)  # --include is required
    fleet.ctl("groups", "create", host, "bad name", "--include", "/x", expect=2)
    fleet.ctl("groups", "create", host, "d", "--include", "/d", "--keep-daily", "-1", expect=2)
    fleet.ctl("groups", "create", host, "e", "--include", "/e", "--exclude", " ", expect=2)
    fleet.ctl("groups", "create", fx.uniq("ghost"), "f", "--include", "/f", expect=4)
    assert fleet.ctl_json("groups", "list", host) == []  # none of them was created

    fleet.ctl("groups", "create", host, "dup", "--include", "/srv")
    conflict = fleet.ctl("groups", "create", host, "dup", "--include", "/srv", expect=1)
    assert "already has" in conflict.stderr
    # the same name on another host is fine
    other = fx.uniq("grpbad")
    fleet.ctl("enroll", other)
    fleet.ctl("groups", "create", other, "dup", "--include", "/srv")


def test_groups_edit_and_delete(fleet, fx):
    host = fx.uniq("edit")
    fleet.ctl("enroll", host)
    fleet.ctl(
        "groups",
        "create",
        host,
        "data",
        "--include",
        "/data",
        "--exclude",
        "*.log",
        "--keep-daily",
        "7",
        "--keep-within",
        "30d",
    )

    renamed = fleet.ctl_json("groups", "edit", host, "data", "--rename", "bulk")
    assert renamed["name"] == "bulk"
    fleet.ctl("groups", "show", host, "data", expect=4)
    assert renamed["retention"] == {"keep_daily": 7, "keep_within": "30d"}

    edited = fleet.ctl_json("groups", "edit", host, "bulk", "--keep-weekly", "4")
    assert edited["retention"] == {"keep_daily": 7, "keep_weekly": 4, "keep_within": "30d"}
    edited = fleet.ctl_json(
        "groups", "edit", host, "bulk", "--clear-retention", "--keep-weekly", "2"
    )
    assert edited["retention"] == {"keep_weekly": 2}
    edited = fleet.ctl_json("groups", "edit", host, "bulk", "--clear-excludes")
    assert edited["excludes"] == [] and edited["includes"] == ["/data"]
    edited = fleet.ctl_json(
        "groups",
        "edit",
        host,
        "bulk",
        "--include",
        "/a",
        "--include",
        "/b",
        "--exclude",
        "*.bak",
        "--post-hook",
        "echo done",
    )
    assert edited["includes"] == ["/a", "/b"] and edited["excludes"] == ["*.bak"]
    assert edited["post_hook"] == "echo done"
    edited = fleet.ctl_json("groups", "edit", host, "bulk", "--post-hook", "")
    assert edited["post_hook"] is None
    table = fleet.ctl("groups", "edit", host, "bulk", "--clear-retention")
    assert f"updated source group {host}/bulk" in table.stderr
    assert fleet.ctl_json("groups", "show", host, "bulk")["retention"] == {}

    fleet.ctl("groups", "edit", host, "bulk", expect=2)  # nothing to change
    fleet.ctl("groups", "edit", host, "bulk", "--exclude", "x", "--clear-excludes", expect=2)
    fleet.ctl("groups", "edit", host, "bulk", "--keep-within", "7x", expect=2)
    fleet.ctl("groups", "edit", host, "bulk", "--include", "rel", expect=2)
    fleet.ctl("groups", "edit", host, "nope", "--keep-daily", "1", expect=4)
    fleet.ctl("groups", "create", host, "other", "--include", "/o")
    fleet.ctl("groups", "edit", host, "bulk", "--rename", "other", expect=1)
    assert fleet.ctl_json("groups", "show", host, "bulk")["includes"] == ["/a", "/b"]

    deleted = fleet.ctl("groups", "delete", host, "bulk", "--yes")
    assert f"deleted source group {host}/bulk" in deleted.stderr
    assert [g["name"] for g in fleet.ctl_json("groups", "list", host)] == ["other"]
    fleet.ctl("groups", "delete", host, "bulk", "--yes", expect=4)
    fleet.ctl("groups", "delete", host, "other", input="n\n", expect=1)  # asked, declined
    assert [g["name"] for g in fleet.ctl_json("groups", "list", host)] == ["other"]


# -- users ---------------------------------------------------------------------------


def test_users_add_list_passwd_role_remove(fleetd_factory, fx):
    env = fleetd_factory()  # the last-admin rules need a fleetd where admin is alone
    name = fx.uniq("alice")
    added = env.ctl(
        "users", "add", name, "--role", "viewer", "--password-stdin", input="alice-pw-1\n"
    )
    assert f"added user {name} (viewer)" in added.stderr
    rows = env.ctl_json("users", "list")
    assert {(u["name"], u["role"]) for u in rows} == {("admin", "admin"), (name, "viewer")}
    table = env.ctl("users", "list").stdout
    assert "USER" in table and name in table and "viewer" in table

    env.ctl("users", "add", name, "--password-stdin", input="alice-pw-2\n", expect=1)  # exists
    env.ctl("users", "add", fx.uniq("bob"), "--password-stdin", input="short\n", expect=2)
    env.ctl("users", "add", "no spaces", "--password-stdin", input="long-enough\n", expect=2)
    env.ctl(
        "users",
        "add",
        fx.uniq("bob"),
        "--role",
        "root",
        "--password-stdin",
        input="long-enough\n",
        expect=2,
    )

    alice = fx.api_login(env.url, name, "alice-pw-1")["token"]
    env.ctl("users", "passwd", name, "--password-stdin", input="alice-pw-new\n")
    assert fx.api_login(env.url, name, "alice-pw-new")["user"] == name
    with pytest.raises(fx.RpcError):
        fx.api_login(env.url, name, "alice-pw-1")
    env.ctl("users", "passwd", fx.uniq("ghost"), "--password-stdin", input="whatever-1\n", expect=4)

    assert "is now operator" in env.ctl("users", "role", name, "operator").stderr
    assert env.ctl_json("whoami", token=alice)["role"] == "operator"  # role read per request
    env.ctl("users", "role", fx.uniq("ghost"), "admin", expect=4)
    env.ctl("users", "role", name, "superuser", expect=2)

    # admin is the only admin: cannot be demoted, cannot remove itself
    last = env.ctl("users", "role", "admin", "viewer", expect=1)
    assert "last admin" in last.stderr
    env.ctl("users", "remove", "admin", "--yes", expect=1)
    assert env.ctl_json("whoami")["role"] == "admin"

    env.ctl("users", "remove", name, input="n\n", expect=1)  # asked, declined
    removed = env.ctl("users", "remove", name, "--yes")
    assert f"removed user {name}" in removed.stderr
    assert name not in [u["name"] for u in env.ctl_json("users", "list")]
    env.ctl("whoami", token=alice, expect=3)  # the user's tokens went with it
    env.ctl("users", "remove", name, "--yes", expect=4)

    # with a second admin, the first may step down; the second is then the last
    second = fx.uniq("root")
    env.ctl("users", "add", second, "--role", "admin", "--password-stdin", input="root-pw-12\n")
    second_token = fx.api_login(env.url, second, "root-pw-12")["token"]
    env.ctl("users", "role", "admin", "operator")
    assert env.ctl_json("whoami")["role"] == "operator"
    env.ctl("users", "list", expect=3)
    last = env.ctl("users", "role", second, "viewer", token=second_token, expect=1)
    assert "last admin" in last.stderr
    assert (
        "cannot remove yourself"
        in env.ctl("users", "remove", second, "--yes", token=second_token, expect=1).stderr
    )
    env.ctl("users", "role", "admin", "admin", token=second_token)
    env.ctl("users", "remove", second, "--yes")  # two admins: removing one is fine
    env.ctl("whoami", token=second_token, expect=3)


# -- tokens, audit -------------------------------------------------------------------


def test_tokens_commands_json_and_table(fleet, fx):
    name = fx.uniq("tok")
    created = fleet.ctl_json("tokens", "create", name, "--expires", "2h")
    assert 7100 < _seconds_from_now(created["expires_at"]) <= 7200
    rows = fleet.ctl_json("tokens", "list")
    row = next(t for t in rows if t["id"] == created["id"])
    assert set(row) == {
        "id", "name", "user", "state", "created_at", "expires_at", "last_used_at",
    }  # fmt: skip
    assert row["state"] == "active" and row["expires_at"] == created["expires_at"]
    table = fleet.ctl("tokens", "list").stdout
    line = next(x for x in table.splitlines() if name in x)
    assert str(created["id"]) in line and "active" in line
    fleet.ctl("tokens", "revoke", created["id"])
    table = fleet.ctl("tokens", "list").stdout
    assert "revoked" in next(x for x in table.splitlines() if name in x)
    fleet.ctl("tokens", "revoke", "not-a-number", expect=2)
    fleet.ctl("tokens", "create", fx.uniq("t"), "--expires", "forever", expect=2)


def test_audit_shows_who_did_what(fleet, fx, pwfile):
    operator = fleet.add_user("operator")
    host = fx.uniq("audited")
    fleet.ctl("enroll", host, token=operator.token)
    fleet.ctl(
        "repo",
        "set",
        host,
        "--url",
        "/srv/a",
        "--password-file",
        pwfile("audit-pw-9"),
        "--env",
        "B2_ACCOUNT_KEY=audit-env-9",
        token=operator.token,
    )
    fleet.ctl("groups", "create", host, "logs", "--include", "/var/log", token=operator.token)
    fleet.ctl("groups", "edit", host, "logs", "--keep-last", "3", token=operator.token)
    fleet.ctl("groups", "delete", host, "logs", "--yes", token=operator.token)
    fleet.ctl("hosts", "remove", host, "--yes", token=operator.token)

    entries = fleet.ctl_json("audit", "--actor", operator.name)
    actions = [(a["action"], a["target"]) for a in entries]
    assert actions == [
        ("host.remove", host),
        ("group.delete", f"{host}/logs"),
        ("group.edit", f"{host}/logs"),
        ("group.create", f"{host}/logs"),
        ("repo.set", host),
        ("host.enroll_token", host),
        ("auth.login", "it"),
    ]  # newest first
    repo_set = next(a for a in entries if a["action"] == "repo.set")
    assert repo_set["detail"] == {"url": "/srv/a", "env": ["B2_ACCOUNT_KEY"]}
    assert repo_set["address"] == "127.0.0.1"
    assert all(a["actor"] == operator.name for a in entries)
    dumped = json.dumps(entries)
    assert "audit-pw-9" not in dumped and "audit-env-9" not in dumped

    only_groups = fleet.ctl_json("audit", "--actor", operator.name, "--action", "group")
    assert [a["action"] for a in only_groups] == ["group.delete", "group.edit", "group.create"]
    assert len(fleet.ctl_json("audit", "--limit", "1")) == 1
    fleet.ctl("audit", "--limit", "0", expect=2)

    table = fleet.ctl("audit", "--actor", operator.name).stdout
    assert "ACTOR" in table and "ACTION" in table
    assert any("repo.set" in x and operator.name in x and host in x for x in table.splitlines())
    # users are audited too, with the admin as actor
    adds = fleet.ctl_json("audit", "--action", "user.add")
    assert any(a["target"] == operator.name and a["actor"] == "admin" for a in adds)


def test_fleetctl_client_uses_websockets_without_deprecation_warnings(fleet):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fleet.ctl("hosts", "list")
    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert not deprecations, [str(w.message) for w in deprecations]


# -- real processes: exit statuses as a shell sees them ----------------------------


def test_fleetctl_launcher_exit_statuses(fleet, fx, tmp_path, pwfile):
    host = fx.uniq("proc")
    fleet.ctl("enroll", host)
    fleet.ctl("groups", "create", host, "dup", "--include", "/srv")
    pw = pwfile("pw")
    auth = {"server": fleet.url, "token": fleet.admin_token, "config_dir": tmp_path / "xdg"}
    cases = {
        "ok": (0, ("hosts", "list", "--json"), auth),
        "version": (0, ("--version",), {}),
        "usage": (2, ("hosts", "show"), auth),
        "unknown command": (2, ("frobnicate",), auth),
        "bad url": (2, ("repo", "set", host, "--url", "relative/path", "--password-file",
                        str(pw)), auth),
        "not logged in": (3, ("whoami",), {"server": fleet.url, "config_dir": tmp_path / "e"}),
        "bad token": (3, ("whoami",), {**auth, "token": "fleet_nope"}),
        "not found": (4, ("hosts", "show", fx.uniq("ghost")), auth),
        "conflict": (1, ("groups", "create", host, "dup", "--include", "/srv"), auth),
        "unreachable": (5, ("--server", "ws://127.0.0.1:1", "hosts", "list"), auth),
    }  # fmt: skip
    procs = {label: fx.run_fleetctl_proc(*args, **kw) for label, (_, args, kw) in cases.items()}
    for label, proc in procs.items():
        code, out, err = fx.finish(proc)
        expected = cases[label][0]
        assert code == expected, f"{label}: exit {code}, expected {expected}\n{out}\n{err}"
        assert "Traceback" not in err, f"{label}: {err}"
        if expected == 0:
            if label == "ok":
                assert host in [h["name"] for h in json.loads(out)]
            else:
                assert __version__ in out
        elif label in ("usage", "unknown command"):
            assert "Usage:" in err
        else:
            assert err.startswith("fleetctl: error: "), f"{label}: {err!r}"
            assert err.count("\n") == 1, f"{label}: {err!r}"
    fleet.ctl("hosts", "show", host)  # and nothing happened to the host


def test_fleetctl_malformed_server_url_is_a_usage_error(fleet, fx, tmp_path):
    code, out, err = fx.finish(
        fx.run_fleetctl_proc(
            "--server",
            "ws://[bad",
            "hosts",
            "list",
            token=fleet.admin_token,
            config_dir=tmp_path,
        )
    )
    assert "Traceback" not in err
    assert err.startswith("fleetctl: error: ")
    assert code == 2


def test_only_an_admin_sets_a_hook_and_the_audit_log_keeps_it(fleet, fx):
    """A hook is a shell command run as the agent's user on the host at
    every backup: an operator may configure groups, not run commands."""
    host = fx.uniq("hk")
    fleet.ctl("enroll", host)
    operator = fleet.add_user("operator")
    out = fleet.ctl(
        "groups",
        "create",
        host,
        "g",
        "--include",
        "/etc",
        "--pre-hook",
        "id",
        token=operator.token,
        expect=3,
    )
    assert "admin" in out.stderr
    fleet.ctl("groups", "create", host, "g", "--include", "/etc", token=operator.token)
    fleet.ctl("groups", "edit", host, "g", "--post-hook", "true", token=operator.token, expect=3)
    fleet.ctl("groups", "edit", host, "g", "--pre-hook", "systemctl stop app")  # admin
    fleet.ctl("groups", "edit", host, "g", "--pre-hook", "", token=operator.token)  # removing
    assert fleet.ctl_json("groups", "show", host, "g")["pre_hook"] is None
    edits = [
        a for a in fleet.ctl_json("audit", "--action", "group.edit") if a["target"] == f"{host}/g"
    ]
    assert any(a["detail"].get("pre_hook") == "systemctl stop app" for a in edits)


def test_server_urls_and_error_messages_are_for_people(fleet, fx, tmp_path):
    # another scheme is a usage error, not "unreachable"
    out = fleet.ctl("--server", "ftp://fleet.example", "whoami", expect=2)
    assert "ws://, wss://, http://, https:// or host:port" in out.stderr
    # a bare host means fleetd's port, 8433, not the web's 80
    out = fleet.ctl("--server", "127.0.0.1", "whoami", expect=None)
    assert "ws://127.0.0.1:8433" in out.stderr or out.exit_code == 0
    # a role refusal says what is needed, without the internal method's name
    viewer = fleet.add_user("viewer")
    host = fx.uniq("msg")
    fleet.ctl("enroll", host)
    out = fleet.ctl(
        "groups", "create", host, "g", "--include", "/etc", token=viewer.token, expect=3
    )
    assert "needs the operator role" in out.stderr and "is a viewer" in out.stderr
    assert "groups.create" not in out.stderr
    # login keeps the CA file as an absolute path, whatever the directory
    ca = tmp_path / "ca.pem"
    ca.write_text("not used: the server is plain ws\n")
    xdg = tmp_path / "xdg"
    code, shown = fx.run_fleetctl_tty(
        "login",
        "--cafile",
        "ca.pem",
        answers=(fx.ADMIN_PASSWORD,),
        server=fleet.url,
        config_dir=xdg,
        cwd=tmp_path,
    )
    assert code == 0, shown
    saved = json.loads((xdg / "fleet" / "config.json").read_text())
    assert saved["cafile"] == str(ca)


def test_run_on_an_offline_host_says_so_and_ctrl_c_says_the_job_goes_on(fleet, fx):
    import signal

    host = fx.uniq("off")
    fleet.ctl("enroll", host)
    fleet.ctl("groups", "create", host, "g", "--include", "/etc")
    out = fleet.ctl("run", host, "g")
    assert f"{host} is offline" in out.stderr and "waits until its agent connects" in out.stderr
    proc = fx.run_fleetctl_proc(
        "run",
        host,
        "g",
        "--follow",
        server=fleet.url,
        token=fleet.admin_token,
        config_dir=fleet.config_dir,
    )
    line = proc.stderr.readline()  # "job N queued: ..." once it is queued
    job_id = int(line.split()[1])
    fx.wait_until(
        lambda: any("offline" in x for x in [proc.stderr.readline()]), timeout=20, what="the note"
    )
    proc.send_signal(signal.SIGINT)
    code, out, err = fx.finish(proc, timeout=20)
    assert code == 130, err
    assert f"job {job_id} goes on" in err and f"fleetctl jobs tail {job_id}" in err
    assert fleet.ctl_json("jobs", "show", job_id)["status"] == "queued"  # not cancelled


def test_a_name_may_not_end_in_a_line_break(fleet, fx):
    """Python's $ matches before a final newline: names were taken with one."""
    for method, params in (
        ("enroll.create", {"host": "web\n"}),
        ("repos.create", {"name": "r\n", "url": "/r", "password": "pw", "env": {}}),
        ("users.add", {"name": "bob\n", "password": "pw-long-enough-1", "role": "viewer"}),
    ):
        try:
            fleet.rpc(method, **params)
            raise AssertionError(f"{method} took a name ending in a newline")
        except fx.RpcError as exc:
            assert exc.code == "bad_request", (method, exc)


def test_output_for_scripts_is_a_line_a_row_and_plain_with_no_color(fleet, fx):
    import subprocess

    host = fx.uniq("a-long-host-name-for-a-row-wider-than-eighty-columns")
    fleet.ctl("enroll", host)
    env = fx.clean_env(
        FLEET_SERVER=fleet.url,
        FLEET_TOKEN=fleet.admin_token,
        XDG_CONFIG_HOME=str(fleet.config_dir),
        COLUMNS=None,  # piped, as in a script: no width given
    )
    listed = subprocess.run(
        [str(fx.REPO_ROOT / "fleetctl"), "hosts", "list"],
        capture_output=True,
        text=True,
        env=env,
        cwd=fx.REPO_ROOT,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    (row,) = [line for line in listed.stdout.splitlines() if host in line]
    assert row.split()[0] == host and "pending" in row  # the whole row on its line
    # NO_COLOR on a terminal: no escape sequence at all (bold included)
    code, shown = fx.run_fleetctl_tty(
        "hosts",
        "list",
        server=fleet.url,
        token=fleet.admin_token,
        config_dir=fleet.config_dir,
        env={"NO_COLOR": "1"},
    )
    assert code == 0 and host in shown and "\x1b[" not in shown, shown
    code, shown = fx.run_fleetctl_tty(
        "hosts", "list", server=fleet.url, token=fleet.admin_token, config_dir=fleet.config_dir
    )
    assert code == 0 and "\x1b[1m" in shown  # the header is bold on a terminal otherwise


def test_shell_completion_names_hosts_groups_and_jobs_from_fleetd(fleet, fx):
    import subprocess

    host = fx.uniq("compl")
    fleet.ctl("enroll", host)
    fleet.ctl("groups", "create", host, "www-data", "--include", "/var/www")
    job = fleet.ctl_json("run", host, "www-data")["id"]

    def complete(line, server=fleet.url):
        words = line.split(" ")
        env = fx.clean_env(
            FLEET_SERVER=server,
            FLEET_TOKEN=fleet.admin_token,
            XDG_CONFIG_HOME=str(fleet.config_dir),
            _FLEETCTL_COMPLETE="bash_complete",
            COMP_WORDS=line,
            COMP_CWORD=str(len(words) - 1),
        )
        done = subprocess.run(
            [str(fx.REPO_ROOT / "fleetctl")],
            capture_output=True,
            text=True,
            env=env,
            cwd=fx.REPO_ROOT,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return [x.split(",", 1)[1] for x in done.stdout.splitlines() if x]

    assert host in complete(f"fleetctl hosts show {host[:6]}")
    assert host in complete(f"fleetctl run {host[:6]}")
    assert complete(f"fleetctl run {host} www") == ["www-data"]
    assert complete(f"fleetctl groups show {host} ") == ["www-data"]
    assert str(job) in complete("fleetctl jobs show ")
    spec = fleet.config_dir / "compl-spec.json"
    spec.write_text('{"groups": {"c": {"includes": ["/etc"]}}}')
    fleet.ctl("templates", "set", host, "--selector", f"compl={host}", "-f", spec)
    assert complete(f"fleetctl templates show {host[:8]}") == [host]
    assert "status" in complete("fleetctl sta")  # commands, from click itself
    # fleetd out of reach: no candidates, and no error on the terminal
    assert complete("fleetctl hosts show ", server="ws://127.0.0.1:9") == []
    script = fleet.ctl("completion", "bash").stdout
    assert "_FLEETCTL_COMPLETE=bash_complete" in script
    fleet.ctl("completion", "tcsh", expect=2)


def test_labels_pick_hosts_and_one_run_covers_them(fleet, fx):
    """Fifty servers, one command: hosts carry labels (at enrollment or
    later), a selector picks them, `run --selector` queues a job on each and
    says which it skipped."""
    tag = fx.uniq("t").replace("-", "")
    webs = [fx.uniq("web") for _ in range(3)]
    for h in webs:
        fleet.ctl("enroll", h, "--label", "role=web", "--label", f"batch={tag}")
        fleet.ctl("groups", "create", h, "www", "--include", "/var/www")
    db = fx.uniq("db")
    fleet.ctl("enroll", db, "--label", f"batch={tag}")
    fleet.ctl("hosts", "label", db, "role=db", "env=prod")
    fleet.ctl("hosts", "label", webs[0], "env=test")
    assert fleet.ctl_json("hosts", "show", db)["labels"] == {
        "batch": tag,
        "role": "db",
        "env": "prod",
    }

    def picked(selector):
        return sorted(h["name"] for h in fleet.ctl_json("hosts", "list", "--selector", selector))

    assert picked(f"batch={tag},role=web") == sorted(webs)
    assert picked(f"batch={tag},env!=test") == sorted([*webs[1:], db])
    assert picked(f"batch={tag},!env") == sorted(webs[1:])
    assert "role=web" in fleet.ctl("hosts", "list", "--selector", f"batch={tag}").stdout
    fleet.ctl("hosts", "list", "--selector", "Bad=Key", expect=2)

    result = fleet.ctl_json("run", "--selector", f"batch={tag}", "www", expect=1)  # db lacks it
    assert sorted(j["host"] for j in result["jobs"]) == sorted(webs)
    assert [s["host"] for s in result["skipped"]] == [db]
    assert "www" in result["skipped"][0]["error"]
    out = fleet.ctl("run", "--selector", f"batch={tag},role=web", "www")
    assert "3 job(s) queued, 0 host(s) skipped" in out.stderr
    fleet.ctl("run", "--selector", "role=nobody-has-this", "www", expect=4)
    fleet.ctl("run", "--selector", f"batch={tag}", expect=2)  # GROUP alone is needed
    # and one command cancels what waits on them (offline: each was queued)
    out = fleet.ctl("jobs", "cancel", "--selector", f"batch={tag},role=web")
    assert out.stderr.count("cancelled") == 6  # the two runs' three jobs each
    fleet.ctl("jobs", "cancel", "--selector", f"batch={tag}", expect=4)  # none left
    fleet.ctl("jobs", "cancel", expect=2)  # JOB or --selector
    fleet.ctl("hosts", "label", db, "--remove", "env")
    assert "env" not in fleet.ctl_json("hosts", "show", db)["labels"]
    audit = fleet.ctl_json("audit", "--action", "host.label")
    assert any(a["target"] == db for a in audit)
