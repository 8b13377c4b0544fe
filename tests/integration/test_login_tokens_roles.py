"""Authentication and authorisation end to end: login, logout, rate limits,
API tokens and the three roles, through the real fleetctl."""

from __future__ import annotations

import json
import stat

import pytest

# -- login / logout -------------------------------------------------------------


def test_login_saves_the_token_0600_and_later_commands_use_it(fleet, fx, tmp_path):
    xdg = tmp_path / "xdg"
    result = fleet.ctl(
        "login",
        "--server",
        fleet.url,
        "--user",
        "admin",
        "--password-stdin",
        server=None,
        token=None,
        config_dir=xdg,
        input=fx.ADMIN_PASSWORD + "\n",
    )
    path = xdg / "fleet" / "config.json"
    assert f"token saved in {path}" in result.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
    saved = json.loads(path.read_text())
    assert saved["server"] == fleet.url
    assert saved["token"].startswith("fleet_")
    assert saved["token"] not in result.stdout + result.stderr

    me = fleet.ctl_json("whoami", server=None, token=None, config_dir=xdg)
    assert me["user"] == "admin" and me["role"] == "admin"
    assert me["server"] == fleet.url
    assert me["token"].startswith("fleetctl@")
    assert me["token_expires_at"] is not None  # logins default to 30 days


def test_login_prompts_for_the_password(fleet, fx, tmp_path):
    xdg = tmp_path / "xdg"
    code, shown = fx.run_fleetctl_tty(
        "login",
        "--expires",
        "never",
        answers=(fx.ADMIN_PASSWORD,),
        server=fleet.url,
        config_dir=xdg,
    )
    assert code == 0, shown
    assert "Password for admin" in shown
    assert fx.ADMIN_PASSWORD not in shown  # not echoed
    assert "expires never" in shown
    # no terminal to ask on: says what to give instead, exit 2
    refused = fleet.ctl(
        "login",
        server=None,
        token=None,
        config_dir=tmp_path / "x",
        expect=2,
        env={"FLEET_SERVER": fleet.url},
    )
    assert "no terminal" in refused.stderr and "--password-stdin" in refused.stderr
    assert "Warning" not in refused.stderr
    me = fleet.ctl_json("whoami", token=None, config_dir=xdg)
    assert me["token_expires_at"] is None


def test_logout_revokes_the_token_on_the_server(fleet, fx, tmp_path):
    xdg = tmp_path / "xdg"
    fleet.ctl(
        "login",
        "--password-stdin",
        token=None,
        config_dir=xdg,
        input=fx.ADMIN_PASSWORD + "\n",
    )
    path = xdg / "fleet" / "config.json"
    old = json.loads(path.read_text())["token"]
    fleet.ctl("whoami", token=old)

    result = fleet.ctl("logout", token=None, config_dir=xdg)
    assert "logged out" in result.stderr
    assert json.loads(path.read_text())["token"] is None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    refused = fleet.ctl("whoami", token=old, expect=3)
    assert refused.stderr.startswith("fleetctl: error:")
    assert "refused the token" in refused.stderr
    # nothing saved any more: not logged in
    fleet.ctl("whoami", token=None, config_dir=xdg, expect=3)
    states = {t["id"]: t["state"] for t in fleet.ctl_json("tokens", "list")}
    assert "revoked" in states.values()


def test_wrong_password_exits_3_with_one_line_and_no_traceback(fleetd_factory, fx, tmp_path):
    env = fleetd_factory()  # failed logins count against the address: own fleetd
    outcomes = []
    for user in ("admin", "no-such-user"):
        proc = fx.run_fleetctl_proc(
            "login",
            "--server",
            env.url,
            "--user",
            user,
            "--password-stdin",
            config_dir=tmp_path / "xdg",
            input="wrong-password\n",
        )
        outcomes.append(fx.finish(proc))
    for code, out, err in outcomes:
        assert code == 3
        assert out == ""
        assert err.count("\n") == 1 and err.endswith("\n")
        assert err.startswith("fleetctl: error: ")
        assert "Traceback" not in err
    # an unknown user and a wrong password look the same from outside
    assert outcomes[0][2] == outcomes[1][2]
    assert not (tmp_path / "xdg" / "fleet" / "config.json").exists()


