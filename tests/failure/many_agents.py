"""Run many real agents (fleet.agent.connection.Agent) in one process.

    python many_agents.py SPEC.json

SPEC is a list of {"enrollment": "fleet1:...", "state_dir": "..."}. Every
agent is enrolled, then run until SIGTERM. Printed on stdout, one per line:
`enrolled N`, then `up I` each time agent I completes a handshake, and
`gave-up I REASON` if an agent's run_forever ever ends (it must not).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

from fleet.agent.connection import Agent, enroll
from fleet.agent.state import State


async def watch(i: int, agent: Agent) -> None:
    while True:
        await agent.connected.wait()
        print(f"up {i}", flush=True)
        await agent.disconnected.wait()


async def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    states = [State(Path(s["state_dir"])) for s in spec]
    identities = await asyncio.gather(*(enroll(st, s["enrollment"]) for st, s in zip(states, spec)))
    print(f"enrolled {len(identities)}", flush=True)
    agents = [Agent(st, ident) for st, ident in zip(states, identities)]
    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(
        signal.SIGTERM, lambda: stop.done() or stop.set_result(None)
    )

    async def run(i: int, agent: Agent) -> None:
        try:
            await agent.run_forever()
            print(f"gave-up {i} returned", flush=True)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            print(f"gave-up {i} {type(exc).__name__}: {exc}", flush=True)

    tasks = [asyncio.ensure_future(run(i, a)) for i, a in enumerate(agents)]
    tasks += [asyncio.ensure_future(watch(i, a)) for i, a in enumerate(agents)]
    await stop
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for agent in agents:
        agent.spool.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
