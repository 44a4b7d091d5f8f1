"""Evaluate a trained run, measure per-round client cost, write report.json, plots and a summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hierarchy.tree import write_text_atomic
from trainer.device.cost import summarize_costs, task_cost
from trainer.evaluate import expert_accuracy
from trainer.plots import plot_cost_per_task, plot_metric_vs_round
from trainer.protocol.run import RunConfig
from trainer.machine import git_commit, machine_info
from trainer.protocol.strategy import stable_seed

if TYPE_CHECKING:   # report reads families; the transports build them
    from trainer.transports.inprocess import Federation

HMOE_DECODERS = ["greedy", "beam:2", "threshold:0.5"]
FLAT_RULES = ["leaf", "majority"]


def evaluate_family(fed: Federation, decoders: list[str] | None = None) -> dict:
    """Test-set figures for every decoder (HMoE) or rule (flat), and per-expert accuracy."""
    d = fed.prep.data
    decoders = decoders or (HMOE_DECODERS if fed.kind == "hmoe" else FLAT_RULES)
    out: dict = {"test": {dec: fed.evaluate(d.test_x, d.test_y, dec) for dec in decoders}}
    log = fed.state["log"]
    out["rounds"] = fed.state["completed_rounds"]
    out["total_client_seconds"] = float(sum(e["client_seconds"] for e in log))
    out["total_client_gmacs"] = float(sum(e.get("client_gmacs", 0.0) for e in log))
    out["data_used"] = data_used(fed)
    out["rounds_per_task"] = {k: sum(k in e.get("tasks", {e["task"]: 1}) for e in log) for k in fed.tasks}
    if fed.kind == "hmoe":
        out["experts"] = {}
        for key, task in fed.tasks.items():
            acc, n = expert_accuracy(fed.tree, task.node, fed.net(key), d.test_x, d.test_y,
                                     fed.prep.normalize, fed.cfg.device)
            out["experts"][key] = {"test_accuracy": acc, "test_samples": n,
                                   "children": [fed.tree.names[c] for c in fed.tree.children(task.node)]}
    return out


def cost_clients(fed: Federation, num_clients: int) -> list[int]:
    """The clients whose rounds are measured: the same ones for every expert and for the
    flat model (a paired comparison on the same devices' data), drawn from those holding
    samples under every expert of the tree."""
    d, tree = fed.prep.data, fed.tree
    masks = [tree.lcpn(int(e), d.train_y)[0] for e in tree.experts]
    have_all = [c for c, part in enumerate(fed.prep.parts) if all(m[part].any() for m in masks)]
    pool = have_all if len(have_all) >= num_clients else list(range(len(fed.prep.parts)))
    rng = np.random.default_rng(stable_seed(fed.cfg.seed, "cost-clients"))
    return sorted(rng.choice(pool, min(num_clients, len(pool)), replace=False).tolist())


def measure_family_cost(fed: Federation, num_clients: int = 3) -> dict[str, dict]:
    """Per task: the local update of each cost client, each in its own process."""
    d, s = fed.prep.data, fed.strategy
    chosen = cost_clients(fed, num_clients)
    last = fed.cfg.rounds(fed.kind) - 1
    out = {}
    for key, task in fed.tasks.items():
        clients = []
        for c in chosen:
            idx, target = s.client_data(key, d.train_y, fed.prep.parts[c])
            if len(idx):
                local = s.client_config(key, last, len(fed.prep.parts[c]), len(idx))
                clients.append((d.train_x[idx], target, local))
        if not clients:
            continue
        out[key] = task_cost(task.net, fed.weights[key], clients, d.mean, d.std,
                             stable_seed(fed.cfg.seed, "cost-run", key), fed.cfg.device, trunk=fed.trunk(key))
        out[key]["clients"] = [c for c in chosen if len(s.client_data(key, d.train_y, fed.prep.parts[c])[0])]
    return out


def build_report(run_dir: Path, cfg: RunConfig, feds: dict[str, Federation], cost_clients: int = 3,
                 previous: dict | None = None) -> dict:
    report: dict = dict(previous or {})
    report.update({"config": cfg.to_dict(), "machine": machine_info(), "commit": git_commit(),
                   "dataset": {"name": cfg.dataset, "train": int(len(next(iter(feds.values())).prep.data.train_y)),
                               "test": int(len(next(iter(feds.values())).prep.data.test_y))}})
    for kind, fed in feds.items():
        report[kind] = {**evaluate_family(fed), "log": fed.state["log"]}
    if cfg.extends:
        report["extension"] = extension_report(cfg, report, list(feds))
    fleet = fleet_report(feds)
    if fleet is not None:
        report["fleet"] = fleet
    if cost_clients > 0:
        per_task = dict(report.get("cost", {}).get("per_task", {}))
        for fed in feds.values():
            per_task.update(measure_family_cost(fed, cost_clients))
        report["cost"] = summarize_costs(per_task)
        memory = ("peak CUDA memory allocated by torch (torch.cuda.max_memory_allocated) over what was allocated "
                  "before the update" if cfg.device.startswith("cuda") else
                  "peak RSS growth (VmHWM reset via /proc/self/clear_refs) over the idle process")
        report["cost"]["method"] = (f"wall time of the local update loop (median of 3 identical updates), and "
                                    f"{memory} during the first, after a one-step warm-up of a one-channel "
                                    "network; each client in a fresh process; median over clients")
    write_text_atomic(run_dir / "report.json", json.dumps(report, indent=1) + "\n")
    logs = {k: report[k]["log"] for k in ("hmoe", "flat") if k in report}
    plot_metric_vs_round(logs, run_dir / "plots" / "metric_vs_round.png")
    if "cost" in report:
        plot_cost_per_task(report["cost"]["per_task"], run_dir / "plots" / "cost_per_expert.png")
    return report


def fleet_table(report: dict) -> str:
    """Per model family: how much of the fleet's data and rounds it could use."""
    f = report["fleet"]
    tiers = ", ".join(f"{t['name']} {t['share']:.0%} ({t['memory_mb']:g} MB, speed {t['speed']:g})"
                      for t in f["fleet"]["tiers"])
    lines = [f"fleet: {tiers}; deadline {f['fleet']['deadline_s']:g} s",
             f"{'model':<8}{'data used':>11}{'client-rounds':>15}{'not asked (unfit)':>19}{'device s':>10}  per tier"]
    for kind, r in f["families"].items():
        per = ", ".join(f"{k} {v}" for k, v in r["trained_client_rounds_per_tier"].items())
        lines.append(f"{kind:<8}{r['data_used']:>11.1%}{r['trained_client_rounds']:>15}{r['unfit_client_rounds']:>19}"
                     f"{r['device_seconds']:>10.0f}  {per}")
    return "\n".join(lines)


def extension_report(cfg: RunConfig, report: dict, kinds: list[str]) -> dict:
    """What growing the run kept, changed and added, and the compute it spent, beside what the
    run it grew from spent (from that run's report.json, where it has one)."""
    ext = cfg.extends
    old_report = Path(ext["from_run"]) / "report.json"
    before = json.loads(old_report.read_text()) if old_report.is_file() else {}
    fields = ("rounds", "total_client_gmacs", "total_client_seconds")
    return {**ext, "trained": cfg.train_only,
            "spent": {k: {f: report[k].get(f) for f in fields} for k in kinds},
            "from_run_spent": {k: {f: before[k].get(f) for f in fields} for k in kinds if k in before}}


def extension_table(report: dict) -> str:
    e = report["extension"]
    changed = ", ".join(f"{k} (+{', '.join(v['added']) or '-'})" for k, v in e["changed"].items()) or "-"
    lines = [f"\ngrown from {e['from_run']}: added leaves {', '.join(e['added_leaves']) or '-'}",
             f"  kept (bit for bit): {', '.join(e['kept']) or '-'}", f"  changed: {changed}",
             f"  new: {', '.join(e['new']) or '-'}",
             f"{'model':<8}{'rounds':>8}{'client GMAC':>14}{'client s':>10}{'info F1':>9}"
             f"{'old run GMAC':>14}"]
    for kind, spent in e["spent"].items():
        old = e["from_run_spent"].get(kind, {}).get("total_client_gmacs")
        f1 = report[kind]["test"]["greedy" if kind == "hmoe" else "leaf"]["info_f1"]
        lines.append(f"{kind:<8}{spent['rounds']:>8}{spent['total_client_gmacs']:>14.1f}"
                     f"{spent['total_client_seconds']:>10.1f}{f1:>9.4f}{'-' if old is None else f'{old:.1f}':>14}")
    return "\n".join(lines)


def data_used(fed: Federation) -> float:
    """Share of the clients' training samples that some completed round trained on."""
    used = [np.zeros(len(p), dtype=bool) for p in fed.prep.parts]
    labels = fed.prep.data.train_y
    for e in fed.state["log"]:
        assigned = e.get("assigned") or {c: e["task"] for c in e.get("client_config", {})}
        for c, key in assigned.items():
            c = int(c)
            if c in e.get("diverged", []):
                continue
            used[c] |= fed.tasks[key].select(fed.tree, labels[fed.prep.parts[c]])[0]
    total = sum(len(p) for p in fed.prep.parts)
    return float(sum(u.sum() for u in used) / total) if total else 0.0


def fleet_report(feds: dict[str, Federation]) -> dict | None:
    """The fleet, each client's tier, the measured costs, what they predict per tier and task
    (for the tier's median client, one epoch) and what the rounds did; None without a fleet."""
    some = next(iter(feds.values()))
    fc = some.fleet
    if fc is None:
        return None
    tiers = fc.fleet.tiers
    out: dict = {"fleet": fc.fleet.to_dict(), "client_tiers": [tiers[t].name for t in fc.client_tier],
                 "costs": fc.book.to_dict(), "predictions": {}, "families": {}}
    for kind, fed in feds.items():
        preds: dict = {}
        for i, tier in enumerate(tiers):
            members = [c for c, t in enumerate(fc.client_tier) if t == i]
            if members:
                preds[tier.name] = {key: {"samples": n, **fc.predict(members[0], task.net, n).to_dict()}
                                    for key, task in fed.tasks.items()
                                    for n in [int(np.median([fed.task_n[c][key] for c in members]))]}
        log = fed.state["log"]
        trained = [int(c) for e in log for c in e.get("assigned", {}) if int(c) not in e.get("diverged", [])]
        out["predictions"][kind] = preds
        out["families"][kind] = {
            "data_used": data_used(fed),
            "unfit_client_rounds": int(sum(len(e.get("unfit", [])) for e in log)),
            "no_cohort_client_rounds": int(sum(len(e.get("no_cohort", [])) for e in log)),
            "trained_client_rounds": len(trained),
            "device_seconds": float(sum(e.get("device_seconds", 0.0) for e in log)),
            "trained_client_rounds_per_tier": {t.name: sum(fc.client_tier[c] == i for c in trained)
                                               for i, t in enumerate(tiers)},
        }
    return out
