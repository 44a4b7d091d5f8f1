"""The server's own update of a task on its validation split: FLTrust's reference (Cao et al.,
NDSS 2021; trainer.protocol.aggregate.trust_results). The device core's local update on the
samples the run held out for validation, from the task's weights at the round's start, with
the round's hyper-parameters, so every transport computes the same one."""

from __future__ import annotations

import numpy as np

from trainer.device.client import local_update
from trainer.device.config import LocalConfig, Weights


def reference_update(task, tree, weights: Weights, config: LocalConfig, seed: int, x: np.ndarray, y: np.ndarray,
                     normalize, device: str = "cpu", trunk: Weights | None = None) -> Weights | None:
    """The reference weights of ``task`` (None when no validation sample lies under it)."""
    mask, target = task.select(tree, y)
    if not mask.any():
        return None
    new, _ = local_update(task.net, weights, x[mask], target, config, normalize, seed, device, trunk=trunk)
    return new