def test_after_failed_logins_fleetctl_login_with_the_right_password_works(
    fleetd_factory, fx, tmp_path
):
    env = fleetd_factory()
    xdg = tmp_path / "xdg"
    for _ in range(5):
        bad = env.ctl(
            "login",
            "--password-stdin",
            token=None,
            config_dir=xdg,
            input="not-the-password\n",
            expect=3,
        )
        assert "wrong user name or password" in bad.stderr
    assert not (xdg / "fleet" / "config.json").exists()
    env.ctl("login", "--password-stdin", token=None, config_dir=xdg, input=fx.ADMIN_PASSWORD + "\n")
    assert (xdg / "fleet" / "config.json").exists()
    failures = env.ctl_json("audit", "--action", "auth.login_failed")
    assert len(failures) == 5
    assert {a["actor"] for a in failures} == {"admin"}


# -- API tokens -------------------------------------------------------------------


def test_tokens_create_list_revoke(fleet, fx):
    name = fx.uniq("ci")
    created = fleet.ctl_json("tokens", "create", name)
    token = created["token"]
    assert token.startswith("fleet_")
    assert created["name"] == name and created["user"] == "admin"
    assert created["expires_at"] is None

    me = fleet.ctl_json("whoami", token=token)
    assert me["token"] == name and me["user"] == "admin"

    listed = fleet.ctl_json("tokens", "list")
    row = next(t for t in listed if t["id"] == created["id"])
    assert row["name"] == name and row["state"] == "active"
    assert row["last_used_at"] is not None  # the whoami above
    assert token not in json.dumps(listed)  # printed once, never again

    table = fleet.ctl("tokens", "list")
    assert "NAME" in table.stdout and name in table.stdout
    assert token not in table.stdout

    revoked = fleet.ctl("tokens", "revoke", created["id"])
    assert f"token {created['id']} ({name}) revoked" in revoked.stderr
    refused = fleet.ctl("whoami", token=token, expect=3)
    assert "refused the token" in refused.stderr
    row = next(t for t in fleet.ctl_json("tokens", "list") if t["id"] == created["id"])
    assert row["state"] == "revoked"

    fleet.ctl("tokens", "revoke", 999999, expect=4)


def test_tokens_create_table_prints_the_token_once_on_stdout(fleet, fx):
    name = fx.uniq("script")
    result = fleet.ctl("tokens", "create", name, "--expires", "90d")
    token = result.stdout.strip()
    assert token.startswith("fleet_") and "\n" not in token
    assert "not shown again" in result.stderr
    assert fleet.ctl_json("whoami", token=token)["token"] == name


def test_a_token_with_a_short_expiry_stops_working(fleet, fx):
    user = fleet.add_user("viewer")
    name = fx.uniq("short")
    created = fleet.ctl_json("tokens", "create", name, "--expires", "1s", token=user.token)
    assert created["expires_at"] is not None

    def expired():
        rows = fleet.ctl_json("tokens", "list", token=user.token)
        return next(t for t in rows if t["id"] == created["id"])["state"] == "expired"

    fx.wait_until(expired, timeout=15, interval=0.1, what="the token to expire")
    refused = fleet.ctl("whoami", token=created["token"], expect=3)
    assert "refused the token" in refused.stderr
    fleet.ctl("whoami", token=user.token)  # the user's own login still works


def test_tokens_list_all_is_for_admins(fleet, fx):
    viewer = fleet.add_user("viewer")
    result = fleet.ctl("tokens", "list", "--all", token=viewer.token, expect=3)
    assert "admin" in result.stderr
    mine = fleet.ctl_json("tokens", "list", token=viewer.token)
    assert {t["user"] for t in mine} == {viewer.name}
    everyone = fleet.ctl_json("tokens", "list", "--all")
    assert {viewer.name, "admin"} <= {t["user"] for t in everyone}


