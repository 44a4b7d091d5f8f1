"""Load on the coordinator: N devices at once through enrol, assignment, weights fetch and
update push, on loopback only, each phase started by all devices together.

    python benchmarks/coordinator_load.py --devices 1000 --out runs/coordinator_load

Starts its own coordinator (a fresh run directory with small experts and N clients, all
sampled every round, `--min-devices N`: the devices report their samples before the timed
phases, so the round is planned, and the last update closes it). The load comes from several processes
(`--procs`), each an asyncio loop speaking plain HTTP/1.1 over one kept-alive connection
per device, so the generator costs far less than the server (both CPU times are
reported per phase, read from the kernel). Writes coordinator_load.json: per request
kind the count, errors, p50/p95/max latency, wall time and CPU seconds of server and
generator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SECRET = "load-test"
PHASES = ("enroll", "assignment", "weights", "update")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_run(path: Path, width: int, devices: int) -> None:
    from trainer.prepare import open_run
    from trainer.protocol.run import RunConfig
    from trainer.transports.inprocess import Federation
    cfg = RunConfig(dataset=f"synthetic:1,28,28:fashion-mnist:{2 * devices}", clients=devices,
                    clients_per_round=devices, partition="iid", expert_width=width)
    _, prep = open_run(path, cfg, resume=False)
    Federation(path, "hmoe", cfg, prep)


class Conn:
    """One device's kept-alive HTTP/1.1 connection (a few lines, so the generator stays cheap)."""

    def __init__(self, port: int) -> None:
        self.port, self.reader, self.writer = port, None, None

    async def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                      body: bytes = b"") -> tuple[int, dict[bytes, bytes], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.writer.write(head.encode() + b"\r\n" + body)
        await self.writer.drain()
        status = int((await self.reader.readline()).split()[1])
        found: dict[bytes, bytes] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.partition(b":")
            found[k.strip().lower()] = v.strip()
        return status, found, await self.reader.readexactly(int(found.get(b"content-length", 0)))


def generator(port: int, devices: list[int], leaves: int, barrier, results) -> None:
    """One load process: its share of the devices, phase by phase in step with the others."""
    from safetensors.numpy import load, save
    lat: dict[str, list[float]] = {k: [] for k in PHASES}
    errors: list[str] = []
    sizes: list[int] = []
    cpu: dict[str, float] = {}
    counts = ",".join(["5"] * leaves)

    async def timed(kind: str, conn: Conn, *args, **kw):
        t = time.perf_counter()
        try:
            status, headers, body = await conn.request(*args, **kw)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            errors.append(f"{kind}: {exc!r}")
            return None
        lat[kind].append((time.perf_counter() - t) * 1000)
        if status != 200:
            errors.append(f"{kind}: HTTP {status} {body[:200]!r}")
            return None
        return headers, body

    async def run() -> None:
        conns = [Conn(port) for _ in devices]
        state: list[dict] = [{} for _ in devices]

        async def phase(kind: str, step) -> None:
            await asyncio.to_thread(barrier.wait)     # all devices start together ...
            c0 = time.process_time()
            await asyncio.gather(*(step(i) for i in range(len(devices))))
            cpu[kind] = time.process_time() - c0
            await asyncio.to_thread(barrier.wait)     # ... and the phase ends when the last one is answered

        async def enroll(i: int) -> None:
            body = json.dumps({"secret": SECRET, "name": f"sim-{devices[i]}"}).encode()
            r = await timed("enroll", conns[i], "POST", "/enroll", {"Content-Type": "application/json"}, body)
            if r:
                state[i]["auth"] = {"Authorization": f"Bearer {json.loads(r[1])['token']}"}

        async def assignment(i: int) -> None:
            if "auth" in state[i]:
                r = await timed("assignment", conns[i], "GET", f"/assignment?counts={counts}", state[i]["auth"])
                if r:
                    state[i]["a"] = json.loads(r[1])

        async def weights(i: int) -> None:
            if "a" in state[i]:
                r = await timed("weights", conns[i], "GET", f"/weights/{state[i]['a']['expert']}", state[i]["auth"])
                if r:
                    state[i]["weights"] = r[1]

        def train(i: int) -> None:   # between phases, not timed: a device's local training stands in here
            if "weights" in state[i]:
                rng = np.random.default_rng(devices[i])
                state[i]["body"] = save({k: (v + rng.normal(0, 0.01, v.shape)).astype(v.dtype)
                                         for k, v in load(state[i].pop("weights")).items()})
                sizes.append(len(state[i]["body"]))

        async def update(i: int) -> None:
            if "body" in state[i]:
                a = state[i]["a"]
                await timed("update", conns[i], "POST", "/update", {
                    **state[i]["auth"], "X-Round": str(a["round"]), "X-Expert": a["expert"],
                    "X-Base-Version": str(a["weights_version"]), "X-Samples": str(a["samples"]),
                    "X-Client-Samples": str(5 * leaves), "X-Hyperparameters": json.dumps(a["hyperparameters"]),
                    "X-Idempotency-Key": f"sim-{devices[i]}-{a['round']}", "X-Metrics": "{}"}, state[i]["body"])

        async def report(i: int) -> None:   # not timed: the round is planned once every device reported
            if "auth" in state[i]:
                await conns[i].request("GET", f"/assignment?counts={counts}", state[i]["auth"])

        for kind, step in zip(PHASES, (enroll, assignment, weights, update)):
            if kind == "assignment":
                await asyncio.to_thread(barrier.wait)
                await asyncio.gather(*(report(i) for i in range(len(devices))))
                await asyncio.to_thread(barrier.wait)
            if kind == "update":
                for i in range(len(devices)):
                    train(i)
            await phase(kind, step)
        for c in conns:
            if c.writer is not None:
                c.writer.close()

    asyncio.run(run())
    results.put({"lat": lat, "errors": errors, "cpu": cpu, "update_bytes": sizes[0] if sizes else None})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--procs", type=int, default=2, help="load-generating processes")
    p.add_argument("--width", type=int, default=8, help="expert width of the run the coordinator serves")
    p.add_argument("--repeat", type=int, default=3, help="whole runs, each against a fresh coordinator")
    p.add_argument("--limit-seconds", type=float, default=600)
    p.add_argument("--out", default="runs/coordinator_load")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [one_run(args) for _ in range(args.repeat)]
    kinds = [k for k in PHASES if all(k in r["latency_ms"] for r in runs)]
    result = {"command": "python benchmarks/coordinator_load.py " + " ".join(sys.argv[1:]), "devices": args.devices, "expert_width": args.width, "load_processes": args.procs,
              "update_bytes": runs[0]["update_bytes"], "cpu_cores": os.cpu_count(),
              "errors": sum(r["errors"] for r in runs),
              "p95_ms_median_of_runs": {k: float(np.median([r["latency_ms"][k]["p95"] for r in runs])) for k in kinds},
              "p95_ms_worst_run": {k: max(r["latency_ms"][k]["p95"] for r in runs) for k in kinds},
              "runs": runs}
    (out / "coordinator_load.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    for i, r in enumerate(runs):
        print(f"run {i}: " + ", ".join(f"{k} p95 {v['p95']:.0f} ms" for k, v in r["latency_ms"].items()) +
              "; CPU s server/generator: " + ", ".join(f"{k} {v['server_cpu_seconds']:.2f}/{v['generator_cpu_seconds']:.2f}"
                                                        for k, v in r["phases"].items()))
    return 0 if not result["errors"] else 1


def one_run(args: argparse.Namespace) -> dict:
    """A fresh coordinator, then every phase with all devices; the figures of that run."""
    import psutil

    from hierarchy import load_taxonomy
    leaves = load_taxonomy("fashion-mnist").num_leaves
    with tempfile.TemporaryDirectory(prefix="hmoe-load-") as tmp:
        run = Path(tmp) / "run"
        make_run(run, args.width, args.devices)
        port = free_port()
        server = subprocess.Popen([str(Path(sys.executable).parent / "hmoe"), "coordinator", "--run", str(run),
                                   "--db", str(Path(tmp) / "state.sqlite"), "--port", str(port), "--secret", SECRET,
                                   "--min-devices", str(args.devices)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            import httpx
            for _ in range(300):
                try:
                    httpx.get(f"http://127.0.0.1:{port}/status", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            proc = psutil.Process(server.pid)
            idle_rss = proc.memory_info().rss
            torch_loaded = any("libtorch" in m.path for m in proc.memory_maps())
            barrier = mp.Barrier(args.procs + 1)
            results = mp.Queue()
            shares = np.array_split(np.arange(args.devices), args.procs)
            workers = [mp.Process(target=generator, args=(port, s.tolist(), leaves, barrier, results))
                       for s in shares]
            for w in workers:
                w.start()
            t_end = time.time() + args.limit_seconds

            def mark() -> tuple[float, float]:
                return time.perf_counter(), sum(proc.cpu_times()[:2])

            marks = []
            for kind in PHASES:   # a phase runs between two barriers that every generator reaches
                if kind == "assignment":   # the untimed pass in which the devices report their samples
                    barrier.wait(timeout=max(1.0, t_end - time.time()))
                    barrier.wait(timeout=max(1.0, t_end - time.time()))
                barrier.wait(timeout=max(1.0, t_end - time.time()))
                start = mark()
                barrier.wait(timeout=max(1.0, t_end - time.time()))
                marks.append((start, mark()))
            parts = [results.get(timeout=max(1.0, t_end - time.time())) for _ in workers]
            for w in workers:
                w.join(10)
            status = httpx.get(f"http://127.0.0.1:{port}/status").json()
        finally:
            server.terminate()
            server.wait(10)
    lat = {k: [v for part in parts for v in part["lat"][k]] for k in PHASES}
    errors = [e for part in parts for e in part["errors"]]
    return {
        "requests": sum(map(len, lat.values())) + len(errors), "update_bytes": parts[0].get("update_bytes"),
        "errors": len(errors), "error_samples": errors[:5],
        "latency_ms": {k: {"count": len(v), "p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)),
                           "max": float(np.max(v))} for k, v in lat.items() if v},
        "phases": {k: {"wall_seconds": end[0] - start[0], "server_cpu_seconds": end[1] - start[1],
                       "generator_cpu_seconds": sum(part["cpu"].get(k, 0.0) for part in parts)}
                   for k, (start, end) in zip(PHASES, marks)},
        "server_idle_rss_mb": idle_rss / 2**20, "server_loaded_torch": torch_loaded,
        "aggregation": status.get("last_aggregation"), "rounds_aggregated": status["rounds_aggregated"],
        "updates_total": status["updates_total"],
    }


if __name__ == "__main__":
    raise SystemExit(main())
