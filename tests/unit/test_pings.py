"""The ping helpers of fleet.server.notify: Healthchecks' URL convention,
what of a URL may be shown, and one ping against a real local HTTP server
(success, an HTTP error, a closed port), never naming the URL in an error."""

from __future__ import annotations

import http.server
import socket
import threading

import pytest

from fleet.server import notify


def test_ping_url_appends_the_phase_before_the_query():
    url = "https://hc-ping.com/5f0c/backup-web?create=1"
    assert notify.ping_url(url, "success") == url
    assert notify.ping_url(url, "start") == "https://hc-ping.com/5f0c/backup-web/start?create=1"
    assert notify.ping_url("https://hc-ping.com/5f0c/", "fail") == "https://hc-ping.com/5f0c/fail"


def test_ping_shown_keeps_scheme_host_and_port_only():
    assert notify.ping_shown("https://user:pw@hc.example:8443/key?x=1") == (
        "https://hc.example:8443/********"
    )
    assert notify.ping_shown("http://hc-ping.com/uuid") == "http://hc-ping.com/********"


@pytest.mark.parametrize(
    ("status", "phase"),
    [
        ("succeeded", "success"),
        ("warning", "success"),
        ("failed", "fail"),
        ("lost", "fail"),
        ("cancelled", "fail"),
    ],
)
def test_a_backup_without_a_snapshot_pings_fail(status, phase):
    assert notify.phase_of(status) == phase


@pytest.fixture
def server():
    got = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"])).decode()
            got.append((self.path, body, self.headers["User-Agent"]))
            self.send_response(404 if "missing" in self.path else 200)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", got
    httpd.shutdown()


def test_a_ping_posts_its_body(server):
    base, got = server
    assert notify.ping(f"{base}/key-123/start", "backup of a/b started") is None
    ((path, body, agent),) = got
    assert (path, body) == ("/key-123/start", "backup of a/b started")
    assert agent.startswith("fleetd/")


def test_a_ping_refused_says_why_without_the_url(server):
    base, _ = server
    error = notify.ping(f"{base}/missing-key-123", "x")
    assert error == "the ping URL answered HTTP 404"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # bound, never listening: refused
        error = notify.ping(f"http://127.0.0.1:{closed}/key-123", "x")
    assert error.startswith("the ping URL is out of reach") and "key-123" not in error
