"""fleetd says when its event loop ran late: every connection, handshakes
too, waited meanwhile (fleet.server.app.watch_loop)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from fleet.server import app


def test_a_loop_held_by_a_blocking_call_is_said(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app, "HELD", 0.1)

    async def main() -> None:
        watch = asyncio.ensure_future(app.watch_loop(every=0.02))
        await asyncio.sleep(0)  # the watch's first round begins
        time.sleep(0.4)  # the blocking call the watch is for
        for _ in range(5):
            await asyncio.sleep(0.02)
        watch.cancel()

    with caplog.at_level(logging.WARNING, logger="fleetd"):
        asyncio.run(main())
    said = [r.getMessage() for r in caplog.records if "event loop ran" in r.getMessage()]
    assert said and all("every connection waited" in m for m in said), said
    assert any(float(m.split(" ran ")[1].split(" s ")[0]) >= 0.3 for m in said), said
