"""Why the servers run on Python's own event loop, not uvloop: a one-line ASGI app under
uvicorn, once per loop, loaded by wrk with N connections that each send their next request
as soon as the last is answered (the coordinator's load test, without the coordinator).

    python benchmarks/event_loops.py --connections 1000 --out docs/results/bench

Writes event_loops.json: per loop, requests a second and latency p50 / p95 / p99 / max
from wrk's histogram (`--latency`).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

APP = """
import sys, uvicorn
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"status":"ok"}'})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop=sys.argv[2], log_level="warning", backlog=4096)
"""
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * UNITS[unit]


def measure(loop: str, connections: int, seconds: float) -> dict:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", APP, str(port), loop])
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "30s", "--latency",
                              f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=seconds + 60).stdout
    finally:
        server.terminate()
        server.wait(10)
    pct = {p: ms(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.M)}
    return {"loop": loop, "requests_per_second": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50_ms": pct["50"], "p90_ms": pct["90"], "p99_ms": pct["99"],
            "max_ms": ms(re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", out).group(1)), "wrk_output": out}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--out", default="runs/event_loops")
    args = p.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk (make setup does, as root)")
    rows = [measure(loop, args.connections, args.seconds) for loop in ("uvloop", "asyncio")]
    for r in rows:
        print(f"{r['loop']}: {r['requests_per_second']:.0f} req/s, p50 {r['p50_ms']:.0f} ms, p90 {r['p90_ms']:.0f}, "
              f"p99 {r['p99_ms']:.0f}, max {r['max_ms']:.0f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "event_loops.json").write_text(json.dumps({"command": "python benchmarks/event_loops.py " +
                                                      " ".join(sys.argv[1:]), "connections": args.connections,
                                                      "seconds": args.seconds, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
