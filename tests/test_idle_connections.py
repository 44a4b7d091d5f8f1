"""Silent sockets cannot block a server (issue 37, finding 3): under systemd's usual limit of
1,024 open files, 1,100 TCP connections that send nothing leave /health answering on both
servers; a connection that sends no byte is closed after a few seconds."""

from __future__ import annotations

import resource
import socket
import subprocess
import time

import httpx
import pytest

from hierarchy.serving import IDLE_SECONDS, SPARE_FILES, connection_limit
from tests.support import ALL, BIN, SECRET, edge_exe, free_port, make_run, wait_for_http

FILES = 1024
SILENT = 1100


def limited(files: int = FILES):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))
    return apply


def open_silent(port: int, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            s.close()
            continue
        out.append(s)
    return out


def health_within(url: str, seconds: float = 1.0) -> float:
    t = time.perf_counter()
    r = httpx.get(url + "/health", timeout=seconds)
    assert r.status_code == 200, r.text
    return time.perf_counter() - t


@pytest.fixture
def many_files():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < SILENT + 200:
        pytest.skip(f"this process may open at most {hard} files; the test holds {SILENT} sockets")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 8192, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def check_server(cmd: list[str], port: int) -> None:
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(cmd + ["--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=limited())
    socks: list[socket.socket] = []
    try:
        wait_for_http(url + "/health", proc)
        socks = open_silent(port, SILENT)
        assert len(socks) >= FILES   # more than the server can hold open at once
        time.sleep(1.0)   # the server takes the last of the burst off its listen queue; then, while they are held:
        times = [health_within(url, 5.0) for _ in range(5)]
        assert max(times) < 1.0, times
        time.sleep(IDLE_SECONDS + 1)   # the silent ones it still held are closed by now
        closed = 0
        for s in socks:
            try:
                s.settimeout(0.5)
                closed += s.recv(1) == b""
            except OSError:
                closed += 1
        assert closed == len(socks)
        health_within(url)
        assert proc.poll() is None
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        proc.wait(10)


@pytest.mark.slow
def test_silent_connections_leave_the_coordinator_answering(tmp_path, many_files):
    run = make_run(tmp_path / "run", ALL)
    check_server([str(BIN / "hmoe"), "coordinator", "--run", str(run), "--db", str(tmp_path / "db.sqlite"),
                  "--secret", SECRET], free_port())


@pytest.mark.slow
def test_silent_connections_leave_the_edge_server_answering(bundle_dir, many_files):
    check_server([edge_exe(), "serve", "--bundle", str(bundle_dir)], free_port())


def test_the_file_limit_is_raised_to_the_hard_limit_and_connections_capped_below_it():
    code = ("import resource; from hierarchy.serving import connection_limit; n = connection_limit(); "
            "print(n, *resource.getrlimit(resource.RLIMIT_NOFILE))")
    out = subprocess.run([str(BIN / "python"), "-c", code], capture_output=True, text=True, check=True,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 2048))).stdout.split()
    assert [int(v) for v in out] == [2048 - SPARE_FILES, 2048, 2048]
    assert connection_limit() >= 16


@pytest.mark.slow
def test_many_large_uploads_held_open_cost_a_bounded_memory_given_back(bundle_dir):
    """Issue 37: 70 concurrent 8 MB uploads held open took `serve` from 122 to 640 MB, and it
    stayed there. Now at most --max-uploads bodies arrive at once (the rest: 503 before their
    body is read), and the memory goes back once they are done."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([edge_exe(), "serve", "--bundle", str(bundle_dir), "--port", str(port),
                             "--body-timeout", "20"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def rss_mb() -> float:
        for line in open(f"/proc/{proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    size = 8 * 1024 * 1024
    socks = []
    try:
        wait_for_http(url + "/health", proc)
        before = rss_mb()
        for _ in range(70):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {size}\r\n\r\n"
                      .encode())
            s.sendall(b"\0" * (size - 1024))   # all but the last KB: held open
            socks.append(s)
        time.sleep(1.0)
        refused = 0
        for s in socks:
            s.settimeout(0.2)
            try:
                refused += s.recv(64).startswith(b"HTTP/1.1 503")
            except OSError:
                pass
        held = rss_mb()
        assert refused >= 70 - 8, refused
        assert held - before < 8 * 9 + 60, (before, held)   # 8 bodies of 8 MB at most, and slack
        for s in socks:
            s.close()
        socks = []
        time.sleep(2.0)
        health_within(url)
        assert rss_mb() - before < 40, (before, rss_mb())
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        proc.wait(10)
