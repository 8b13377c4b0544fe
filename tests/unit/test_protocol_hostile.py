"""The decoders against hostile text: deep nesting, lone surrogates, integers
beyond 64 bits. Each is a ProtocolError (an error reply), never a crash."""

from __future__ import annotations

import json
import time

import pytest

from fleet.common import protocol
from fleet.common.protocol import (
    MAX_DEPTH,
    MAX_SEQ,
    Field,
    ProtocolError,
    check_fields,
    decode,
    decode_request,
    format_enrollment,
    parse_enrollment,
)


def request(params, id=1):
    return json.dumps({"id": id, "method": "hosts.list", "params": params})


def heartbeat(**top):
    frame = {"v": 1, "type": "heartbeat", "id": "f1", "data": {"sent_at": "2024-01-01T00:00:00Z"}}
    frame.update(top)
    return json.dumps(frame)


def nested(depth: int, open_: str = "[", close: str = "]") -> str:
    return open_ * depth + close * depth


@pytest.mark.parametrize("depth", [33, 1000, 100_000])
def test_deep_nesting_is_refused_before_parsing(depth):
    for raw in (request(None).replace("null", nested(depth)), nested(depth)):
        with pytest.raises(ProtocolError, match="nested deeper than 32"):
            decode_request(raw)
        with pytest.raises(ProtocolError, match="nested deeper than 32"):
            decode(raw, expect="agent")


def test_nesting_of_objects_and_arrays_mixed():
    inner = '{"a":' * 10 + "[" * 10 + "1" + "]" * 10 + "}" * 10
    ok = request({}).replace("{}", '{"x":' + inner + "}")  # 22 levels with params, id's object
    assert decode_request(ok).params["x"]["a"]
    deep = '{"a":[' * 17 + "1" + "]}" * 17
    with pytest.raises(ProtocolError, match="nested deeper"):
        decode_request(request({}).replace("{}", '{"x":' + deep + "}"))


def test_depth_bound_is_exact():
    # the envelope is one level; params a second
    assert decode_request(request({}).replace("{}", '{"x":' + nested(MAX_DEPTH - 2) + "}"))
    with pytest.raises(ProtocolError, match="nested deeper"):
        decode_request(request({}).replace("{}", '{"x":' + nested(MAX_DEPTH - 1) + "}"))


def test_brackets_inside_strings_do_not_count():
    text = "[" * 500 + '\\"' + "{" * 500
    req = decode_request(json.dumps({"id": 1, "method": "m", "params": {"a": text, "b": "[" * 90}}))
    assert req.params["a"] == text


def test_many_shallow_brackets_are_fine_and_fast():
    report = {
        "v": 1,
        "type": "snapshots.report",
        "seq": 1,
        "data": {
            "snapshots": [
                {"id": "a" * 64, "short_id": "a", "time": "t", "hostname": "h", "paths": ["/"]}
                for _ in range(500)
            ]
        },
    }
    raw = json.dumps(report)
    start = time.perf_counter()
    for _ in range(20):
        assert len(decode(raw, expect="agent").data["snapshots"]) == 500
    assert (time.perf_counter() - start) / 20 < 0.05


def test_hostile_deep_frame_is_refused_quickly():
    raw = nested(500_000)
    start = time.perf_counter()
    with pytest.raises(ProtocolError):
        decode(raw, limit=2 << 20)
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(
    "where",
    ["id", "method", "param", "key", "nested", "upper"],
)
def test_lone_surrogates_are_refused_in_requests(where):
    raw = {
        "id": '{"id":"a\\ud800","method":"m"}',
        "method": '{"id":1,"method":"m\\udfff"}',
        "param": '{"id":1,"method":"m","params":{"token":"x\\ud800y"}}',
        "key": '{"id":1,"method":"m","params":{"\\udc00":1}}',
        "nested": '{"id":1,"method":"m","params":{"a":[{"b":["\\ud9ff"]}]}}',
        "upper": '{"id":1,"method":"m","params":{"a":"\\uDBFF"}}',
    }[where]
    with pytest.raises(ProtocolError, match="surrogate") as info:
        decode_request(raw)
    assert info.value.re in (None, 1)


