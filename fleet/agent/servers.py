"""Which fleetd the agent dials: the replicas' URLs, in turn.

An agent holds a list of fleetd URLs (the enrollment string's, then what
fleetd's welcome says, saved in servers.json). It dials the current one; on
a refused connection, a failed handshake, a TLS or timeout error or a
dropped link it moves on to the next (round robin). Every URL keeps the
scheme the agent enrolled with: an agent enrolled over wss:// never dials
ws://, whatever fleetd says (the key pins apply to every URL alike: one
fleet, one key set).

Delays (see link.py's backoff): a round of the list counts as one attempt
of a lone fleetd, so each replica is dialled no more often than one fleetd
alone was; after a link that was up drops, the first dial of the next
replica is prompt (it is probably up), once a minute at most, so that a
link that keeps dropping still backs off.

Pure but for the clock and the random source, both injectable. Python 3.9.
"""

from __future__ import annotations

import random
from typing import Callable, Optional

from ..common import protocol

PROMPT_MIN = 0.1  # seconds before the first dial of the next replica after a drop
PROMPT_MAX = 1.0
PROMPT_EVERY = 60.0  # a prompt switch at most this often (else: the usual backoff)


def accept_urls(
    offered: list[str], scheme: str, connected: Optional[str] = None
) -> tuple[list[str], list[str]]:
    """The URLs an agent enrolled over `scheme` ("ws" or "wss") takes from
    what fleetd offers, and those it drops (another scheme, not a URL). The
    one it is `connected` to, which works, stays in the list (last, when
    fleetd did not name it). Order kept, duplicates dropped, MAX_URLS at most."""
    kept: list[str] = []
    dropped: list[str] = []
    for url in offered:
        try:
            (checked,) = protocol.check_server_urls([url])
        except (protocol.ProtocolError, ValueError):
            dropped.append(url)
            continue
        if protocol.url_scheme(checked) != scheme:
            dropped.append(url)
        elif checked not in kept:
            kept.append(checked)
    kept = kept[: protocol.MAX_URLS]
    if connected is not None and connected not in kept:
        kept = kept[: protocol.MAX_URLS - 1] + [connected]
    return kept, dropped


class Servers:
    """The URLs, the one dialled now, and the delay before the next dial."""

    def __init__(
        self,
        urls: list[str],
        current: Optional[str] = None,
        clock: Callable[[], float] = lambda: 0.0,
        rng: Optional[random.Random] = None,
    ) -> None:
        if not urls:
            raise ValueError("an agent needs a fleetd URL to dial")
        self.urls = list(urls)
        self.index = self.urls.index(current) if current in self.urls else 0
        self.clock = clock
        self.rng = rng or random.Random()
        self.attempt = 0  # dials that failed since the link was last up a while
        self.refusals = 0  # certificates refused in a row
        self._last_prompt: Optional[float] = None

    @property
    def current(self) -> str:
        return self.urls[self.index]

    def __len__(self) -> int:
        return len(self.urls)

    def advance(self) -> str:
        """Move on to the next URL (round robin); answer it."""
        self.index = (self.index + 1) % len(self.urls)
        return self.current

    def replace(self, urls: list[str], connected: str) -> bool:
        """Take a new list (checked by accept_urls), staying on `connected`;
        whether it differs from the one held."""
        if not urls or urls == self.urls:
            return False
        self.urls = list(urls)
        self.index = self.urls.index(connected) if connected in self.urls else 0
        return True

    def failed(self, established: bool, lasted: float, backoff: Callable[..., float]) -> float:
        """The current URL failed (`established`: a session was up, for
        `lasted` seconds, and dropped): move on; the delay before dialling
        the next. `backoff(n, rng)` is the delay of a lone fleetd's n-th redial."""
        self.refusals = 0
        if lasted > PROMPT_EVERY:
            self.attempt = 0  # the link had been up a while: start over quickly
        self.advance()
        now = self.clock()
        if (
            established
            and len(self.urls) > 1
            and (self._last_prompt is None or now - self._last_prompt >= PROMPT_EVERY)
        ):
            self._last_prompt = now
            delay = self.rng.uniform(PROMPT_MIN, PROMPT_MAX)
        else:
            delay = backoff(self.attempt // len(self.urls), self.rng)
        self.attempt += 1
        return delay

    def refused(
        self, refused_backoff: Callable[..., float], backoff: Callable[..., float]
    ) -> float:
        """The current URL presented a key the agent does not pin: move on.
        Another replica may serve the right key, so the next is dialled
        soon; once every URL has refused in a row, the long delay of a
        refusal (`refused_backoff(n, rng)`) follows."""
        self.refusals += 1
        self.advance()
        if self.refusals % len(self.urls):
            return backoff(0, self.rng)
        return refused_backoff(self.refusals // len(self.urls) - 1, self.rng)
