"""The HMoE ServerApp for Flower: the project's strategy behind Flower's Strategy interface.

Each round, ``configure_train`` asks the project's strategy (through the run's
``Federation``: the same ``plan_round`` as the in-process simulation) which clients train
which expert with which hyper-parameters and seed, and sends each only its expert's
arrays. ``aggregate_train`` checks the replies one by one (an error reply, missing or
extra arrays, a wrong shape, zero samples: left out and counted in the round's log; a
non-finite update: left out as in the simulation), aggregates each expert with the
project's rule (FedAvg in float64 in client order, independent of reply order), and
commits the round through the run directory's crash-safe commit, so ``--resume``
continues a Flower run and ``hmoe export --run`` exports it.

Before the first round the server asks every node for its client id and samples per
leaf (a ``query`` message), as a device sends its counts to the coordinator. Clients are
sampled per round as the simulation samples them (seeded); a sampled client with no
node, or whose node does not reply within the round timeout, is dropped for that round.

Run config keys (``flower/pyproject.toml`` or the CLI): ``run-dir`` (a run made by ``hmoe
train`` or ``hmoe flower``), ``model`` (hmoe|flat), ``round-timeout`` (s), ``min-nodes``
(wait for this many nodes), ``taxonomy`` (refuse a run made with another one).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from hierarchy.errors import HmoeError
from hierarchy.tree import write_text_atomic
from trainer.transports.flower.client import from_record, to_record
from trainer.protocol.run import load_input_spec, load_run_config
from trainer.transports.inprocess import Federation
from trainer.device.nets import trunk_weights
from trainer.protocol.driver import RoundPlan
from trainer.prepare import prepare


class FlowerRunError(HmoeError, ValueError):
    """The ServerApp cannot drive this run as asked."""


class HmoeFlowerStrategy(Strategy):
    """Flower's Strategy interface over the project's strategy and run directory."""

    def __init__(self, fed: Federation, nodes: dict[int, int], leaves: list[str], start_round: int) -> None:
        self.fed, self.nodes, self.leaves, self.start_round = fed, nodes, leaves, start_round
        self.client_of = {node: client for client, node in nodes.items()}
        self.plan: RoundPlan | None = None
        self.entries: list[dict] = []
        self.spec = load_input_spec(fed.run_dir).to_dict()

    def summary(self) -> None:
        print(f"HMoE strategy over {self.fed.run_dir} ({self.fed.kind}, {len(self.fed.tasks)} tasks, "
              f"{len(self.nodes)} nodes)")

    def train_config(self, plan: RoundPlan, client: int) -> dict:
        """What a train message tells ``client``: its task, the plan's hyper-parameters and seed,
        the task's relabelling table and the run's input."""
        key, fed = plan.assigned[client], self.fed
        return {"task": key, "round": plan.rnd, "partition-id": client, "seed": plan.seeds[client],
                "local": json.dumps(plan.configs[client].to_dict()), "net": fed.tasks[key].net.to_json(),
                "targets": self.targets(key), "leaves": json.dumps(self.leaves),
                "shape": json.dumps(list(fed.prep.data.shape)), "input": json.dumps(self.spec)}

    def targets(self, key: str) -> list[int]:
        """Leaf index -> the index of ``key``'s child on its path (-1: not under ``key``)."""
        task, tree = self.fed.tasks[key], self.fed.tree
        mask, target = task.select(tree, np.arange(tree.num_leaves))
        table = np.full(tree.num_leaves, -1, dtype=np.int64)
        table[mask] = target
        return table.tolist()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        fed, rnd = self.fed, self.start_round + server_round - 1
        self.plan = fed.driver.plan(rnd, present=set(self.nodes))
        messages = []
        for client, key in self.plan.assigned.items():
            content = {"arrays": to_record(fed.weights[key]),
                       "config": ConfigRecord(self.train_config(self.plan, client))}
            if fed.tasks[key].net.trunk_blocks:   # an expert on the shared trunk: the trunk's weights beside
                content["trunk"] = to_record(trunk_weights(fed.tasks[key].net, fed.weights[fed.trunk_owner]))
            messages.append(Message(RecordDict(content), dst_node_id=self.nodes[client],
                                    message_type=MessageType.TRAIN, group_id=str(rnd)))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[None, MetricRecord]:
        fed, plan = self.fed, self.plan
        results, left_out = {}, {}
        for msg in replies:
            client = self.client_of.get(msg.metadata.src_node_id)
            if client is None or client not in plan.assigned:
                continue
            if msg.has_error():
                left_out[str(client)] = f"error reply: {msg.error.reason}"
                continue
            if "arrays" not in msg.content or "metrics" not in msg.content:
                left_out[str(client)] = "reply without 'arrays' and 'metrics'"
                continue
            m = msg.content["metrics"]   # the driver checks the rest (names, shapes, finiteness, counts)
            results[client] = (from_record(msg.content["arrays"]),
                               {"num_samples": m.get("num-examples", 0), "train_loss": float(m.get("train-loss", 0.0)),
                                "train_seconds": float(m.get("train-seconds", 0.0))})
        for client in plan.assigned:
            if client not in results and str(client) not in left_out:
                left_out[str(client)] = "no reply within the round timeout"
        entry = fed.close_round(plan, results, left_out)
        self.entries.append(entry)
        print(f"round {plan.rnd}: {entry['clients']} clients trained {sorted(entry.get('tasks', {plan.first: 0}))}"
              + (f", left out {left_out}" if left_out else ""), flush=True)
        return None, MetricRecord({"clients": entry["clients"], "left-out": len(left_out)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []   # the server validates with the project's decoders in close_round

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None


def discover(grid: Grid, want: int, wait: float, leaves: list[str], shape: tuple[int, ...],
             timeout: float) -> tuple[dict[int, int], dict[int, np.ndarray], dict[int, str]]:
    """Wait for ``want`` nodes (at most ``wait`` s), ask each for its client id and samples
    per leaf; returns client -> node id, client -> counts, and node -> why it was left out."""
    deadline = time.monotonic() + wait
    while len(list(grid.get_node_ids())) < want and time.monotonic() < deadline:
        time.sleep(0.5)
    cfg = ConfigRecord({"leaves": json.dumps(leaves), "shape": json.dumps(list(shape))})
    msgs = [Message(RecordDict({"config": cfg}), dst_node_id=n, message_type=MessageType.QUERY, group_id="query")
            for n in grid.get_node_ids()]
    nodes, counts, errors = {}, {}, {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            errors[node] = reply.error.reason
            continue
        c = reply.content["config"]
        client, got = int(c["partition-id"]), np.asarray(c["counts"], dtype=np.int64)
        if got.shape != (len(leaves),) or (got < 0).any():
            errors[node] = f"counts {got.tolist()[:5]}...: expected {len(leaves)} non-negative integers"
        elif client in nodes:
            errors[node] = f"client id {client} is already node {nodes[client]}'s"
        else:
            nodes[client], counts[client] = node, got
    return nodes, counts, errors


def serve(grid: Grid, run_dir: str | Path, kind: str = "hmoe", round_timeout: float = 600.0,
          min_nodes: int = 0, taxonomy: str = "", wait: float = 60.0) -> list[dict]:
    """The ServerApp's work: open the run, find the nodes, train the remaining rounds, report."""
    from trainer.report import build_report
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    prep = prepare(cfg)
    tree = prep.data.tree
    if taxonomy:
        from hierarchy import load_taxonomy
        want = load_taxonomy(taxonomy)
        if list(want.names) != list(tree.names) or not np.array_equal(want.parents, tree.parents):
            raise FlowerRunError(f"{run_dir} was made with another hierarchy (data set {cfg.dataset!r}, "
                                 f"{tree.num_leaves} leaves) than this ServerApp's taxonomy {taxonomy!r} "
                                 f"({want.num_leaves} leaves): point run-dir at a {taxonomy} run or change the "
                                 "app's taxonomy")
    fed = Federation(run_dir, kind, cfg, prep)
    leaves = [tree.names[i] for i in tree.leaves]
    nodes, counts, errors = discover(grid, min_nodes or cfg.clients, wait, leaves, prep.data.shape, round_timeout)
    for node, why in errors.items():
        print(f"node {node} left out of the run: {why}", flush=True)
    for client, c in counts.items():
        fed.use_counts(client, c)
    start = fed.state["completed_rounds"]
    rounds = cfg.rounds(kind) - start
    strategy = HmoeFlowerStrategy(fed, nodes, leaves, start)
    if rounds > 0:
        strategy.start(grid, ArrayRecord(), num_rounds=rounds, timeout=round_timeout)
    report = build_report(run_dir, cfg, {kind: fed}, cost_clients=0,
                          previous=json.loads((run_dir / "report.json").read_text())
                          if (run_dir / "report.json").exists() else None)
    missed: dict[str, dict] = {}   # nodes that fell silent or failed mid-run, by client, with the rounds
    for e in fed.state["log"]:
        for c, why in e.get("left_out", {}).items():
            m = missed.setdefault(c, {"node": nodes.get(int(c)), "rounds": [], "last_reason": why})
            m["rounds"].append(e["round"])
            m["last_reason"] = why
    report["flower"] = {"nodes": {str(c): n for c, n in nodes.items()},
                        "nodes_left_out": {str(n): why for n, why in errors.items()},
                        "clients_without_node": sorted(set(range(cfg.clients)) - set(nodes)),
                        "clients_left_out_of_rounds": missed}
    for c, m in missed.items():
        print(f"client {c} (node {m['node']}) was left out of rounds {m['rounds']}: {m['last_reason']}", flush=True)
    write_text_atomic(run_dir / "report.json", json.dumps(report, indent=1) + "\n")
    return strategy.entries


def make_server_app(run_dir: str | None = None, kind: str = "hmoe", round_timeout: float = 600.0,
                    min_nodes: int = 0) -> ServerApp:
    """The ServerApp; the arguments bind a run for Flower's in-process simulation, the run
    config's keys (module docstring) take precedence when given."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        rc = context.run_config
        target = str(rc.get("run-dir", run_dir or ""))
        if not target:
            raise FlowerRunError("no run-dir in the run config: make a run with `hmoe flower --out RUN` or "
                                 "`hmoe train`, then pass --run-config 'run-dir=\"RUN\"'")
        serve(grid, target, str(rc.get("model", kind)), float(rc.get("round-timeout", round_timeout)),
              int(rc.get("min-nodes", min_nodes)), str(rc.get("taxonomy", "")))

    return server_app


app = make_server_app()   # for `flwr run` (flower/pyproject.toml)
