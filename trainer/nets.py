"""The small CNN family used for every expert and for the flat-softmax baseline."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn


@dataclass(frozen=True)
class NetConfig:
    """Everything needed to rebuild a network; saved inside every checkpoint."""

    in_shape: tuple[int, int, int]   # C, H, W
    num_outputs: int
    width: int = 16                  # channels of the first conv block; doubles per block
    depth: int = 0                   # conv blocks; 0 = chosen from the input size
    hidden: int = 0                  # units of the hidden dense layer; 0 = 4 * width

    def resolved(self) -> "NetConfig":
        c, h, w = self.in_shape
        depth = self.depth or (1 if min(h, w) < 16 else 2 if min(h, w) <= 32 else 3 if min(h, w) <= 64 else 4)
        if min(h, w) >> depth < 1:
            raise ValueError(f"input {self.in_shape} is too small for {depth} conv blocks")
        return replace(self, in_shape=tuple(self.in_shape), depth=depth, hidden=self.hidden or 4 * self.width)

    def to_json(self) -> str:
        return json.dumps(asdict(self.resolved()))

    @classmethod
    def from_json(cls, text: str) -> "NetConfig":
        d = json.loads(text)
        d["in_shape"] = tuple(d["in_shape"])
        return cls(**d).resolved()


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
