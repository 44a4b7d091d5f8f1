"""Train a run in process: open it, run its model families' rounds, evaluate and report (the
library behind `hmoe train` and `hmoe demo`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from trainer.protocol.fleet import CostBook
from trainer.protocol.run import RunConfig

# The demo's defaults (README): 20 clients, Dirichlet(0.5) non-IID, 5 clients a round, SGD
# (lr 0.05, momentum 0.9, cosine decay), one local epoch (experts: balanced by data share);
# flat softmax at width 32 for 40 rounds; HMoE experts at width 16 for 100 rounds (20 each).
DEMO = RunConfig()


def cold_experts(fed) -> list[str]:
    """The experts a warm start gives nothing: independent experts (no shared trunk) whose every
    tensor but the output layer differs in shape from their parent expert's (another width)."""
    tree, by_node = fed.tree, {t.node: k for k, t in fed.tasks.items()}
    out = []
    for key, task in fed.tasks.items():
        if task.net.trunk_blocks:   # its features are the trunk's already
            continue
        v = int(tree.parents[task.node]) if task.node > 0 else -1
        while v >= 0 and v not in by_node:
            v = int(tree.parents[v])
        if v < 0:
            continue
        own, parent = task.net.param_shapes(), fed.tasks[by_node[v]].net.param_shapes()
        if not any(n in parent and parent[n] == s for n, s in own.items() if not n.startswith("head.3")):
            out.append(key)
    return out


def train_run(out: Path, cfg: RunConfig, kinds: list[str], resume: bool, cost_clients: int,
              progress: bool = True, fleet_costs: CostBook | None = None) -> dict:
    """Train (or continue) the given model families, then evaluate, measure cost, report."""
    from trainer.report import build_report
    from trainer.transports.inprocess import prepared_feds
    from trainer.prepare import open_run
    if cfg.fleet and progress and not (out / "costs.json").exists():
        print("measuring per-round costs for the fleet's predictions (fresh processes, a few seconds a network)")
    cfg, prep = open_run(out, cfg, resume, kinds=tuple(kinds), seed_book=fleet_costs)
    if cfg.extends:
        from trainer.grow import seed_extension
        seed_extension(out, cfg, prep.data.tree, prep.data.shape, kinds)
    feds = prepared_feds(out, cfg, prep, kinds)
    if "hmoe" in feds and cfg.warm_start:
        cold = cold_experts(feds["hmoe"])
        if cold:
            print(f"warning: --warm-start copies only tensors of equal shape: {len(cold)} experts differ from their "
                  f"parent in every tensor and start from scratch (for example {cold[0]}); give them their parent's "
                  "width (--expert-widths) or a shared trunk (--trunk-blocks)", file=sys.stderr)
    for fed in feds.values():
        fed.run(progress=progress)
    previous = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
    if progress:
        print("evaluating on the test split" + (", measuring per-round client cost" if cost_clients else ""))
    return build_report(out, cfg, feds, cost_clients, previous)