def test_a_user_cannot_revoke_someone_elses_token(fleet, fx):
    viewer = fleet.add_user("viewer")
    admin_token = fleet.ctl_json("tokens", "create", fx.uniq("adm"))
    fleet.ctl("tokens", "revoke", admin_token["id"], token=viewer.token, expect=4)
    fleet.ctl("whoami", token=admin_token["token"])  # still valid
    # an admin may revoke anyone's
    viewer_token = fleet.ctl_json("tokens", "create", fx.uniq("v"), token=viewer.token)
    fleet.ctl("tokens", "revoke", viewer_token["id"])
    fleet.ctl("whoami", token=viewer_token["token"], expect=3)


# -- roles ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def team(fleet):
    """A viewer, an operator, and a host with a repo and a group to look at."""
    host = "roles-host"
    fleet.ctl("enroll", host)
    pw = fleet.config_dir / "repo-pw"
    pw.write_text("roles-repo-pw\n")
    fleet.ctl("repo", "set", host, "--url", "/srv/restic/roles", "--password-file", pw)
    fleet.ctl("groups", "create", host, "etc", "--include", "/etc")
    return {
        "host": host,
        "pwfile": pw,
        "viewer": fleet.add_user("viewer"),
        "operator": fleet.add_user("operator"),
    }


def test_viewer_reads_but_cannot_change_anything(fleet, team, fx):
    t, host = team["viewer"].token, team["host"]
    assert team["host"] in [h["name"] for h in fleet.ctl_json("hosts", "list", token=t)]
    assert fleet.ctl_json("hosts", "show", host, token=t)["repo"] is True
    assert [g["name"] for g in fleet.ctl_json("groups", "list", host, token=t)] == ["etc"]
    fleet.ctl("groups", "show", host, "etc", token=t)
    assert fleet.ctl_json("repo", "show", host, token=t)["password"] == "********"
    assert fleet.ctl_json("whoami", token=t)["role"] == "viewer"

    refused = [
        ("groups", "create", host, fx.uniq("g"), "--include", "/srv"),
        ("groups", "edit", host, "etc", "--keep-daily", "3"),
        ("groups", "delete", host, "etc", "--yes"),
        ("repo", "set", host, "--url", "/x", "--password-file", str(team["pwfile"])),
        ("enroll", fx.uniq("h")),
        ("hosts", "remove", host, "--yes"),
        ("users", "add", fx.uniq("u"), "--password-stdin"),
        ("users", "list"),
        ("audit",),
    ]
    for args in refused:
        result = fleet.ctl(*args, token=t, input="some-password-1\n", expect=3)
        assert "needs the" in result.stderr, (args, result.stderr)
        assert "viewer" in result.stderr
    # and nothing changed
    group = fleet.ctl_json("groups", "show", host, "etc")
    assert group["retention"] == {}
    assert fleet.ctl_json("repo", "show", host)["url"] == "/srv/restic/roles"


def test_operator_configures_but_does_not_manage_users_or_read_audit(fleet, team, fx):
    t = team["operator"].token
    new_host = fx.uniq("op-host")
    assert fleet.ctl_json("enroll", new_host, token=t)["host"] == new_host
    fleet.ctl(
        "repo",
        "set",
        new_host,
        "--url",
        "sftp:backup@nas:/r",
        "--password-file",
        team["pwfile"],
        token=t,
    )
    group = fx.uniq("g")
    fleet.ctl("groups", "create", new_host, group, "--include", "/srv", token=t)
    fleet.ctl("groups", "edit", new_host, group, "--keep-daily", "3", token=t)
    fleet.ctl("groups", "delete", new_host, group, "--yes", token=t)
    fleet.ctl("hosts", "remove", new_host, "--yes", token=t)
    fleet.ctl("hosts", "show", new_host, token=t, expect=4)

    for args in (
        ("users", "add", fx.uniq("u"), "--password-stdin"),
        ("users", "list"),
        ("users", "role", team["viewer"].name, "admin"),
        ("audit",),
        ("tokens", "list", "--all"),
    ):
        result = fleet.ctl(*args, token=t, input="some-password-1\n", expect=3)
        assert "admin" in result.stderr, (args, result.stderr)
    assert fleet.ctl_json("whoami", token=team["viewer"].token)["role"] == "viewer"


