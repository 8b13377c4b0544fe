"""Property-based fuzzing of the decoders (hypothesis).

For any text, and for any JSON-ish value (including lone surrogates, huge
integers, deep nesting), `decode`, `decode_request` and `parse_enrollment`
return a result or raise ProtocolError, and whatever they accept can be
encoded back to UTF-8 JSON.
"""

from __future__ import annotations

import base64
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet.common.protocol import (
    MAX_DEPTH,
    MESSAGES,
    ProtocolError,
    decode,
    decode_request,
    parse_enrollment,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# every code point, lone surrogates included
ANY_TEXT = st.text(alphabet=st.characters(codec=None), max_size=40)
INTS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) + 1, 0, -1, 2**62, 2**62 + 1]),
)
SCALARS = st.one_of(
    st.none(), st.booleans(), INTS, st.floats(allow_nan=False, allow_infinity=False), ANY_TEXT
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(ANY_TEXT, inner, max_size=4)
    ),
    max_leaves=40,
)


def reencodes(value) -> None:
    json.dumps(value, ensure_ascii=False).encode("utf-8")


def depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


def attempt(fn, *args):
    """fn(*args): a result, or None for a ProtocolError; anything else fails."""
    try:
        return fn(*args)
    except ProtocolError:
        return None


def check_decoders(raw: str) -> None:
    for expect in ("agent", "server", ""):
        frame = attempt(decode, raw, expect)
        if frame is not None:
            reencodes(frame.data)
            reencodes(frame.id)
            frame.to_json().encode("utf-8")
    req = attempt(decode_request, raw)
    if req is not None:
        reencodes([req.id, req.method, req.params])
    attempt(parse_enrollment, raw)


def as_json(value) -> str:
    return json.dumps(value, ensure_ascii=True)  # lone surrogates become \ud800 escapes


@FUZZ
@given(ANY_TEXT)
def test_arbitrary_text(raw):
    check_decoders(raw)


@FUZZ
@given(st.binary(max_size=64))
def test_arbitrary_bytes(raw):
    check_decoders(raw.decode("latin-1"))
    for fn in (decode, decode_request):
        assert attempt(fn, raw) is None  # binary frames are refused
    doc = attempt(parse_enrollment, "fleet1:" + base64.urlsafe_b64encode(raw).decode())
    if doc is not None:
        reencodes(doc)


@FUZZ
@given(VALUES)
def test_arbitrary_values(value):
    check_decoders(as_json(value))
    check_decoders(json.dumps(value, ensure_ascii=False))


@FUZZ
@given(
    st.sampled_from(sorted(MESSAGES)),
    st.dictionaries(st.sampled_from(["v", "type", "id", "seq", "data"]), VALUES, max_size=5),
    st.dictionaries(ANY_TEXT, VALUES, max_size=6),
    st.one_of(st.none(), INTS, ANY_TEXT),
)
def test_envelopes_with_arbitrary_parts(type_, top, data, seq):
    frame = {"v": 1, "type": type_, "id": "x", "seq": seq, "data": data}
    frame.update(top)
    check_decoders(as_json(frame))
    request = {"id": top.get("id", 1), "method": type_, "params": data}
    check_decoders(as_json(request))


@FUZZ
@given(VALUES, st.integers(0, 40))
def test_depth_bound_matches_real_depth(value, extra):
    wrapped = value
    for _ in range(extra):
        wrapped = [wrapped]
    params = {"p": wrapped}
    raw = as_json({"id": 1, "method": "m", "params": params})
    accepted = attempt(decode_request, raw) is not None
    if depth({"params": params}) > MAX_DEPTH:
        assert not accepted


@FUZZ
@given(VALUES)
def test_enrollment_strings(value):
    body = base64.urlsafe_b64encode(as_json(value).encode()).decode().rstrip("=")
    doc = attempt(parse_enrollment, "fleet1:" + body)
    if doc is not None:
        reencodes(doc)


ENROLLMENT_FIELDS = ("url", "token", "sha256", "pins", "urls")
URLISH = st.one_of(
    ANY_TEXT,
    st.builds(
        lambda s, rest: s + rest, st.sampled_from(["ws://", "wss://", "http://", ""]), ANY_TEXT
    ),
)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(ENROLLMENT_FIELDS),
        st.one_of(VALUES, URLISH, st.lists(URLISH, max_size=20)),
        max_size=len(ENROLLMENT_FIELDS),
    )
)
def test_enrollment_documents_with_arbitrary_fields(doc):
    """Documents made of the enrollment string's own fields: whatever they
    hold, parse_enrollment answers a document (whose URLs to dial are all
    ws:// or wss://) or a ProtocolError, nothing else."""
    body = base64.urlsafe_b64encode(as_json(doc).encode()).decode().rstrip("=")
    parsed = attempt(parse_enrollment, "fleet1:" + body)
    if parsed is not None:
        reencodes(parsed)
        for url in parsed.get("urls", []):
            assert url.startswith(("ws://", "wss://")) and len(url) <= 2048
        assert len(parsed.get("urls", [])) <= 16
