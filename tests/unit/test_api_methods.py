"""Operator API methods through the real registry against real SQLite, with
the store thread replaced by inline calls: group retry bounds."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from fleet.server import api, auth
from fleet.server.api.auth import issue_token, lookup_token
from fleet.server.api.context import Context
from fleet.server.store.db import open_database
from fleet.server.store.models import Host, User, db


class InlineStore:
    """Store's interface, run on the calling thread (the test's loop)."""

    async def run(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)

    async def atomic(self, fn, *args, **kwargs):
        with db.atomic():
            return fn(*args, **kwargs)


class State:
    store = InlineStore()
    hub = None


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
        "message": "groups.edit: retries: must be at least 0",
    }
    shown = rpc("groups.show", host="web-01", name="etc")
    assert (shown["retries"], shown["retry_delay"]) == (100, 604800)  # refusals changed nothing
    assert [g["name"] for g in rpc("groups.list", host="web-01")] == ["etc"]
