"""A bounded wire fuzzer against a real fleetd (runs in CI: a few hundred
frames, a fixed seed, well under 30 s).

Mutated and garbage frames (deep nesting, lone surrogates, huge integers,
wrong types, binary frames, oversized and truncated frames) go to /ctl,
/login, /enroll and /agent. Each must get an error reply or a clean close
(1000, 1008, 1009 or 4000-4999; never 1011 nor a dropped socket); fleetd
must then still answer a normal request, and its log hold no traceback.
"""

from __future__ import annotations

import json
import random
import time

from websockets.exceptions import ConnectionClosed

from fleet.common import protocol

SEED = 20240501
PER_ENDPOINT = 150
CLEAN_CLOSES = {1000, 1008, 1009}


def clean(code) -> bool:
    return code in CLEAN_CLOSES or (code is not None and 4000 <= code <= 4999)


HELLO = {
    "v": 1,
    "type": "hello",
    "id": "h1",
    "data": {
        "protocol_version": 1,
        "agent_version": "9.9.9-fuzz",
        "restic_version": "0.17.3",
        "hostname": "fuzz-box",
        "os": "linux",
        "arch": "x86_64",
    },
}
AGENT_FRAMES = [
    {"v": 1, "type": "heartbeat", "data": {"sent_at": "2024-05-01T00:00:00Z"}},
    {
        "v": 1,
        "type": "job.log",
        "id": "l",
        "seq": 1,
        "data": {"job_id": 1, "seq": 1, "ts": "t", "stream": "stdout", "payload": "x"},
    },
    {"v": 1, "type": "repo.locks", "id": "r", "seq": 1, "data": {"count": 0}},
    {"v": 1, "type": "command.result", "data": {"job_id": 1, "accepted": False, "error": "no"}},
    {"v": 1, "type": "job.progress", "data": {"job_id": 1, "percent_done": 0.5}},
    HELLO,
]
CTL_FRAMES = [
    {"id": 1, "method": "hosts.list", "params": {}},
    {"id": 2, "method": "jobs.show", "params": {"id": 1}},
    {"id": "s", "method": "jobs.list", "params": {"limit": 5, "status": "failed"}},
    {"id": 4, "method": "hosts.show", "params": {"host": "nope"}},
]
# never a well-formed password: fuzzing must not spend argon2 runs
LOGIN_FRAMES = [{"id": 1, "method": "auth.login", "params": {"user": "x", "password": 5}}]
ENROLL_FRAMES = [{"v": 1, "type": "enroll", "id": "e", "data": {"token": 7, "hostname": "h"}}]

ODD_VALUES = [
    None,
    True,
    -1,
    0,
    2**63,
    -(2**63),
    2**64 + 1,
    1.5,
    "",
    "\ud800",
    "a\udfffb",
    "\x00",
    "x" * 5000,
    [],
    {},
    [[[[]]]],
    {"\udc00": 1},
]


def deep(n: int) -> str:
    return "[" * n + "]" * n


def mutate(rng: random.Random, base: dict, oversize: int) -> str | bytes:
    """One hostile frame derived from `base`."""
    choice = rng.randrange(13)
    frame = json.loads(json.dumps(base))
    if choice == 0:
        return deep(rng.choice([33, 200, 1000, 5000]))
    if choice == 1:  # a value replaced by something odd
        target = frame.get("data", frame.get("params"))
        if isinstance(target, dict) and target and rng.random() < 0.7:
            target[rng.choice(sorted(target))] = rng.choice(ODD_VALUES)
        else:
            frame[rng.choice(sorted(frame))] = rng.choice(ODD_VALUES)
        return json.dumps(frame)  # ensure_ascii: surrogates travel as \ud800 escapes
    if choice == 2:  # truncated
        text = json.dumps(frame)
        return text[: rng.randrange(len(text))]
    if choice == 3:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    if choice == 4:  # an oversized frame: an error reply or close 1009
        return '{"pad": "' + "x" * oversize + '"}'
    if choice == 5:  # a huge integer at the top level
        frame[rng.choice(["id", "seq", "v"])] = rng.choice([2**63, 10**30, -(2**63), -5])
        return json.dumps(frame)
    if choice == 6:
        return rng.choice(["", "null", "[]", "1", '"x"', "{}", "NaN", "Infinity", "1e400", "{" * 3])
    if choice == 7:  # deep nesting inside a field
        key = "data" if "data" in frame else "params"
        return json.dumps(frame).replace(json.dumps(frame[key]), '{"x": ' + deep(40) + "}", 1)
    if choice == 8:  # a 5000-digit number
        return json.dumps(frame).replace("1", "1" + "7" * 5000, 1)
    if choice == 9:  # random bytes flipped in the text
        chars = list(json.dumps(frame))
        for _ in range(rng.randrange(1, 4)):
            chars[rng.randrange(len(chars))] = chr(rng.randrange(32, 127))
        return "".join(chars)
    if choice == 10:  # wrong envelope types
        frame[rng.choice(["type", "method", "data", "params"])] = rng.choice(ODD_VALUES)
        return json.dumps(frame)
    if choice == 11:  # a surrogate escape spliced into any string
        text = json.dumps(frame)
        quote = [i for i, c in enumerate(text) if c == '"']
        at = rng.choice(quote) + 1
        return text[:at] + rng.choice(["\\ud800", "\\uDFFF", "\\udc80x"]) + text[at:]
    return json.dumps(frame)  # unchanged: a valid frame


