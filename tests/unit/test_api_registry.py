"""The operator API's registry (fleet/server/api): built explicitly from the
noun modules, every method that existed before the split still there and
documented, fleetctl calling only methods that exist, typed errors mapping to
the wire codes of DESIGN.md."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from fleet.server import api
from fleet.server.api import errors
from fleet.server.api.context import Caller, Context
from fleet.server.api.registry import Method, Registry, collect
from fleet.server.events import CredentialsChanged
from fleet.server.security.auth import Role
from fleet.server.store.db import StoreClosed

# every /ctl method of fleet/server/ctl.py and ctl_jobs.py before the split
METHODS_BEFORE = {
    "auth.whoami",
    "auth.logout",
    "users.list",
    "users.add",
    "users.passwd",
    "users.role",
    "users.remove",
    "tokens.create",
    "tokens.list",
    "tokens.revoke",
    "enroll.create",
    "hosts.list",
    "hosts.show",
    "hosts.remove",
    "repo.set",
    "repo.show",
    "groups.list",
    "groups.show",
    "groups.create",
    "groups.edit",
    "groups.delete",
    "audit.list",
    "jobs.run",
    "jobs.list",
    "jobs.show",
    "jobs.log",
    "jobs.tail",
    "jobs.cancel",
    "snapshots.list",
}

CTL_SOURCES = Path(api.__file__).resolve().parents[2] / "ctl"


@pytest.fixture(scope="module")
def registry() -> Registry:
    return api.build_registry()


def test_every_method_of_before_the_split_is_registered(registry: Registry) -> None:
    missing = METHODS_BEFORE - set(registry.names())
    assert not missing, f"methods lost in the move: {sorted(missing)}"


def test_every_method_has_help(registry: Registry) -> None:
    undocumented = [m.name for m in registry if len(m.help.strip()) < 10]
    assert not undocumented, f"methods without a docstring: {undocumented}"


def test_each_method_lives_in_the_module_of_its_noun(registry: Registry) -> None:
    for noun in api.NOUNS:
        for m in noun.METHODS:
            assert m.handler.__module__ == noun.__name__, m.name
    # the noun modules are the registry, nothing registered elsewhere
    assert len(registry) == sum(len(noun.METHODS) for noun in api.NOUNS)


def test_fleetctl_calls_only_methods_that_exist(registry: Registry) -> None:
    called = set()
    for path in CTL_SOURCES.glob("*.py"):
        called |= set(re.findall(r"\.(?:call|stream)\(\s*\"([a-z]+\.[a-z_]+)\"", path.read_text()))
    assert "hosts.list" in called  # the pattern still finds fleetctl's calls
    called.discard("auth.login")  # answered on /login, not /ctl
    assert called <= set(registry.names()), sorted(called - set(registry.names()))


def test_a_method_registered_twice_is_refused() -> None:
    collected: list[Method] = []
    method = collect(collected)

    @method("x.y")
    def one(ctx, p):
        """One."""

    @method("x.y")
    def two(ctx, p):
        """Two."""

    with pytest.raises(ValueError, match="x.y"):
        Registry(collected, refresh=lambda caller: caller)


def test_typed_errors_carry_the_wire_codes() -> None:
    codes = {cls.__name__: cls("m").code for cls in errors.ERRORS}
    assert codes == {
        "Invalid": "bad_request",
        "Unauthorized": "unauthorized",
        "Forbidden": "forbidden",
        "NotFound": "not_found",
        "Conflict": "conflict",
        "RateLimited": "rate_limited",
        "Unavailable": "unavailable",
        "UnknownMethod": "unknown_method",
        "Internal": "internal",
    }
    assert all(issubclass(cls, errors.ApiError) for cls in errors.ERRORS)
    frame = json.loads(errors.NotFound("no host named 'x'").frame(7))
    assert frame == {"id": 7, "error": {"code": "not_found", "message": "no host named 'x'"}}


class _FakeStore:
    async def run(self, fn, *args):
        return fn(*args)

    read = atomic = run

    async def publishing(self, events, fn, *args):
        return fn(*args)


class _FakeState:
    store = _FakeStore()
    agents = None
    bus = None


def _dispatch(registry: Registry, frame: dict, role: Role = Role.VIEWER) -> dict:
    ctx = Context(Caller(1, "ann", role, 1, "127.0.0.1"), _FakeState())  # type: ignore[arg-type]
    # these fake callers change role without the event a real role change publishes
    registry.forget(CredentialsChanged(user_id=1))

    async def send(_: str) -> None:
        pass

    return json.loads(asyncio.run(registry.dispatch(ctx, json.dumps(frame), send)))


def test_dispatch_is_the_edge_that_turns_typed_errors_into_frames(caplog) -> None:
    collected: list[Method] = []
    method = collect(collected)

    @method("t.missing")
    def missing(ctx, p):
        """Raises NotFound."""
        raise errors.NotFound("no such thing")

    @method("t.boom")
    def boom(ctx, p):
        """Fails unexpectedly."""
        raise RuntimeError("bug")

    @method("t.admin", Role.ADMIN)
    def admin(ctx, p):
        """Needs admin."""
        return "ok"

    registry = Registry(collected, refresh=lambda caller: caller)
    assert _dispatch(registry, {"id": 1, "method": "t.missing"})["error"] == {
        "code": "not_found",
        "message": "no such thing",
    }
    assert _dispatch(registry, {"id": 2, "method": "t.boom"})["error"] == {
        "code": "internal",
        "message": "t.boom failed inside fleetd; see its log",
    }
    assert "t.boom failed" in caplog.text
    assert _dispatch(registry, {"id": 3, "method": "t.nope"})["error"]["code"] == "unknown_method"
    assert _dispatch(registry, {"id": 4, "method": "t.admin"})["error"]["code"] == "forbidden"
    assert _dispatch(registry, {"id": 5, "method": "t.admin"}, Role.ADMIN) == {
        "id": 5,
        "result": "ok",
    }
    reply = _dispatch(registry, {"id": 6, "method": "t.missing", "params": {"x": 1}})
    assert reply["error"] == {"code": "bad_request", "message": "unknown parameter 'x'"}
    gone = Registry(collected, refresh=lambda caller: None)
    assert _dispatch(gone, {"id": 7, "method": "t.admin"})["error"]["code"] == "unauthorized"


class _ClosedStore:
    async def run(self, fn, *args):
        raise StoreClosed()

    read = atomic = run


def test_a_request_read_as_fleetd_stops_is_unavailable_not_a_failure(caplog) -> None:
    """fleetd closes its store before the sockets: a request that gets to it
    meanwhile is told `unavailable` (fleetctl: exit 5, try again), and
    fleetd logs no traceback for it."""
    collected: list[Method] = []
    method = collect(collected)

    @method("t.read", readonly=True)
    def read(ctx, p):
        """Reads."""
        return "never"

    registry = Registry(collected, refresh=lambda caller: caller)

    class Closed(_FakeState):
        store = _ClosedStore()

    def dispatch(state, frame: dict) -> dict:
        ctx = Context(Caller(1, "ann", Role.VIEWER, 1, "127.0.0.1"), state)

        async def send(_: str) -> None:
            pass

        return json.loads(asyncio.run(registry.dispatch(ctx, json.dumps(frame), send)))

    registry.forget(CredentialsChanged(user_id=1))
    assert dispatch(_FakeState(), {"id": 1, "method": "t.read"})["result"] == "never"
    # the caller's check is cached: the method's own read meets the closed store
    assert dispatch(Closed(), {"id": 2, "method": "t.read"})["error"]["code"] == "unavailable"
    # and with the check due again, the check meets it
    registry.forget(CredentialsChanged(user_id=1))
    assert dispatch(Closed(), {"id": 3, "method": "t.read"})["error"]["code"] == "unavailable"
    assert "Traceback" not in caplog.text and "failed" not in caplog.text
