"""Operator API methods through the real registry against real SQLite, with
the store thread replaced by inline calls: group retry bounds, hosts.list in
pages and in a constant number of queries."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from fleet.common.timefmt import iso
from fleet.server import api
from fleet.server.api.auth import issue_token, lookup_token
from fleet.server.api.context import Context
from fleet.server.jobs import lifecycle
from fleet.server.security import auth
from fleet.server.store.db import open_database
from fleet.server.store.models import Host, Job, User, db


class InlineStore:
    """Store's interface, run on the calling thread (the test's loop)."""

    async def run(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)

    bulk = read = run

    async def atomic(self, fn, *args, **kwargs):
        with db.atomic():
            return fn(*args, **kwargs)

    async def publishing(self, events, fn, *args, **kwargs):
        return await self.atomic(fn, *args, **kwargs)


class State:
    store = InlineStore()
    agents = None
    bus = None
    tls = None  # fleetd without TLS


class Api:
    def __init__(self) -> None:
        self.registry = api.build_registry()
        user = User.create(name="admin", password_hash=auth.hash_password("x" * 12), role="admin")
        token = issue_token(user, "test", None)["token"]
        self.ctx = Context(lookup_token(token), State())  # type: ignore[arg-type]

    def reply(self, method: str, **params: Any) -> dict:
        frame = json.dumps({"id": 1, "method": method, "params": params})

        async def send(_: str) -> None:
            pass

        return json.loads(asyncio.run(self.registry.dispatch(self.ctx, frame, send)))

    def __call__(self, method: str, **params: Any) -> Any:
        reply = self.reply(method, **params)
        assert "result" in reply, reply
        return reply["result"]

    def error(self, method: str, **params: Any) -> dict:
        reply = self.reply(method, **params)
        assert "error" in reply, reply
        return reply["error"]


@pytest.fixture
def rpc(tmp_path: Path):
    database = open_database(tmp_path / "fleet.db")
    yield Api()
    database.close()


# -- source group retry bounds ------------------------------------------------


def test_group_retries_and_retry_delay_are_bounded(rpc: Api) -> None:
    Host.create(name="web-01")
    group = rpc("groups.create", host="web-01", name="etc", includes=["/etc"], retries=100)
    assert group["retries"] == 100
    group = rpc("groups.edit", host="web-01", name="etc", retry_delay=604800)
    assert group["retry_delay"] == 604800  # 7 days is allowed

    assert rpc.error("groups.edit", host="web-01", name="etc", retries=101) == {
        "code": "bad_request",
        "message": "retries: must be at most 100",
    }
    # 10**12 s used to be stored, and overflowed a datetime at the first retry
    for delay in (604801, 10**12):
        error = rpc.error("groups.edit", host="web-01", name="etc", retry_delay=delay)
        assert error == {"code": "bad_request", "message": "retry_delay: must be at most 604800"}
    error = rpc.error("groups.create", host="web-01", name="var", includes=["/var"], retries=10**6)
    assert error["code"] == "bad_request"
    assert rpc.error("groups.edit", host="web-01", name="etc", retries=-1) == {
        "code": "bad_request",
        "message": "bad parameter retries: must be at least 0",
    }
    shown = rpc("groups.show", host="web-01", name="etc")
    assert (shown["retries"], shown["retry_delay"]) == (100, 604800)  # refusals changed nothing
    assert [g["name"] for g in rpc("groups.list", host="web-01")] == ["etc"]


# -- hosts.list: pages, one query ---------------------------------------------


@pytest.fixture
def fleet_of_50(rpc: Api) -> list[Host]:
    hosts = [Host.create(name=f"h{i:02d}") for i in range(50)]
    for i, host in enumerate(hosts):
        for _ in range(i % 3):  # 0, 1 or 2 backups, and an init job that must not count
            lifecycle.create([], host.id, "backup", "user")
        lifecycle.create([], host.id, "init", "system")
    return hosts


class QueryCounter:
    def __init__(self) -> None:
        self.sql: list[str] = []

    def __enter__(self) -> QueryCounter:
        self.conn = db.connection()
        self.conn.set_trace_callback(self.sql.append)
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.set_trace_callback(None)

    @property
    def selects(self) -> list[str]:
        return [s for s in self.sql if s.lstrip().upper().startswith("SELECT")]


def test_hosts_list_is_a_constant_number_of_queries(rpc: Api, fleet_of_50) -> None:
    rpc("hosts.list")  # warm up: the caller refresh and any lazy setup
    with QueryCounter() as everything:
        listed = rpc("hosts.list")
    with QueryCounter() as page:
        rpc("hosts.list", limit=10)
    assert len(listed) == 50
    # the listing is one query (the caller's token check is cached for a few seconds)
    assert len(everything.selects) == 1, everything.selects
    assert len(page.selects) == len(everything.selects)


def test_hosts_list_shows_each_hosts_latest_backup(rpc: Api, fleet_of_50) -> None:
    by_name = {h["name"]: h for h in rpc("hosts.list")}
    for host in fleet_of_50:
        backups = [j for j in host.jobs.order_by(-Job.id) if j.kind == "backup"]
        shown = by_name[host.name]["last_backup"]
        if not backups:
            assert shown is None
        else:
            assert shown == {
                "job": backups[0].id,
                "status": "queued",
                "created_at": iso(backups[0].created_at),
                "finished_at": None,
            }
    # hosts.show agrees with the listing
    shown = rpc("hosts.show", host="h02")
    assert shown["last_backup"] == by_name["h02"]["last_backup"]
    assert shown["repo"] is False and shown["repo_stats"] is None and shown["groups"] == []


def test_the_listing_read_without_the_orm_says_what_the_orm_would(rpc: Api, fleet_of_50) -> None:
    """hosts.list reads plain rows; hosts.show (and every other view) the
    models: the same host must come out the same, in every state."""
    from fleet.server.api.hosts import last_job
    from fleet.server.api.views import host_json

    seen = dt.datetime(2026, 3, 4, 5, 6, 7, 891011)  # microseconds are not shown
    for name, online in (("h01", True), ("h02", True), ("h04", False)):
        Host.update(
            agent_token_hash=f"hash-{name}",
            online=online,
            last_seen_at=seen,
            agent_version="1.2",
            restic_version="0.14.0",
            repo_locks=2,
        ).where(Host.name == name).execute()
    ended = Job.select().where(Job.kind == "backup").first()
    Job.update(status="failed", finished_at=dt.datetime(2026, 3, 4, 6, 0, 0)).where(
        Job.id == ended.id
    ).execute()
    listed = {h["name"]: h for h in rpc("hosts.list")}
    for host in Host.select():
        assert listed[host.name] == host_json(host, last_job(host, "backup")), host.name
    assert {listed[n]["status"] for n in ("h00", "h01", "h04")} == {"pending", "online", "offline"}
    assert listed["h01"]["last_seen_at"] == "2026-03-04T05:06:07Z"


def test_hosts_list_pages_by_name(rpc: Api, fleet_of_50) -> None:
    everything = rpc("hosts.list")
    names = [h["name"] for h in everything]
    assert names == sorted(names) and len(names) == 50

    pages, after = [], None
    while True:
        params: dict[str, Any] = {"limit": 7}
        if after is not None:
            params["after"] = after
        page = rpc("hosts.list", **params)
        if not page:
            break
        assert len(page) <= 7
        pages.append(page)
        after = page[-1]["name"]
    assert [h for page in pages for h in page] == everything
    assert [len(p) for p in pages] == [7] * 7 + [1]

    assert [h["name"] for h in rpc("hosts.list", after="h47")] == ["h48", "h49"]
    assert [h["name"] for h in rpc("hosts.list", after="h10x", limit=2)] == ["h11", "h12"]
    assert rpc("hosts.list", after="zzz") == []
    assert len(rpc("hosts.list", limit=1000)) == 50


def test_the_whole_list_is_stitched_from_pages_without_a_gap_or_a_repeat(rpc: Api) -> None:
    """Past one page (1,000) the listing is read and encoded a page at a
    time and spliced together: every host once, in order, also when the
    fleet is an exact number of pages."""
    from fleet.server.api.hosts import MAX_PAGE

    Host.insert_many([{"name": f"n{i:05d}"} for i in range(2 * MAX_PAGE)]).execute()
    names = [h["name"] for h in rpc("hosts.list")]
    assert names == [f"n{i:05d}" for i in range(2 * MAX_PAGE)]
    Host.create(name="zz-last")
    assert [h["name"] for h in rpc("hosts.list")][-2:] == [f"n{2 * MAX_PAGE - 1:05d}", "zz-last"]
    assert [h["name"] for h in rpc("hosts.list", after="n01998")] == ["n01999", "zz-last"]


def test_hosts_list_refuses_bad_page_sizes(rpc: Api) -> None:
    assert rpc.error("hosts.list", limit=0) == {
        "code": "bad_request",
        "message": "bad parameter limit: must be at least 1",
    }
    assert rpc.error("hosts.list", limit=1001) == {
        "code": "bad_request",
        "message": "limit: must be at most 1000",
    }
    assert rpc.error("hosts.list", after=5)["code"] == "bad_request"
    assert rpc.error("hosts.list", page=2)["message"] == "unknown parameter 'page'"


def test_a_revoked_token_stops_at_once_despite_the_check_cache(rpc: Api) -> None:
    """Token checks are reused for a few seconds, but a revocation (published
    as CredentialsChanged) drops the cached check: the next request fails."""
    from fleet.server.api.registry import Registry
    from fleet.server.events import Bus, CredentialsChanged

    bus = Bus()
    bus.subscribe(CredentialsChanged, rpc.registry.forget)
    rpc.ctx.state.bus = bus
    try:
        rpc("hosts.list")
        with QueryCounter() as cached:
            rpc("hosts.list")
        assert not any('"api_token"' in q for q in cached.selects), "the check was not cached"
        assert isinstance(rpc.registry, Registry)
        rpc("auth.logout")  # revokes this very token
        error = rpc.error("hosts.list")
        assert error["code"] == "unauthorized", error
    finally:
        rpc.ctx.state.bus = None


def test_read_only_methods_write_nothing(rpc: Api, fleet_of_50) -> None:
    """Methods marked readonly run without a transaction: each must only read
    (every statement they run is a SELECT)."""
    from fleet.server.api import build_registry

    readonly = {m.name for m in build_registry()._methods.values() if m.readonly}
    assert {"hosts.show", "jobs.list", "audit.list"} <= readonly
    calls = {
        "users.list": {},
        "tokens.list": {},
        "hosts.show": {"host": "h01"},
        "groups.list": {"host": "h01"},
        "jobs.list": {},
        "audit.list": {},
        "snapshots.list": {"host": "h01"},
    }
    for name, params in calls.items():
        assert name in readonly, name
        with QueryCounter() as counter:
            rpc(name, **params)
        writes = [q for q in counter.sql if not q.lstrip().upper().startswith("SELECT")]
        assert writes == [], (name, writes)