@pytest.mark.parametrize("field", ["id", "hostname", "payload"])
def test_lone_surrogates_are_refused_in_agent_frames(field):
    if field == "id":
        raw = heartbeat(id="\ud800")
    elif field == "hostname":
        raw = json.dumps({"v": 1, "type": "enroll", "data": {"token": "t", "hostname": "\udc80"}})
    else:
        data = {"job_id": 1, "seq": 1, "ts": "t", "stream": "stdout", "payload": "x\ud800"}
        raw = json.dumps({"v": 1, "type": "job.log", "seq": 3, "id": "f9", "data": data})
    with pytest.raises(ProtocolError, match="surrogate") as info:
        decode(raw, expect="agent")
    assert info.value.re in (None, "f9")
    error = protocol.error_frame(info.value.code, str(info.value), info.value.re)
    error.encode("utf-8")  # the reply itself can be sent


def test_surrogate_pairs_are_characters_and_accepted():
    req = decode_request('{"id":1,"method":"m","params":{"a":"\\ud83d\\ude00"}}')
    assert req.params["a"] == "\U0001f600"


def test_literal_surrogate_in_text_is_refused():
    with pytest.raises(ProtocolError, match="surrogate"):
        decode_request('{"id":1,"method":"m","params":{"a":"\ud800"}}')


@pytest.mark.parametrize("seq", [2**63, 2**64, 10**30, MAX_SEQ + 1])
def test_huge_seq_is_refused(seq):
    with pytest.raises(ProtocolError, match="seq|range"):
        decode(heartbeat(seq=seq), expect="agent")


@pytest.mark.parametrize("req_id", [-1, -(2**63), 2**63, 10**40])
def test_request_ids_out_of_range_are_refused(req_id):
    with pytest.raises(ProtocolError, match="id|range") as info:
        decode_request(json.dumps({"id": req_id, "method": "m"}))
    assert info.value.re is None


def test_huge_ints_anywhere_are_refused():
    for value in ("9223372036854775808", "-9223372036854775808", "1" + "0" * 4000, "1e400"):
        with pytest.raises(ProtocolError):
            decode_request('{"id":1,"method":"m","params":{"retention":{"keep":' + value + "}}}")
    assert decode_request('{"id":1,"method":"m","params":{"a":9223372036854775807}}')
    assert decode_request('{"id":1,"method":"m","params":{"a":1e-400}}')


def test_field_maximum():
    fields = (Field("n", "int", minimum=0, maximum=10),)
    assert check_fields({"n": 10}, fields) == {"n": 10}
    with pytest.raises(ProtocolError, match="at most 10"):
        check_fields({"n": 11}, fields)
    with pytest.raises(ProtocolError, match="out of range"):
        check_fields({"n": 2**63}, (Field("n", "int"),))


def test_hello_ints_are_bounded():
    hello = {
        "protocol_version": 1,
        "agent_version": "1",
        "restic_version": "0.16",
        "hostname": "h",
        "os": "linux",
        "arch": "amd64",
        "spool_seq": MAX_SEQ + 1,
    }
    with pytest.raises(ProtocolError, match="spool_seq: must be at most"):
        decode(json.dumps({"v": 1, "type": "hello", "data": hello}), expect="agent")
    hello.update(spool_seq=0, protocol_version=2**40)
    with pytest.raises(ProtocolError, match="protocol_version: must be at most"):
        decode(json.dumps({"v": 1, "type": "hello", "data": hello}), expect="agent")


def test_enrollment_strings_are_checked_too():
    good = format_enrollment("ws://h:1", "tok")
    assert parse_enrollment(good)["token"] == "tok"
    import base64

    for body in (b"[" * 1000 + b"]" * 1000, b'{"url":"\\ud800","token":"t"}', b"\xff\xfe"):
        bad = "fleet1:" + base64.urlsafe_b64encode(body).decode()
        with pytest.raises(ProtocolError, match="damaged"):
            parse_enrollment(bad)
    # the replicas' URLs: bounded in number, size and scheme, whatever the string says
    for urls, message in (
        (["ws://a"] * 10_000, "damaged"),  # larger than an enrollment document may be
        ([f"ws://h{i}" for i in range(17)], "more than 16 items"),
        (["ws://" + "a" * 5000], "longer than 2048"),
        (["file:///etc/passwd"], "not a ws:// or wss:// URL"),
        (["ws://a", {"url": "ws://b"}], "expected a string"),
        (["ws://\ud800"], "damaged"),
    ):
        body = json.dumps({"url": "ws://a", "token": "t", "urls": urls}).encode()
        bad = "fleet1:" + base64.urlsafe_b64encode(body).decode()
        with pytest.raises(ProtocolError, match=message):
            parse_enrollment(bad)
