"""Growing a taxonomy: which experts a new tree keeps, changes or adds, and the weights
each starts from (numpy only). Experts are independent, so a new class costs only the
experts it touches:

- kept: the node is an expert in both trees with the same children in the same order and
  the same network; its weights carry over bit for bit;
- changed: the node is an expert in both trees but its children differ; it starts from
  its old weights, with each surviving child's output row kept and a freshly initialised
  row for each new child (so on the old children it answers exactly as before);
- new: the node has no expert in the old tree (a new node, or one that now has two or
  more children); it starts from scratch.

``hmoe train --extend NEW_TREE --from-run OLD --out NEW`` (``extension_config`` and
``seed_extension``) makes a new run directory from these: the old run's settings with the
new tree, starting checkpoints as above, and a strategy that trains only the changed and
new experts. The flat baseline grows the only way it can: its output layer gains a row per
new leaf (old rows kept) and the whole network is fine-tuned.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from hierarchy import Hierarchy
from hierarchy.errors import UsageError
from trainer.device.config import Weights
from trainer.protocol.run import RunConfig, RunError, run_files, refuse_trunk
from trainer.protocol.strategy import FLAT, Task, make_tasks

OUT_W, OUT_B = "head.3.weight", "head.3.bias"   # the output layer of trainer.device.nets.ConvNet


@dataclass
class ExtensionPlan:
    kept: list[str] = field(default_factory=list)
    changed: dict[str, dict] = field(default_factory=dict)   # name -> {"added": [...], "removed": [...]}
    new: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"kept": self.kept, "changed": self.changed, "new": self.new}


def _children(tree: Hierarchy, name: str) -> list[str]:
    return [tree.names[c] for c in tree.children(tree.index(name))]


def plan_extension(old: Hierarchy, new: Hierarchy, old_tasks: dict[str, Task],
                   new_tasks: dict[str, Task]) -> ExtensionPlan:
    """Sort the new tree's experts into kept, changed and new (module docstring)."""
    plan = ExtensionPlan()
    for key, task in new_tasks.items():
        if key not in old_tasks:
            plan.new.append(key)
            continue
        before, after = _children(old, key), _children(new, key)
        same_body = {k: v for k, v in task.net.param_shapes().items() if k not in (OUT_W, OUT_B)} == \
            {k: v for k, v in old_tasks[key].net.param_shapes().items() if k not in (OUT_W, OUT_B)}
        if before == after and same_body:
            plan.kept.append(key)
        elif same_body:
            plan.changed[key] = {"added": [c for c in after if c not in before],
                                 "removed": [c for c in before if c not in after]}
        else:   # another network body (a new width or depth): nothing to carry over
            plan.new.append(key)
    return plan


def extend_weights(old_weights: Weights, before: list[str], after: list[str], fresh: Weights) -> Weights:
    """A changed expert's starting weights: every layer of ``old_weights`` but the output
    layer, whose rows follow ``after``: the old row for a child in ``before``, ``fresh``'s
    row (a new network's initialisation) for a new child."""
    out = {k: v.copy() for k, v in old_weights.items()}
    w = fresh[OUT_W].copy()
    b = fresh[OUT_B].copy()
    for i, child in enumerate(after):
        if child in before:
            j = before.index(child)
            w[i], b[i] = old_weights[OUT_W][j], old_weights[OUT_B][j]
    out[OUT_W], out[OUT_B] = w, b
    return out


def starting_weights(old: Hierarchy, new: Hierarchy, plan: ExtensionPlan, old_weights: dict[str, Weights],
                     fresh: dict[str, Weights]) -> dict[str, Weights]:
    """Every new-tree expert's starting weights: kept ones as they were (the same arrays'
    bytes), changed ones by ``extend_weights``, new ones from ``fresh``."""
    start: dict[str, Weights] = {}
    for key in plan.kept:
        start[key] = {k: np.array(v, copy=True) for k, v in old_weights[key].items()}
    for key in plan.changed:
        start[key] = extend_weights(old_weights[key], _children(old, key), _children(new, key), fresh[key])
    for key in plan.new:
        start[key] = fresh[key]
    return start


def _leaves(tree: Hierarchy) -> list[str]:
    return [tree.names[v] for v in tree.leaf_order]


def parse_arrival(text: str | None, added: list[str]) -> dict | None:
    """``--arrival``: 'LEAF,LEAF@SHARE' (those leaves' samples on a seeded SHARE of the
    clients), or 'SHARE' for the leaves a grown run adds; None or '' : everywhere."""
    if not text:
        return None
    leaves_text, _, share_text = text.rpartition("@")
    leaves = [n.strip() for n in leaves_text.split(",") if n.strip()] if leaves_text else list(added)
    try:
        share = float(share_text)
    except ValueError:
        raise UsageError(f"--arrival {text!r}: expected LEAF,LEAF@SHARE or SHARE, SHARE a number in (0, 1]") from None
    if not leaves:
        raise UsageError(f"--arrival {text!r} names no leaves, and the run adds none; expected LEAF,LEAF@SHARE")
    if not 0.0 < share <= 1.0:
        raise UsageError(f"--arrival {text!r}: share of clients {share}; expected a number in (0, 1]")
    return {"leaves": leaves, "clients": share}


