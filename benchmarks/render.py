"""Render BENCHMARKS.md from the benchmarks' JSON files; no number in it is typed by hand.

    python benchmarks/render.py                                   # docs/results/bench -> BENCHMARKS.md
    python benchmarks/render.py --results runs/bench-quick/results --out runs/bench-quick/BENCHMARKS.md
    python benchmarks/render.py --check                           # exit 1 if BENCHMARKS.md is stale

Reads, from --results: bench.json (what `benchmarks/bench.py` ran, how long, on what),
table1.json, tradeoffs.json, edge_inference.json, coordinator_load.json, flower_scale.json;
and, from --fleet-results, the committed results of the longer fleet benchmarks
(mixed_fleet/, grow/, grow-min-children-2/, label_skew/, label_skew-demo/, subtree_bundle/), which `make bench` renders
but does not run again (each takes 20 to 50 minutes on two cores). A missing file leaves
its section saying which command writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

POLICY_TEXT = {"paper": "paper (one epoch on the samples under the expert)",
               "balanced": "balanced (epochs fit in the root's round, in samples and in steps)"}
ROW_TEXT = {"flat": "flat softmax", "hmoe_max": "HMoE, largest expert", "hmoe_min": "HMoE, smallest expert"}


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def rel(target: Path, out: Path) -> str:
    return os.path.relpath(target, out.parent).replace(os.sep, "/")


def shown(path: Path) -> str:
    """A path as the command line would name it: relative to the repository when inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(path)


def clean(text: str) -> str:
    """Commands and paths as a user in the repository would type them."""
    return text.replace(str(ROOT) + "/", "")


def pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}" if v < 1 else f"{v:.1f}"


def f(v, fmt: str = ".1f", none: str = "-") -> str:
    return none if v is None else format(v, fmt)


def span(d: dict, fmt: str) -> str:
    """median (min-max) of a measured figure."""
    return f"{d['median']:{fmt}} ({d['min']:{fmt}}–{d['max']:{fmt}})"


def machine_line(m: dict | None) -> str:
    if not m:
        return "machine not recorded"
    parts = [m.get("cpu", "?"), f"{m.get('cores', '?')} cores", f"{m.get('memory_gb', '?')} GB"]
    parts += [f"{name} {m[key]}" for key, name in (("torch", "torch"), ("python", "Python")) if key in m]
    return ", ".join(parts)


