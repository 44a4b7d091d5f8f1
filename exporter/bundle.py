"""A run directory -> a bundle for devices: ONNX per expert, manifest, validation, atomic."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_runtime.bundle import sha256_file
from exporter.onnx_export import ExportSpec, ValidationError, constants, export_net, max_logit_diff, weights_as_inputs
from hierarchy import Hierarchy, HierarchyError
from hierarchy.errors import HmoeError
from hierarchy.manifest import FileEntry, Manifest, ModelEntry, TemplateEntry, template_key
from trainer.protocol.checkpoint import CheckpointError, load_checkpoint
from trainer.datasets import Dataset
from trainer.device.nets import OnTrunk, build_net, build_trunk, num_params
from trainer.protocol.run import RunError, load_input_spec, load_run_config
from trainer.protocol.strategy import trunk_owner


class ExportError(HmoeError, ValueError):
    """The run cannot be exported (missing, corrupt, unknown subtree node, ...)."""


@dataclass
class ExportResult:
    out: Path
    rows: list[dict] = field(default_factory=list)   # one per exported file
    report: dict = field(default_factory=dict)


def _load_run(run: Path) -> tuple:
    if not run.is_dir():
        raise ExportError(f"{run}: no such run directory")
    try:
        cfg = load_run_config(run)
        tree = Hierarchy.from_json(run / "hierarchy.json")
        spec = load_input_spec(run)
    except RunError as exc:
        raise ExportError(str(exc)) from None
    except (FileNotFoundError, HierarchyError, ValueError, TypeError) as exc:
        raise ExportError(f"{run}: not a complete run directory ({exc})") from None
    return cfg, tree, spec


def _load_nets(run: Path, tree: Hierarchy, shape: tuple[int, int, int], cfg) -> tuple[dict, object]:
    """Expert networks by node name (and the flat one, if trained) from their checkpoints."""
    from trainer.device.client import load_numpy
    experts, loaded = {}, {}
    for key, task in cfg.tasks("hmoe", tree, shape).items():
        path = run / "experts" / f"{task.file_stem}.safetensors"
        try:
            weights, net_cfg, meta = load_checkpoint(path)
        except CheckpointError as exc:
            raise ExportError(str(exc)) from None
        if net_cfg.num_outputs != tree.num_children[task.node] or meta.get("node") != key:
            raise ExportError(f"{path}: checkpoint is for node {meta.get('node')!r} with {net_cfg.num_outputs} "
                              f"outputs; expected {key!r} with {tree.num_children[task.node]}")
        net = build_net(net_cfg)
        load_numpy(net, weights)
        experts[key] = net.eval()
        loaded[key] = weights
    # Experts on a shared trunk: each file holds the trunk too for now (the device's answers equal
    # torch's; a bundle with the trunk as a model of its own is issue 39's next step).
    owner = trunk_owner(cfg.tasks("hmoe", tree, shape))
    for key, net in experts.items():
        if net.cfg.trunk_blocks:
            experts[key] = OnTrunk(build_trunk(net.cfg, loaded[owner]), net).eval()
    flat = None
    if (run / "flat.safetensors").exists():
        try:
            weights, net_cfg, _ = load_checkpoint(run / "flat.safetensors")
        except CheckpointError as exc:
            raise ExportError(str(exc)) from None
        if net_cfg.num_outputs != tree.num_leaves:
            raise ExportError(f"{run / 'flat.safetensors'}: {net_cfg.num_outputs} outputs for {tree.num_leaves} leaves")
        flat = build_net(net_cfg)
        load_numpy(flat, weights)
        flat.eval()
    return experts, flat


def validate_model(name: str, path: Path, net, real: np.ndarray, spec: ExportSpec, seed: int = 0) -> dict:
    """onnxruntime vs torch on random and on real inputs: max |logit diff| <= atol, and the
    same argmax wherever torch's own top-two margin is at least atol (near-ties counted)."""
    rng = np.random.default_rng(seed)
    rand = rng.standard_normal((64, *net.cfg.in_shape)).astype(np.float32)
    diff_rand, _, _ = max_logit_diff(path, net, rand, spec)
    diff_real, ort_logits, torch_logits = max_logit_diff(path, net, real, spec)
    worst = max(diff_rand, diff_real)
    if worst > spec.atol:
        raise ValidationError(name, worst, spec.atol)
    top2 = np.sort(torch_logits, axis=1)[:, -2:] if torch_logits.shape[1] > 1 else None
    margin = top2[:, 1] - top2[:, 0] if top2 is not None else np.full(len(torch_logits), np.inf)
    disagree = ort_logits.argmax(1) != torch_logits.argmax(1)
    near_tie = margin < spec.atol
    if (disagree & ~near_tie).any():
        raise ValidationError(name, worst, spec.atol,
                              f"; {int((disagree & ~near_tie).sum())} real images change their decision")
    return {"max_diff_random": diff_rand, "max_diff_real": diff_real, "real_images": int(len(real)),
            "decision_changes_at_near_ties": int((disagree & near_tie).sum()), "near_ties": int(near_tie.sum())}


