"""Load on the coordinator from an established external tool (wrk, Debian's `wrk`), at N
devices at once, on loopback:

    python benchmarks/coordinator_load.py --devices 200 1000 --out docs/results/coordinator_load

For each N: a fresh coordinator (a run with N + 1 clients, all sampled every round,
`--min-devices N + 1`), N + 1 devices enrolled and reporting their samples (untimed set-up,
so the round is planned; device 0 stays silent, so the round stays open while updates
stream in), then three timed phases, each `wrk -c N` (one kept-alive connection per
device, every connection sending its next request as soon as its answer arrives) for
``--seconds``: ``GET /assignment`` (with the device's counts, as `hmoe-edge sync` polls),
``GET /weights/<expert>``, and ``POST /update`` (a real update body; each device's first
is a new update, later sends of the same update are answered as duplicates after the
same checks; the counts of each are reported). A Lua script gives every request its own
device's token. Writes coordinator_load.json: per N and request kind the requests,
non-2xx answers, socket errors, requests a second, and latency p50 / p95 / p99 / max from
wrk's own histogram; the server's CPU seconds and peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

SECRET = "load-test"
OPERATOR = "load-operator"
KINDS = ("assignment", "weights", "update")

LUA = r"""
-- every request carries its own device's token (tokens file: one a line); a device's update
-- body and headers come from the same files. Requests are built once, in init(), so wrk
-- spends no time per request on Lua; only the update phase reads answers (new or duplicate).
local tokens, threads = {}, {}
local kind, path, body, extra = os.getenv("HMOE_KIND"), os.getenv("HMOE_PATH"), nil, {}
for line in io.lines(os.getenv("HMOE_TOKENS")) do tokens[#tokens + 1] = line end
if kind == "update" then
  local f = io.open(os.getenv("HMOE_BODY"), "rb"); body = f:read("*a"); f:close()
  for line in io.lines(os.getenv("HMOE_HEADERS")) do
    local k, v = line:match("^([^:]+): (.*)$"); extra[k] = v
  end
end
function setup(thread)
  thread:set("id", #threads); table.insert(threads, thread)
end
function init(args)
  new, dup, other, reqs, next_req = 0, 0, 0, {}, 1
  -- thread t sends devices t, t + T, t + 2T, ... in turn, from the start again when done
  for i = id + 1, #tokens, tonumber(os.getenv("HMOE_THREADS")) do
    local h = {Authorization = "Bearer " .. tokens[i]}
    if kind == "update" then
      for k, v in pairs(extra) do h[k] = v end
      h["X-Idempotency-Key"] = "load-" .. i
      h["Content-Type"] = "application/octet-stream"
      reqs[#reqs + 1] = wrk.format("POST", "/update", h, body)
    else
      reqs[#reqs + 1] = wrk.format("GET", path, h)
    end
  end
end
function request()
  local r = reqs[next_req]
  next_req = next_req % #reqs + 1
  return r
end
if kind == "update" then
  function response(status, headers, b)
    if status ~= 200 then other = other + 1
    elseif string.find(b, '"duplicate":false', 1, true) then new = new + 1 else dup = dup + 1 end
  end
end
function done(summary, latency, requests)
  local n, d, o = 0, 0, 0
  for _, t in ipairs(threads) do n = n + t:get("new"); d = d + t:get("dup"); o = o + t:get("other") end
  local e = summary.errors
  io.write(string.format('HMOE_JSON {"requests": %d, "seconds": %.3f, "non_2xx": %d, "socket_errors": %d, ' ..
    '"timeouts": %d, "p50_ms": %.3f, "p95_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f, "mean_ms": %.3f, ' ..
    '"new_updates": %d, "duplicate_updates": %d, "non_200": %d}\n',
    summary.requests, summary.duration / 1e6, e.status, e.connect + e.read + e.write, e.timeout,
    latency:percentile(50) / 1e3, latency:percentile(95) / 1e3, latency:percentile(99) / 1e3,
    latency.max / 1e3, latency.mean / 1e3, n, d, o))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_run(path: Path, width: int, clients: int) -> None:
    from trainer.prepare import open_run
    from trainer.protocol.run import RunConfig
    from trainer.transports.inprocess import Federation
    cfg = RunConfig(dataset=f"synthetic:1,28,28:fashion-mnist:{2 * clients}", clients=clients,
                    clients_per_round=clients, partition="iid", expert_width=width)
    _, prep = open_run(path, cfg, resume=False)
    Federation(path, "hmoe", cfg, prep)


def more_files() -> None:
    """Children may hold a descriptor per device connection, and more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 65536), hard), hard))


def prepare(url: str, devices: int, leaves: int, work: Path) -> dict:
    """Enrol devices + 1 and report their samples (device 0 silent afterwards); write the tokens,
    one device's update body and headers for the Lua script."""
    import httpx
    from safetensors.numpy import load, save
    counts = ",".join(["5"] * leaves)

    def one(_: int) -> str:
        with httpx.Client(base_url=url, timeout=60) as c:
            token = c.post("/enroll", json={"secret": SECRET}).raise_for_status().json()["token"]
            c.get("/assignment", params={"counts": counts}, headers={"Authorization": f"Bearer {token}"})
            return token

    with ThreadPoolExecutor(16) as pool:
        tokens = list(pool.map(one, range(devices + 1)))
    auth = {"Authorization": f"Bearer {tokens[1]}"}
    a = httpx.get(url + "/assignment", params={"counts": counts}, headers=auth, timeout=60).json()
    if a.get("wait") or not a.get("samples"):
        raise SystemExit(f"the round was not planned for the load devices: {a}")
    w = load(httpx.get(url + f"/weights/{a['expert']}", headers=auth, timeout=60).content)
    rng = np.random.default_rng(0)
    body = save({k: (v + rng.normal(0, 0.001, v.shape)).astype(v.dtype) for k, v in w.items()})
    (work / "tokens.txt").write_text("\n".join(tokens[1:]) + "\n")
    (work / "update.safetensors").write_bytes(body)
    (work / "headers.txt").write_text("".join(f"{k}: {v}\n" for k, v in {
        "X-Round": a["round"], "X-Expert": a["expert"], "X-Base-Version": a["weights_version"],
        "X-Samples": a["samples"], "X-Client-Samples": 5 * leaves,
        "X-Hyperparameters": json.dumps(a["hyperparameters"]), "X-Metrics": "{}"}.items()))
    return {"expert": a["expert"], "update_bytes": len(body), "counts": counts}


def wrk(url: str, kind: str, path: str, devices: int, seconds: float, threads: int, work: Path) -> dict:
    script = work / "load.lua"
    script.write_text(LUA)
    env = {**os.environ, "HMOE_KIND": kind, "HMOE_PATH": path, "HMOE_TOKENS": str(work / "tokens.txt"), "HMOE_THREADS": str(threads),
           "HMOE_BODY": str(work / "update.safetensors"), "HMOE_HEADERS": str(work / "headers.txt")}
    cmd = ["wrk", "-t", str(threads), "-c", str(devices), "-d", f"{seconds:g}s", "--timeout", "30s", "-s",
           str(script), url]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, preexec_fn=more_files, timeout=seconds + 120)
    line = next((x for x in out.stdout.splitlines() if x.startswith("HMOE_JSON ")), None)
    if line is None:
        raise SystemExit(f"wrk gave no figures ({out.returncode}): {out.stdout[-2000:]} {out.stderr[-2000:]}")
    r = json.loads(line[len("HMOE_JSON "):])
    r["requests_per_second"] = r["requests"] / r["seconds"] if r["seconds"] else None
    r["command"] = " ".join(cmd[:-3] + ["load.lua", "URL"])
    return r


def one_size(args: argparse.Namespace, devices: int) -> dict:
    import httpx
    import psutil

    from hierarchy import load_taxonomy
    leaves = load_taxonomy("fashion-mnist").num_leaves
    with tempfile.TemporaryDirectory(prefix="hmoe-load-") as tmp:
        work = Path(tmp)
        make_run(work / "run", args.width, devices + 1)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "hmoe"), "coordinator", "--run", str(work / "run"), "--db",
             str(work / "state.sqlite"), "--port", str(port), "--secret", SECRET, "--operator-token", OPERATOR,
             "--min-devices", str(devices + 1), "--round-seconds", "3600", "--enrol-burst", str(devices + 10)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=more_files)
        try:
            for _ in range(600):
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            proc = psutil.Process(server.pid)
            facts = prepare(url, devices, leaves, work)
            paths = {"assignment": f"/assignment?counts={facts['counts']}", "weights": f"/weights/{facts['expert']}",
                     "update": "/update"}
            out = {"devices": devices, "update_bytes": facts["update_bytes"], "kinds": {}}
            for kind in KINDS:
                cpu0 = sum(proc.cpu_times()[:2])
                r = wrk(url, kind, paths[kind], devices, args.seconds, args.threads, work)
                r["server_cpu_seconds"] = sum(proc.cpu_times()[:2]) - cpu0
                out["kinds"][kind] = r
                print(f"{devices} devices, {kind}: {r['requests']} requests, p50 {r['p50_ms']:.1f} ms, "
                      f"p95 {r['p95_ms']:.1f}, p99 {r['p99_ms']:.1f}, max {r['max_ms']:.0f}; non-2xx {r['non_2xx']}, "
                      f"socket errors {r['socket_errors']}, timeouts {r['timeouts']}", flush=True)
            out["server_rss_mb"] = proc.memory_info().rss / 2**20
            status = httpx.get(url + "/status", headers={"Authorization": f"Bearer {OPERATOR}"}).json()
            out["updates_received"] = status["updates_received"]
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, nargs="+", default=[200, 1000], help="devices at once (one run each)")
    p.add_argument("--seconds", type=float, default=15.0, help="each phase's length")
    p.add_argument("--threads", type=int, default=2, help="wrk threads")
    p.add_argument("--width", type=int, default=8, help="expert width of the run the coordinator serves")
    p.add_argument("--out", default="runs/coordinator_load")
    args = p.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk (make setup does, as root)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import platform
    result = {"command": "python benchmarks/coordinator_load.py " + " ".join(sys.argv[1:]), "tool": "wrk",
              "wrk": [line.split(" Copyright")[0] for line in
                      subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[0:1]],
              "cpu_cores": os.cpu_count(), "machine": platform.machine(), "seconds_per_phase": args.seconds,
              "sizes": [one_size(args, n) for n in args.devices]}
    (out / "coordinator_load.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out / 'coordinator_load.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
