"""One client's local update of one network (expert or flat), independent of any loop."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from hierarchy.errors import UsageError
from trainer.device.config import LocalConfig, NetConfig
from trainer.device.config import Weights
from trainer.device.nets import build_net


class Normalizer:
    """uint8 images -> float32 normalised tensors, per channel."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


def to_numpy(net: nn.Module) -> Weights:
    return {k: v.detach().cpu().numpy().copy() for k, v in net.state_dict().items()}


def load_numpy(net: nn.Module, weights: Weights) -> None:
    state = {k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()}
    net.load_state_dict(state, strict=True)


def make_optimizer(params, cfg: LocalConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise UsageError(f"unknown optimizer {cfg.optimizer!r}; expected sgd or adam")


TRAIN_THREADS = 1   # torch threads of every local update, on every transport (see local_update)


def local_update(net_cfg: NetConfig, weights: Weights | None, x: np.ndarray, y: np.ndarray,
                 cfg: LocalConfig, normalize: Normalizer, seed: int,
                 device: str = "cpu", micro_batch: int | None = None,
                 threads: int = TRAIN_THREADS) -> tuple[Weights, dict]:
    """Train from ``weights`` on uint8 images ``x`` with child/leaf targets ``y``.

    The update runs on ``threads`` torch threads (restored afterwards). A CPU kernel's
    reductions split by thread count, so the same update on one and on two threads differs
    in the last bits, and those differences grow over a round: every transport (the
    in-process simulation, Flower's nodes, ``hmoe-edge train`` and ``sync``) trains with
    ``TRAIN_THREADS`` so that they all give the same experts with default flags.

    ``micro_batch`` splits every batch into smaller chunks whose gradients are
    accumulated (loss scaled by chunk share), so the update equals the full batch's
    while peak memory follows the micro-batch.
    """
    if len(x) == 0:
        raise UsageError("local_update needs at least one sample")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _update(net_cfg, weights, x, y, cfg, normalize, seed, device, micro_batch)
    finally:
        torch.set_num_threads(previous)


def _update(net_cfg: NetConfig, weights: Weights | None, x: np.ndarray, y: np.ndarray, cfg: LocalConfig,
            normalize: Normalizer, seed: int, device: str, micro_batch: int | None) -> tuple[Weights, dict]:
    torch.manual_seed(seed)
    net = build_net(net_cfg).to(device)
    if weights is not None:
        load_numpy(net, weights)
    opt = make_optimizer(net.parameters(), cfg)
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(np.ascontiguousarray(x))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    n = len(xt)
    mb = micro_batch or cfg.batch_size
    losses: list[float] = []
    start = time.perf_counter()
    net.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        for lo in range(0, n, cfg.batch_size):
            batch = order[lo:lo + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for clo in range(0, len(batch), mb):
                chunk = batch[clo:clo + mb]
                xb = normalize(xt[chunk]).to(device)
                loss = nn.functional.cross_entropy(net(xb), yt[chunk].to(device), reduction="sum") / len(batch)
                loss.backward()
                total += float(loss.detach())
            if cfg.clip_norm > 0:
                nn.utils.clip_grad_norm_(net.parameters(), cfg.clip_norm)
            opt.step()
            losses.append(total)
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    return to_numpy(net.cpu()), {"num_samples": n, "train_loss": float(np.mean(losses)),
                                 "train_seconds": elapsed}
