"""fleet.agent.link: the sender's window of unacknowledged frames, against a
fake link that withholds its acks."""

from __future__ import annotations

import asyncio
import json

import pytest

from fleet.agent.link import Agent, Window, pack_logs
from fleet.agent.state import Identity, State


class FakeLink:
    """Records what the sender sends; acks only when the test says so."""

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.sizes: list[int] = []

    async def send(self, text: str) -> None:
        self.seqs.append(json.loads(text)["seq"])
        self.sizes.append(len(text))


@pytest.fixture
def make_agent(tmp_path):
    made = []

    def make(**kw) -> Agent:
        agent = Agent(State(tmp_path), Identity("ws://127.0.0.1:1", 1, "h1", "tok"), **kw)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.spool.close()


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def log_line(n: int, size: int = 10) -> dict:
    return {
        "job_id": 1,
        "seq": n,
        "ts": "2024-01-01T00:00:00Z",
        "stream": "stdout",
        "payload": "x" * size,
    }


def test_the_sender_stops_at_the_window_and_goes_on_with_each_ack(make_agent):
    agent = make_agent(window_frames=10)

    async def main():
        for n in range(1, 26):
            await agent.emit("job.log", log_line(n))
        link = FakeLink()
        sender = asyncio.ensure_future(agent._sender(link))
        await settle()
        assert link.seqs == list(range(1, 11))  # then it waits: no ack came
        await asyncio.sleep(0.05)
        assert len(link.seqs) == 10
        agent.acknowledge(4)
        await settle()
        assert link.seqs == list(range(1, 15))  # 4 acked: 4 more may go
        agent.acknowledge(14)
        await settle()
        assert link.seqs == list(range(1, 25))
        agent.acknowledge(24)
        await settle()
        assert link.seqs == list(range(1, 26))
        # new frames go at once while the window has room
        await agent.emit("job.log", log_line(26))
        await settle()
        assert link.seqs[-1] == 26
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)

        # a new session resends from the last ack, within its own window
        link = FakeLink()
        sender = asyncio.ensure_future(agent._sender(link))
        await settle()
        assert link.seqs == [25, 26]
        agent.acknowledge(26)
        await settle()
        assert agent.spool.count() == 0
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)

    asyncio.run(main())


def test_the_window_bounds_bytes_too_and_a_big_frame_goes_alone(make_agent):
    agent = make_agent(window_frames=1000, window_bytes=3000)

    async def main():
        for n in range(1, 11):
            await agent.emit("job.log", log_line(n, 800))
        await agent.emit("job.log", log_line(11, 5000))  # larger than the whole window
        await agent.emit("job.log", log_line(12, 10))
        link = FakeLink()
        sender = asyncio.ensure_future(agent._sender(link))
        await settle()
        assert link.seqs == [1, 2, 3] and sum(link.sizes) <= 3000
        agent.acknowledge(3)
        await settle()
        assert link.seqs == [1, 2, 3, 4, 5, 6]
        agent.acknowledge(6)
        await settle()
        assert link.seqs == list(range(1, 10))
        agent.acknowledge(9)
        await settle()
        assert link.seqs == list(range(1, 11))  # 11 does not fit beside 10
        agent.acknowledge(10)
        await settle()
        assert link.seqs == list(range(1, 12))  # alone, though over the bound
        agent.acknowledge(11)
        await settle()
        assert link.seqs[-1] == 12
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)

    asyncio.run(main())


def test_window():
    w = Window(frames=2, size=100)
    assert not w.full(1000)  # empty: anything goes
    w.add(5, 60)
    assert w.full(41) and not w.full(40)
    w.add(7, 10)
    assert w.full(1) and len(w) == 2
    w.acked(5)
    assert len(w) == 1 and w.bytes == 10 and not w.full(90)
    w.acked(100)
    assert len(w) == 0 and w.bytes == 0


def spooled(seq: int, job: int = 1, line: int = 0, size: int = 10) -> tuple:
    return (seq, "job.log", {**log_line(line or seq, size), "job_id": job})


def test_pack_logs_packs_runs_of_one_jobs_consecutive_lines():
    started = (1, "job.started", {"job_id": 1, "kind": "backup", "started_at": "t"})
    finished = (9, "job.finished", {"job_id": 1})
    frames = [started, *(spooled(s) for s in range(2, 6)), spooled(7), spooled(8, job=2), finished]
    out = pack_logs(frames)
    assert [(seq, type_) for seq, type_, _ in out] == [
        (1, "job.started"),
        (5, "job.logs"),  # seqs 2..5: a run, under its last seq
        (7, "job.log"),  # seq 6 is gone (the spool evicted it): a new run, of one line
        (8, "job.log"),  # another job's line
        (9, "job.finished"),
    ]
    pack = out[1][2]
    assert pack["job_id"] == 1 and pack["first"] == 2
    assert [line["seq"] for line in pack["lines"]] == [2, 3, 4, 5]
    assert all("job_id" not in line for line in pack["lines"])
    assert pack_logs([spooled(3)]) == [spooled(3)]  # a lone line goes as it was


def test_pack_logs_bounds_lines_and_bytes_and_every_pack_decodes():
    frames = [spooled(s) for s in range(1, 1201)]
    out = pack_logs(frames)
    assert [len(d["lines"]) for _, _, d in out] == [500, 500, 200]
    assert [d["first"] for _, _, d in out] == [1, 501, 1001]
    big = [spooled(s, size=60_000) for s in range(1, 11)]
    sizes = [len(d["lines"]) for _, t, d in pack_logs(big)]
    assert sizes == [4, 4, 2]  # 256 KiB a pack at most
    from fleet.common import protocol

    for seq, type_, data in out + pack_logs(big):
        text = protocol.Envelope(type_, data, seq=seq).to_json()
        assert len(text.encode()) < protocol.MAX_FRAME_BYTES
        assert protocol.decode(text, expect="agent").seq == seq