# ------------------------------------------------------------------------------ Table 1
def table1_section(t: dict | None, out: Path, results: Path) -> list[str]:
    lines = ["## Table 1: per-round client cost on the paper's shapes", ""]
    if t is None:
        return lines + ["Not measured: run `python benchmarks/table1.py` (or `make bench`).", ""]
    lines += [f"Command: `{clean(t['command'])}`; commit `{t['commit']}`; {machine_line(t['machine'])}; "
              f"{t['repeats']} repeats of every measured task, each in a fresh process with "
              f"{t['threads']} torch thread; {t['seconds'] / 60:.1f} min.", "",
              f"Ratios: {t['ratio_basis']}.", "",
              f"![Table 1]({rel(results / 'table1.png', out)})", ""]
    for shape, s in t["shapes"].items():
        lines += [f"### {s['label']}", "",
                  f"`{s['dataset']}`: {s['train_samples']:,} training images, {s['experts']} experts, leaves up to "
                  f"{s['tree_depth']} levels deep; {s['clients']} clients (Dirichlet 0.5), the measured one "
                  f"(client {s['client']}) holds {s['client_samples']:,} samples; batch {s['batch_size']}; expert "
                  f"width {s['widths']['expert']}, flat width {s['widths']['flat']}.", "",
                  "| policy | model | time / round, ms: median (min–max) | % of flat | resident growth, MB: median "
                  "(min–max) | % of flat | live tensors, MB | % of flat | analytic MB | optimizer steps | client "
                  "GMAC | paper: time % / memory % |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        paper = s.get("paper") or {}
        for p, pol in s["policies"].items():
            per, rows = pol["per_task"], pol["rows"]
            for name in ("flat", "hmoe_max", "hmoe_min"):
                if name == "flat" and p != next(iter(s["policies"])):
                    continue
                if name == "flat":
                    d = per["flat"]
                    pp = paper.get("flat")
                    ref = f"{pp['time_ms']:g} ms / {pp['mem_mb']:g} MB" if pp else ""
                    lines.append(f"| all | {ROW_TEXT[name]} | {span(d['time_ms'], '.0f')} | 100 | "
                                 f"{span(d['rss_mb'], '.1f')} | 100 | {d['live_mb']['median']:.2f} | 100 | "
                                 f"{d['analytic_mb']:.1f} | {d['steps']} | {d['gmacs']:.2f} | {ref} |")
                    continue
                r = rows[name]
                pp = paper.get(name)
                ref = f"{pp['time_pct']:g} / {pp['mem_pct']:g}" if pp else ""

                def measured(metric: str, fmt: str) -> str:
                    return f"{span(per[r[metric + '_expert']][metric], fmt)} {r[metric + '_expert']}"
                lines.append(f"| {p} | {ROW_TEXT[name]} | {measured('time_ms', '.0f')} | "
                             f"{pct(r['time_ms_pct_of_flat'])} | {measured('rss_mb', '.1f')} | "
                             f"{pct(r['rss_mb_pct_of_flat'])} | {r['live_mb']:.2f} {r['live_mb_expert']} | "
                             f"{pct(r['live_mb_pct_of_flat'])} | {r['analytic_mb']:.1f} | {r['steps']} "
                             f"{r['steps_expert']} | {r['gmacs']:.3f} {r['gmacs_expert']} | {ref} |")
        lines += [""]
        for p, pol in s["policies"].items():
            n_exp = len([k for k in pol["per_task"] if k != "flat"])
            lines.append(f"- {POLICY_TEXT[p]}: measured {len(pol['measured'])} of {n_exp} experts "
                         f"({', '.join(pol['measured'])}); largest spread (max − min) / median over repeats: "
                         f"resident growth {pol['max_rss_spread']:.0%}, time {pol['max_time_spread']:.0%}"
                         f"{'' if pol['max_rss_spread'] <= 0.10 else ' (over 10%: lead with the live-tensor figure)'}.")
        lines.append("")
    q = t.get("fashion_mnist_f1") or {}
    if q:
        lines += ["### Fashion-MNIST Information F1 under each policy", "",
                  "| policy | run | HMoE greedy Information F1 | flat Information F1 | HMoE total client GMAC |",
                  "|---|---|---|---|---|"]
        for p, r in q.items():
            lines.append(f"| {POLICY_TEXT.get(p, p)} | `{clean(r['run'])}` | {f(r['hmoe_info_f1'], '.4f')} | "
                         f"{f(r['flat_info_f1'], '.4f')} | {f(r['hmoe_total_client_gmacs'], '.0f')} |")
        lines.append("")
    return lines


# ------------------------------------------------------------------------------ trade-offs
def tradeoffs_section(t: dict | None, out: Path, results: Path) -> list[str]:
    lines = ["## Trade-offs on Fashion-MNIST", ""]
    if t is None:
        return lines + ["Not measured: run `python benchmarks/tradeoffs.py` (or `make bench`).", ""]
    pts = t["sweep"]["points"]
    front = {c: set(v) for c, v in t["sweep"]["pareto"].items()}
    lines += [f"Command: `{clean(t['command'])}`; commit `{t['commit']}`; {machine_line(t['machine'])}. Memory: "
              f"{t['memory_basis']}.", "", f"![Trade-offs]({rel(results / 'tradeoffs.png', out)})", "",
              "### Width sweep", "",
              "| model | width | rounds | Information F1 | live tensors, MB | analytic MB | resident growth, MB | "
              "total client GMAC | on the Pareto front (memory / compute) |", "|---|---|---|---|---|---|---|---|---|"]
    for i, p in enumerate(pts):
        marks = " / ".join("yes" if i in front[c] else "no" for c in ("live_mb", "total_client_gmacs"))
        lines.append(f"| {p['model']} | {p['width']} | {p['rounds']} | {p['info_f1']:.4f} | {f(p['live_mb'], '.2f')} | "
                     f"{f(p['analytic_mb'])} | {f(p['rss_mb'])} | {p['total_client_gmacs']:.0f} | {marks} |")
    c = t["compute_to_f1"]
    lines += ["", "### Client compute to reach a validation Information F1", "", c["note"] + ".", "",
              "| model | width | " + " | ".join(f"GMAC to F1 {x:g}" for x in c["targets"]) + " | final validation F1 |",
              "|---|---|" + "---|" * len(c["targets"]) + "---|"]
    for r in c["rows"]:
        lines.append(f"| {r['model']} | {r['width']} | " + " | ".join(
            f(r["gmacs_to_reach"][f"{x:g}"], ".0f", "not reached") for x in c["targets"]) +
            f" | {f(r['final_val_f1'], '.4f')} |")
    d = t["decoding"]
    lines += ["", "### Decoding", "", f"`hmoe eval` on `{clean(d['run'])}` (test split).", "",
              "| model | decoding | Information F1 | precision | recall | leaf accuracy | experts per input |",
              "|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        lines.append(f"| {r['model']} | {r['decode']} | {r['info_f1']:.4f} | {r['info_precision']:.4f} | "
                     f"{r['info_recall']:.4f} | {r['leaf_accuracy']:.4f} | {f(r.get('experts_per_input'), '.2f')} |")
    return lines + [""]


# ------------------------------------------------------------------------------ edge
def edge_section(e: dict | None) -> list[str]:
    lines = ["## Edge inference (onnxruntime, batch 1)", ""]
    if e is None:
        return lines + ["Not measured: run `python benchmarks/edge_inference.py` (or `make bench`).", ""]
    lines += [f"Command: `{clean(e['command'])}`; {machine_line(e['machine'])}; {e['images']} images, {e['threads']} "
              "thread, each mode and variant in a fresh process. 'path' loads only the experts a decision visits "
              "(cache bounded to the longest path); 'all' preloads every expert; memory is what the models add over "
              "the ready engine.", "",
              "| bundle | experts (depth) | variant | mode | median ms | p95 ms | experts per input (max) | added MB "
              "| resident MB |", "|---|---|---|---|---|---|---|---|---|"]
    for name, b in e["bundles"].items():
        for variant in ("fp32", "int8"):
            for mode, r in b[variant].items():
                if not isinstance(r, dict):
                    continue
                per = "" if r.get("experts_per_input") is None else \
                    f"{r['experts_per_input']:.2f} ({r['max_experts_per_input']})"
                lines.append(f"| {name} | {b['experts']} ({b['tree_depth']}) | {variant} | {mode} | "
                             f"{r['latency_ms_median']:.2f} | {r['latency_ms_p95']:.2f} | {per} | {r['added_mb']:.1f} | "
                             f"{r['resident_mb']:.1f} |")
    lines += ["", "| bundle | expert ONNX, fp32 MB | int8 MB | path-only / all, added memory (fp32) |", "|---|---|---|---|"]
    for name, b in e["bundles"].items():
        lines.append(f"| {name} | {b['expert_mb_on_disk']:.2f} | {b['int8_expert_mb_on_disk']:.2f} | "
                     f"{f(b['fp32'].get('path_over_all_added'), '.3f')} |")
    return lines + [""]


GREEDY_BUNDLES = (("greedy_latency", "demo bundle (Fashion-MNIST, 5 experts)"),
                  ("greedy_latency-leaf-widths", "the demo's training with narrower experts below the root (`hmoe train "
                   "--model both --expert-widths leaves:8 --out runs/arch/leaves8`, then `hmoe export`: the root at "
                   "width 16, Clothes 10, the others 8; the same flat model)"),
                  ("greedy_latency-cifar100", "CIFAR-100-shaped bundle (21 experts, one round on synthetic data; built by `python benchmarks/edge_inference.py --work runs/shaped`)"),
                  ("greedy_latency-tiny-imagenet", "Tiny-ImageNet-shaped bundle (101 experts, one round on synthetic data; built the same way)"))


def greedy_section(fleet: Path) -> list[str]:
    lines = ["### One image at a time: greedy against flat", ""]
    found = [(label, g) for name, label in GREEDY_BUNDLES if (g := load(fleet / name / "greedy_latency.json"))]
    if not found:
        return lines + ["Not measured: `python benchmarks/greedy_latency.py --bundle runs/demo/bundle --out "
                        "docs/results/greedy_latency`.", ""]
    lines += ["Not re-run by `make bench`. One onnxruntime thread, one image per call; the settings take turns, 100 "
              "images each, so all rows share the machine's conditions. *Path-only budget*: the bytes of the longest "
              "root-to-leaf path's experts plus the template. *Streamed*: the engine's default, where experts the "
              "budget cannot keep open run through their template with their weights read for that run; *packed "
              "for this CPU*: the same from a folder `hmoe-edge pack` wrote on this machine (the weights in "
              "onnxruntime's blocked layout for this CPU), read into the buffer per run; *memory-mapped*: the "
              "packed weights mapped instead (`--mmap`), so nothing is copied, but their pages stay resident as page "
              "cache while memory is free: the budget then bounds the engine's own memory, not what is resident. "
              "*Sessions only*: opening and closing onnxruntime sessions instead, as before templates.", ""]
    for label, g in found:
        flat = g["rows"]["flat"]["p50_ms"]
        packed = f" Packing took {g['pack_seconds']:.2f} s." if g.get("pack_seconds") is not None else ""
        lines += [f"**{label}**: `{clean(g['command'])}`, {g['images']} {g.get('inputs', 'test images')}.{packed}", "",
                  "| setting | p50 ms | p95 ms | p95 / p50 | p50 / flat's | session creations | streamed runs | "
                  "same leaf as the batch decoder |", "|---|---|---|---|---|---|---|---|"]
        n = g["images"]
        for name, r in g["rows"].items():
            same = r.get("same_leaf_as_batch_decoder")
            lines.append(f"| {name} | {r['p50_ms']:.3f} | {r['p95_ms']:.3f} | {r['p95_ms'] / r['p50_ms']:.2f} | "
                         f"{r['p50_ms'] / flat:.2f} | {r.get('session_creations', r.get('misses', ''))} | "
                         f"{r.get('streamed', '')} | {'' if same is None else f'{same} of {n}'} |")
        lines += [""] + model_runs_lines(g.get("model_runs"))
    return lines


def model_runs_lines(runs: dict | None, most: int = 8) -> list[str]:
    """Each model's own run inside decoding against its run repeated on one image (greedy_latency.py's
    ``model_runs``): a table for a bundle of at most ``most`` models."""
    if not runs or len(runs.get("repeated on one image", {})) > most:
        return []
    alone = runs["repeated on one image"]
    cols = [k for k in runs if k != "repeated on one image"]
    lines = ["Each model's own run, p50 us (timed apart from the rows above): run 200 times in a row on one image "
             "(its weights stay in the CPU's caches), and inside decoding in the settings named (runs per model "
             "in brackets).", "", "| model | repeated on one image | " + " | ".join(f"inside: {c}" for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for key, a in alone.items():
        cells = [f"{runs[c][key]['p50_us']:.1f} ({runs[c][key]['runs']})" if key in runs[c] else "" for c in cols]
        lines.append(f"| {key} | {a['p50_us']:.1f} | " + " | ".join(cells) + " |")
    return lines + [""]


def boards_section(b: dict | None) -> list[str]:
    lines = ["### Inside a board's memory", ""]
    if b is None:
        return lines + ["Not measured: as root, `python benchmarks/boards.py --bundle runs/demo/bundle --out "
                        "docs/results/boards` (not re-run by `make bench`).", ""]
    lines += [f"`{clean(b['command'])}` (not re-run by `make bench`; needs root): each stage in its own cgroup "
              f"({b['cgroup']}) with a hard memory limit, no swap and a CPU quota, the page cache dropped first so "
              "the libraries' pages are charged to the limit. Peak RSS is the process's own (ru_maxrss); the "
              "cgroup's peak counts page cache too. The CPU quota limits this x86 machine's share, it does not "
              "make it a Cortex-A53: only the memory figures speak for the board.", "",
              "| bundle | board | limit MB | stage | peak RSS MB | cgroup peak MB | killed | result |",
              "|---|---|---|---|---|---|---|---|"]
    for r in b["rows"]:
        s, t = r["serve"], r["train"]
        lines.append(f"| {r['bundle']} | {r['board']} | {r['limit_mb']} | serve + {s['predictions']} predictions | "
                     f"{s['peak_rss_mb']:.0f} | {s['cgroup_peak_mb']:.0f} | {'yes' if s['killed'] else 'no'} | "
                     f"p50 {s['p50_ms']:.1f} ms, p95 {s['p95_ms']:.1f} ms, {s['errors']} errors |")
        outcome = (f"not finished in {t['seconds']:.0f} s: stopped, at the limit, not killed" if t.get("timed_out") else
                   f"exit {t['returncode']} in {t['seconds']:.0f} s")
        lines.append(f"| {r['bundle']} | {r['board']} | {r['limit_mb']} | train {t['expert']}, {t['samples']} "
                     f"samples, cap {t['memory_cap_mb']:g} MB | {t['peak_rss_mb']:.0f} | {t['cgroup_peak_mb']:.0f} | "
                     f"{'yes' if t['killed'] else 'no'} | {outcome} |")
    boards = {r["board"]: r["stands_for"] for r in b["rows"]}
    lines += ["", "Profiles (what each limit stands for): " + "; ".join(f"{k}: {v}" for k, v in boards.items()) + ".",
              "A killed training round (exit -9) is the kernel's OOM killer inside the limit: that round does not fit "
              "the profile. Peak RSS can exceed the limit: it counts file-backed pages the kernel reclaims under it.",
              ""]
    return lines


# ------------------------------------------------------------------------------ fleet
def fleet_section(results: Path, fleet: Path, out: Path) -> list[str]:
    import grow
    import mixed_fleet
    import subtree_bundle
    lines = ["## Fleets", ""]
    c = load(results / "coordinator_load.json")
    lines += ["### One coordinator under load", ""]
    if c is None or "sizes" not in c:
        lines += ["Not measured with wrk yet: run `python benchmarks/coordinator_load.py` (or `make bench`).", ""]
    else:
        lines += [f"`{clean(c['command'])}`: {c['wrk'][0] if c.get('wrk') else 'wrk'}, {c['cpu_cores']} cores "
                  f"shared by the coordinator and wrk, loopback. Each row is {c['seconds_per_phase']:g} s of `wrk -c N`: "
                  "N kept-alive connections, one per enrolled device, each sending its next request as soon as "
                  "its answer arrives (every request with its own device's token). Updates: each device's first is "
                  "new, later sends of it are retries answered as duplicates after the same checks.", "",
                  "| devices | request | requests | per second | p50 ms | p95 ms | p99 ms | max ms | errors |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for size in c["sizes"]:
            for kind, r in size["kinds"].items():
                errors = r["non_2xx"] + r["socket_errors"] + r["timeouts"]
                extra = f" ({r['new_updates']:,} new)" if kind == "update" else ""
                lines.append(f"| {size['devices']:,} | {kind} | {r['requests']:,}{extra} | "
                             f"{r['requests_per_second']:,.0f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
                             f"{r['p99_ms']:.0f} | {r['max_ms']:.0f} | {errors} |")
        lines += ["", f"Update bodies of {c['sizes'][0]['update_bytes']:,} bytes. Targets (issue 25): p99 under "
                  "2 s for assignment and weights, p95 under 1 s for update, at 1,000 devices.", ""]
    e = load(results / "event_loops.json")
    if e is not None:
        lines += [f"Why Python's own event loop and not uvloop (`{clean(e['command'])}`: a one-line ASGI app under "
                  f"uvicorn, `wrk -c {e['connections']}` for {e['seconds']:g} s, same machine):", "",
                  "| loop | requests / s | p50 ms | p90 ms | p99 ms | max ms |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['loop']} | {r['requests_per_second']:,.0f} | {r['p50_ms']:.0f} | {r['p90_ms']:.0f} | "
                  f"{r['p99_ms']:.0f} | {r['max_ms']:.0f} |" for r in e["rows"]] + [""]
    fl = load(results / "flower_scale.json")
    lines += ["### Flower's simulation runtime at scale", ""]
    if fl is None:
        lines += ["Not measured: run `python benchmarks/flower_scale.py` (or `make bench`; needs the `flwr` extra).", ""]
    else:
        st = fl["settings"]
        lines += [f"`{clean(fl['command'])}`; commit `{fl['commit']}`; {machine_line(fl['machine'])}.", "",
                  "| virtual SuperNodes | sampled per round | rounds | wall (s) | to first round (s) | rounds / min after "
                  "the first | peak memory, process tree (MB) |", "|---|---|---|---|---|---|---|",
                  f"| {st['clients']} | {st['clients_per_round']} | {fl['rounds']} | {fl['wall_seconds']:.0f} | "
                  f"{f(fl['seconds_to_first_round'], '.0f')} | {f(fl['rounds_per_minute_after_the_first'])} | "
                  f"{fl['peak_rss_mb']:.0f} |", "", fl["memory_method"] + ".", ""]
    import label_skew

    def saved(script: str, folder: str, title: str, png: str, body) -> list[str]:
        """A benchmark's saved results.json under docs/results/FOLDER, or how to measure it."""
        r = load(fleet / folder / "results.json")
        if r is None:
            return [f"### {title}", "", f"Not measured: `python benchmarks/{script} --out docs/results/{folder}`.", ""]
        cost = (f"{len(r['cells'])} runs, {r['run_seconds'] / 3600:.1f} h of run wall time, "
                f"{r['settings']['jobs']} at a time" if "run_seconds" in r else f"about {r['wall_seconds'] / 60:.0f} min")
        text = body(r)
        while text and not text[-1]:
            text = text[:-1]
        return [f"### {title}", "", f"Not re-run by `make bench` ({cost}); from "
                f"`{rel(fleet / folder / 'results.json', out)}`, commit `{r['commit']}`, `{r['command']}`; "
                f"{machine_line(r.get('machine'))}.", "", *text, "",
                f"![{title}]({rel(fleet / folder / png, out)})", ""]

    for folder, title in (("mixed_fleet", "Mixed fleets (weak devices; before the label-skew defaults)"),
                          ("mixed_fleet-defaults", "Mixed fleets at Dirichlet 0.1 with today's defaults"),
                          ("mixed_fleet-hanzi", "Mixed fleets on glyphs (hanzi:100, half the devices weak)"),
                          ("mixed_fleet-trunk", "Mixed fleet on glyphs with experts on a shared trunk (hanzi:500, "
                           "half the devices weak)")):
        lines += saved("mixed_fleet.py", folder, title, "f1_vs_weak_share.png",
                       lambda r: mixed_fleet.results_table(r["rows"]))
    for folder, title in (("grow", "Growing the taxonomy (--min-children 1, no logit adjustment)"),
                          ("grow-min-children-2", "Growing, --min-children 2 (no logit adjustment)"),
                          ("grow-defaults", "Growing with today's defaults (--logit-adjust 1, --min-children 2)")):
        lines += saved("grow.py", folder, title, "f1_vs_compute.png",
                       lambda r: [ln.replace("### ", "#### ") for ln in grow.results_lines(r["scenarios"])])
    for folder, title in (("label_skew", "Label skew (quick profile, every remedy)"),
                          ("label_skew-demo", "Label skew at the demo's settings"),
                          ("label_skew-leaf-widths", "Narrower experts below the root (--expert-widths leaves:8), "
                           "demo settings")):
        lines += saved("label_skew.py", folder, title, "f1_vs_alpha.png", label_skew.results_lines)
    sb = load(fleet / "subtree_bundle" / "subtree_bundle.json")
    lines += ["### Per-subtree bundles", ""]
    if sb is None:
        lines += ["Not measured: `python benchmarks/subtree_bundle.py`.", ""]
    else:
        lines += [f"Not re-run by `make bench`; from `{rel(fleet / 'subtree_bundle' / 'subtree_bundle.json', out)}`, "
                  f"`{sb['command']}`.", "", *subtree_bundle.results_lines(sb), ""]
    return lines


# ------------------------------------------------------------------------------ page
def hanzi_section(h: dict | None, out: Path, folder: Path) -> list[str]:
    """Issue 27: many classes on real glyphs (benchmarks/hanzi.py); ``out`` the Markdown file,
    ``folder`` the one holding hanzi.json and its pictures."""
    lines = ["## Many classes: printed Chinese characters (hanzi)", ""]
    if not h:
        return lines + ["Not measured: `python benchmarks/hanzi.py --profile cpu --out docs/results/hanzi`.", ""]
    where = folder
    prof = h["profile"]
    lines += [f"Command: `{clean(h['command'])}` (profile {prof['name']}, device {h.get('device', 'cpu')}); commit "
              f"`{h['commit']}`; {machine_line(h['machine'])}. Steps: " +
              ", ".join(f"{k} {v / 60:.1f} min" for k, v in h.get("seconds", {}).items()) + ".", ""]
    by_command: dict[str, list[str]] = {}
    for step, command in h.get("commands", {}).items():
        by_command.setdefault(command, []).append(step)
    if len(by_command) > 1:   # steps last run by other commands than the one above
        lines += ["Each step as last run: " + "; ".join(f"{', '.join(steps)}: `{clean(c)}`"
                                                         for c, steps in by_command.items()) + ".", ""]
    st = h.get("stats")
    if st:
        lines += [f"**Data set** `{st['dataset']}`: {st['characters']} characters, {st['image_size'][1]}x"
                  f"{st['image_size'][2]} grey glyphs; {st['train_images']:,} training images from "
                  f"{len(st['faces']['train'])} faces ({', '.join(st['families']['train'])}), {st['test_images']:,} "
                  f"test images from {len(st['faces']['test'])} faces of held-out families "
                  f"({', '.join(st['families']['test'])}); images per class {st['images_per_class']['train'][0]}"
                  f"-{st['images_per_class']['train'][1]} (train), {st['images_per_class']['test'][0]}-"
                  f"{st['images_per_class']['test'][1]} (test). Tree: {st['experts']} experts, depth {st['depth']}, "
                  f"root with {st['root_children']} children; largest expert {st['largest_expert'][0]} "
                  f"({st['largest_expert'][1]} children), smallest {st['smallest_expert'][0]} "
                  f"({st['smallest_expert'][1]}). Samples: [glyphs.png]({rel(where / 'glyphs.png', out)}).", ""]
    t = h.get("table1")
    if t:
        rows = t["policies"]["balanced"]["rows"]
        paper = t.get("paper") or {}
        lines += ["**Table 1 on this data** (balanced epochs, one client's round, "
                  f"{t['client_samples']} samples; median of {h['profile']['repeats']} fresh processes; the source "
                  "paper's Tiny ImageNet figures beside):", "",
                  "| model | time / round: ms, % of flat (expert) | resident growth: MB, % of flat (expert) | "
                  "live tensors: MB, % of flat (expert) | paper (Tiny ImageNet): % of flat |",
                  "|---|---|---|---|---|",
                  f"| flat softmax | {rows['flat']['time_ms']:.0f} | {rows['flat']['rss_mb']:.1f} | "
                  f"{rows['flat']['live_mb']:.1f} | |"]
        for name, label in (("hmoe_max", "largest expert"), ("hmoe_min", "smallest expert")):
            r, pp = rows[name], paper.get(name, {})
            lines.append(f"| HMoE, {label} | {r['time_ms']:.0f}, {pct(r['time_ms_pct_of_flat'])}% of flat "
                         f"({r['time_ms_expert']}) | {r['rss_mb']:.1f}, {pct(r['rss_mb_pct_of_flat'])}% "
                         f"({r['rss_mb_expert']}) | {r['live_mb']:.1f}, {pct(r['live_mb_pct_of_flat'])}% "
                         f"({r['live_mb_expert']}) | time {f(pp.get('time_pct'))}%, memory {f(pp.get('mem_pct'))}% |")
        lines.append("")
    sw = h.get("sweep")
    seeds = h.get("seeds") if h.get("seeds", {}).get("rows") else None
    if sw:
        lines += ["**HMoE against flat softmax** (test split: held-out font families; HMoE greedy, flat's leaf rule; "
                  "memory: the live-tensor peak of one step of the model's round, for HMoE its largest expert's; "
                  f"HMoE with `--assignment spread`; Pareto plot [pareto.png]({rel(where / 'pareto.png', out)})):", "",
                  "| model | width | Information F1 | leaf accuracy | live MB / round | client GMACs | client s | "
                  "rounds | Pareto (memory, compute) |", "|---|---|---|---|---|---|---|---|---|"]
        for p in sorted(sw["points"], key=lambda p: (p["kind"], p["width"])):
            lines.append(f"| {p['kind']} | {p['width']} | {p['f1']:.4f} | {p['leaf_accuracy']:.4f} | "
                         f"{p['live_mb']:.2f} | {p['client_gmacs']:.0f} | {p['client_seconds']:.0f} | {p['rounds']} | "
                         f"{'yes' if p['pareto_memory'] else 'no'}, {'yes' if p['pareto_compute'] else 'no'} |")
        g = sw["goals"]
        lines += ["", "Runs (each `hmoe train` with the profile's settings; `--reuse` names runs trained before with "
                  "them): " + ", ".join(f"{k} `{clean(v)}`" for k, v in sw.get("runs", {}).items()) + "."]
        lines += ["", "Goals: HMoE at no more than a quarter of flat's per-round memory with F1 at least flat's: " +
                  ("; ".join(f"{q['hmoe']} against {q['flat']}: {q['margin']:+.4f} at {q['memory_ratio']:.2f} of its "
                             "memory" for q in g["quarter_memory"]) or "no flat model is four times an HMoE's memory") +
                  f" ({'met' if g['quarter_memory_met'] else 'NOT met'}). Against the widest flat model whose round "
                  "fits in the largest expert's memory, ahead by at least 0.05: " +
                  (f"{g['same_memory']['hmoe']} against {g['same_memory']['flat']}: {g['same_memory']['margin']:+.4f}"
                   if g["same_memory"] else "no flat model fits") +
                  (f" with seed 0; judged on the mean over {len(seeds['rows'])} seeds below" if seeds else
                   f" ({'met' if g['same_memory_met'] else 'NOT met'})") + ".", ""]
        if seeds:
            lines += [f"**Seeds** (the second goal's pair, {seeds['pair'][0]} and {seeds['pair'][1]}, trained again "
                      "with other seeds and the same settings; the seed draws the data split, the initial weights "
                      "and every client's shuffling):", "",
                      "| seed | HMoE F1 (leaf accuracy) | flat F1 (leaf accuracy) | margin |", "|---|---|---|---|"]
            for r in seeds["rows"]:
                lines.append(f"| {r['seed']} | {r['hmoe_f1']:.4f} ({r['hmoe_leaf_accuracy']:.4f}) | "
                             f"{r['flat_f1']:.4f} ({r['flat_leaf_accuracy']:.4f}) | {r['margin']:+.4f} |")
            lines += ["", f"Mean over {len(seeds['rows'])} seeds: HMoE {seeds['mean_hmoe_f1']:.4f}, flat "
                      f"{seeds['mean_flat_f1']:.4f}, margin {seeds['mean_margin']:+.4f} (standard deviation "
                      f"{seeds['std_margin']:.4f}, smallest {seeds['min_margin']:+.4f}): ahead by at least 0.05 on "
                      f"average {'met' if seeds['met'] else 'NOT met'}.", ""]
        eq = h.get("rounds")
        if eq and eq.get("pair"):
            lines += [f"**Equal rounds** (seed 0): {eq['pair'][1]} trained for HMoE's {eq['rounds']} rounds instead of "
                      f"the sweep's {eq['flat_rounds_sweep']} reaches {eq['flat_f1']:.4f} (leaf accuracy "
                      f"{eq['flat_leaf_accuracy']:.4f}, {eq['flat_client_gmacs']:.0f} client GMACs) against "
                      f"{eq['flat_f1_sweep']:.4f}; {eq['pair'][0]} {eq['hmoe_f1']:.4f} ({eq['hmoe_client_gmacs']:.0f} "
                      f"client GMACs): HMoE {'ahead' if eq['margin'] > 0 else 'behind'} by {abs(eq['margin']):.4f} "
                      "at equal rounds.", ""]
    e = h.get("edge")
    if e:
        lines += [f"**On the device** (one bundle of the main widths: the HMoE run's experts and the flat run's model; {e['images']} held-out images one at a time, "
                  "each mode in a fresh process; memory over the ready engine, after the first image and after the "
                  "last; path: the path-only budget, stream: the smallest budget, the templates and room for one "
                  "expert's weights, every expert streamed):", "",
                  "| mode | added MB, first image | grown MB, whole run | p50 ms | p95 ms | experts per input |",
                  "|---|---|---|---|---|---|"]
        for m, r in e["modes"].items():
            lines.append(f"| {m} | {r['added_mb']:.1f} | {f(r.get('grown_mb'), '.1f')} | {r['p50_ms']:.3f} | "
                         f"{r['p95_ms']:.3f} | {f(r.get('experts_per_input'), '.2f')} |")
        d = e["disk"]
        stream = e.get("stream_over_flat_added")
        lines += ["", f"Disk: experts {d['experts_mb']:.1f} MB, the longest path's {d['largest_path_mb']:.2f} MB, flat "
                  f"{f(d['flat_mb'], '.2f')} MB. Over the whole run (the larger reading), path-only adds "
                  f"{f(e['path_over_flat_added'], '.2f')} of flat's memory"
                  + (f", the smallest budget {f(stream, '.2f')}" if stream is not None else "")
                  + f" (goal at most 0.3: {'met' if e['path_goal_met'] else 'NOT met'})."
                  + (f" The bundle's runs, when it was made: HMoE test F1 {e['runs_f1']['hmoe']:.4f}, flat "
                     f"{e['runs_f1']['flat']:.4f} (where these differ from the sweep's table, the runs were trained "
                     "again, on another machine)." if e.get("runs_f1") else ""), ""]
    s = h.get("shape")
    if s:
        lines += [f"**On the device, {s['characters']:,} characters** (`{s['tree']}`, {s['experts']} experts, the "
                  f"largest with {s['largest_expert_children']} children; experts of width {s['widths'][0]}, flat "
                  f"{s['widths'][1]}, trained one round on synthetic data: memory and latency depend on the shapes "
                  "alone, the untrained experts' decisions mean nothing, and greedy paths through them visit few "
                  "experts, so *stream-tour* runs every leaf's path in turn under the smallest budget, streaming "
                  "every expert; seeded noise images, one at a time, each mode in a fresh process):", "",
                  "| mode | added MB, first image | grown MB, whole run | p50 ms | p95 ms | experts per input | "
                  "experts visited |", "|---|---|---|---|---|---|---|"]
        for m, r in s["modes"].items():
            lines.append(f"| {m} | {r['added_mb']:.1f} | {r['grown_mb']:.1f} | {r['p50_ms']:.3f} | {r['p95_ms']:.3f} | "
                         f"{f(r.get('experts_per_input'), '.2f')} | {f(r.get('experts_visited'), 'd')} |")
        d, o = s["disk"], s["over_flat"]
        met = [m for m, v in o.items() if m != "all" and v <= 0.3]
        lines += ["", f"Disk: experts {d['experts_mb']:.1f} MB, the longest path's {d['largest_path_mb']:.2f} MB, flat "
                  f"{d['flat_mb']:.2f} MB. Over the whole run (the larger reading), of flat's memory: "
                  + ", ".join(f"{m} {v:.2f}" for m, v in o.items() if m != "all")
                  + f" (goal at most 0.3: {'met by ' + ', '.join(met) if met else 'NOT met'}).", ""]
    st = h.get("subtrees")
    if st:
        lines += [f"**One radical's bundle** (`hmoe export --subtree RADICAL`, the radicals with the most characters; "
                  "a device that reads only that radical's characters carries its expert alone. Leaf accuracy on the "
                  "held-out images of that radical's characters; the whole bundle and flat must also find the "
                  f"radical. The whole bundle: experts {st['whole_disk_mb']:.1f} MB on disk, path-only adds "
                  f"{st['whole_path_added_mb']:.1f} MB, flat {st['flat_added_mb']:.1f} MB):", "",
                  "| radical | characters | images | disk MB | added MB | p50 ms | p95 ms | accuracy: radical's bundle | "
                  "whole HMoE | flat |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in st["rows"]:
            lines.append(f"| {r['node']} | {r['characters']} | {r['images']} | {r['disk_mb']:.2f} | "
                         f"{r['added_mb']:.1f} | {r['p50_ms']:.3f} | {r['p95_ms']:.3f} | {r['subtree_accuracy']:.3f} | "
                         f"{r['hmoe_accuracy']:.3f} | {r['flat_accuracy']:.3f} |")
        lines.append("")
    return lines


def render(results: Path, fleet: Path, out: Path) -> str:
    b = load(results / "bench.json")
    lines = ["# Benchmarks", "",
             f"Generated by `python benchmarks/render.py --results {shown(results)} --out {shown(out)}` from the JSON "
             "files "
             "beside each table; do not edit by hand (a test checks this file against them).", ""]
    if b:
        steps = ", ".join(f"{k} {v / 60:.1f} min" for k, v in b["steps"].items())
        lines += [f"Profile **{b['profile']}** (`{b['command']}`), started {b['started']}, commit `{b['commit']}`, "
                  f"{machine_line(b['machine'])}; {b['seconds'] / 60:.1f} min in all ({steps}).", "",
                  "How far the figures repeat: information F1 and every GMAC, step and analytic count are fixed by the "
                  "seed and the data (same machine and seed); the live-tensor peaks are fixed by the torch build; "
                  "times and resident growth move with the machine's load (min–max over repeats shown) and are only "
                  "comparable as ratios measured in one run.", ""]
        if not b.get("train_threads"):   # a profile run before every local update had one torch thread
            lines += ["These figures predate two changes a re-run would show. Every local update now runs on one "
                      "torch thread on every transport, so that they all give the same experts; with the same seed "
                      "this moves Information F1 in the fourth decimal (the README's `make demo` section gives both "
                      "runs' figures) and makes simulated rounds slower on two cores." +
                      ("" if "sizes" in (load(results / "coordinator_load.json") or {}) else
                       " And the coordinator now plans its rounds (a device reports its samples before a round is "
                       "planned), so its load figures below were measured with the protocol before that."), ""]
    lines += table1_section(load(results / "table1.json"), out, results)
    lines += tradeoffs_section(load(results / "tradeoffs.json"), out, results)
    lines += edge_section(load(results / "edge_inference.json"))
    lines += greedy_section(fleet)
    lines += boards_section(load(fleet / "boards" / "boards.json"))
    lines += fleet_section(results, fleet, out)
    hz = load(fleet / "hanzi" / "hanzi.json")
    if hz:
        lines += hanzi_section(hz, out, fleet / "hanzi")
    lines += trunk_section(sorted(p for p in fleet.glob("trunk*") if (p / "results.json").exists()), out)
    return "\n".join(lines).rstrip() + "\n"


def trunk_section(folders: list[Path], out: Path) -> list[str]:
    """benchmarks/trunk.py's results (one folder a seed): experts on a shared trunk, independent
    ones and flat, equal rounds."""
    import trunk
    lines = ["### Experts on a shared trunk (equal rounds)", ""]
    if not folders:
        return lines + ["Not measured: `python benchmarks/trunk.py --out docs/results/trunk`.", ""]
    lines += ["Not re-run by `make bench`. Scored on the held-out font families; live MB is the peak of live torch "
              "tensors in one step of that round (fixed by the torch build), for HMoE the root's and the largest "
              "other expert's; one run per model and seed.", ""]
    for folder in folders:
        r = load(folder / "results.json")
        lines += [f"**{r['dataset']}, {r['rounds']} rounds each, seed {r['seed']}**: from "
                  f"`{rel(folder / 'results.json', out)}`, commit `{r['commit']}`, `{r['command']}` (about "
                  f"{r['wall_seconds'] / 60:.0f} min, training included where it trained); "
                  f"{machine_line(r.get('machine'))}.", "", *trunk.results_lines(r), ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(ROOT / "docs/results/bench"))
    p.add_argument("--fleet-results", default=str(ROOT / "docs/results"))
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--check", action="store_true", help="do not write; exit 1 if --out differs from the rendering")
    args = p.parse_args(argv)
    out = Path(args.out)
    text = render(Path(args.results), Path(args.fleet_results), out)
    if args.check:
        same = out.is_file() and out.read_text() == text
        print(f"{out}: {'matches' if same else 'DIFFERS FROM'} its JSON")
        return 0 if same else 1
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
