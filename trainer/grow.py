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

This is the first part of issue #14: the run-directory command (``hmoe train --extend``),
the class-incremental benchmark and subtree serving build on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hierarchy import Hierarchy
from trainer.fedavg import Weights
from trainer.strategy import Task

OUT_W, OUT_B = "head.3.weight", "head.3.bias"   # the output layer of trainer.nets.ConvNet


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