def extension_config(from_run: Path, new_tree: Hierarchy, kinds: list[str], hmoe_rounds: int | None,
                     flat_rounds: int | None, arrival: str | None, device: str) -> tuple[RunConfig, ExtensionPlan]:
    """The config of a run grown from ``from_run`` onto ``new_tree``: the old run's settings,
    the new tree, the rounds given (default: 20 per expert to train for HMoE, the old run's
    half for the flat fine-tune) and a strategy that trains only the changed and new experts."""
    old_cfg, old_tree, spec = run_files(from_run)
    refuse_trunk(old_cfg, "--extend")
    old_tasks = old_cfg.tasks("hmoe", old_tree, spec.shape)
    new_tasks = old_cfg.tasks("hmoe", new_tree, spec.shape)
    plan = plan_extension(old_tree, new_tree, old_tasks, new_tasks)
    train = sorted(plan.changed) + sorted(plan.new)
    if "hmoe" in kinds and not train:
        raise UsageError(f"the new tree changes no expert of {from_run}'s tree: nothing to train")
    added = [n for n in _leaves(new_tree) if n not in _leaves(old_tree)]
    if "flat" in kinds and not (Path(from_run) / "flat.safetensors").is_file():
        raise RunError(f"{from_run} has no flat model to grow (flat.safetensors); grow --model hmoe")
    for key in plan.kept + list(plan.changed):
        if not (Path(from_run) / "experts" / f"{old_tasks[key].file_stem}.safetensors").is_file():
            raise RunError(f"{from_run}: expert {key!r} has no checkpoint (experts/{old_tasks[key].file_stem}"
                           ".safetensors); is it a trained run?")
    cfg = replace(old_cfg, tree=new_tree.to_dict(), arrival=parse_arrival(arrival, added),
                  train_only=train, device=device,
                  hmoe_rounds=20 * len(train) if hmoe_rounds is None else hmoe_rounds,
                  flat_rounds=max(1, old_cfg.flat_rounds // 2) if flat_rounds is None else flat_rounds,
                  extends={"from_run": str(Path(from_run).resolve()), "added_leaves": added,
                           "removed_leaves": [n for n in _leaves(old_tree) if n not in _leaves(new_tree)],
                           **plan.to_dict()})
    return cfg, plan


def seed_extension(run_dir: Path, cfg: RunConfig, tree: Hierarchy, shape: tuple[int, int, int],
                   kinds: list[str]) -> None:
    """Write the starting checkpoints of a grown run that are not there yet (so a start that
    was cut off and resumed writes the rest): kept experts' files copied byte for byte,
    changed experts and the flat model extended (``extend_weights``), new experts left to
    the federation's own initialisation."""
    import torch

    from trainer.protocol.checkpoint import load_checkpoint, save_checkpoint
    from trainer.device.client import to_numpy
    from trainer.device.nets import build_net
    from trainer.protocol.strategy import stable_seed
    ext, run_dir = cfg.extends, Path(run_dir)
    old = Path(ext["from_run"])
    old_cfg, old_tree, _ = run_files(old)

    def fresh(key: str, task: Task) -> Weights:   # what Federation would initialise it to
        torch.manual_seed(stable_seed(cfg.seed, "init", key))
        return to_numpy(build_net(task.net))

    if "hmoe" in kinds:
        old_tasks, new_tasks = old_cfg.tasks("hmoe", old_tree, shape), cfg.tasks("hmoe", tree, shape)
        for key in ext["kept"] + list(ext["changed"]):
            src = old / "experts" / f"{old_tasks[key].file_stem}.safetensors"
            dst = run_dir / "experts" / f"{new_tasks[key].file_stem}.safetensors"
            if dst.exists():
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            if key in ext["kept"]:
                shutil.copyfile(src, dst)
            else:
                weights, _, _ = load_checkpoint(src)
                start = extend_weights(weights, _children(old_tree, key), _children(tree, key),
                                       fresh(key, new_tasks[key]))
                save_checkpoint(dst, start, new_tasks[key].net, {"node": key, "round": None, "grown_from": str(src)})
    if "flat" in kinds and not (run_dir / "flat.safetensors").exists():
        task = make_tasks(tree, "flat", shape, cfg.flat_width, cfg.depth)[FLAT]
        weights, net, _ = load_checkpoint(old / "flat.safetensors")
        if net.width != task.net.width or net.depth != task.net.depth:
            raise RunError(f"{old}/flat.safetensors is a width-{net.width} network; this run's flat model is "
                           f"width {task.net.width}")
        start = extend_weights(weights, _leaves(old_tree), _leaves(tree), fresh(FLAT, task))
        save_checkpoint(run_dir / "flat.safetensors", start, task.net,
                        {"node": FLAT, "round": None, "grown_from": str(old / "flat.safetensors")})
