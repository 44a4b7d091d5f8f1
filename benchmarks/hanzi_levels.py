"""Where an HMoE run loses accuracy, level by level: how often the root expert picks the
right child (on held-out test images and on training images), and how often a second-level
expert picks the right child when the root was right (test and training images).

    python benchmarks/hanzi_levels.py --run runs/hanzi500-v2

Prints the four rates; written for the hanzi data set (a two-level tree) but works on any
run whose tree has experts below the root.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--train-images", type=int, default=5000, help="training images to score (the first N)")
    args = p.parse_args(argv)
    import torch

    from trainer.prepare import prepare
    from trainer.protocol.run import load_run_config
    from trainer.transports.inprocess import Federation
    cfg = load_run_config(args.run)
    prep = prepare(cfg)
    fed = Federation(Path(args.run), "hmoe", cfg, prep)
    d, tree = prep.data, prep.data.tree
    nets = {task.node: fed.net(key).eval() for key, task in fed.tasks.items()}   # (on the trunk where shared)
    root = int(tree.experts[0])
    kids = np.array(tree.children(root))

    def child(leaf: int, node: int) -> int:
        path = list(tree.path(int(leaf)))
        return path[path.index(node) + 1]

    def rates(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        x = torch.from_numpy(d.input_spec.normalize(x))
        leaves = tree.leaves[y]
        with torch.no_grad():
            picked = kids[nets[root](x).numpy().argmax(1)]
        true = np.array([child(leaf, root) for leaf in leaves])
        ok = picked == true
        right = total = 0
        for node in np.unique(true[ok]):
            if int(node) not in nets:
                continue
            idx = np.flatnonzero(ok & (true == node))
            with torch.no_grad():
                second = np.array(tree.children(int(node)))[nets[int(node)](x[idx]).numpy().argmax(1)]
            want = np.array([child(leaf, int(node)) for leaf in leaves[idx]])
            right, total = right + int((second == want).sum()), total + len(idx)
        return float(ok.mean()), right / max(1, total)

    test = rates(d.test_x, d.test_y)
    n = min(args.train_images, len(d.train_y))
    train = rates(d.train_x[:n], d.train_y[:n])
    print(f"root picks the right child: {test[0]:.3f} of held-out test images, {train[0]:.3f} of {n} training images")
    print(f"second level right when the root was: {test[1]:.3f} (test), {train[1]:.3f} (training)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