def file_entry(path: Path) -> FileEntry:
    return FileEntry(path.name, sha256_file(path), path.stat().st_size)


def _entry(node: str, children: list[str], path: Path, net, spec: ExportSpec) -> ModelEntry:
    """The manifest entry; the weights also travel as safetensors so a device can train."""
    from safetensors.numpy import save_file

    from trainer.device.client import to_numpy
    weights = path.with_suffix(".safetensors")
    save_file(to_numpy(net), str(weights))
    f = file_entry(path)
    return ModelEntry(node, children, f.file, f.sha256, num_params(net), f.bytes, spec.opset,
                      json.loads(net.cfg.to_json()), file_entry(weights))


def write_templates(folder: Path, entries: dict[str, ModelEntry], nets: dict, real: np.ndarray,
                    spec: ExportSpec) -> tuple[list[TemplateEntry], list[dict]]:
    """One weights-as-inputs graph per expert architecture (``template-NNN.onnx``), each checked
    against every expert it serves: given that expert's weights it must give the expert's own
    file's decisions on ``real`` and logits within the tolerance. An architecture whose experts
    carry different shape constants gets no template (the report says why); the engine then
    opens those experts as sessions only."""
    from exporter.onnx_export import session
    from trainer.device.client import to_numpy
    groups: dict[str, list[str]] = {}
    for node, entry in entries.items():
        groups.setdefault(template_key(entry.net), []).append(node)
    templates, report = [], []
    for key, nodes in groups.items():
        name = f"template-{len(templates):03d}.onnx"
        first = nets[nodes[0]]
        weights = {n: to_numpy(nets[n]) for n in nodes}
        consts = {n: constants(folder / entries[n].file, weights[n]) for n in nodes}
        if any(c != consts[nodes[0]] for c in consts.values()):
            report.append({"template": None, "experts": nodes, "why": "shape constants differ between experts"})
            continue
        path = weights_as_inputs(folder / entries[nodes[0]].file, weights[nodes[0]], folder / name, spec)
        tmpl, worst, changed = session(path), 0.0, 0
        for n in nodes:
            own = session(folder / entries[n].file).run(None, {spec.input_name: real})[0]
            got = tmpl.run(None, {spec.input_name: real, **weights[n]})[0]
            worst = max(worst, float(np.abs(own - got).max()))
            changed += int((own.argmax(1) != got.argmax(1)).sum())
        if worst > spec.atol or changed:
            path.unlink()
            report.append({"template": None, "experts": nodes,
                           "why": f"differs from the experts' files by {worst:.3g}, {changed} decisions changed"})
            continue
        f = file_entry(path)
        templates.append(TemplateEntry(f, {k: v for k, v in json.loads(key).items()}))
        report.append({"template": name, "experts": nodes, "bytes": f.bytes, "max_diff_real": worst,
                       "width": first.cfg.width, "images": int(len(real))})
    return templates, report


