"""Plots of a run: validation metric per round, per-round cost per expert."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_metric_vs_round(logs: dict[str, list[dict]], out: Path) -> Path:
    """Validation Information F1 against round and against cumulative client compute."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for kind, log in logs.items():
        spent = np.cumsum([e["client_seconds"] for e in log])
        rows = [i for i, e in enumerate(log) if e.get("val_info_f1") is not None]
        if not rows:
            continue
        f1 = [log[i]["val_info_f1"] for i in rows]
        axes[0].plot([log[i]["round"] + 1 for i in rows], f1, marker=".", label=kind)
        axes[1].plot(spent[rows], f1, marker=".", label=kind)
    axes[0].set(xlabel="round", ylabel="validation Information F1", title="metric vs round")
    axes[1].set(xlabel="cumulative client training time (s)", ylabel="validation Information F1",
                title="metric vs total client compute")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_cost_per_task(per_task: dict[str, dict], out: Path) -> Path:
    """Per-round client time and memory growth for every expert and the flat model."""
    plt = _plt()
    keys = sorted(per_task, key=lambda k: (k != "flat", -per_task[k]["time_ms"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = ["tab:red" if k == "flat" else "tab:blue" for k in keys]
    axes[0].bar(keys, [per_task[k]["time_ms"] for k in keys], color=colors)
    axes[0].set(ylabel="ms per round (median over clients)", title="per-round client training time")
    axes[1].bar(keys, [per_task[k]["mem_mb"] for k in keys], color=colors, label="measured peak RSS growth")
    axes[1].plot(keys, [per_task[k]["analytic_mb"] for k in keys], "k_", markersize=20, label="analytic count")
    axes[1].set(ylabel="MB", title="per-round client memory")
    axes[1].legend()
    for ax in axes:
        ax.tick_params(axis="x", rotation=45)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
