"""A learned two-level tree instead of a data set's taxonomy, and how a run trained on it
scores on the data set's own tree (docs/TRAINING.md, "The hanzi data set").

    python benchmarks/learned_tree.py build --dataset hanzi:500 --groups 22 --out runs/tree-k22.json
    python benchmarks/learned_tree.py build --dataset hanzi:500 --groups 22 \\
        --flat runs/hanzi500/flat.safetensors --out runs/tree-w22.json
    hmoe train --tree runs/tree-k22.json ...
    python benchmarks/learned_tree.py score --run DIR

build: k-means (seeded, 10 starts) on the classes' mean training images, or with --flat on
the rows of a flat model's output layer (NBDT's induced hierarchy, Wan et al., ICLR 2021),
into --groups groups under the root. score: a run's greedy leaf accuracy, its root's
accuracy, and Information F1 of its leaves on the data set's own tree.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def kmeans(f: np.ndarray, k: int, seed: int = 0, starts: int = 10) -> np.ndarray:
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(starts):
        centres = f[rng.choice(len(f), k, replace=False)]
        for _ in range(100):
            a = ((f[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
            new = np.stack([f[a == j].mean(0) if (a == j).any() else centres[j] for j in range(k)])
            if np.allclose(new, centres):
                break
            centres = new
        inertia = float(((f - centres[a]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, a)
    return best[1]


def build(args) -> int:
    from trainer.datasets import load_dataset
    d = load_dataset(args.dataset, download=False)
    names = [d.tree.names[i] for i in d.tree.leaves]
    if args.flat:
        from safetensors.numpy import load_file
        w = load_file(args.flat)
        f = np.asarray(w[sorted(k for k in w if k.endswith(".weight"))[-1]], dtype=np.float64)
        if len(f) != len(names):
            raise SystemExit(f"{args.flat}: its output layer has {len(f)} rows; the data set has {len(names)} classes")
    else:
        x = d.train_x.reshape(len(d.train_x), -1).astype(np.float64) / 255.0
        f = np.stack([x[d.train_y == c].mean(0) for c in range(len(names))])
    f = f - f.mean(0)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    a = kmeans(f, args.groups)
    groups = [np.flatnonzero(a == j) for j in range(args.groups) if (a == j).any()]
    tree = {"root": [f"group {j}" for j in range(len(groups))]}
    tree.update({f"group {j}": [names[c] for c in g] for j, g in enumerate(groups)})
    Path(args.out).write_text(json.dumps(tree, ensure_ascii=False, indent=1) + "\n")
    print(f"{args.out}: {len(groups)} groups of {min(map(len, groups))}-{max(map(len, groups))} classes")
    return 0


def score(args) -> int:
    import torch

    from hierarchy.decode import greedy
    from hierarchy.metrics import info_f1
    from trainer.datasets import load_dataset
    from trainer.device.client import load_numpy
    from trainer.device.nets import build_net
    from trainer.prepare import prepare
    from trainer.protocol.run import load_run_config
    from trainer.transports.inprocess import Federation
    cfg = load_run_config(args.run)
    prep = prepare(cfg)
    fed = Federation(Path(args.run), "hmoe", cfg, prep)
    d, tree = prep.data, prep.data.tree
    x = torch.from_numpy(d.input_spec.normalize(d.test_x))
    probs = {}
    for key, task in fed.tasks.items():
        net = build_net(task.net)
        load_numpy(net, fed.weights[key])
        with torch.no_grad():
            probs[task.node] = torch.softmax(net.eval()(x), 1).numpy()
    dec = greedy(tree, lambda node, idx: probs[node][idx], len(x))
    pred = [tree.names[v] for v in dec.nodes]
    true = [tree.names[tree.leaves[y]] for y in d.test_y]
    own = load_dataset(cfg.dataset, download=False).tree
    index = {n: i for i, n in enumerate(own.names)}
    f1 = float(info_f1(own, np.array([index[n] for n in true]), np.array([index[n] for n in pred])).mean())
    kids = np.array(tree.children(0))
    top = np.array([list(tree.path(int(tree.leaves[y])))[1] for y in d.test_y])
    print(json.dumps({"run": args.run, "leaf_accuracy": float(np.mean([a == b for a, b in zip(pred, true)])),
                      "root_accuracy": float((kids[probs[0].argmax(1)] == top).mean()),
                      "info_f1_on_the_data_sets_tree": f1, "experts": len(probs)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write a learned two-level tree (JSON for hmoe train --tree)")
    b.add_argument("--dataset", required=True)
    b.add_argument("--groups", type=int, default=22)
    b.add_argument("--flat", help="a flat model's safetensors: cluster its output layer's rows")
    b.add_argument("--out", required=True)
    s = sub.add_parser("score", help="a run on a learned tree, scored on the data set's own tree")
    s.add_argument("--run", required=True)
    args = p.parse_args(argv)
    return build(args) if args.cmd == "build" else score(args)


if __name__ == "__main__":
    raise SystemExit(main())
