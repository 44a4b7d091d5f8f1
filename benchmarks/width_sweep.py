"""Expert-width sweep: Information F1 against per-round client memory, HMoE vs flat.

For every width, trains HMoE (experts of that width) and flat softmax (that width)
with the same federated settings, then measures each model's per-round client cost
in fresh processes. Writes sweep.json, sweep.md and sweep.png to --out.

    python benchmarks/width_sweep.py --widths 8 16 32 --out runs/width_sweep
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from trainer.train import DEMO, train_run
from trainer.device.cost import summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--out", default="runs/width_sweep")
    p.add_argument("--hmoe-rounds", type=int, default=DEMO.hmoe_rounds)
    p.add_argument("--flat-rounds", type=int, default=DEMO.flat_rounds)
    p.add_argument("--train-limit", type=int, default=0, help="subsample the training set (0: all)")
    p.add_argument("--cost-clients", type=int, default=2)
    args = p.parse_args()
    out = Path(args.out)
    rows = []
    for width in args.widths:
        cfg = replace(DEMO, expert_width=width, flat_width=width, hmoe_rounds=args.hmoe_rounds,
                      flat_rounds=args.flat_rounds, train_limit=args.train_limit)
        s = summary(train_run(out / f"w{width}", cfg, ["hmoe", "flat"], resume=True,
                              cost_clients=args.cost_clients, progress=True))
        for kind, cost_key in (("hmoe", "hmoe_max"), ("flat", "flat")):
            rows.append({"model": kind, "width": width, "info_f1": s[kind]["info_f1"],
                         "mem_mb": s["cost"][cost_key]["mem_mb"], "time_ms": s["cost"][cost_key]["time_ms"],
                         "analytic_mb": s["cost"][cost_key]["analytic_mb"]})
        print(json.dumps(rows[-2:], indent=1))
    result = {"config": {**DEMO.to_dict(), "hmoe_rounds": args.hmoe_rounds, "flat_rounds": args.flat_rounds,
                         "train_limit": args.train_limit}, "machine": s.get("machine"), "commit": s.get("commit"),
              "rows": rows}
    (out / "sweep.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["| model | width | Information F1 | memory / round (MB, largest) | time / round (ms, largest) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['width']} | {r['info_f1']:.4f} | {r['mem_mb']:.1f} | {r['time_ms']:.0f} |"
              for r in rows]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, marker in (("hmoe", "o"), ("flat", "s")):
        pts = [r for r in rows if r["model"] == kind]
        ax.plot([r["mem_mb"] for r in pts], [r["info_f1"] for r in pts], marker=marker, label=kind)
        for r in pts:
            ax.annotate(f"w{r['width']}", (r["mem_mb"], r["info_f1"]), textcoords="offset points", xytext=(4, 4))
    ax.set(xlabel="per-round client memory growth (MB; HMoE: largest expert)", ylabel="test Information F1",
           title="F1 vs per-round memory")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=110)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
