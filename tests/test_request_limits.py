"""Small requests, large costs: both servers bound a request's head (size and time), the
coordinator a body's arrival time, integers are checked before arithmetic, a malformed
multipart body is a 4xx, and what needs which token is as documented (issue 25)."""

from __future__ import annotations

import socket
import time

import httpx
import psutil
import pytest

from hierarchy.serving import bounded_protocol
from tests.support import ALL, SECRET, Server, enrol, make_run, png, serve_in_thread, start_serve

OPERATOR = "op-token"


def raw(url: str, data: bytes, read_after: float = 5.0, chunk: int = 65536) -> bytes:
    """Send ``data`` on a raw connection (as far as the server lets it), then read the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=read_after) as s:
        try:
            for i in range(0, len(data), chunk):
                s.sendall(data[i:i + chunk])
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = b""
        try:
            while True:
                got = s.recv(65536)
                if not got:
                    break
                out += got
        except (ConnectionResetError, socket.timeout):
            pass
        return out


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    from trainer.transports.coordinator.http import create_app
    from trainer.transports.coordinator.service import Coordinator
    tmp = tmp_path_factory.mktemp("limits")
    run = make_run(tmp / "run", ALL)
    coord = Coordinator(run, tmp / "db.sqlite", SECRET, min_devices=1)
    url, server, thread = serve_in_thread(create_app(coord, operator_token=OPERATOR, body_seconds=1.0),
                                          http=bounded_protocol(max_head=16 * 1024, head_seconds=1.0))
    yield url
    server.should_exit = True
    thread.join(10)
    coord.close()


def test_a_huge_header_is_431_and_others_are_served_meanwhile(coordinator):
    t = time.monotonic()
    answer = raw(coordinator, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (8 << 20) + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
    assert time.monotonic() - t < 5
    assert httpx.get(coordinator + "/health", timeout=2).status_code == 200


def test_a_head_that_trickles_is_408(coordinator):
    host, port = coordinator.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        t = time.monotonic()
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert 0.9 < time.monotonic() - t < 4


def test_a_body_that_never_arrives_is_408(coordinator):
    t = time.monotonic()
    answer = raw(coordinator, b"POST /enroll HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Content-Length: 100\r\n\r\n{")
    assert b" 408 " in answer.split(b"\r\n")[0] and b"did not arrive" in answer, answer[:300]
    assert time.monotonic() - t < 5


def test_integers_are_bounded_before_arithmetic(coordinator):
    auth = enrol(coordinator)
    huge = ",".join(["18446744073709551616"] + ["1"] * 9)
    r = httpx.get(coordinator + "/assignment", params={"counts": huge}, headers=auth)
    assert r.status_code == 422, r.text
    r = httpx.post(coordinator + "/decline", params={"round": 2**70}, headers=auth)
    assert r.status_code == 422, r.text
    r = httpx.post(coordinator + "/update", content=b"x", headers={**auth, "X-Round": str(2**64), "X-Expert": "root",
                                                                      "X-Base-Version": "0", "X-Samples": "1",
                                                                      "X-Idempotency-Key": "k",
                                                                      "X-Hyperparameters": "{}"})
    assert r.status_code == 422 and "X-Round" in r.json()["detail"], r.text


def test_who_needs_which_token(coordinator):
    device = enrol(coordinator)
    operator = {"Authorization": f"Bearer {OPERATOR}"}
    assert httpx.get(coordinator + "/health").json() == {"status": "ok"}
    for path in ("/status", "/openapi.json", "/docs"):
        assert httpx.get(coordinator + path).status_code == 401, path
        assert httpx.get(coordinator + path, headers=device).status_code == 403, path
        assert httpx.get(coordinator + path, headers=operator).status_code == 200, path
    assert httpx.get(coordinator + "/manifest").status_code == 401
    assert httpx.get(coordinator + "/manifest", headers=device).status_code == 200


def test_the_command_line_servers_bound_heads_too(tmp_path, bundle_dir):
    """The coordinator and `hmoe-edge serve` as started from the command line: a 64 MB header is
    refused at once and leaves the server's memory as it was; /health answers meanwhile."""
    server = Server(make_run(tmp_path / "run", ALL), tmp_path / "db.sqlite")
    proc, edge = start_serve(bundle_dir)
    try:
        for url, pid in ((server.url, server.proc.pid), (edge, proc.pid)):
            rss = psutil.Process(pid).memory_info().rss
            answer = raw(url, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (64 << 20) + b"\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
            assert httpx.get(url + "/health", timeout=2).status_code == 200
            assert psutil.Process(pid).memory_info().rss - rss < 20 * 2**20
    finally:
        proc.kill()
        server.stop()


def test_the_edge_app_answers_a_malformed_multipart_body_with_a_4xx(bundle_dir):
    from edge_runtime.app import create_app
    url, server, thread = serve_in_thread(create_app(bundle_dir, token="t"))
    try:
        auth = {"Authorization": "Bearer t"}
        for content_type in ("multipart/form-data; boundary=x", "multipart/form-data", "multipart/form-data; boundary="):
            r = httpx.post(url + "/predict", content=png(), headers={**auth, "Content-Type": content_type})
            assert r.status_code == 400 and "multipart" in r.json()["detail"], (content_type, r.status_code, r.text)
        public = httpx.get(url + "/health").json()
        assert public == {"status": "ok"}   # no path, no contents without the token
        full = httpx.get(url + "/health", headers=auth).json()
        assert full["experts"] > 0 and str(bundle_dir) not in str(full)
    finally:
        server.should_exit = True
        thread.join(10)
