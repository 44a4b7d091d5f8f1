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


class Objective:
    """The local loss with the label-skew remedies of ``LocalConfig`` (docs/TRAINING.md, "Label
    skew"), all derived from the client's own targets ``counts`` (samples per output):

    - restricted softmax (FedRS): the logits of outputs with no local sample are multiplied by
      ``restricted_softmax`` (1: plain softmax), so a client that holds one child of an expert
      does not push the others' rows down as hard;
    - logit adjustment (balanced softmax, FedLC; Menon et al., ICLR 2021):
      ``logit_adjust * (log(count / n) - log(prior))`` is added to the logits, so the
      network learns the logits of the federation's label distribution ``prior`` (sent by the
      strategy; uniform when empty) whatever the client's own; an output with no local
      sample gets -inf, i.e. no probability and no gradient;
    - proximal term (FedProx): ``prox_mu / 2 * ||w - w_round||^2``, once per batch.
    Plain cross entropy when all three are off (the update is then bit-identical to it)."""

    def __init__(self, cfg: LocalConfig, counts: np.ndarray, anchor: list[torch.Tensor] | None, device: str) -> None:
        self.cfg, self.anchor = cfg, anchor
        held = torch.from_numpy(counts > 0).to(device)
        self.scale = None
        if cfg.restricted_softmax < 1:
            self.scale = torch.where(held, 1.0, float(cfg.restricted_softmax)).to(device)
        self.shift = None
        if cfg.logit_adjust > 0:
            share = torch.from_numpy(counts / max(1, counts.sum())).float().to(device)
            log_prior = torch.zeros_like(share)
            if cfg.prior:
                if len(cfg.prior) != len(counts):
                    raise UsageError(f"prior has {len(cfg.prior)} shares; the network has {len(counts)} outputs")
                log_prior = torch.log(torch.tensor(cfg.prior, dtype=torch.float32).clamp_min(1e-12)).to(device)
            self.shift = torch.where(held, cfg.logit_adjust * (torch.log(share.clamp_min(1e-12)) - log_prior),
                                     torch.tensor(float("-inf"), device=device))

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Summed cross entropy of the batch's ``logits`` under the remedies."""
        if self.scale is not None:
            logits = logits * self.scale
        if self.shift is not None:
            logits = logits + self.shift
        return nn.functional.cross_entropy(logits, target, reduction="sum")

    def proximal(self, net: nn.Module) -> torch.Tensor:
        return 0.5 * self.cfg.prox_mu * sum(((p - a) ** 2).sum() for p, a in zip(net.parameters(), self.anchor))


TRAIN_THREADS = 1   # torch threads of every local update, on every transport (see local_update)


def local_update(net_cfg: NetConfig, weights: Weights | None, x: np.ndarray, y: np.ndarray,
                 cfg: LocalConfig, normalize: Normalizer, seed: int,
                 device: str = "cpu", micro_batch: int | None = None,
                 threads: int = TRAIN_THREADS, trunk: Weights | None = None) -> tuple[Weights, dict]:
    """Train from ``weights`` on uint8 images ``x`` with child/leaf targets ``y``.

    The update runs on ``threads`` torch threads (restored afterwards). A CPU kernel's
    reductions split by thread count, so the same update on one and on two threads differs
    in the last bits, and those differences grow over a round: every transport (the
    in-process simulation, Flower's nodes, ``hmoe-edge train`` and ``sync``) trains with
    ``TRAIN_THREADS`` so that they all give the same experts with default flags.

    ``micro_batch`` splits every batch into smaller chunks whose gradients are
    accumulated (loss scaled by chunk share), so the update equals the full batch's
    while peak memory follows the micro-batch.

    An expert on a shared trunk (``net_cfg.trunk_blocks``) needs ``trunk``: the trunk's tensors
    (the root expert's weights, or just their trunk part). The trunk runs forward without
    gradients, ``TRUNK_CHUNK`` images at a time, and only the expert trains on its features:
    once for the round's samples when their features fit ``config.TRUNK_CACHE_BYTES``, else on
    every batch of every epoch (then the round holds one batch of features at a time).
    """
    if len(x) == 0:
        raise UsageError("local_update needs at least one sample")
    if net_cfg.trunk_blocks and trunk is None:
        raise UsageError("this expert runs on a shared trunk (trunk_blocks "
                         f"{net_cfg.trunk_blocks}); its update needs the trunk's weights")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        trunk_seconds = 0.0
        if net_cfg.trunk_blocks:
            normalize = OnTrunkInput(net_cfg, trunk, normalize, device)
            if net_cfg.trunk_passes(len(x), cfg.epochs) == 1:   # once a round, not once an epoch
                start = time.perf_counter()
                x, normalize = normalize.features(x), identity
                trunk_seconds = time.perf_counter() - start
        new, metrics = _update(net_cfg, weights, x, y, cfg, normalize, seed, device, micro_batch)
        metrics["train_seconds"] += trunk_seconds   # the trunk's pass is part of the round
        return new, metrics
    finally:
        torch.set_num_threads(previous)


TRUNK_CHUNK = 8                  # images the frozen trunk runs at once: its activations, not a batch's, peak


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


class OnTrunkInput:
    """uint8 images -> the frozen trunk's features of them (no gradients, ``TRUNK_CHUNK`` at a
    time): what an expert on the shared trunk trains on."""

    def __init__(self, net_cfg: NetConfig, trunk: Weights, normalize: Normalizer, device: str) -> None:
        from trainer.device.nets import build_trunk
        self.trunk, self.normalize, self.device = build_trunk(net_cfg, trunk).to(device), normalize, device

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.trunk(self.normalize(x[lo:lo + TRUNK_CHUNK]).to(self.device))
                          for lo in range(0, len(x), TRUNK_CHUNK)])

    def features(self, x: np.ndarray) -> np.ndarray:
        """Every image's features (a round's samples, once)."""
        return self(torch.from_numpy(np.ascontiguousarray(x))).cpu().numpy()


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
    objective = Objective(cfg, np.bincount(np.asarray(y, dtype=np.int64), minlength=net_cfg.num_outputs),
                          [p.detach().clone() for p in net.parameters()] if cfg.prox_mu > 0 else None, device)
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
                loss = objective.loss(net(xb), yt[chunk].to(device)) / len(batch)
                if objective.anchor is not None and clo == 0:
                    loss = loss + objective.proximal(net)
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
