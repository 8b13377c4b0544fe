"""Tests for fleet/server/auth.py: password hashing, tokens, roles and the
failed-login limiter (driven by a fake clock, never by sleeping)."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest

from fleet.server.security import auth
from fleet.server.security.auth import (
    RateLimiter,
    Role,
    hash_password,
    new_token,
    token_hash,
    verify_password,
)

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def stored() -> str:
    return hash_password(PASSWORD)


# --- passwords --------------------------------------------------------------


def test_hash_is_argon2id_with_the_documented_parameters(stored: str) -> None:
    assert stored.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    _, kind, version, params, salt, digest = stored.split("$")
    assert (kind, version, params) == ("argon2id", "v=19", "m=65536,t=3,p=4")
    assert len(base64.b64decode(salt + "==")) >= 16
    assert len(base64.b64decode(digest + "==")) >= 32
    assert PASSWORD not in stored


def test_hash_verifies_and_wrong_password_does_not(stored: str) -> None:
    assert verify_password(stored, PASSWORD) is True
    assert verify_password(stored, PASSWORD + " ") is False
    assert verify_password(stored, PASSWORD.upper()) is False
    assert verify_password(stored, "") is False


def test_hashes_are_salted() -> None:
    one, two = hash_password("pässwörd 🔑"), hash_password("pässwörd 🔑")
    assert one != two
    assert verify_password(one, "pässwörd 🔑")
    assert verify_password(two, "pässwörd 🔑")
    assert not verify_password(one, "passwort 🔑")


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "garbage",
        "$argon2id$",
        "$argon2id$v=19$m=65536,t=3,p=4$xx$yy",
        "$2b$12$abcdefghijklmnopqrstuuFz0mXkqf3b3e6c3vZ8lH7cN6n1bI2m",
        "5f4dcc3b5aa765d61d8327deb882cf99",
    ],
)
def test_verify_password_on_garbage_hash_is_false(garbage: str) -> None:
    assert verify_password(garbage, PASSWORD) is False


@pytest.mark.parametrize("garbage", ["ü", "$argon2id$v=19$m=65536,t=3,p=4$sält$häsh"])
def test_verify_password_on_non_ascii_garbage_hash_is_false(garbage: str) -> None:
    assert verify_password(garbage, PASSWORD) is False


def test_burn_password_check_returns_nothing_and_does_not_raise() -> None:
    assert auth.burn_password_check("whatever") is None


def test_generate_password_is_random_and_long_enough() -> None:
    one, two = auth.generate_password(), auth.generate_password()
    assert one != two
    assert len(one) >= auth.MIN_PASSWORD
    assert re.fullmatch(r"[A-Za-z0-9_-]+", one)


# --- tokens -----------------------------------------------------------------


def test_token_hash_is_sha256_hex() -> None:
    assert token_hash("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    token = new_token("fleet")
    digest = token_hash(token)
    assert digest == hashlib.sha256(token.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert token_hash(token) == digest  # deterministic
    assert token_hash(token + "x") != digest


def test_new_token_has_prefix_and_randomness() -> None:
    token = new_token("fla")
    prefix, sep, rest = token.partition("_")
    assert (prefix, sep) == ("fla", "_")
    assert len(rest) >= 40
    assert re.fullmatch(r"[A-Za-z0-9_-]+", rest)
    # 32 random bytes in URL-safe base64.
    assert len(base64.urlsafe_b64decode(rest + "=")) == 32


def test_new_tokens_differ() -> None:
    tokens = {new_token("x") for _ in range(100)}
    assert len(tokens) == 100
    assert len({token_hash(t) for t in tokens}) == 100


# --- roles ------------------------------------------------------------------


def test_role_values_and_ranks() -> None:
    assert [r.value for r in Role] == ["viewer", "operator", "admin"]
    assert Role("operator") is Role.OPERATOR
    assert Role.VIEWER.rank < Role.OPERATOR.rank < Role.ADMIN.rank
    with pytest.raises(ValueError):
        Role("root")


@pytest.mark.parametrize(
    ("have", "needed", "allowed"),
    [
        (Role.VIEWER, Role.VIEWER, True),
        (Role.VIEWER, Role.OPERATOR, False),
        (Role.VIEWER, Role.ADMIN, False),
        (Role.OPERATOR, Role.VIEWER, True),
        (Role.OPERATOR, Role.OPERATOR, True),
        (Role.OPERATOR, Role.ADMIN, False),
        (Role.ADMIN, Role.VIEWER, True),
        (Role.ADMIN, Role.OPERATOR, True),
        (Role.ADMIN, Role.ADMIN, True),
    ],
)
def test_role_allows(have: Role, needed: Role, allowed: bool) -> None:
    assert have.allows(needed) is allowed


# --- RateLimiter ------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limiter(clock: FakeClock) -> RateLimiter:
    return RateLimiter(limit=3, window=60.0, clock=clock)


def test_defaults() -> None:
    limiter = RateLimiter()
    assert (limiter.limit, limiter.window) == (5, 300.0)


def test_blocks_after_limit_failures_within_the_window(
    limiter: RateLimiter, clock: FakeClock
) -> None:
    assert not limiter.blocked("1.2.3.4")
    limiter.fail("1.2.3.4")
    clock.advance(10)
    limiter.fail("1.2.3.4")
    clock.advance(10)
    assert not limiter.blocked("1.2.3.4")
    assert limiter.retry_after("1.2.3.4") == 0
    limiter.fail("1.2.3.4")
    assert limiter.blocked("1.2.3.4")


def test_failures_spread_wider_than_the_window_never_block(
    limiter: RateLimiter, clock: FakeClock
) -> None:
    for _ in range(10):
        limiter.fail("k")
        assert not limiter.blocked("k")
        clock.advance(30.5)  # at most two failures inside any 60 s window


def test_unblocks_when_failures_age_out(limiter: RateLimiter, clock: FakeClock) -> None:
    # Failures at t=1000, 1010, 1020.
    for _ in range(3):
        limiter.fail("k")
        clock.advance(10)
    clock.now = 1059.0
    assert limiter.blocked("k")
    clock.now = 1060.0  # the first failure is now exactly one window old
    assert not limiter.blocked("k")
    assert limiter.retry_after("k") == 0
    # Another failure inside the window of the other two blocks again.
    limiter.fail("k")
    assert limiter.blocked("k")
    clock.now = 1070.0  # the failure at 1010 ages out
    assert not limiter.blocked("k")


def test_retry_after_while_blocked(limiter: RateLimiter, clock: FakeClock) -> None:
    for _ in range(3):
        limiter.fail("k")
        clock.advance(10)
    # Failures at 1000, 1010, 1020; now 1030; unblocked at 1060.
    wait = limiter.retry_after("k")
    assert wait > 0
    assert 30 <= wait <= 31
    clock.advance(wait)
    assert not limiter.blocked("k")
    assert limiter.retry_after("k") == 0


def test_retry_after_is_at_least_one_second_while_blocked(
    limiter: RateLimiter, clock: FakeClock
) -> None:
    for _ in range(3):
        limiter.fail("k")
    clock.advance(59.9)
    assert limiter.blocked("k")
    assert limiter.retry_after("k") >= 1


def test_retry_after_counts_from_the_failure_that_must_age_out(
    limiter: RateLimiter, clock: FakeClock
) -> None:
    # Five failures 10 s apart: blocked until the third-to-last ages out.
    for _ in range(5):
        limiter.fail("k")
        clock.advance(10)
    # Failures at 1000..1040; now 1050; 1020 ages out at 1080.
    wait = limiter.retry_after("k")
    assert 30 <= wait <= 31
    clock.now = 1079.0
    assert limiter.blocked("k")
    clock.now = 1080.0
    assert not limiter.blocked("k")


def test_retry_after_is_zero_for_an_unknown_key(limiter: RateLimiter) -> None:
    assert limiter.retry_after("nobody") == 0
    assert not limiter.blocked("nobody")


def test_reset_clears_a_key(limiter: RateLimiter, clock: FakeClock) -> None:
    for _ in range(3):
        limiter.fail("alice")
    assert limiter.blocked("alice")
    limiter.reset("alice")
    assert not limiter.blocked("alice")
    assert limiter.retry_after("alice") == 0
    # The count starts again from zero.
    limiter.fail("alice")
    limiter.fail("alice")
    assert not limiter.blocked("alice")
    limiter.reset("never-seen")  # no error


def test_keys_are_independent(limiter: RateLimiter, clock: FakeClock) -> None:
    for _ in range(3):
        limiter.fail("user:alice")
    limiter.fail("user:bob")
    limiter.fail("user:bob")
    assert limiter.blocked("user:alice")
    assert not limiter.blocked("user:bob")
    assert not limiter.blocked("ip:1.2.3.4")
    limiter.reset("user:bob")
    assert limiter.blocked("user:alice")
    limiter.reset("user:alice")
    assert not limiter.blocked("user:alice")


def test_limit_of_one(clock: FakeClock) -> None:
    limiter = RateLimiter(limit=1, window=5.0, clock=clock)
    assert not limiter.blocked("k")
    limiter.fail("k")
    assert limiter.blocked("k")
    assert 1 <= limiter.retry_after("k") <= 6
    clock.advance(5.0)
    assert not limiter.blocked("k")


def test_a_blocked_key_lets_one_try_through_every_so_often(clock: FakeClock) -> None:
    limiter = RateLimiter(limit=2, window=60.0, clock=clock)
    limiter.fail("k")
    limiter.fail("k")
    assert limiter.blocked("k")
    assert limiter.probe("k", 10.0) is True  # one try now
    assert limiter.probe("k", 10.0) is False  # not another at once
    clock.advance(9.9)
    assert limiter.probe("k", 10.0) is False
    clock.advance(0.2)
    assert limiter.probe("k", 10.0) is True
    limiter.reset("k")
    assert not limiter.blocked("k") and limiter.probe("k", 10.0) is True
