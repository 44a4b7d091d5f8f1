"""The memory meter and the micro-batch planner of memory-capped local training (device
core: used by the edge runtime's trainer and by the Flower ClientApp; torch is imported
lazily, with the local update).

"Growth" is the peak resident-set growth of the process over its idle state, where idle
means torch already warmed up by one step of a one-channel network (the same definition as
the per-round cost, docs/COSTS.md). A cap is met by choosing the micro-batch: one training
step is measured at micro-batches 1, 2, 4, ..., the largest whose measured step stayed
under the cap is used, and gradients are accumulated so the effective batch, and so the
result, does not change.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from hierarchy.errors import HmoeError

SAFETY = 0.85  # a probe must stay under this fraction of the cap


class MemoryCapError(HmoeError, ValueError):
    """A memory cap is too small for even one sample at a time."""


def _vm_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


class PeakMeter:
    """Peak RSS growth over a baseline, via VmHWM reset (Linux)."""

    def __init__(self) -> None:
        gc.collect()
        self.baseline = _vm_kb("VmRSS") * 1024

    def reset(self) -> None:
        Path("/proc/self/clear_refs").write_text("5")

    def growth_mb(self) -> float:
        return max(0, _vm_kb("VmHWM") * 1024 - self.baseline) / 2**20


@dataclass
class Plan:
    micro_batch: int
    predicted_mb: float
    probes: dict[int, float]


def plan_micro_batch(net_cfg, local, normalize, x: np.ndarray, y: np.ndarray, cap_mb: float,
                     meter: PeakMeter, trunk=None) -> Plan:
    """Measure one training step at micro-batches 1, 2, 4, ... up to the batch size (growth
    over the idle baseline, so memory the allocator kept from earlier probes counts too);
    use the largest that stayed under SAFETY x cap."""
    from trainer.device.client import local_update
    sizes = []
    m = 1
    while m < local.batch_size:
        sizes.append(m)
        m *= 2
    sizes.append(local.batch_size)
    probes: dict[int, float] = {}
    chosen = None
    for m in sizes:
        if len(probes) >= 2:
            # extrapolate from the last two probes; never probe a size predicted to break the cap
            (m1, g1), (m2, g2) = list(probes.items())[-2:]
            if g2 + (g2 - g1) / (m2 - m1) * (m - m2) > cap_mb * SAFETY:
                break
        meter.reset()
        n = min(len(x), m)
        local_update(net_cfg, None, x[:n], y[:n], _one_step(local, m), normalize, seed=0, micro_batch=m,
                     trunk=trunk)
        probes[m] = meter.growth_mb()
        if probes[m] > cap_mb * SAFETY:
            break
        chosen = m
        if n < m:  # fewer samples than the micro-batch: larger ones cost the same
            chosen = local.batch_size
            break
    if chosen is None:
        raise MemoryCapError(f"memory cap {cap_mb:g} MB is too small: one sample at a time already grows memory "
                         f"by {probes[1]:.1f} MB for this expert (we keep {SAFETY:.0%} of the cap as the "
                         "limit); raise --memory-cap-mb")
    return Plan(chosen, probes.get(chosen, 0.0), probes)


def release_freed_memory() -> None:
    """glibc: serve large blocks with mmap at a fixed threshold (no dynamic raise), so memory
    freed by one step goes back to the system instead of staying resident; a no-op elsewhere."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 256 * 1024)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 * 1024)   # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _one_step(local, batch: int):
    from dataclasses import replace
    return replace(local, epochs=1, batch_size=batch)


def warm_up(net_cfg, local, normalize) -> None:
    from trainer.device.client import local_update
    from trainer.device.nets import NetConfig
    tiny = NetConfig(tuple(net_cfg.in_shape), 2, width=1, depth=net_cfg.depth, hidden=2)
    local_update(tiny, None, np.zeros((2, *net_cfg.in_shape), dtype=np.uint8), np.array([0, 1]),
                 replace(_one_step(local, 2), prior=()), normalize, seed=0)   # the task's prior is not the tiny net's