def test_admin_can_do_everything(fleet, team, fx):
    name = fx.uniq("new")
    fleet.ctl(
        "users", "add", name, "--role", "operator", "--password-stdin", input="new-user-pw-1\n"
    )
    assert name in [u["name"] for u in fleet.ctl_json("users", "list")]
    entries = fleet.ctl_json("audit", "--action", "user.add")
    assert any(a["target"] == name and a["actor"] == "admin" for a in entries)
    fleet.ctl("enroll", fx.uniq("h"))
    fleet.ctl("groups", "edit", team["host"], "etc", "--keep-last", "2")
    assert fleet.ctl_json("groups", "show", team["host"], "etc")["retention"] == {"keep_last": 2}
    fleet.ctl("groups", "edit", team["host"], "etc", "--clear-retention")


def test_users_change_their_own_password_but_not_others(fleet, team, fx):
    viewer = fleet.add_user("viewer")
    fleet.ctl(
        "users",
        "passwd",
        viewer.name,
        "--password-stdin",
        token=viewer.token,
        input="brand-new-pw-1\n",
    )
    assert fx.api_login(fleet.url, viewer.name, "brand-new-pw-1")["role"] == "viewer"
    refused = fleet.ctl(
        "users",
        "passwd",
        team["operator"].name,
        "--password-stdin",
        token=viewer.token,
        input="hijack-pw-123\n",
        expect=3,
    )
    assert "admin" in refused.stderr
    # the operator's password is unchanged
    fx.api_login(fleet.url, team["operator"].name, team["operator"].password)


def test_logout_with_an_already_revoked_token_still_forgets_it(fleet, fx, tmp_path):
    xdg = tmp_path / "xdg"
    fleet.ctl(
        "login", "--password-stdin", token=None, config_dir=xdg, input=fx.ADMIN_PASSWORD + "\n"
    )
    path = xdg / "fleet" / "config.json"
    token = json.loads(path.read_text())["token"]
    fleet.rpc("auth.logout", token=token)  # revoked behind fleetctl's back
    fleet.ctl("logout", token=None, config_dir=xdg)
    assert json.loads(path.read_text())["token"] is None


def test_login_accepts_an_http_url_and_saves_it_as_ws(fleet, fx, tmp_path):
    xdg = tmp_path / "xdg"
    http_url = fleet.url.replace("ws://", "http://") + "/"
    fleet.ctl(
        "login",
        "--server",
        http_url,
        "--password-stdin",
        server=None,
        token=None,
        config_dir=xdg,
        input=fx.ADMIN_PASSWORD + "\n",
    )
    assert json.loads((xdg / "fleet" / "config.json").read_text())["server"] == fleet.url


def test_a_damaged_config_file_is_a_usage_error(fleet, tmp_path):
    xdg = tmp_path / "xdg"
    (xdg / "fleet").mkdir(parents=True)
    (xdg / "fleet" / "config.json").write_text("{not json")
    result = fleet.ctl("whoami", token=None, config_dir=xdg, expect=2)
    assert "cannot read" in result.stderr and "config.json" in result.stderr


def test_login_limits_slow_guessing_but_let_the_right_password_in(fleetd_factory, fx, tmp_path):
    """Five wrong passwords for a user from one address no longer lock the
    user out (an attacker could shut the admin out so): past the limit one
    try every 10 s goes ahead, and the right password gets in."""
    env = fleetd_factory()
    other = env.add_user("viewer")
    for _ in range(5):
        with pytest.raises(fx.RpcError) as refused:
            fx.api_login(env.url, "admin", "wrong-password")
        assert refused.value.code == "unauthorized"
    # the right password is let through, over the limit
    assert fx.api_login(env.url, "admin", fx.ADMIN_PASSWORD)["user"] == "admin"
    for _ in range(5):
        with pytest.raises(fx.RpcError):
            fx.api_login(env.url, "admin", "wrong-password")
    # over the limit a wrong guess is one try in 10 s: the next is refused unread
    with pytest.raises(fx.RpcError) as slowed:
        fx.api_login(env.url, "admin", "another-guess")
    assert slowed.value.code == "rate_limited"
    with pytest.raises(fx.RpcError) as blocked:
        fx.api_login(env.url, "admin", "yet-another-guess")
    assert blocked.value.code == "rate_limited" and "try again in 10 s" in blocked.value.message
    # another user at the same address is not slowed
    assert fx.api_login(env.url, other.name, other.password)["user"] == other.name


