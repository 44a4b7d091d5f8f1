"""The configs a network and a local update are rebuilt from (no torch: the strategy, the
coordinator and the checkpoint reader use them without loading it)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np

from hierarchy.errors import UsageError

Weights = dict[str, np.ndarray]   # a network's named arrays, as they travel and aggregate
TRUNK_CACHE_BYTES = 8 << 20       # a round's trunk features up to this size are computed once, not every epoch


@dataclass(frozen=True)
class NetConfig:
    """Everything needed to rebuild a network; saved inside every checkpoint."""

    in_shape: tuple[int, int, int]   # C, H, W
    num_outputs: int
    width: int = 16                  # channels of the first conv block; doubles per block
    depth: int = 0                   # conv blocks; 0 = chosen from the input size
    hidden: int = 0                  # units of the hidden dense layer; 0 = 4 * width
    # Experts on a shared trunk (docs/TRAINING.md, "Shared trunk"): the first ``trunk_blocks``
    # conv blocks are not this network's but the trunk's (the root expert's, of width
    # ``trunk_width``); this network takes the trunk's output and runs the remaining blocks
    # and its head. ``in_shape`` stays the image's. 0: an independent network (the paper's).
    trunk_blocks: int = 0
    trunk_width: int = 0             # 0 = this network's own width

    def resolved(self) -> "NetConfig":
        c, h, w = self.in_shape
        depth = self.depth or (1 if min(h, w) < 16 else 2 if min(h, w) <= 32 else 3 if min(h, w) <= 64 else 4)
        if min(h, w) >> depth < 1:
            raise UsageError(f"input {self.in_shape} is too small for {depth} conv blocks")
        if not 0 <= self.trunk_blocks <= depth:
            raise UsageError(f"--trunk-blocks {self.trunk_blocks}: expected 0 to the networks' {depth} conv blocks")
        return replace(self, in_shape=tuple(self.in_shape), depth=depth, hidden=self.hidden or 4 * self.width,
                       trunk_width=(self.trunk_width or self.width) if self.trunk_blocks else 0)

    def feature_shape(self) -> tuple[int, int, int]:
        """The shape this network takes: the image's, or the trunk's output on a shared trunk."""
        cfg = self.resolved()
        c, h, w = cfg.in_shape
        for i in range(cfg.trunk_blocks):
            c, h, w = cfg.trunk_width * 2 ** i, h // 2, w // 2
        return c, h, w

    def trunk_config(self) -> "NetConfig":
        """The trunk this network runs on, as the network of its blocks (``trunk_blocks`` deep; its
        head is never built by ``trainer.device.nets.Trunk``)."""
        cfg = self.resolved()
        return NetConfig(cfg.in_shape, 1, cfg.trunk_width, cfg.trunk_blocks)

    def to_json(self) -> str:
        return json.dumps(asdict(self.resolved()))

    @classmethod
    def from_json(cls, text: str) -> "NetConfig":
        d = json.loads(text)
        d["in_shape"] = tuple(d["in_shape"])
        return cls(**d).resolved()

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """The state-dict names and shapes of ``trainer.device.nets.ConvNet`` for this config
        (a test holds the two together), so weights can be checked without torch."""
        cfg = self.resolved()
        c, h, w = cfg.in_shape
        shapes: dict[str, tuple[int, ...]] = {}
        for i in range(cfg.depth):
            if i < cfg.trunk_blocks:   # the trunk's block: no tensor of this network's
                c, h, w = cfg.trunk_width * 2 ** i, h // 2, w // 2
                continue
            out = cfg.width * 2 ** i
            shapes[f"features.{3 * i}.weight"] = (out, c, 3, 3)
            shapes[f"features.{3 * i}.bias"] = (out,)
            c, h, w = out, h // 2, w // 2
        shapes["head.1.weight"] = (cfg.hidden, c * h * w)
        shapes["head.1.bias"] = (cfg.hidden,)
        shapes["head.3.weight"] = (cfg.num_outputs, cfg.hidden)
        shapes["head.3.bias"] = (cfg.num_outputs,)
        return shapes

    def forward_macs(self) -> int:
        """Multiply-accumulates of one sample's forward pass (convolutions and dense layers;
        ReLU and pooling are not counted). A training step costs about three times this
        (forward, and backward through activations and weights): the deterministic measure of
        client compute (docs/COSTS.md) that does not move with the machine's load."""
        cfg = self.resolved()
        c, h, w = cfg.in_shape
        macs = 0
        for i in range(cfg.depth):
            out = (cfg.trunk_width if i < cfg.trunk_blocks else cfg.width) * 2 ** i
            if i >= cfg.trunk_blocks:   # the trunk's blocks are counted by trunk_macs
                macs += out * c * 9 * h * w
            c, h, w = out, h // 2, w // 2
        return macs + c * h * w * cfg.hidden + cfg.hidden * cfg.num_outputs

    def trunk_passes(self, samples: int, epochs: int) -> int:
        """How often a round of ``samples`` samples and ``epochs`` epochs runs the trunk over each
        sample: once when their features fit ``TRUNK_CACHE_BYTES`` (kept for the round), else
        every epoch; 0 without a trunk (trainer.device.client.local_update)."""
        if not self.trunk_blocks:
            return 0
        return 1 if samples * 4 * int(np.prod(self.feature_shape())) <= TRUNK_CACHE_BYTES else epochs

    def trunk_macs(self) -> int:
        """Multiply-accumulates of one sample's pass through the trunk this network runs on (0
        without one): a round runs it forward on every batch, without gradients."""
        cfg = self.resolved()
        c, h, w = cfg.in_shape
        macs = 0
        for i in range(cfg.trunk_blocks):
            out = cfg.trunk_width * 2 ** i
            macs += out * c * 9 * h * w
            c, h, w = out, h // 2, w // 2
        return macs


