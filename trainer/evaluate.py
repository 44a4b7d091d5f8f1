"""Evaluation on held-out data: information metrics, leaf accuracy, per-expert accuracy."""

from __future__ import annotations

import numpy as np
import torch

from hierarchy import Hierarchy, decode, leaf_rule, majority_rule, summarize
from hierarchy.errors import UsageError
from trainer.device.client import Normalizer
from trainer.device.nets import ConvNet

FLAT_RULES = {"leaf": leaf_rule, "majority": majority_rule}


@torch.no_grad()
def predict_logits(net: ConvNet, x: np.ndarray, normalize: Normalizer, batch: int = 1024,
                   device: str = "cpu") -> np.ndarray:
    """Logits for uint8 images ``x``."""
    net.eval()
    out = [net(normalize(torch.from_numpy(np.ascontiguousarray(x[lo:lo + batch]))).to(device)).float().cpu().numpy()
           for lo in range(0, len(x), batch)]
    return np.concatenate(out) if out else np.zeros((0, net.cfg.num_outputs), dtype=np.float32)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


TEMPERATURES = np.exp(np.linspace(np.log(0.25), np.log(8.0), 41))   # the grid a temperature is fitted on


def fit_temperature(logits: np.ndarray, target: np.ndarray) -> float:
    """The temperature (on ``TEMPERATURES``) whose softmax gives ``target`` the least mean negative
    log-likelihood: Guo et al., ICML 2017's calibration, one scalar per expert; 1 without samples."""
    if not len(target):
        return 1.0
    nll = [-np.mean(np.log(np.clip(softmax(logits, t)[np.arange(len(target)), target], 1e-12, None)))
           for t in TEMPERATURES]
    return float(TEMPERATURES[int(np.argmin(nll))])


def fit_temperatures(tree: Hierarchy, nets: dict[int, ConvNet], x: np.ndarray, y: np.ndarray,
                     normalize: Normalizer, device: str = "cpu") -> dict[int, float]:
    """Every expert's temperature, fitted on the samples of ``x`` (validation) under it."""
    out = {}
    for expert, net in nets.items():
        mask, target = tree.lcpn(expert, y)
        out[expert] = fit_temperature(predict_logits(net, x[mask], normalize, device=device), target)
    return out


@torch.no_grad()
def predict_probs(net: ConvNet, x: np.ndarray, normalize: Normalizer, batch: int = 1024,
                  device: str = "cpu", temperature: float = 1.0) -> np.ndarray:
    """Softmax outputs for uint8 images ``x`` (of the logits over ``temperature``)."""
    net.eval()
    out = []
    for lo in range(0, len(x), batch):
        xb = normalize(torch.from_numpy(np.ascontiguousarray(x[lo:lo + batch]))).to(device)
        out.append(torch.softmax(net(xb).float() / temperature, dim=1).cpu().numpy())
    if not out:
        return np.zeros((0, net.cfg.num_outputs), dtype=np.float32)
    return np.concatenate(out)


def _scores(tree: Hierarchy, y: np.ndarray, pred: np.ndarray) -> dict:
    gt = tree.leaves[y]
    s = summarize(tree, gt, pred)
    s["leaf_accuracy"] = float(np.mean(pred == gt)) if len(gt) else float("nan")
    s["leaf_recall"] = {tree.names[int(v)]: float(np.mean(pred[gt == v] == v)) for v in tree.leaf_order
                        if (gt == v).any()}   # per class: a grown class's own figure
    return s


def evaluate_hmoe(tree: Hierarchy, nets: dict[int, ConvNet], x: np.ndarray, y: np.ndarray,
                  normalize: Normalizer, decoder: str = "greedy", device: str = "cpu",
                  temperatures: dict[int, float] | None = None) -> dict[str, float]:
    """Decode with ``decoder`` (greedy | beam:K | threshold:T); only visited experts run, each
    with its ``temperatures`` entry where given (calibrated probabilities)."""
    temperatures = temperatures or {}

    def expert_fn(expert: int, idx: np.ndarray) -> np.ndarray:
        return predict_probs(nets[expert], x[idx], normalize, device=device,
                             temperature=temperatures.get(expert, 1.0))

    d = decode(tree, expert_fn, len(x), decoder)
    out = _scores(tree, y, d.nodes)
    out["experts_per_input"] = float(d.experts_evaluated.mean()) if len(x) else 0.0
    return out


def evaluate_flat(tree: Hierarchy, net: ConvNet, x: np.ndarray, y: np.ndarray, normalize: Normalizer,
                  rule: str = "leaf", device: str = "cpu") -> dict[str, float]:
    try:
        fn = FLAT_RULES[rule]
    except KeyError:
        raise UsageError(f"unknown flat rule {rule!r}; expected one of {', '.join(FLAT_RULES)}") from None
    return _scores(tree, y, fn(tree, predict_probs(net, x, normalize, device=device)))


def expert_accuracy(tree: Hierarchy, expert: int, net: ConvNet, x: np.ndarray, y: np.ndarray,
                    normalize: Normalizer, device: str = "cpu") -> tuple[float, int]:
    """Accuracy of one expert on the samples whose true leaf lies under it (LCPN targets)."""
    mask, target = tree.lcpn(expert, y)
    if not mask.any():
        return float("nan"), 0
    probs = predict_probs(net, x[mask], normalize, device=device)
    return float(np.mean(probs.argmax(axis=1) == target)), int(mask.sum())


def validation_error(tree: Hierarchy, task, weights: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray,
                     normalize: Normalizer, device: str = "cpu", trunk: dict | None = None) -> float:
    """1 - accuracy of ``task``'s expert with ``weights`` on the validation samples under it
    (0 when none lies under it): what the worst-validation schedule reads, on every transport.
    ``trunk``: the shared trunk's weights, for an expert that runs on one."""
    from trainer.device.client import load_numpy
    from trainer.device.nets import OnTrunk, build_net, build_trunk
    net = build_net(task.net)
    load_numpy(net, weights)
    if task.net.trunk_blocks:
        net = OnTrunk(build_trunk(task.net, trunk), net)
    net = net.to(device)
    acc, n = expert_accuracy(tree, task.node, net, x, y, normalize, device)
    return 1.0 - acc if n else 0.0
