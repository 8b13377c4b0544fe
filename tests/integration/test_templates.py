"""Templates: one definition for the hosts a label selector picks, applied
by a real fleetd now, when the template changes and when a host's labels
change; a host's own settings and its overrides win."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def spec_file(tmp_path):
    def write(spec) -> str:
        path = tmp_path / f"spec-{abs(hash(json.dumps(spec, sort_keys=True)))}.json"
        path.write_text(json.dumps(spec))
        return str(path)

    return write


def make_repo(fleet, fx, tmp_path) -> str:
    name = fx.uniq("repo")
    fleet.rpc("repos.create", name=name, url=str(tmp_path / name), password="pw-" + name)
    return name


def settings(fleet, host: str) -> dict[tuple[str, str], dict]:
    return {(s["kind"], s["name"]): s for s in fleet.ctl_json("hosts", "show", host)["settings"]}


def test_fifty_hosts_one_template_overrides_and_labels(fleet, fx, tmp_path, spec_file):
    tag = fx.uniq("b").replace("-", "")
    repo = make_repo(fleet, fx, tmp_path)
    webs = [f"{tag}-web{n:02d}" for n in range(50)]
    for h in webs:
        fleet.rpc("enroll.create", host=h, labels={"role": "web", "batch": tag})
    other = f"{tag}-db"
    fleet.rpc("enroll.create", host=other, labels={"role": "db", "batch": tag})
    spec = {
        "repositories": [repo],
        "maintenance": {repo: {"forget": "30 3 * * *", "check": "off"}},
        "groups": {
            "www": {
                "includes": ["/etc", "/var/www"],
                "excludes": ["*.tmp"],
                "retention": {"keep_daily": 7},
            }
        },
        "schedules": {"nightly": {"cron": "0 2 * * *", "groups": ["www"]}},
    }
    selector = f"role=web,batch={tag}"
    done = fleet.ctl_json(
        "templates", "set", "web" + tag, "--selector", selector, "-f", spec_file(spec)
    )
    assert (done["picked"], done["changed"], done["failed"], done["new"]) == (50, 50, 0, True)
    assert sorted(h["host"] for h in done["hosts"]) == webs
    assert done["hosts"][0]["created"] == [f"repository {repo}", "group www", "schedule nightly"]
    assert done["maintenance"] == [repo]

    # every web host has it, from the template; the db host has nothing
    h = webs[7]
    shown = fleet.ctl_json("hosts", "show", h)
    assert shown["templates"] == ["web" + tag] and shown["template_error"] is None
    assert shown["repository"] == repo
    origin = settings(fleet, h)
    assert {k: v["template"] for k, v in origin.items()} == {
        ("repository", repo): "web" + tag,
        ("group", "www"): "web" + tag,
        ("schedule", "nightly"): "web" + tag,
    }
    g = fleet.ctl_json("groups", "show", h, "www")
    assert (g["includes"], g["excludes"], g["retention"]) == (
        ["/etc", "/var/www"],
        ["*.tmp"],
        {"keep_daily": 7},
    )
    s = fleet.ctl_json("schedules", "show", h, "nightly")
    assert (s["cron"], s["groups"], s["template"]) == ("0 2 * * *", ["www"], "web" + tag)
    assert fleet.ctl_json("hosts", "show", other)["settings"] == []
    m = fleet.ctl_json("maintenance", "show", repo)
    assert (m["forget"]["cron"], m["check"]["cron"], m["template"]) == (
        "30 3 * * *",
        None,
        "web" + tag,
    )
    text = fleet.ctl("hosts", "show", h).stdout
    assert f"template web{tag}" in text and "nightly" in text

    # applying again changes nothing
    again = fleet.ctl_json("templates", "apply", "web" + tag)
    assert (again["picked"], again["changed"]) == (50, 0)

    # an override on one host: the template's next change leaves that field there
    fleet.ctl("groups", "edit", h, "www", "--keep-daily", "30")
    assert settings(fleet, h)[("group", "www")]["overrides"] == ["retention"]
    spec["groups"]["www"]["retention"] = {"keep_daily": 14}
    spec["groups"]["www"]["retries"] = 2
    dry = fleet.ctl_json(
        "templates", "set", "web" + tag, "--selector", selector, "-f", spec_file(spec), "--dry-run"
    )
    assert dry["dry_run"] and dry["changed"] == 50
    assert fleet.ctl_json("groups", "show", webs[0], "www")["retries"] == 0  # nothing changed
    fleet.ctl("templates", "set", "web" + tag, "--selector", selector, "-f", spec_file(spec))
    assert fleet.ctl_json("groups", "show", webs[0], "www")["retention"] == {"keep_daily": 14}
    mine = fleet.ctl_json("groups", "show", h, "www")
    assert (mine["retention"], mine["retries"]) == ({"keep_daily": 30}, 2)
    assert "this host overrides retention" in fleet.ctl("groups", "show", h, "www").stdout
    back = fleet.ctl_json("groups", "edit", h, "www", "--inherit", "retention")
    assert (back["retention"], back["overrides"]) == ({"keep_daily": 14}, [])
    fleet.ctl("groups", "edit", h, "www", "--inherit", "bogus", expect=2)

    # a schedule disabled on one host stays disabled through template changes
    fleet.ctl("schedules", "disable", webs[1], "nightly")
    spec["schedules"]["nightly"]["cron"] = "15 2 * * *"
    fleet.ctl("templates", "set", "web" + tag, "--selector", selector, "-f", spec_file(spec))
    s1 = fleet.ctl_json("schedules", "show", webs[1], "nightly")
    assert (s1["cron"], s1["enabled"], s1["overrides"]) == ("15 2 * * *", False, ["enabled"])

    # what a template made is not deleted or renamed by hand
    fleet.ctl("groups", "delete", webs[2], "www", expect=1)
    fleet.ctl("schedules", "delete", webs[2], "nightly", "--yes", expect=1)
    fleet.ctl("groups", "edit", webs[2], "www", "--rename", "w2", expect=1)
    fleet.ctl("repos", "detach", repo, webs[2], expect=1)
    fleet.ctl("repos", "delete", repo, "--yes", expect=1)

    # a host that gains the label gets it; one that loses it loses what was not changed there
    new = f"{tag}-web50"
    fleet.rpc("enroll.create", host=new)
    labelled = fleet.ctl("hosts", "label", new, "role=web", f"batch={tag}")
    assert "group www" in labelled.stderr
    assert ("group", "www") in settings(fleet, new)
    gone = fleet.ctl_json("hosts", "label", webs[3], "--remove", "role")
    assert gone["templates"]["removed"] == ["schedule nightly", "group www"]
    assert set(settings(fleet, webs[3])) == {("repository", repo)}
    assert settings(fleet, webs[3])[("repository", repo)]["template"] is None
    fleet.ctl("hosts", "label", webs[1], "--remove", "role")  # its schedule was changed there
    kept = settings(fleet, webs[1])
    assert kept[("schedule", "nightly")]["template"] is None
    assert kept[("group", "www")]["template"] is None  # its own schedule backs it up

    # deleting the template takes what it made from every host
    deleted = fleet.ctl_json("templates", "delete", "web" + tag)
    assert deleted["removed"] == "web" + tag and deleted["failed"] == 0
    assert ("group", "www") not in settings(fleet, webs[0])
    assert fleet.ctl_json("maintenance", "show", repo)["template"] is None


def test_host_own_settings_win_and_failures_are_per_host(fleet, fx, tmp_path, spec_file):
    tag = fx.uniq("c").replace("-", "")
    main, offsite = make_repo(fleet, fx, tmp_path), make_repo(fleet, fx, tmp_path)
    a, b = f"{tag}-a", f"{tag}-b"
    for h in (a, b):
        fleet.rpc("enroll.create", host=h, labels={"batch": tag})
    fleet.ctl("repos", "use", offsite, a)  # a backs up into offsite already
    fleet.ctl("repos", "use", main, b)
    fleet.ctl("groups", "create", b, "db", "--include", "/srv/mine")
    spec = {"groups": {"db": {"includes": ["/var/lib/db"], "copy_to": offsite}}}
    name = "copy" + tag
    result = fleet.ctl_json(
        "templates", "set", name, "--selector", f"batch={tag}", "-f", spec_file(spec), expect=1
    )
    by_host = {h["host"]: h for h in result["hosts"]}
    assert "where its backups go already" in by_host[a]["error"]
    assert by_host[b]["error"] is None
    assert by_host[b]["notes"] == [f"group db: the host's own, not template {name}'s"]
    assert fleet.ctl_json("groups", "show", b, "db")["includes"] == ["/srv/mine"]
    shown = fleet.ctl_json("hosts", "show", a)
    assert "where its backups go already" in shown["template_error"]
    assert ("group", "db") not in settings(fleet, a)  # nothing half-applied
    assert "templates not applied" in fleet.ctl("hosts", "show", a).stdout
    table = fleet.ctl("templates", "show", name).stdout
    assert a in table and "where its backups" in table

    # fixed on the host, applying again succeeds there
    fleet.ctl("repos", "use", main, a)
    fixed = fleet.ctl_json("templates", "apply", name)
    assert fixed["failed"] == 0
    assert fleet.ctl_json("hosts", "show", a)["template_error"] is None
    assert fleet.ctl_json("groups", "show", a, "db")["copy_to"] == offsite
    # --keep leaves what it made as each host's own
    fleet.ctl("templates", "delete", name, "--keep")
    assert settings(fleet, a)[("group", "db")]["template"] is None


def test_bad_templates_are_refused_and_change_nothing(fleet, fx, tmp_path, spec_file):
    tag = fx.uniq("d").replace("-", "")
    repo = make_repo(fleet, fx, tmp_path)
    fleet.rpc("enroll.create", host=f"{tag}-h", labels={"batch": tag})
    good = {"groups": {"etc": {"includes": ["/etc"]}}}
    sel = f"batch={tag}"
    for bad, words in (
        ({"groups": {"etc": {"includes": ["/etc"], "keep": 3}}}, "unknown setting 'keep'"),
        ({"groups": {"etc": {"includes": ["etc"]}}}, "not absolute"),
        ({"groups": {"etc": {}}}, "at least one"),
        ({"repositories": ["nope"]}, "no repository named 'nope'"),
        (
            {"schedules": {"n": {"cron": "61 * * * *", "groups": ["etc"]}}, **good},
            "schedules.n: cron",
        ),
        ({"schedules": {"n": {"cron": "0 1 * * *", "groups": ["x"]}}, **good}, "no group 'x'"),
        ({"maintenance": {repo: {"prune": "whenever"}}}, f"maintenance.{repo}: --prune"),
        ({"grops": {}}, "unknown part 'grops'"),
        ({}, "empty"),
    ):
        result = fleet.ctl(
            "templates", "set", "t" + tag, "--selector", sel, "-f", spec_file(bad), expect=2
        )
        assert words in result.stderr, (bad, result.stderr)
    fleet.ctl(
        "templates", "set", "t" + tag, "--selector", "Bad=Key", "-f", spec_file(good), expect=2
    )
    not_json = tmp_path / "not.json"
    not_json.write_text("{nope")
    assert (
        "not JSON"
        in fleet.ctl(
            "templates", "set", "t" + tag, "--selector", sel, "-f", str(not_json), expect=2
        ).stderr
    )
    assert fleet.ctl("templates", "show", "t" + tag, expect=4)
    assert fleet.ctl_json("hosts", "show", f"{tag}-h")["settings"] == []

    # hooks run as root-ish shell commands on every host: admins only
    operator = fleet.add_user("operator")
    hooked = {"groups": {"etc": {"includes": ["/etc"], "pre_hook": "touch /tmp/x"}}}
    fleet.ctl(
        "templates",
        "set",
        "t" + tag,
        "--selector",
        sel,
        "-f",
        spec_file(hooked),
        token=operator.token,
        expect=3,
    )
    fleet.ctl(
        "templates",
        "set",
        "t" + tag,
        "--selector",
        sel,
        "-f",
        spec_file(good),
        token=operator.token,
    )
    listed = {t["name"]: t for t in fleet.ctl_json("templates", "list")}
    assert listed["t" + tag]["picked"] == 1
    assert "t" + tag in fleet.ctl("templates", "list").stdout
    audit = fleet.ctl_json("audit", "--action", "template")
    assert any(e["action"] == "template.set" and e["target"] == "t" + tag for e in audit)


def test_edges_of_overrides_repositories_hooks_and_failures(
    fleetd_factory, fx, tmp_path, spec_file
):
    """A fleetd of its own: a selector here picks hosts without labels too."""
    fleet = fleetd_factory()
    r1, r2 = make_repo(fleet, fx, tmp_path), make_repo(fleet, fx, tmp_path)
    base = {
        "repositories": [r1],
        "maintenance": {r1: {"prune": "0 5 * * 0"}},
        "groups": {"g": {"includes": ["/etc"]}},
        "schedules": {"s": {"cron": "0 2 * * *", "groups": ["g"]}},
    }
    fleet.ctl(
        "templates", "set", "a", "--selector", "!role", "-f", spec_file(base), "--priority", "5"
    )
    extra = {"groups": {"x": {"includes": ["/srv/x"]}}}
    fleet.ctl("templates", "set", "b", "--selector", "extra=y", "-f", spec_file(extra))

    # a host enrolled without labels is picked by !role at once
    fleet.ctl("enroll", "h1", "--label", "extra=y")
    done = fleet.ctl_json("enroll", "h0")
    assert "group g" in done["templates"]["created"]

    # the priority given once stays when the template is set again without it
    fleet.ctl("templates", "set", "a", "--selector", "!role", "-f", spec_file(base))
    assert fleet.ctl_json("templates", "show", "a")["priority"] == 5

    # a schedule whose groups were changed here keeps the group it now backs up
    fleet.ctl("schedules", "edit", "h1", "s", "--group", "x")
    version = fleet.ctl_json("hosts", "show", "h1")["schedule_version"]
    fleet.ctl("hosts", "label", "h1", "--remove", "extra")
    kept = settings(fleet, "h1")
    assert kept[("group", "x")]["template"] is None
    assert fleet.ctl_json("schedules", "show", "h1", "s")["groups"] == ["x"]
    assert fleet.ctl_json("hosts", "show", "h1")["schedule_version"] == version

    # a repository a template attached stays when another becomes the default
    fleet.ctl("repos", "use", r2, "h0")
    h0 = settings(fleet, "h0")
    assert h0[("repository", r1)]["template"] == "a" and ("repository", r2) in h0
    fleet.ctl("repos", "edit", r1, "--rename", "renamed", expect=1)  # templates name it

    # the host's own group of the template's name wins; once it goes, the template's comes
    fleet.ctl("enroll", "h2", "--label", "role=own")
    fleet.ctl("groups", "create", "h2", "g", "--include", "/mine")
    fleet.ctl("hosts", "label", "h2", "--remove", "role")
    assert settings(fleet, "h2")[("group", "g")]["template"] is None
    fleet.ctl("schedules", "delete", "h2", "s", "--yes", expect=1)  # the template's
    fleet.ctl("schedules", "edit", "h2", "s", "--group", "g")  # make it the host's own...
    fleet.ctl("templates", "apply", "a")
    s = fleet.ctl_json("schedules", "show", "h2", "s")
    assert s["template"] == "a" and s["overrides"] == ["groups"]
    fleet.ctl("schedules", "edit", "h2", "s", "--inherit", "groups")
    fleet.ctl("hosts", "label", "h2", "role=own")  # h2 leaves: s goes, its own g stays
    fleet.ctl("groups", "delete", "h2", "g", "--yes")
    fleet.ctl("hosts", "label", "h2", "--remove", "role")  # back: the template's g is made
    assert fleet.ctl_json("groups", "show", "h2", "g")["includes"] == ["/etc"]

    # maintenance: set by hand overrides the template's, --inherit gives it back
    m = fleet.ctl_json("maintenance", "set", r1, "--prune", "0 6 * * 0")
    assert (m["prune"]["cron"], m["overrides"]) == ("0 6 * * 0", ["prune"])
    m = fleet.ctl_json("maintenance", "set", r1, "--inherit", "prune")
    assert (m["prune"]["cron"], m["overrides"], m["template"]) == ("0 5 * * 0", [], "a")

    # hooks: an operator may not give a host an admin's hook template by labelling it
    hooked = {"groups": {"db": {"includes": ["/var/lib/db"], "pre_hook": "true"}}}
    fleet.ctl("templates", "set", "hooks", "--selector", "role=db", "-f", spec_file(hooked))
    operator = fleet.add_user("operator")
    fleet.ctl("hosts", "label", "h0", "role=db", token=operator.token, expect=3)
    fleet.ctl("enroll", "h9", "--label", "role=db", token=operator.token, expect=3)
    assert settings(fleet, "h0")[("group", "g")]["template"] == "a"  # nothing changed
    fleet.ctl("hosts", "label", "h0", "role=db")  # an admin may
    assert settings(fleet, "h0")[("group", "db")]["template"] == "hooks"

    # a host another template fails on still lets go of a deleted template's rows,
    # and a failed --inherit is an error that keeps the override
    clash = {"groups": {"c": {"includes": ["/c"], "copy_to": r2}}}
    fleet.ctl("enroll", "h3", "--label", "clash=y")
    fleet.ctl("repos", "use", r2, "h3")
    fleet.ctl("groups", "edit", "h3", "g", "--keep-daily", "3")
    failed = fleet.ctl_json(
        "templates", "set", "clash", "--selector", "clash=y", "-f", spec_file(clash), expect=1
    )
    assert failed["failed"] == 1
    fleet.ctl("groups", "edit", "h3", "g", "--inherit", "retention", expect=1)
    assert settings(fleet, "h3")[("group", "g")]["overrides"] == ["retention"]
    fleet.ctl("templates", "delete", "a", expect=1)  # h3 still fails on clash
    h3 = settings(fleet, "h3")
    assert ("schedule", "s") not in h3
    assert h3[("group", "g")]["template"] is None  # changed there: the host's own
    assert ("group", "g") not in settings(fleet, "h0")