@dataclass(frozen=True)
class LocalConfig:
    """Hyper-parameters of a client's local update; sent to devices with each assignment."""

    epochs: int = field(default=1, metadata={"help": "local epochs (experts: times the balanced count)",
                                             "flag": "--local-epochs", "least": 1})
    batch_size: int = field(default=32, metadata={"help": "local batch size", "least": 1})
    lr: float = field(default=0.05, metadata={"help": "client learning rate (the first round's, with --lr-decay)"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum (Adam: its beta1)", "least": 0,
                                                   "most": 0.999})
    weight_decay: float = field(default=0.0, metadata={"help": "L2 weight decay of the client's optimizer",
                                                        "least": 0})
    optimizer: str = field(default="sgd", metadata={"help": "the client's optimizer", "choices": ("sgd", "adam")})
    clip_norm: float = field(default=0.0, metadata={"help": "clip each batch's gradient to this L2 norm (0: off)",
                                                     "least": 0})
    # The label-skew remedies of the local objective (docs/TRAINING.md, "Label skew"): each
    # reads only the client's own targets, so every transport applies them alike.
    prox_mu: float = field(default=0.0, metadata={
        "help": "FedProx (Li et al., MLSys 2020): add mu/2 * ||w - w_round||^2 to the loss (0: off)",
        "least": 0, "most": 1e3})
    restricted_softmax: float = field(default=1.0, metadata={
        "help": "FedRS (Li & Zhan, KDD 2021): logits of the outputs the client holds no sample of are scaled by "
                "this factor in [0, 1] during training (1: off; 0: their logits are held at 0)",
        "least": 0, "most": 1})
    logit_adjust: float = field(default=1.0, metadata={
        "help": "balanced softmax / FedLC-style calibration (Ren et al., NeurIPS 2020; Zhang et al., ICML 2022): "
                "add tau * (log of the client's share of each output - log of the federation's share) to the "
                "logits during training, so an output the client lacks gets no push down and one it holds more of "
                "than the federation no free lead (0: off)",
        "least": 0, "most": 10})
    prior: tuple = field(default=(), metadata={
        "help": "set by the strategy with --logit-adjust: the share of each output in the whole federation, the "
                "prior the adjusted logits are calibrated to", "internal": True})

    def __post_init__(self) -> None:
        if not isinstance(self.prior, tuple):
            object.__setattr__(self, "prior", tuple(self.prior) if isinstance(self.prior, list) else self.prior)
        if not isinstance(self.prior, tuple) or not all(
                isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 1 for p in self.prior):
            raise UsageError(f"prior {self.prior!r}: expected a list of shares in [0, 1], one per output")
        for f in fields(self):
            if f.metadata.get("internal"):
                continue
            value, meta = getattr(self, f.name), f.metadata
            flag = meta.get("flag") or "--" + f.name.replace("_", "-")
            kinds = {"int": (int,), "float": (int, float), "str": (str,)}[str(f.type)]
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise UsageError(f"{flag} {value!r}: expected {'a number' if f.type != 'str' else 'a name'}")
            if meta.get("least") is not None and value < meta["least"] or \
                    meta.get("most") is not None and value > meta["most"]:
                bound = f"in [{meta['least']:g}, {meta['most']:g}]" if meta.get("most") is not None \
                    else f"at least {meta['least']:g}"
                raise UsageError(f"{flag} must be {bound}; got {value}")
            if meta.get("choices") and value not in meta["choices"]:
                raise UsageError(f"{flag} {value!r}; expected one of {', '.join(meta['choices'])}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be positive; got {self.lr}")

    def to_dict(self) -> dict:
        """JSON's shapes: the prior as a list (what every transport reads back)."""
        return {**asdict(self), "prior": list(self.prior)}

    @classmethod
    def from_dict(cls, d: dict) -> "LocalConfig":
        """Refuses names this release does not know (a newer coordinator's), naming them."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise UsageError(f"unknown hyper-parameters {', '.join(unknown)}")
        return cls(**d)

    def differences(self, other: "LocalConfig") -> list[str]:
        """Names of the fields whose values differ from ``other``'s."""
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]
