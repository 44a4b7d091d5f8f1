"""Child process of trainer.device.cost: one local update, timed, with its peak memory growth.

Usage: python -m trainer.device.cost_worker DIR   (DIR holds spec.json, x.npy, y.npy, w.safetensors)

Memory is the peak growth of the first update; time is the median over ``repeats``
identical updates (spec.json, default 1). ``micro_batch`` in spec.json splits every batch
as the memory-capped trainer does (the update is the same; peak memory follows it).
"""

from __future__ import annotations

import gc
import json
import sys
import threading
from pathlib import Path

MB = 1024 * 1024


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Sampler:
    """psutil RSS sampling, for systems without a resettable VmHWM."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil
        self.proc, self.interval, self.peak = psutil.Process(), interval, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.stop.wait(self.interval)

    def __enter__(self) -> "Sampler":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def warm_up(net, local, normalize, device: str) -> None:
    """One step of a one-channel network of the same input shape: torch's one-time
    start-up (autograd engine, conv kernels, allocator pools) happens once per process
    on a device, not once per round, so it belongs to the idle baseline."""
    import numpy as np

    from dataclasses import replace

    from trainer.device.client import local_update
    from trainer.device.nets import NetConfig
    tiny = NetConfig(net.in_shape, 2, width=1, depth=net.depth, hidden=2)   # (no trunk: an image network)
    x = np.zeros((2, *net.in_shape), dtype=np.uint8)
    local_update(tiny, None, x, np.array([0, 1]), replace(local, prior=()), normalize, seed=0, device=device)


def main(folder: str) -> int:
    import numpy as np
    import psutil
    import torch
    from safetensors.numpy import load_file

    from trainer.device.client import LocalConfig, Normalizer, local_update
    from trainer.device.nets import NetConfig

    d = Path(folder)
    spec = json.loads((d / "spec.json").read_text())
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    net = NetConfig.from_json(json.dumps(spec["net"]))
    local = LocalConfig(**spec["local"])
    x, y = np.load(d / "x.npy"), np.load(d / "y.npy")
    weights = load_file(str(d / "w.safetensors"))
    trunk = load_file(str(d / "trunk.safetensors")) if (d / "trunk.safetensors").exists() else None
    normalize = Normalizer(tuple(spec["mean"]), tuple(spec["std"]))
    device = spec.get("device", "cpu")
    micro = spec.get("micro_batch")
    warm_up(net, local, normalize, device)
    gc.collect()
    result: dict = {"device": device, "samples": int(len(y)), "micro_batch": micro}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _, metrics = local_update(net, weights, x, y, local, normalize, spec["seed"], device, micro, trunk=trunk)
        result.update(mem_mb=(torch.cuda.max_memory_allocated() - base) / MB, method="torch.cuda.max_memory_allocated")
    else:
        baseline = psutil.Process().memory_info().rss
        if reset_peak() and _status_kb("VmHWM") is not None:
            _, metrics = local_update(net, weights, x, y, local, normalize, spec["seed"], device, micro, trunk=trunk)
            peak, method = _status_kb("VmHWM") * 1024, "VmHWM after clear_refs"
        else:
            with Sampler() as s:
                _, metrics = local_update(net, weights, x, y, local, normalize, spec["seed"], device, micro, trunk=trunk)
            peak, method = s.peak, "psutil RSS sampling"
        result.update(mem_mb=max(0, peak - baseline) / MB, baseline_mb=baseline / MB, peak_mb=peak / MB,
                      method=method)
    # Time: the median of ``repeats`` identical updates (the first is the memory-measured one);
    # one run of a few hundred ms on a shared machine swings by +-30%.
    times = [metrics["train_seconds"] * 1000.0]
    for _ in range(int(spec.get("repeats", 1)) - 1):
        _, again = local_update(net, weights, x, y, local, normalize, spec["seed"], device, micro, trunk=trunk)
        times.append(again["train_seconds"] * 1000.0)
    result["times_ms"] = times
    result["time_ms"] = float(np.median(times))
    if spec.get("live_peak"):
        result["live_peak_mb"] = live_tensor_peak(net, weights, x, y, local, normalize, device, micro, trunk) / MB
    (d / "result.json").write_text(json.dumps(result))
    return 0


def live_tensor_peak(net, weights, x, y, local, normalize, device: str, micro, trunk=None) -> int:
    """Peak bytes of live torch tensors during one optimizer step of the update (a network
    built, its weights loaded, one batch forward and backward, the optimizer's state
    created), from torch.profiler's memory events: the allocator's own count, which is the
    same on every run and machine with this torch build, unlike resident-set growth. Every
    step of an update peaks alike, so one step gives the update's peak."""
    from dataclasses import replace

    import numpy as np
    from torch.profiler import ProfilerActivity, profile

    from trainer.device.client import local_update
    n = min(len(y), local.batch_size)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        local_update(net, weights, x[:n], y[:n], replace(local, epochs=1), normalize, 0, device, micro, trunk=trunk)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    return int(np.cumsum([b for _, b in events]).max(initial=0))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
