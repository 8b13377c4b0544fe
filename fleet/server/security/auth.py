"""Passwords, tokens, roles and the failed-login limiter. No I/O."""

from __future__ import annotations

import enum
import hashlib
import math
import secrets
import time
from collections import defaultdict, deque

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

# argon2id with the RFC 9106 "second recommended" parameters (64 MiB, t=3, p=4).
_hasher = PasswordHasher(time_cost=3, memory_cost=64 * 1024, parallelism=4)

MIN_PASSWORD = 8


class Role(str, enum.Enum):
    VIEWER = "viewer"  # read
    OPERATOR = "operator"  # read, run, configure
    ADMIN = "admin"  # also users and tokens

    @property
    def rank(self) -> int:
        return ("viewer", "operator", "admin").index(self.value)

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(stored_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(stored_hash, password)
    except (VerificationError, InvalidHashError, ValueError):  # ValueError: a non-ASCII hash
        return False


# A hash to verify against when the user does not exist, so that a wrong
# user name costs as much time as a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def burn_password_check(password: str) -> None:
    verify_password(_DUMMY_HASH, password)


def new_token(prefix: str) -> str:
    """A random bearer token; the prefix tells a human what it is for."""
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def token_hash(token: str) -> str:
    """Tokens are stored as SHA-256: a stolen database hands over no credential."""
    return hashlib.sha256(token.encode()).hexdigest()


def generate_password() -> str:
    return secrets.token_urlsafe(18)


class RateLimiter:
    """Counts failures per key in a sliding window.

    `blocked(key)` is true once `limit` failures fell within `window`
    seconds; it clears as they age out. A success does not reset the count
    for an address (an attacker may own one account), only for a user.
    """

    def __init__(self, limit: int = 5, window: float = 300.0, clock=time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._probes: dict[str, float] = {}  # a blocked key's last try let through

    def _prune(self, key: str) -> deque[float]:
        q = self._failures[key]
        cutoff = self._clock() - self.window
        while q and q[0] <= cutoff:
            q.popleft()
        if not q:
            del self._failures[key]
        return q

    def blocked(self, key: str) -> bool:
        return len(self._prune(key)) >= self.limit

    def retry_after(self, key: str) -> int:
        q = self._prune(key)
        if len(q) < self.limit:
            return 0
        return max(1, math.ceil(q[-self.limit] + self.window - self._clock()))

    def probe(self, key: str, every: float) -> bool:
        """For a blocked key: whether one more try may go ahead now (one
        every `every` seconds), counting it as taken."""
        now = self._clock()
        last = self._probes.get(key)
        if last is not None and now - last < every:
            return False
        self._probes[key] = now
        if len(self._probes) > 10_000:  # keys long gone: forget the oldest half
            for old in sorted(self._probes, key=self._probes.__getitem__)[:5_000]:
                del self._probes[old]
        return True

    def fail(self, key: str) -> None:
        self._prune(key)
        self._failures[key].append(self._clock())

    def reset(self, key: str) -> None:
        self._failures.pop(key, None)
        self._probes.pop(key, None)
