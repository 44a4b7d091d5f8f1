"""Do a radical's expert's features transfer from the root expert? Trains the second-level
experts of a finished HMoE run again, centrally, on exactly the training images their
radical holds, from a random initialisation and from the run's root expert's weights (every
tensor but the output layer), and scores both, and the run's own federated experts, on the
held-out images of each radical's characters (the radical given).

    python benchmarks/hanzi_transfer.py --run runs/hanzi500-v2 --radicals 12 --epochs 15

Prints each radical's three accuracies and their averages weighted by held-out images. The
measurement behind --warm-start (docs/TRAINING.md, "The hanzi data set"): not a federated
result, a diagnosis.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a finished HMoE run directory")
    p.add_argument("--radicals", type=int, default=12, help="the second-level experts with the most children")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=0.05, help="from a random initialisation")
    p.add_argument("--warm-lr", type=float, default=0.005, help="from the root's weights")
    args = p.parse_args(argv)
    import torch

    from trainer.device.client import load_numpy
    from trainer.device.nets import build_net
    from trainer.prepare import prepare
    from trainer.protocol.run import load_run_config
    from trainer.transports.inprocess import Federation
    torch.set_num_threads(1)
    cfg = load_run_config(args.run)
    prep = prepare(cfg)
    fed = Federation(Path(args.run), "hmoe", cfg, prep)
    d, tree = prep.data, prep.data.tree
    tasks = {t.node: (k, t) for k, t in fed.tasks.items()}
    root = int(tree.experts[0])
    root_net = build_net(tasks[root][1].net)
    load_numpy(root_net, fed.weights[tasks[root][0]])
    last = list(root_net.state_dict())[-1].rsplit(".", 1)[0] + "."

    def child(leaf: int, node: int) -> int:
        path = list(tree.path(int(leaf)))
        return path[path.index(node) + 1]

    train_leaves, test_leaves = tree.leaves[d.train_y], tree.leaves[d.test_y]
    train_top = np.array([child(v, root) for v in train_leaves])
    test_top = np.array([child(v, root) for v in test_leaves])
    second = sorted((v for v in tasks if v != root), key=lambda v: -len(tree.children(v)))[:args.radicals]
    norm = d.input_spec.normalize
    acc: dict[str, list[tuple[float, int]]] = {"random start": [], "root's weights": [], "the run's own": []}
    for v in second:
        kids = {c: i for i, c in enumerate(tree.children(v))}
        tr, te = np.flatnonzero(train_top == v), np.flatnonzero(test_top == v)
        ytr = torch.tensor([kids[child(u, v)] for u in train_leaves[tr]])
        yte = np.array([kids[child(u, v)] for u in test_leaves[te]])
        xtr, xte = torch.from_numpy(norm(d.train_x[tr])), torch.from_numpy(norm(d.test_x[te]))

        def score(net) -> float:
            net.eval()
            with torch.no_grad():
                return float((net(xte).argmax(1).numpy() == yte).mean())

        own = build_net(tasks[v][1].net)
        load_numpy(own, fed.weights[tasks[v][0]])
        acc["the run's own"].append((score(own), len(te)))
        for mode in ("random start", "root's weights"):
            torch.manual_seed(0)
            net = build_net(tasks[v][1].net)
            lr = args.lr
            if mode == "root's weights":
                sd = net.state_dict()
                sd.update({n: t.clone() for n, t in root_net.state_dict().items()
                           if not n.startswith(last) and sd[n].shape == t.shape})
                net.load_state_dict(sd)
                lr = args.warm_lr
            opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
            for _ in range(args.epochs):
                net.train()
                perm = torch.randperm(len(tr))
                for i in range(0, len(perm), 32):
                    b = perm[i:i + 32]
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(net(xtr[b]), ytr[b]).backward()
                    opt.step()
            acc[mode].append((score(net), len(te)))
        print(f"{tree.names[v]} ({len(kids)} characters, {len(te)} held-out images): "
              + ", ".join(f"{m} {a[-1][0]:.3f}" for m, a in acc.items()), flush=True)
    for mode, rows in acc.items():
        a = np.array(rows)
        print(f"{mode}: {float((a[:, 0] * a[:, 1]).sum() / a[:, 1].sum()):.3f} (weighted by held-out images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
