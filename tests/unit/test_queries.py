"""Queries to agents, both ends without a network: fleetd's Queries (pages
to the one waiting, checked per kind, bounded, failed when the link goes)
and the agent's refusals of a query it cannot run."""

from __future__ import annotations

import asyncio
import json

import pytest

from fleet.agent import queries as agent_queries
from fleet.agent.kinds import Refused
from fleet.server.agents.queries import QUEUE_PAGES, Queries, QueryFailed

LINK, OTHER = object(), object()


class Wire:
    def __init__(self) -> None:
        self.sent: list[dict] = []

    async def send(self, frame: str) -> bool:
        self.sent.append(json.loads(frame))
        return True


def entry(name: str) -> dict:
    return {"self": False, "name": name, "type": "file", "size": 1}


async def collect(q: Queries, wire: Wire, feed) -> list:
    pages = q.ask(wire.send, LINK, "ls", {"snapshot": "4f2a9c1e", "path": "/"}, timeout=5)
    got = []
    task = asyncio.ensure_future(feed())
    try:
        async for page in pages:
            got.append([e["name"] for e in page])
    finally:
        await task
    return got


def test_pages_reach_the_one_asking_and_the_agent_is_told_to_go_on() -> None:
    async def main() -> None:
        q, wire = Queries(), Wire()

        async def feed() -> None:
            await asyncio.sleep(0)
            qid = wire.sent[0]["data"]["query_id"]
            q.deliver(OTHER, {"query_id": qid, "items": [entry("stray")], "done": False})
            for i in range(9):
                q.deliver(LINK, {"query_id": qid, "items": [entry(f"f{i}")], "done": False})
            q.deliver(LINK, {"query_id": qid, "items": [entry("last")], "done": True})

        got = await collect(q, wire, feed)
        assert got == [[f"f{i}"] for i in range(9)] + [["last"]]  # the stray one dropped
        run, *more = wire.sent
        assert run["type"] == "query.run" and run["data"]["window"] == 16
        assert [m["type"] for m in more] == ["query.more"] and more[0]["data"]["pages"] == 8
        assert q.pending == {}

    asyncio.run(main())


@pytest.mark.parametrize(
    ("page", "code"),
    [
        (
            {"items": [], "done": True, "error": "Fatal: no such snapshot", "code": "failed"},
            "failed",
        ),
        ({"items": [{"name": "no self or type"}], "done": False}, "bad_frame"),
    ],
)
def test_an_error_or_a_malformed_page_ends_the_query(page, code) -> None:
    async def main() -> None:
        q, wire = Queries(), Wire()

        async def feed() -> None:
            await asyncio.sleep(0)
            q.deliver(LINK, {"query_id": wire.sent[0]["data"]["query_id"], **page})

        with pytest.raises(QueryFailed) as failed:
            await collect(q, wire, feed)
        assert failed.value.code == code

    asyncio.run(main())


def test_an_agent_that_runs_ahead_or_goes_away_fails_its_queries() -> None:
    async def main() -> None:
        q, wire = Queries(), Wire()

        async def flood() -> None:
            await asyncio.sleep(0)
            qid = wire.sent[0]["data"]["query_id"]
            for i in range(QUEUE_PAGES + 5):  # nobody reads meanwhile
                q.deliver(LINK, {"query_id": qid, "items": [entry(str(i))], "done": False})

        pages = q.ask(wire.send, LINK, "ls", {}, timeout=5)
        first = asyncio.ensure_future(pages.__anext__())
        await flood()
        assert (await first) == [entry("0")]
        with pytest.raises(QueryFailed) as failed:
            async for _ in pages:
                pass
        assert failed.value.code == "overflow"
        assert wire.sent[-1]["type"] == "query.cancel"

        async def gone() -> None:
            await asyncio.sleep(0)
            q.link_gone(LINK)

        with pytest.raises(QueryFailed) as failed:
            await collect(q, wire, gone)
        assert failed.value.code == "offline"

    asyncio.run(main())


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ({"kind": "rm"}, "unknown_kind"),
        ({"kind": "ls", "snapshot": "4f2a9c1e"}, "bad_params"),
        ({"kind": "ls", "snapshot": "latest", "path": "/"}, "bad_params"),
        ({"kind": "ls", "snapshot": "4f2a9c1e", "path": "etc"}, "bad_params"),
        ({"kind": "find", "patterns": []}, "bad_params"),
        ({"kind": "diff", "snapshot": "4f2a9c1e", "snapshot2": "--help"}, "bad_params"),
        ({"kind": "dump", "snapshot": "4f2a9c1e", "path": "relative"}, "bad_params"),
    ],
)
def test_the_agent_refuses_a_query_it_cannot_run(data, code) -> None:
    with pytest.raises(Refused) as refused:
        agent_queries.prepare({"query_id": 1, **data})
    assert refused.value.code == code


def test_the_agent_builds_each_kind() -> None:
    argv, parser = agent_queries.prepare(
        {"query_id": 1, "kind": "dump", "snapshot": "4f2a9c1e", "path": "/etc/hosts"}
    )
    assert argv == ("restic", "dump", "--no-lock", "--", "4f2a9c1e", "/etc/hosts")
    assert parser is None  # bytes, not lines
    argv, parser = agent_queries.prepare(
        {"query_id": 1, "kind": "find", "patterns": ["*.ini"], "hosts": ["web-01"]}
    )
    assert argv[:3] == ("restic", "find", "--no-lock") and parser is not None
