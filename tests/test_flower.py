"""HMoE on Flower: the same strategy, local update and aggregation as the project's own
simulation, under Flower's simulation runtime; bad replies left out one by one."""

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

from tests.conftest import CFG  # noqa: E402
from tests.support import simulate_on_flower  # noqa: E402
from trainer.protocol.aggregate import fedavg  # noqa: E402
from trainer.transports.inprocess import Federation  # noqa: E402
from trainer.prepare import open_run  # noqa: E402

for _k, _v in {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(_k, _v)

SMALL = replace(CFG, clients=4, clients_per_round=3, hmoe_rounds=4)


def test_project_fedavg_and_flowers_aggregate_arrayrecords_agree_within_float32():
    """Same updates, same weights: both average by sample count. They differ in how: the
    project sums in float64 in client order and rounds once; Flower sums float32 arrays in
    reply order, so its result moves with the order by float32 rounding."""
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from trainer.transports.flower.client import from_record, to_record
    rng = np.random.default_rng(0)
    results = [({"w": (rng.normal(size=(64, 32)) * 10.0 ** rng.integers(-3, 3)).astype(np.float32),
                 "b": rng.normal(size=(32,)).astype(np.float32)}, int(n)) for n in rng.integers(1, 5000, 7)]
    ours = fedavg(results)
    records = [RecordDict({"arrays": to_record(w), "metrics": MetricRecord({"num-examples": n})}) for w, n in results]
    theirs = from_record(aggregate_arrayrecords(records, "num-examples"))
    reversed_ = from_record(aggregate_arrayrecords(records[::-1], "num-examples"))
    for name in ours:
        scale = np.abs(ours[name]).max()
        np.testing.assert_allclose(theirs[name], ours[name], rtol=0, atol=8 * np.finfo(np.float32).eps * scale)
        np.testing.assert_allclose(reversed_[name], ours[name], rtol=0, atol=8 * np.finfo(np.float32).eps * scale)
    assert isinstance(records[0]["arrays"], ArrayRecord)
    # where they differ: ours is the float64 average rounded once; Flower's accumulates in float32
    exact = {k: sum(w[k].astype(np.float64) * n for w, n in results) / sum(n for _, n in results) for k in ours}
    assert max(np.abs(ours[k] - exact[k]).max() for k in ours) <= max(np.abs(theirs[k] - exact[k]).max() for k in ours)


def test_flower_simulation_trains_the_same_experts_as_the_projects_simulation(tmp_path):
    cfg, own_prep = open_run(tmp_path / "own", SMALL, False, kinds=("hmoe",))
    own = Federation(tmp_path / "own", "hmoe", cfg, own_prep)
    own.run(progress=False)
    fl = simulate_on_flower(tmp_path / "flower", SMALL)
    assert fl.state["completed_rounds"] == SMALL.hmoe_rounds
    assert [e["task"] for e in fl.state["log"]] == [e["task"] for e in own.state["log"]]
    assert [e["client_config"] for e in fl.state["log"]] == [e["client_config"] for e in own.state["log"]]
    for key in own.tasks:
        for name, arr in own.weights[key].items():
            np.testing.assert_allclose(fl.weights[key][name], arr, rtol=0, atol=1e-6, err_msg=f"{key}/{name}")
    assert (tmp_path / "flower" / "report.json").exists()


def test_bad_replies_are_left_out_one_by_one_and_the_run_goes_on(tmp_path):
    """Client 0 replies NaN weights, client 1 a wrong shape, client 2 zero samples, client 3
    raises (an error reply); every round closes with whatever remains, none aborts the run."""
    run = tmp_path / "bad"
    fed = simulate_on_flower(run, replace(SMALL, clients_per_round=4), "bad-replies")
    log = fed.state["log"]
    assert fed.state["completed_rounds"] == SMALL.hmoe_rounds
    assert all(e["clients"] == 0 for e in log)            # every reply was bad: the experts stay as they were
    reasons = {c: why for e in log for c, why in e.get("left_out", {}).items()}
    assert "[3, 3]; expected float32" in reasons["1"] and "num-examples 0" in reasons["2"]
    assert "node 3's disk is full" in reasons["3"]
    assert any(0 in e["diverged"] for e in log)            # non-finite: left out as the simulation does


def _listeners(netns_pid: int | None = None) -> list[tuple[str, str]]:
    """(local address, process) of every listening socket, in the namespace of ``netns_pid``."""
    cmd = ["ss", "-H", "-ltnup"]
    if netns_pid:
        cmd = ["nsenter", f"--net=/proc/{netns_pid}/ns/net"] + cmd
    out = subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()
    return [(line.split()[4], line.split("users:")[-1]) for line in out if "users:" in line]


def _tree(pid: int) -> set[int]:
    import psutil
    try:
        p = psutil.Process(pid)
        return {pid} | {c.pid for c in p.children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


@pytest.mark.slow
def test_hmoe_flower_cli_listens_on_loopback_only(tmp_path):
    """Ray's gRPC servers bind every interface; `hmoe flower` runs them in a network
    namespace whose only interface is loopback: outside it the run has no listener at all,
    inside it every listener is reachable from loopback alone."""
    import shutil
    if not all(shutil.which(t) for t in ("ss", "nsenter", "unshare", "ip")) or os.geteuid() != 0:
        pytest.skip("needs root with ss, nsenter, unshare and ip (iproute2, util-linux)")
    args = [sys.executable, "-m", "exporter.cli", "flower", "--out", str(tmp_path / "run"), "--dataset", CFG.dataset,
            "--clients", "4", "--clients-per-round", "2", "--hmoe-rounds", "3", "--expert-width", "4",
            "--batch-size", "16", "--ray-cpus", "2"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    outside, inside, links = [], [], set()
    own = os.readlink("/proc/self/ns/net")

    def other_ns(pid: int) -> bool:
        try:
            return os.readlink(f"/proc/{pid}/ns/net") != own
        except OSError:   # the process ended meanwhile
            return False

    try:
        while proc.poll() is None:
            pids = _tree(proc.pid)
            outside += [a for a, who in _listeners() if any(f"pid={p}," in who for p in pids)]
            ns = [p for p in pids if other_ns(p)]
            if ns:
                inside += [a for a, _ in _listeners(ns[0])]
                links |= {line.split(":")[1].strip() for line in subprocess.run(
                    ["nsenter", f"--net=/proc/{ns[0]}/ns/net", "ip", "-o", "link"], capture_output=True,
                    text=True).stdout.splitlines()}
            time.sleep(0.3)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    out = proc.stdout.read()
    assert proc.returncode == 0, out[-3000:]
    assert not outside, f"listeners outside the namespace: {outside}"
    assert inside, "Ray's processes should listen inside the namespace"
    assert links == {"lo"}, links   # the namespace's only interface
    assert all(a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:", "*:")) for a in inside), inside
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["hmoe"]["rounds"] == 3


def _free_ports(n: int) -> list[int]:
    import socket
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class LocalFleet:
    """A real SuperLink and SuperNodes on 127.0.0.1, each node with its own data folder;
    every process it starts is ended by its PID (process group) on exit."""

    def __init__(self, tmp: Path, parts: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.tmp, self.parts, self.procs = tmp, parts, []
        self.home = tmp / "flwr-home"
        self.home.mkdir()
        venv_bin = str(Path(sys.executable).parent)
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "PATH": venv_bin + os.pathsep + os.environ["PATH"],
                    "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"}

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def __enter__(self) -> "LocalFleet":
        link_port, *node_ports = _free_ports(1 + len(self.parts))
        (self.home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                               f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
        bin_ = Path(sys.executable).parent
        self.link = self._start("superlink", [str(bin_ / "flower-superlink"), "--insecure",
                                              "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                                              "--port", str(link_port), "--database", str(self.tmp / "link.db")])
        time.sleep(3)
        self.nodes = []
        for i, ((x, y), port) in enumerate(zip(self.parts, node_ports)):
            folder = self.tmp / f"node{i}"
            folder.mkdir()
            np.savez(folder / "train.npz", images=x, labels=y)
            self.nodes.append(self._start(f"node{i}", [
                str(bin_ / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                "--node-config", f'partition-id={i} data-dir="{folder}"', "--host", "127.0.0.1", "--port", str(port)]))
        return self

    def run(self, app_dir: Path, run_config: str, timeout: float = 400) -> subprocess.Popen:
        return self._start("flwr-run", [str(Path(sys.executable).parent / "flwr"), "run", str(app_dir), "local",
                                        "--run-config", run_config, "--stream"])

    def pids(self) -> set[int]:
        return set().union(*(_tree(p.pid) for p in self.procs))

    def __exit__(self, *exc) -> None:
        import signal
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def _fleet_run(tmp_path: Path, cfg, kill_node_after_round: int | None = None, timeout: float = 600):
    root = Path(__file__).resolve().parents[1]
    cfg, prep = open_run(tmp_path / "run", cfg, False, kinds=("hmoe",))
    Federation(tmp_path / "run", "hmoe", cfg, prep)
    parts = [(prep.data.train_x[p], prep.data.train_y[p]) for p in prep.parts]
    seen: set[str] = set()
    with LocalFleet(tmp_path, parts) as fleet:
        run = fleet.run(root / "flower", f'run-dir="{tmp_path / "run"}" min-nodes={len(parts)} round-timeout=30.0')
        start, killed = time.monotonic(), False
        while run.poll() is None and time.monotonic() - start < timeout:
            seen.update(a for a, who in _listeners() if any(f"pid={p}," in who for p in fleet.pids()))
            state = tmp_path / "run" / "state-hmoe.json"
            if kill_node_after_round is not None and not killed and state.exists():
                if json.loads(state.read_text())["completed_rounds"] > kill_node_after_round:
                    import signal
                    os.killpg(fleet.nodes[-1].pid, signal.SIGKILL)
                    killed = True
            time.sleep(0.5)
        assert run.poll() == 0, (tmp_path / "flwr-run.log").read_text()[-3000:]
    fed = Federation(tmp_path / "run", "hmoe", cfg, open_run(tmp_path / "run", cfg, True, kinds=("hmoe",))[1])
    return fed, seen


@pytest.mark.slow
def test_three_ways_agree_project_simulation_flower_simulation_and_a_real_superlink(tmp_path):
    cfg = replace(SMALL, clients=3, clients_per_round=3, hmoe_rounds=3)
    own_cfg, own_prep = open_run(tmp_path / "own", cfg, False, kinds=("hmoe",))
    own = Federation(tmp_path / "own", "hmoe", own_cfg, own_prep)
    own.run(progress=False)
    sim = simulate_on_flower(tmp_path / "sim", cfg)
    real, listeners = _fleet_run(tmp_path / "fleet", cfg)
    assert real.state["completed_rounds"] == sim.state["completed_rounds"] == 3
    for other in (sim, real):
        for key in own.tasks:
            for name, arr in own.weights[key].items():
                np.testing.assert_allclose(other.weights[key][name], arr, rtol=0, atol=1e-6, err_msg=f"{key}/{name}")
    assert listeners, "the SuperLink and SuperNodes should listen"
    assert all(a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:")) for a in listeners), listeners


@pytest.mark.slow
def test_a_supernode_killed_mid_run_leaves_the_run_to_finish_with_the_others(tmp_path):
    cfg = replace(SMALL, clients=3, clients_per_round=3, hmoe_rounds=4)
    fed, _ = _fleet_run(tmp_path, cfg, kill_node_after_round=0)
    log = fed.state["log"]
    assert fed.state["completed_rounds"] == 4
    late = [e for e in log[2:]]   # rounds that started after the kill
    assert all("2" in e.get("left_out", {}) or 2 in e["dropped"] for e in late), [e.get("left_out") for e in log]
    assert all(e["clients"] >= 1 for e in late), "the others' updates still make the round"
    named = json.loads((tmp_path / "run" / "report.json").read_text())["flower"]["clients_left_out_of_rounds"]
    assert "2" in named and named["2"]["node"] is not None and named["2"]["rounds"], named   # the report names it


def test_nodes_with_bad_data_are_left_out_by_name_and_the_run_goes_on(tmp_path):
    """Node 1's data folder does not exist, node 2's data has a class the hierarchy lacks:
    both answer the server's query with an error that names the problem, and the run
    trains with nodes 0 and 3."""
    run = tmp_path / "run"
    (tmp_path / "hats").mkdir()
    np.savez(tmp_path / "hats" / "train.npz", images=np.zeros((2, 1, 28, 28), np.uint8), labels=np.array(["Hat"] * 2))
    fed = simulate_on_flower(run, replace(SMALL, clients_per_round=4), "bad-data", tmp_path)
    assert fed.state["completed_rounds"] == SMALL.hmoe_rounds
    flower = json.loads((run / "report.json").read_text())["flower"]
    reasons = " | ".join(flower["nodes_left_out"].values())
    assert "missing: no train.npz" in reasons and "classes ['Hat'] are not leaves" in reasons, reasons
    assert flower["clients_without_node"] == [1, 2]
    assert all(set(e["dropped"]) == {1, 2} and e["clients"] >= 1 for e in fed.state["log"])


def test_a_server_app_refuses_a_run_of_another_taxonomy(tmp_path):
    from trainer.transports.flower.server import FlowerRunError, serve
    open_run(tmp_path / "run", SMALL, False, kinds=("hmoe",))
    with pytest.raises(FlowerRunError, match="another hierarchy .*'synthetic:1,28,28:fashion-mnist:400', 10 leaves.* "
                                              "taxonomy 'cifar100' \\(100 leaves\\)"):
        serve(None, tmp_path / "run", taxonomy="cifar100")


def test_a_flower_run_resumes_and_exports(tmp_path):
    from exporter.bundle import export_run
    run = tmp_path / "run"
    simulate_on_flower(run, replace(SMALL, hmoe_rounds=2))
    more = replace(SMALL, hmoe_rounds=4)
    open_run(run, more, True, kinds=("hmoe",))   # raise the run's rounds, as `hmoe train --resume` does
    fed = simulate_on_flower(run, more)
    assert [e["round"] for e in fed.state["log"]] == [0, 1, 2, 3]
    result = export_run(run, tmp_path / "bundle", progress=False, validate_images=20)
    assert {r["model"] for r in result.rows} >= set(fed.tasks)


def test_client_app_trains_a_nodes_folder_under_a_memory_cap_like_without(tmp_path):
    """The ClientApp's training on a node's own data folder, called directly: with memory-cap-mb
    (the micro-batch planner probes first) it gives the update it gives without a cap."""
    from trainer.transports.flower.client import train_task
    from trainer.transports.flower.server import HmoeFlowerStrategy
    cfg, prep = open_run(tmp_path / "run", SMALL, False, kinds=("hmoe",))
    fed = Federation(tmp_path / "run", "hmoe", cfg, prep)
    np.savez(tmp_path / "train.npz", images=prep.data.train_x[prep.parts[0]], labels=prep.data.train_y[prep.parts[0]])
    strategy = HmoeFlowerStrategy(fed, {0: 1}, [fed.tree.names[i] for i in fed.tree.leaves], 0)
    rnd = next(r for r in range(100) if 0 in fed.clients.sample(r))   # a round that samples client 0
    plan = fed.driver.plan(rnd, present={0})
    key = plan.assigned[0]
    config = strategy.train_config(plan, 0)   # what the ServerApp sends client 0
    out = {}
    for cap in (None, 64.0):
        node_config = {"partition-id": 0, "data-dir": str(tmp_path)} | ({"memory-cap-mb": cap} if cap else {})
        out[cap], metrics = train_task(config, fed.weights[key], node_config, {})
        assert metrics["num-examples"] == fed.task_n[0][key]
    for name in out[None]:
        np.testing.assert_allclose(out[64.0][name], out[None][name], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_hmoe_train_and_hmoe_flower_give_the_same_experts_with_default_flags(tmp_path):
    """The two commands, as a user runs them, on real Fashion-MNIST with the default expert
    width and nothing about threads set: every local update runs on TRAIN_THREADS, so the
    in-process simulation and Flower's virtual nodes agree within 1e-6."""
    from trainer.protocol.checkpoint import load_checkpoint
    try:
        from trainer.datasets import load_dataset
        load_dataset("fashion-mnist", download=False)
    except Exception as exc:   # noqa: BLE001 - the data set is an install step of make test
        pytest.skip(f"Fashion-MNIST is not installed here: {exc}")
    flags = ["--model", "hmoe", "--train-limit", "3000", "--test-limit", "200", "--clients", "4",
             "--clients-per-round", "3", "--hmoe-rounds", "3"]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    hmoe = str(Path(sys.executable).with_name("hmoe"))
    train = subprocess.run([hmoe, "train", *flags, "--out", str(tmp_path / "train"), "--cost-clients", "0",
                            "--no-progress"], capture_output=True, text=True, timeout=600, env=env)
    assert train.returncode == 0, train.stderr[-3000:]
    try:
        cmd = [hmoe, "flower", *flags, "--out", str(tmp_path / "flower")]
        from trainer.cli.flower import loopback_command
        loopback_command(["true"])
    except Exception as exc:   # noqa: BLE001
        pytest.skip(f"no loopback-only network namespace here: {exc}")
    fl = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert fl.returncode == 0, fl.stdout[-2000:] + fl.stderr[-3000:]
    experts = sorted((tmp_path / "train" / "experts").glob("*.safetensors"))
    assert len(experts) == 5
    for path in experts:
        ours, theirs = load_checkpoint(path)[0], load_checkpoint(tmp_path / "flower" / "experts" / path.name)[0]
        for name, arr in ours.items():
            np.testing.assert_allclose(theirs[name], arr, rtol=0, atol=1e-6, err_msg=f"{path.name}/{name}")
