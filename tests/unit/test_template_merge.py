"""The pure parts of templates: merging specs by strength, the params that
make a group as a spec says, which templates pick a host."""

from __future__ import annotations

import types

from fleet.server.api import templates


def t(name: str, selector: str, priority: int = 100) -> types.SimpleNamespace:
    return types.SimpleNamespace(name=name, selector=selector, priority=priority)


def test_merge_gives_each_name_to_the_strongest_template() -> None:
    want = templates.merge(
        [
            ("base", {"repositories": ["a", "b"], "groups": {"etc": {"includes": ["/etc"]}}}),
            (
                "web",
                {
                    "repositories": ["b", "c"],
                    "groups": {"etc": {"includes": ["/srv"]}, "www": {"includes": ["/var/www"]}},
                    "schedules": {"n": {"cron": "0 1 * * *", "groups": ["www"]}},
                },
            ),
        ]
    )
    assert want.repositories == [("a", "base"), ("b", "base"), ("c", "web")]
    assert want.groups == {
        "etc": ("base", {"includes": ["/etc"]}),
        "www": ("web", {"includes": ["/var/www"]}),
    }
    assert want.schedules["n"][0] == "web"
    assert want.shadowed == ["group etc of web: base has it"]


def test_picking_orders_by_priority_then_name_and_matches_labels() -> None:
    all_ = [
        t("zeta", "role=web", 10),
        t("alpha", "role=web"),
        t("db", "role=db", 0),
        t("beta", "env"),
    ]
    assert [x.name for x in templates.picking({"role": "web"}, all_)] == ["zeta", "alpha"]
    picked = templates.picking({"role": "web", "env": "prod"}, all_)
    assert [x.name for x in picked] == ["zeta", "alpha", "beta"]
    assert templates.picking({}, all_) == []


def test_group_params_fill_defaults_and_leave_overrides() -> None:
    settings = {"includes": ["/etc"], "retention": {"keep_daily": 7}}
    p = templates.group_params(settings, ())
    assert p["includes"] == ["/etc"] and p["retention"] == {"keep_daily": 7}
    # what the spec leaves out goes back to its default on every host
    assert (p["excludes"], p["retries"], p["copy_to"], p["drill_cron"]) == ([], 0, "", "")
    assert p["clear_copy_retention"] is True and "copy_retention" not in p
    kept = templates.group_params(settings, ["retention", "copy_retention", "retries"])
    assert "retention" not in kept and "retries" not in kept
    assert "clear_copy_retention" not in kept


def test_hooks_of_names_each_hook() -> None:
    spec = {"groups": {"a": {"pre_hook": "pg_dump x", "post_hook": " "}, "b": {}}}
    assert templates.hooks_of(spec) == {"a.pre_hook": "pg_dump x"}


def test_marks_a_request_left_behind_are_applied_by_the_ticker(tmp_path) -> None:
    """fleetd stopped while applying a template: the hosts still marked get
    it from the ticker once the mark is older than GRACE, not before."""
    import datetime as dt

    from fleet.server.events import RepoChanged, SchedulesChanged
    from fleet.server.store import models as m
    from fleet.server.store.db import open_database

    database = open_database(tmp_path / "fleet.db")
    try:
        web = m.Host.create(name="web-1", labels={"role": "web"})
        m.Host.create(name="db-1", labels={"role": "db"})
        m.Template.create(
            name="web",
            selector="role=web",
            spec={
                "repositories": [],
                "maintenance": {},
                "groups": {"www": {"includes": ["/var/www"]}},
                "schedules": {
                    "n": {"cron": "0 2 * * *", "groups": ["www"], "timezone": "", "enabled": True}
                },
            },
        )
        now = dt.datetime(2026, 12, 3, 12, 0)
        templates.mark_due([web.id])
        m.Host.update(templates_due_at=now - dt.timedelta(seconds=30)).execute()
        assert templates.next_due() == now - dt.timedelta(seconds=30) + templates.GRACE
        events: list = []
        templates.run_due(events, now)  # not yet: the request may still be at it
        assert not m.SourceGroup.select().exists()
        templates.run_due(events, now + templates.GRACE)
        group = m.SourceGroup.get()
        assert (group.host.name, group.name, group.template) == ("web-1", "www", "web")
        assert m.Schedule.get().template == "web"
        assert any(isinstance(e, SchedulesChanged) for e in events)
        assert not any(isinstance(e, RepoChanged) for e in events)
        assert m.Host.get_by_id(web.id).templates_due_at is None
        assert templates.next_due() is None
    finally:
        database.close()
