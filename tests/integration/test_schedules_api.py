"""schedules.* on a real fleetd: create, list with next fire times, show,
edit, enable, disable, delete; validation; version bumps; the group guard."""

from __future__ import annotations

import datetime as dt

import pytest


@pytest.fixture
def host(fleet, fx):
    name = fx.uniq("sched")
    fleet.ctl("enroll", name)
    for group in ("etc", "home"):
        fleet.rpc("groups.create", host=name, name=group, includes=[f"/{group}"])
    return name


def version(fleet, host) -> int:
    return fleet.rpc("hosts.show", host=host)["schedule_version"]


def test_create_list_show_and_the_next_fire_times(fleet, fx, host):
    before = version(fleet, host)
    made = fleet.rpc(
        "schedules.create",
        host=host,
        name="nightly",
        cron="30  2 * * *",
        groups=["home", "etc", "etc"],
        timezone="Europe/Paris",
    )
    assert made["name"] == "nightly" and made["cron"] == "30 2 * * *"
    assert made["groups"] == ["etc", "home"]
    assert (made["timezone"], made["timezone_from"], made["enabled"]) == (
        "Europe/Paris",
        "schedule",
        True,
    )
    assert version(fleet, host) == before + 1
    fires = made["next_fires"]
    assert len(fires) == 3
    for fire in fires:
        local = dt.datetime.fromisoformat(fire["local"])
        utc = dt.datetime.strptime(fire["fires_at"], "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=dt.timezone.utc
        )
        assert local == utc  # the same instant, shown twice
        assert (local.hour, local.minute) == (2, 30) or (local.hour, local.minute) == (3, 0)
    assert [fleet.rpc("schedules.show", host=host, name="nightly")] == fleet.rpc(
        "schedules.list", host=host
    )


def test_without_a_zone_it_follows_the_hosts_and_gets_a_free_name(fleet, fx, host):
    made = fleet.rpc("schedules.create", host=host, cron="@hourly", groups=["etc"])
    assert made["name"] == "schedule-1"
    # the host never connected: no zone reported, so UTC until it does
    assert (made["timezone"], made["timezone_from"]) == ("UTC", "default")
    second = fleet.rpc("schedules.create", host=host, cron="@daily", groups=["etc"])
    assert second["name"] == "schedule-2"
    first_fire = dt.datetime.strptime(second["next_fires"][0]["fires_at"], "%Y-%m-%dT%H:%M:%SZ")
    assert (first_fire.hour, first_fire.minute, first_fire.second) == (0, 0, 0)


@pytest.mark.parametrize(
    "params, code, words",
    [
        ({"cron": "* * * *"}, "bad_request", "expected 5"),
        ({"cron": "0 0 L * *"}, "bad_request", "not accepted"),
        ({"cron": "@reboot"}, "bad_request", "@hourly"),
        ({"cron": "0 0 31 2 *"}, "bad_request", "never matches"),
        ({"cron": "@daily", "timezone": "Mars/Olympus"}, "bad_request", "unknown time zone"),
        ({"cron": "@daily", "groups": []}, "bad_request", "at least one source group"),
        ({"cron": "@daily", "groups": ["nope"]}, "not_found", "no source group 'nope'"),
        ({"groups": ["etc"]}, "bad_request", "cron expression"),
        ({"cron": "@daily", "name": "bad name!"}, "bad_request", "schedule name"),
    ],
)
def test_bad_schedules_are_refused_and_change_nothing(fleet, fx, host, params, code, words):
    before = version(fleet, host)
    with pytest.raises(fx.RpcError) as err:
        fleet.rpc("schedules.create", host=host, **{"groups": ["etc"], **params})
    assert err.value.code == code and words in err.value.message, err.value
    assert fleet.rpc("schedules.list", host=host) == []
    assert version(fleet, host) == before


def test_edit_enable_disable_delete(fleet, fx, host):
    fleet.rpc("schedules.create", host=host, name="n", cron="0 1 * * *", groups=["etc"])
    v = version(fleet, host)
    edited = fleet.rpc(
        "schedules.edit",
        host=host,
        name="n",
        new_name="night",
        cron="15 4 * * mon",
        groups=["home"],
    )
    assert (edited["name"], edited["cron"], edited["groups"]) == ("night", "15 4 * * mon", ["home"])
    assert version(fleet, host) == v + 1
    with pytest.raises(fx.RpcError) as err:
        fleet.rpc("schedules.edit", host=host, name="night", cron="99 * * * *")
    assert err.value.code == "bad_request"
    assert fleet.rpc("schedules.show", host=host, name="night")["cron"] == "15 4 * * mon"

    off = fleet.rpc("schedules.disable", host=host, name="night")
    assert off["enabled"] is False and off["next_fires"] == []
    assert version(fleet, host) == v + 2
    fleet.rpc("schedules.disable", host=host, name="night")  # already: no new version
    assert version(fleet, host) == v + 2
    on = fleet.rpc("schedules.enable", host=host, name="night")
    assert on["enabled"] is True and len(on["next_fires"]) == 3

    # a group a schedule uses cannot be deleted, and the error names it
    with pytest.raises(fx.RpcError) as err:
        fleet.rpc("groups.delete", host=host, name="home")
    assert err.value.code == "conflict" and "schedule(s) night" in err.value.message
    assert fleet.rpc("schedules.delete", host=host, name="night") == {
        "removed": "night",
        "host": host,
    }
    assert fleet.rpc("schedules.list", host=host) == []
    fleet.rpc("groups.delete", host=host, name="home")  # free now
    with pytest.raises(fx.RpcError) as err:
        fleet.rpc("schedules.show", host=host, name="night")
    assert err.value.code == "not_found"


