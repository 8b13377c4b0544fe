"""Run many real agents (fleet.agent.link.Agent) in one process.

    python many_agents.py SPEC.json

SPEC is a list of {"enrollment": "fleet1:...", "state_dir": "..."}. Every
agent is enrolled, then run until SIGTERM (exit 0). Printed on stdout, one
per line:

- `enrolled N` once every agent is enrolled;
- `up I` each time agent I completes a handshake;
- `down I DELAY` each time agent I loses its link or fails to redial, with
  the backoff it chose before the next dial (seconds);
- `gave-up I REASON` if an agent's run_forever ever ends (it must not).

The agents' own log goes to stderr, each line naming its agent.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import re
import signal
import sys
from pathlib import Path
from typing import Optional

from fleet.agent.enroll import enroll
from fleet.agent.link import Agent
from fleet.agent.state import State

# which agent the running task belongs to (tasks inherit it from run())
CURRENT: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("agent", default=None)
REDIAL = re.compile(r"redialling in ([0-9.]+) s")


class NameAgent(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.agent = CURRENT.get()
        return True


class Redials(logging.Handler):
    """`down I DELAY` for each "link to ... down ...; redialling in X s" of agent I."""

    def emit(self, record: logging.LogRecord) -> None:
        index = CURRENT.get()
        if index is None or not record.getMessage().startswith("link to "):
            return
        args = record.args if isinstance(record.args, tuple) else ()
        if args and isinstance(args[-1], float):
            delay = args[-1]  # the exact value, not the %.1f of the message
        else:
            match = REDIAL.search(record.getMessage())
            if not match:
                return
            delay = float(match.group(1))
        print(f"down {index} {delay:.3f}", flush=True)


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(NameAgent())
    handler.setFormatter(
        logging.Formatter("%(asctime)s agent %(agent)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("websockets").setLevel(logging.WARNING)
    logging.getLogger("fleet-agent").addHandler(Redials())


async def watch(i: int, agent: Agent) -> None:
    while True:
        await agent.connected.wait()
        print(f"up {i}", flush=True)
        await agent.disconnected.wait()


async def main(spec_path: str) -> None:
    setup_logging()
    spec = json.loads(Path(spec_path).read_text())
    states = [State(Path(s["state_dir"])) for s in spec]
    identities = await asyncio.gather(*(enroll(st, s["enrollment"]) for st, s in zip(states, spec)))
    print(f"enrolled {len(identities)}", flush=True)
    agents = [Agent(st, ident) for st, ident in zip(states, identities)]
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, lambda: stop.done() or stop.set_result(None))

    async def run(i: int, agent: Agent) -> None:
        CURRENT.set(i)
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