def check_greedy(folder: Path, tree: Hierarchy, experts: dict, x: np.ndarray) -> int:
    """Open the bundle through the edge engine and require its greedy predictions on ``x`` to
    equal torch's; returns how many inputs were compared."""
    import torch

    from edge_runtime.engine import Engine
    from hierarchy import decode

    def torch_probs(e: int, idx: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(experts[tree.names[e]](torch.from_numpy(x[idx])), dim=1).numpy()

    want = decode(tree, torch_probs, len(x), "greedy").nodes
    got = Engine(folder).decode(x, "greedy").nodes
    if (want != got).any():
        raise ExportError(f"the exported bundle, opened by the edge engine, predicts other nodes than torch for "
                          f"{int((want != got).sum())} of {len(x)} test images")
    return len(x)


def export_run(run: str | os.PathLike, out: str | os.PathLike, subtree: str | None = None,
               quantize: str | None = None, data: Dataset | None = None, spec: ExportSpec = ExportSpec(),
               validate_images: int = 0, progress: bool = True) -> ExportResult:
    """Export a run to a bundle directory ``out``; nothing is left at ``out`` unless every
    file validated. ``validate_images`` 0 uses the whole test split."""
    from trainer.datasets import load_dataset
    from trainer.prepare import limit
    run, out = Path(run), Path(out)
    cfg, tree, input_spec = _load_run(run)
    data = data or limit(load_dataset(cfg.dataset, cfg.data_root), cfg.train_limit, cfg.test_limit, cfg.seed)
    differ = input_spec.differences(data.input_spec)
    if differ:
        raise ExportError(f"{run}: the validation data's input differs from the run's in {', '.join(differ)} "
                          f"(run: {input_spec.to_dict()}, data: {data.input_spec.to_dict()}); validate with the "
                          "data set the run was trained on")
    experts, flat = _load_nets(run, tree, input_spec.shape, cfg)
    bundle_tree = tree
    if subtree is not None:
        if subtree not in tree._index:
            raise ExportError(f"unknown --subtree node {subtree!r}; expected one of the experts: "
                              f"{', '.join(tree.names[e] for e in tree.experts)}")
        bundle_tree = tree.subtree(tree.index(subtree))
        experts = {bundle_tree.names[e]: experts[bundle_tree.names[e]] for e in bundle_tree.experts}
        flat = None
        if not experts:
            raise ExportError(f"--subtree {subtree!r} has no expert (it has fewer than two leaves below it)")
    real = input_spec.normalize(data.test_x[: validate_images or len(data.test_x)])
    if out.exists():
        raise ExportError(f"{out} already exists; choose a new --out or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    result = ExportResult(out)
    try:
        models = [(k, [bundle_tree.names[c] for c in bundle_tree.children(bundle_tree.index(k))], net)
                  for k, net in experts.items()]
        if flat is not None:
            models.append(("flat", [tree.names[i] for i in tree.leaves], flat))
        manifest_experts, manifest_flat = {}, None
        for i, (node, children, net) in enumerate(models):
            is_flat = node == "flat" and flat is not None and net is flat
            fname = "flat.onnx" if is_flat else f"expert-{i:03d}.onnx"
            t = time.perf_counter()
            path = export_net(net, tmp / fname, spec, {"hmoe.node": node, "hmoe.children": json.dumps(children),
                                                      "hmoe.kind": "flat" if is_flat else "expert"})
            check = validate_model(node, path, net, real, spec)
            entry = _entry(node, children, path, net, spec)
            result.rows.append({"model": node, "children": len(children), "params": entry.params,
                                "bytes": entry.bytes, "seconds": time.perf_counter() - t, **check})
            if progress:
                r = result.rows[-1]
                print(f"  exported {node:<20} {r['params']:>9} params {r['bytes']:>10} bytes "
                      f"max diff {max(r['max_diff_random'], r['max_diff_real']):.2e}")
            if is_flat:
                manifest_flat = entry
            else:
                manifest_experts[node] = entry
        templates, template_report = write_templates(tmp, manifest_experts, experts, real[:512], spec)
        if progress:
            for r in template_report:
                print(f"  template {r['template'] or '(none)':<20} for {len(r['experts'])} experts"
                      + (f": {r['why']}" if r["template"] is None else f", {r['bytes']} bytes"))
        Manifest(bundle_tree, input_spec, manifest_experts, manifest_flat, subtree_of=subtree,
                 source={"run": str(run.resolve()), "dataset": cfg.dataset},
                 created_by="hmoe-edge exporter", templates=templates).write(tmp)
        result.report = {"models": result.rows, "subtree": subtree, "opset": spec.opset, "atol": spec.atol,
                         "total_bytes": sum(r["bytes"] for r in result.rows), "templates": template_report}
        if quantize:
            from exporter.quantize import quantize_bundle
            result.report["int8"] = quantize_bundle(tmp, data, experts, flat, quantize)
        result.report["greedy_checked_images"] = check_greedy(tmp, bundle_tree, experts, real[:64])
        (tmp / "export_report.json").write_text(json.dumps(result.report, indent=1) + "\n")
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result
