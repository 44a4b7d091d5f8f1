"""Load on the coordinator: N simulated devices at once through enrol, assignment, weights
fetch and update push, on loopback only, bounded in count and time.

    python benchmarks/coordinator_load.py --devices 200 --out runs/coordinator_load

Starts its own coordinator (a fresh run directory with tiny experts), so the figures
are the service's own overhead: request count, errors (should be 0), p50/p95 latency
per request kind, and the time of the aggregation the last update triggers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from safetensors.numpy import load, save

SECRET = "load-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_run(path: Path, width: int) -> None:
    from trainer.run import RunConfig
    from trainer.simulation import Federation, open_run
    cfg = RunConfig(dataset="synthetic:1,28,28:fashion-mnist:200", clients=4, clients_per_round=2, expert_width=width)
    _, prep = open_run(path, cfg, resume=False)
    Federation(path, "hmoe", cfg, prep)


async def device(client: httpx.AsyncClient, i: int, lat: dict[str, list[float]], errors: list[str]) -> None:
    async def call(kind: str, method: str, url: str, **kw) -> httpx.Response | None:
        t = time.perf_counter()
        try:
            r = await client.request(method, url, **kw)
        except httpx.HTTPError as exc:
            errors.append(f"{kind}: {exc!r}")
            return None
        lat.setdefault(kind, []).append((time.perf_counter() - t) * 1000)
        if r.status_code != 200:
            errors.append(f"{kind}: HTTP {r.status_code} {r.text[:200]}")
            return None
        return r

    r = await call("enroll", "POST", "/enroll", json={"secret": SECRET, "name": f"sim-{i}"})
    if r is None:
        return
    auth = {"Authorization": f"Bearer {r.json()['token']}"}
    r = await call("assignment", "GET", "/assignment", headers=auth)
    if r is None:
        return
    a = r.json()
    r = await call("weights", "GET", f"/weights/{a['expert']}", headers=auth)
    if r is None:
        return
    w = load(r.content)
    rng = np.random.default_rng(i)
    new = {k: (v + rng.normal(0, 0.01, v.shape)).astype(v.dtype) for k, v in w.items()}
    await call("update", "POST", "/update", content=save(new), headers={
        **auth, "X-Round": str(a["round"]), "X-Expert": a["expert"], "X-Base-Version": str(a["weights_version"]),
        "X-Samples": str(10 + i), "X-Idempotency-Key": f"sim-{i}-{a['round']}", "X-Metrics": "{}"})


async def drive(url: str, n: int, limit_s: float) -> tuple[dict, list[str], float]:
    lat: dict[str, list[float]] = {}
    errors: list[str] = []
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        t = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(device(client, i, lat, errors) for i in range(n))), limit_s)
        return lat, errors, time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--width", type=int, default=8, help="expert width of the run the coordinator serves")
    p.add_argument("--limit-seconds", type=float, default=300)
    p.add_argument("--out", default="runs/coordinator_load")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hmoe-load-") as tmp:
        run = Path(tmp) / "run"
        make_run(run, args.width)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([str(Path(sys.executable).parent / "hmoe"), "coordinator", "--run", str(run),
                                   "--db", str(Path(tmp) / "state.sqlite"), "--port", str(port), "--secret", SECRET,
                                   "--min-updates", str(args.devices)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            for _ in range(300):
                try:
                    httpx.get(url + "/status", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            lat, errors, wall = asyncio.run(drive(url, args.devices, args.limit_seconds))
            status = httpx.get(url + "/status").json()
        finally:
            server.terminate()
            server.wait(10)
    result = {
        "devices": args.devices, "requests": sum(len(v) for v in lat.values()) + len(errors),
        "errors": len(errors), "error_samples": errors[:5], "wall_seconds": wall,
        "latency_ms": {k: {"p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)), "count": len(v)}
                       for k, v in lat.items()},
        "aggregation": status.get("last_aggregation"), "rounds_aggregated": status["rounds_aggregated"],
        "updates_total": status["updates_total"],
    }
    (out / "coordinator_load.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0 if not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