def test_an_absurd_expiry_is_a_bad_request(fleet, fx, tmp_path):
    # the shared fleetd's log is checked for tracebacks when the module ends
    login = fleet.ctl(
        "login",
        "--expires",
        "99999999d",
        "--password-stdin",
        token=None,
        config_dir=tmp_path,
        input=fx.ADMIN_PASSWORD + "\n",
        expect=2,
    )
    assert login.stderr.startswith("fleetctl: error: ")
    assert not (tmp_path / "fleet" / "config.json").exists()
    for args in (("tokens", "create", fx.uniq("far")), ("enroll", fx.uniq("far"))):
        result = fleet.ctl(*args, "--expires", "99999999d", expect=2)
        assert "inside fleetd" not in result.stderr
    assert "Traceback" not in fleet.fleetd.log()
    # nothing was created by the refused calls
    names = [t["name"] for t in fleet.ctl_json("tokens", "list")]
    assert not any(n.startswith("far-") for n in names)
    assert not any(h["name"].startswith("far-") for h in fleet.ctl_json("hosts", "list"))


# -- a credential taken away while its connection is open -------------------------


def test_a_revoked_token_stops_working_on_its_open_connection(fleet, fx):
    # logout on the connection itself
    user = fleet.add_user("operator")
    with fx.ws_connect(fleet.url, "/ctl", user.token) as ws:
        assert fx.rpc_on(ws, "auth.whoami")["user"] == user.name
        fx.rpc_on(ws, "auth.logout")
        fleet.ctl("whoami", token=user.token, expect=3)  # a new connection is refused
        with pytest.raises(fx.RpcError) as refused:
            fx.rpc_on(ws, "hosts.list")
        assert refused.value.code == "unauthorized"

    # a token revoked from elsewhere, and a user removed while connected
    other = fleet.add_user("viewer")
    spare = fleet.ctl_json("tokens", "create", fx.uniq("spare"), token=other.token)
    by_token = fx.ws_connect(fleet.url, "/ctl", spare["token"])
    by_user = fx.ws_connect(fleet.url, "/ctl", other.token)
    with by_token, by_user:
        assert fx.rpc_on(by_token, "hosts.list") is not None
        assert fx.rpc_on(by_user, "hosts.list") is not None
        fleet.ctl("tokens", "revoke", spare["id"])
        with pytest.raises(fx.RpcError) as refused:
            fx.rpc_on(by_token, "hosts.list")
        assert refused.value.code == "unauthorized"
        assert fx.rpc_on(by_user, "auth.whoami")["user"] == other.name  # the user's other token
        fleet.ctl("users", "remove", other.name, "--yes")
        with pytest.raises(fx.RpcError) as refused:
            fx.rpc_on(by_user, "auth.whoami")
        assert refused.value.code == "unauthorized"


def test_a_role_change_applies_to_an_open_connection(fleet, fx):
    user = fleet.add_user("admin")
    with fx.ws_connect(fleet.url, "/ctl", user.token) as ws:
        assert fx.rpc_on(ws, "users.list")
        fleet.ctl("users", "role", user.name, "viewer")
        with pytest.raises(fx.RpcError) as refused:
            fx.rpc_on(ws, "users.list")
        assert refused.value.code == "forbidden"
        assert fx.rpc_on(ws, "auth.whoami")["role"] == "viewer"
        fleet.ctl("users", "role", user.name, "operator")
        assert fx.rpc_on(ws, "auth.whoami")["role"] == "operator"
        host = fx.uniq("promoted")
        assert fx.rpc_on(ws, "enroll.create", host=host)["host"] == host
