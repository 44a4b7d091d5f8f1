"""The small CNN family used for every expert and for the flat-softmax baseline."""

from __future__ import annotations

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


def num_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def analytic_bytes(cfg: NetConfig, batch_size: int, optimizer_slots: int = 1) -> dict[str, int]:
    """Parameters + gradients + optimizer state + one batch of activations (float32)."""
    net = build_net(cfg)
    params = num_params(net)
    acts = 0

    def count(_m, _inp, out):
        nonlocal acts
        acts += out.numel()

    hooks = [m.register_forward_hook(count) for m in net.modules() if not list(m.children())]
    with torch.no_grad():
        net(torch.zeros(batch_size, *cfg.resolved().in_shape))
    for h in hooks:
        h.remove()
    out = {"params": params * 4, "grads": params * 4, "optimizer": optimizer_slots * params * 4,
           "activations": (acts + batch_size * int(torch.tensor(cfg.resolved().in_shape).prod())) * 4}
    out["total"] = sum(out.values())
    return out
