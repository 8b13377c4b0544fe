"""The operator channel over the rebuilt core: requests on one connection run
concurrently (a tail does not hold up the rest), removing a host ends the
tails of its jobs, and the job lifecycle's states show through /ctl."""

from __future__ import annotations

import json
import time

import pytest


def send(ws, req_id, method, **params) -> None:
    ws.send(json.dumps({"id": req_id, "method": method, "params": params}))


def recv(ws, timeout: float = 10.0) -> dict:
    return json.loads(ws.recv(timeout=timeout))


@pytest.fixture
def queued_check(fleet, fx):
    """A host that never connects, with a check job queued for it."""
    host = fx.uniq("idle")
    fleet.ctl("enroll", host)
    job = fleet.rpc("jobs.run", host=host, kind="check")
    assert job["status"] == "queued"
    return host, job


def test_a_tail_does_not_hold_up_other_requests_on_its_connection(fleet, fx, queued_check):
    host, job = queued_check
    with fx.ws_connect(fleet.url, "/ctl", fleet.admin_token) as ws:
        send(ws, 1, "jobs.tail", id=job["id"])
        first = recv(ws)
        assert first == {"id": 1, "event": {"type": "status", "status": "queued"}}, first
        # the tail is still open (the host never connects); these are answered anyway
        started = time.monotonic()
        send(ws, 2, "auth.whoami")
        send(ws, 3, "hosts.show", host=host)
        replies = {r["id"]: r for r in (recv(ws), recv(ws))}
        assert replies[2]["result"]["user"] == "admin"
        assert replies[3]["result"]["name"] == host
        assert time.monotonic() - started < 5
        # cancelling the queued job ends the tail with the job itself
        send(ws, 4, "jobs.cancel", id=job["id"])
        replies = {}
        while len(replies) < 2:
            reply = recv(ws)
            if "event" in reply:
                continue
            replies[reply["id"]] = reply
        assert replies[4]["result"]["status"] == "cancelled"
        assert replies[1]["result"]["status"] == "cancelled"
        assert replies[1]["result"]["error"] == "cancelled before it started"


def test_removing_a_host_ends_the_tails_of_its_jobs(fleet, fx, queued_check):
    host, job = queued_check
    with fx.ws_connect(fleet.url, "/ctl", fleet.admin_token) as ws:
        send(ws, 1, "jobs.tail", id=job["id"])
        assert recv(ws)["event"] == {"type": "status", "status": "queued"}
        fleet.ctl("hosts", "remove", host, "--yes")
        reply = recv(ws)
        assert reply["id"] == 1 and reply["error"]["code"] == "not_found", reply
        assert "removed" in reply["error"]["message"]
        # the connection is still good
        send(ws, 2, "auth.whoami")
        assert recv(ws)["result"]["user"] == "admin"


def test_job_ids_are_never_reused_and_carry_a_uid(fleet, fx, queued_check):
    host, job = queued_check
    assert len(job["uid"]) == 32 and job["due_at"] is None
    fleet.ctl("hosts", "remove", host, "--yes")  # its jobs go with it
    other = fx.uniq("idle")
    fleet.ctl("enroll", other)
    again = fleet.rpc("jobs.run", host=other, kind="check")
    assert again["id"] > job["id"] and again["uid"] != job["uid"]
    listed = fleet.ctl_json("jobs", "list", "--status", "dispatched")
    assert all(j["status"] == "dispatched" for j in listed)
