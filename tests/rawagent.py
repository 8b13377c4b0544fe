"""An agent's /agent link driven frame by frame by a test: what the tests
of the wire (schedules, status, replicas) need of a hand-made agent. It
numbers its reliable frames (seq) and keeps the frames fleetd sent that the
test has not looked at yet, so waiting for one kind of frame loses no other."""

from __future__ import annotations

import itertools
import json
from typing import Any, Optional

from fleet.common import protocol

TS = "2026-12-02T00:00:00Z"  # started_at, finished_at of what finish() reports
_probes = itertools.count(1)


class RawAgent:
    def __init__(self, ws: Any, seq: int = 0, timeout: float = 10.0) -> None:
        self.ws = ws
        self.seq = seq  # the last seq this agent used
        self.timeout = timeout  # seconds to wait for a frame, unless told
        self.pending: list[dict] = []
        self.last_ack = 0  # the highest seq fleetd acked (acks are cumulative)

    def hello(self, frame: str) -> dict:
        """Send this hello; fleetd's welcome."""
        self.ws.send(frame)
        welcome = self.next_of("welcome")
        assert welcome["id"] == "h1", welcome
        return welcome

    def next_of(self, kind: str, timeout: Optional[float] = None, **fields: Any) -> dict:
        """The next frame of this type (whose data has these values)."""

        def fits(frame: dict) -> bool:
            data = frame.get("data", {})
            return frame.get("type") == kind and all(data.get(k) == v for k, v in fields.items())

        for i, frame in enumerate(self.pending):
            if fits(frame):
                return self.pending.pop(i)
        while True:
            frame = json.loads(self.ws.recv(timeout=self.timeout if timeout is None else timeout))
            if fits(frame):
                return frame
            self.pending.append(frame)

    def sync(self) -> None:
        """Send a frame fleetd answers at once (an unknown type) and wait for
        the answer: whatever fleetd sent before it is then in `pending`, and
        the unreliable frames sent before the probe (schedule.ack) have been
        handled; reliable ones are awaited with `acked`."""
        probe = f"probe-{next(_probes)}"
        self.ws.send(json.dumps({"v": 1, "type": "no.such.type", "id": probe, "data": {}}))
        answer = self.next_of("error", re=probe)
        assert answer["data"]["code"] == "bad_frame", answer

    def seen(self, kind: str) -> list[dict]:
        return [f for f in self.pending if f.get("type") == kind]

    def send(self, kind: str, data: dict) -> None:
        """An unreliable frame (no seq): schedule.ack, command.result."""
        self.ws.send(protocol.encode(kind, data))

    def report(self, kind: str, data: dict, seq: Optional[int] = None) -> int:
        """A reliable frame under the next seq (or the one given, for a resend)."""
        if seq is None:
            seq = self.seq + 1
        self.seq = max(self.seq, seq)
        self.ws.send(protocol.encode(kind, data, seq=seq))
        return seq

    def acked(self, seq: int) -> int:
        """Wait for fleetd's ack covering `seq` (at once if one did already)."""
        while self.last_ack < seq:
            self.last_ack = max(self.last_ack, self.next_of("ack")["data"]["seq"])
        return self.last_ack

    def finish(self, job_id: int, kind: str = "check", status: str = "succeeded") -> None:
        """Take a job fleetd sent, run it and end it; wait for the ack."""
        self.send("command.result", {"job_id": job_id, "accepted": True})
        self.report("job.started", {"job_id": job_id, "kind": kind, "started_at": TS})
        ended = {"job_id": job_id, "status": status, "exit_code": 0, "finished_at": TS}
        self.acked(self.report("job.finished", ended))

    def close(self) -> None:
        self.ws.close()
