"""The server's own update of a task on its validation split: FLTrust's reference (Cao et al.,
NDSS 2021; trainer.protocol.aggregate.trust_results). The device core's local update on the
samples the run held out for validation, from the task's weights at the round's start, with
the round's hyper-parameters, so every transport computes the same one."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from trainer.device.client import local_update
from trainer.device.config import LocalConfig, Weights


MAX_EPOCHS = 50   # a reference on a few validation samples repeats them at most this often


def reference_update(task, tree, weights: Weights, config: LocalConfig, seed: int, x: np.ndarray, y: np.ndarray,
                     normalize, device: str = "cpu", trunk: Weights | None = None, steps: int = 0) -> Weights | None:
    """The reference weights of ``task`` (None when no validation sample lies under it), trained
    for about ``steps`` optimizer steps (the round's median client's; 0: ``config``'s epochs),
    so its change is as long as a typical device's."""
    mask, target = task.select(tree, y)
    if not mask.any():
        return None
    if steps:
        per_epoch = -(-int(mask.sum()) // config.batch_size)
        config = replace(config, epochs=int(min(MAX_EPOCHS, max(1, round(steps / per_epoch)))))
    new, _ = local_update(task.net, weights, x[mask], target, config, normalize, seed, device, trunk=trunk)
    return new
