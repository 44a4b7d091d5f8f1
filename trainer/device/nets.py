"""The small CNN family used for every expert and for the flat-softmax baseline."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from trainer.device.config import NetConfig


class ConvNet(nn.Module):
    """[conv3x3 - ReLU - maxpool2] x depth, then dense - ReLU - dense (logits)."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        cfg = cfg.resolved()
        self.cfg = cfg
        c, h, w = cfg.in_shape
        layers: list[nn.Module] = []
        for i in range(cfg.depth):
            if i < cfg.trunk_blocks:   # the shared trunk's block: its place kept, so tensor names match the root's
                layers += [nn.Identity(), nn.Identity(), nn.Identity()]
                c, h, w = cfg.trunk_width * 2 ** i, h // 2, w // 2
                continue
            out = cfg.width * 2 ** i
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c, h, w = out, h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, cfg.hidden), nn.ReLU(inplace=True),
                                  nn.Linear(cfg.hidden, cfg.num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_net(cfg: NetConfig) -> ConvNet:
    return ConvNet(cfg)


class Trunk(nn.Module):
    """The shared trunk: the first ``trunk_blocks`` conv blocks of the root expert, whose
    tensors it reads by their names in the root's weights (``trunk_weights``)."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        cfg = cfg.resolved()
        self.cfg = cfg.trunk_config()
        c, h, w = cfg.in_shape
        layers: list[nn.Module] = []
        for i in range(cfg.trunk_blocks):
            out = cfg.trunk_width * 2 ** i
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c = out
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def trunk_weights(cfg: NetConfig, root_weights: dict) -> dict:
    """The trunk's tensors of the root expert's weights (``features.J`` for J below 3 * blocks)."""
    blocks = cfg.resolved().trunk_blocks
    return {k: v for k, v in root_weights.items() if k.startswith("features.") and int(k.split(".")[1]) < 3 * blocks}


def build_trunk(cfg: NetConfig, root_weights: dict) -> Trunk:
    """The trunk an expert of ``cfg`` runs on, frozen, with the root expert's current weights."""
    trunk = Trunk(cfg)
    trunk.load_state_dict({k: torch.from_numpy(np.asarray(v))
                           for k, v in trunk_weights(cfg, root_weights).items()}, strict=True)
    trunk.eval()
    for p in trunk.parameters():
        p.requires_grad_(False)
    return trunk


class OnTrunk(nn.Module):
    """An expert on the shared trunk, as one network of images (evaluation and export)."""

    def __init__(self, trunk: Trunk, expert: ConvNet) -> None:
        super().__init__()
        self.trunk, self.expert, self.cfg = trunk, expert, expert.cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expert(self.trunk(x))


def num_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def analytic_bytes(cfg: NetConfig, batch_size: int, optimizer_slots: int = 1) -> dict[str, int]:
    """Parameters + gradients + optimizer state + one batch of activations (float32)."""
    net = build_net(cfg)
    params = num_params(net)
    trunk = num_params(Trunk(cfg)) if cfg.resolved().trunk_blocks else 0   # held for its forward, not trained
    acts = 0

    def count(_m, _inp, out):
        nonlocal acts
        acts += out.numel()

    hooks = [m.register_forward_hook(count) for m in net.modules() if not list(m.children())]
    with torch.no_grad():
        net(torch.zeros(batch_size, *cfg.feature_shape()))
    for h in hooks:
        h.remove()
    out = {"params": params * 4, "grads": params * 4, "optimizer": optimizer_slots * params * 4,
           "activations": (acts + batch_size * int(np.prod(cfg.feature_shape()))) * 4}
    if trunk:
        out["trunk"] = trunk * 4
    out["total"] = sum(out.values())
    return out