def test_wire_fuzz(fleetd_factory, fx):
    fleet = fleetd_factory()
    host = fx.uniq("fuzz")
    enrollment = fleet.ctl_json("enroll", host)["enrollment"]
    token = protocol.parse_enrollment(enrollment)["token"]
    with fx.ws_connect(fleet.url, "/enroll") as ws:
        ws.send(json.dumps({"v": 1, "type": "enroll", "data": {"token": token, "hostname": "h"}}))
        agent_token = json.loads(ws.recv(timeout=10))["data"]["agent_token"]

    rng = random.Random(SEED)
    started = time.monotonic()
    outcomes: dict[str, dict[str, int]] = {}

    def run(path, bases, probe, oversize, connect, after_connect=None):
        """Send fuzz frames on `path`; after each, a probe frame whose error
        reply shows fleetd is done with it (or a close, whose code counts).
        Without a probe (/enroll) fleetd answers once and must then close."""
        stats = outcomes.setdefault(path, {"replies": 0, "closes": 0})
        ws = None
        for n in range(PER_ENDPOINT):
            if ws is None:
                ws = connect().__enter__()  # closed below, or by fleetd
                if after_connect:
                    after_connect(ws)
            frame = mutate(rng, rng.choice(bases), oversize)
            probe_id = f"probe-{n}"
            answered = False
            try:
                ws.send(frame)
                if probe is not None:
                    ws.send(probe(probe_id))
                while True:
                    reply = json.loads(ws.recv(timeout=15))
                    assert isinstance(reply, dict), reply
                    if probe is None:
                        break
                    re = reply.get("id", (reply.get("data") or {}).get("re"))
                    if re == probe_id:
                        break
                stats["replies"] += 1
                answered = True
                if probe is None:
                    while True:
                        ws.recv(timeout=15)
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
                assert clean(code), f"{path}: frame {frame[:200]!r} -> close {code}"
                stats["closes"] += 0 if answered else 1
                ws = None
        if ws is not None:
            ws.close()

    ctl_probe = lambda i: json.dumps({"id": i, "method": "no.such"})  # noqa: E731
    agent_probe = lambda i: json.dumps({"v": 1, "type": "no.such", "id": i, "data": {}})  # noqa: E731
    run(
        "/ctl",
        CTL_FRAMES,
        ctl_probe,
        (1 << 20) + 100,
        lambda: fx.ws_connect(fleet.url, "/ctl", fleet.admin_token, max_size=None),
    )
    run("/login", LOGIN_FRAMES, ctl_probe, 70_000, lambda: fx.ws_connect(fleet.url, "/login"))
    run("/enroll", ENROLL_FRAMES, None, 70_000, lambda: fx.ws_connect(fleet.url, "/enroll"))

    def say_hello(ws):
        ws.send(json.dumps(HELLO))
        while json.loads(ws.recv(timeout=10))["type"] != "welcome":
            pass

    run(
        "/agent",
        AGENT_FRAMES,
        agent_probe,
        rng.choice([(1 << 20) + 100, 5 << 20]),
        lambda: fx.ws_connect(fleet.url, "/agent", agent_token, max_size=None),
        say_hello,
    )
    # a few frames as the first one on /agent, instead of hello
    for _ in range(10):
        with fx.ws_connect(fleet.url, "/agent", agent_token) as ws:
            ws.send(mutate(rng, rng.choice(AGENT_FRAMES[:-1]), 100))
            try:
                while True:
                    ws.recv(timeout=15)
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
                assert clean(code), code

    took = time.monotonic() - started
    print(f"wire fuzz: {outcomes} in {took:.1f} s")
    assert sum(s["replies"] + s["closes"] for s in outcomes.values()) == 4 * PER_ENDPOINT
    assert took < 30
    assert isinstance(fleet.rpc("hosts.list"), list)
    assert fx.api_login(fleet.url, "admin", fx.ADMIN_PASSWORD)["token"]
    log = fleet.fleetd.log()
    assert "Traceback" not in log, log
    assert " 1011" not in log