def test_names_are_unique_per_host(fleet, fx, host):
    fleet.rpc("schedules.create", host=host, name="a", cron="@daily", groups=["etc"])
    with pytest.raises(fx.RpcError) as err:
        fleet.rpc("schedules.create", host=host, name="a", cron="@weekly", groups=["etc"])
    assert err.value.code == "conflict"
    fleet.rpc("schedules.create", host=host, name="b", cron="@weekly", groups=["etc"])
    with pytest.raises(fx.RpcError) as err:
        fleet.rpc("schedules.edit", host=host, name="b", new_name="a")
    assert err.value.code == "conflict"


def test_viewers_read_operators_write(fleet, fx, host):
    viewer = fleet.add_user("viewer")
    assert fleet.rpc("schedules.list", token=viewer.token, host=host) == []
    with pytest.raises(fx.RpcError) as err:
        fleet.rpc("schedules.create", token=viewer.token, host=host, cron="@daily", groups=["etc"])
    assert err.value.code == "forbidden"


# -- fleetctl schedules --------------------------------------------------------


def test_fleetctl_schedules_end_to_end(fleet, fx, host):
    made = fleet.ctl(
        "schedules",
        "create",
        host,
        "--cron",
        "0 3 * * *",
        "--group",
        "etc",
        "--name",
        "n3",
        "--timezone",
        "America/New_York",
    )
    assert f"created schedule {host}/n3, first at " in made.stderr
    assert "T03:00:00-0" in made.stderr  # New York, local
    table = fleet.ctl("schedules", "list", host).stdout
    assert "n3" in table and "0 3 * * *" in table and "America/New_York" in table
    shown = fleet.ctl_json("schedules", "show", host, "n3")
    assert shown["groups"] == ["etc"] and len(shown["next_fires"]) == 3
    assert "next fires" in fleet.ctl("schedules", "show", host, "n3").stdout

    fleet.ctl("schedules", "edit", host, "n3", "--group", "home", "--timezone", "")
    edited = fleet.ctl_json("schedules", "show", host, "n3")
    assert (edited["groups"], edited["timezone_from"]) == (["home"], "default")
    fleet.ctl("schedules", "edit", host, "n3", expect=2)  # nothing to change
    fleet.ctl("schedules", "disable", host, "n3")
    assert fleet.ctl_json("schedules", "list", host)[0]["enabled"] is False
    assert "disabled" in fleet.ctl("schedules", "list", host).stdout
    fleet.ctl("schedules", "enable", host, "n3")

    bad = fleet.ctl(
        "schedules", "create", host, "--cron", "0 0 * * 5#2", "--group", "etc", expect=2
    )
    assert "only numbers" in bad.stderr
    missing = fleet.ctl("schedules", "create", host, "--cron", "@daily", "--group", "x", expect=4)
    assert "no source group 'x'" in missing.stderr
    refused = fleet.ctl("groups", "delete", host, "home", "--yes", expect=1)
    assert "schedule(s) n3" in refused.stderr

    fleet.ctl("schedules", "delete", host, "n3", expect=1)  # no terminal to confirm on
    assert len(fleet.ctl_json("schedules", "list", host)) == 1
    fleet.ctl("schedules", "delete", host, "n3", "--yes")
    assert fleet.ctl_json("schedules", "list", host) == []
    assert "no schedules" in fleet.ctl("schedules", "list", host).stdout


def test_retention_a_schedule_cannot_fill_is_warned_about(fleet, fx, host):
    fleet.rpc("groups.edit", host=host, name="etc", retention={"keep_hourly": 24, "keep_daily": 7})
    # no schedule yet: the retention applies to backups run by hand only
    (alone,) = fleet.rpc("groups.show", host=host, name="etc")["retention_warnings"]
    assert alone.startswith("no enabled schedule backs this group up")
    made = fleet.rpc(
        "schedules.create", host=host, name="nightly", cron="0 3 * * *", groups=["etc"]
    )
    (hourly,) = made["retention_warnings"]["etc"]
    assert hourly.startswith("keep-hourly 24: its schedules fire at most once every 1 day")
    assert fleet.rpc("groups.show", host=host, name="etc")["retention_warnings"] == [hourly]
    listed = {s["name"]: s for s in fleet.ctl_json("schedules", "list", host)}
    assert listed["nightly"]["retention_warnings"] == {"etc": [hourly]}
    # in the tables, on stderr
    result = fleet.ctl("schedules", "list", host)
    assert f"warning: group etc: {hourly}" in result.stderr.replace("\n", " ")
    result = fleet.ctl("groups", "show", host, "etc")
    assert "warning: group etc: keep-hourly 24" in result.stderr
    # an hourly schedule of the group as well: every bucket can fill
    fleet.rpc("schedules.create", host=host, name="hourly", cron="0 * * * *", groups=["etc"])
    assert fleet.rpc("groups.show", host=host, name="etc")["retention_warnings"] == []
    assert all(s["retention_warnings"] == {} for s in fleet.ctl_json("schedules", "list", host))
    # disabled, it no longer counts
    fleet.rpc("schedules.disable", host=host, name="hourly")
    assert fleet.rpc("groups.show", host=host, name="etc")["retention_warnings"] == [hourly]
    # a group without retention is never warned about
    assert fleet.rpc("groups.show", host=host, name="home")["retention_warnings"] == []
