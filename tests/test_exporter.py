"""Exporter: ONNX per expert, manifest, validation, atomic bundles, tampering, int8, subtrees."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.bundle import BundleError, load_bundle
from edge_runtime.engine import Engine
from exporter.bundle import ExportError, export_run
from hierarchy import info_f1
from tests.conftest import CFG
from trainer.transports.inprocess import Federation
from trainer.prepare import prepare


def hmoe_edge(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("hmoe-edge", path=str(Path(sys.executable).parent))
    cmd = [exe, *args] if exe else [sys.executable, "-m", "edge_runtime.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_manifest_describes_every_expert(bundle_dir):
    m = json.loads((bundle_dir / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["input"]["shape"] == [1, 28, 28] and m["input"]["color"] == "L"
    assert sorted(e["node"] for e in m["experts"]) == ["Clothes", "Goods", "Shoes", "Tops", "root"]
    shoes = next(e for e in m["experts"] if e["node"] == "Shoes")
    assert shoes["children"] == ["Sandal", "Sneaker", "Ankle boot"] and shoes["opset"] >= 18
    assert m["flat"]["children"][:2] == ["T-shirt/top", "Trouser"]
    report = json.loads((bundle_dir / "export_report.json").read_text())
    assert all(max(r["max_diff_random"], r["max_diff_real"]) <= 1e-4 for r in report["models"])
    import onnx
    model = onnx.load(str(bundle_dir / shoes["file"]))
    props = {p.key: p.value for p in model.metadata_props}
    assert props["hmoe.node"] == "Shoes" and json.loads(props["hmoe.children"]) == shoes["children"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis


def test_template_runs_every_expert_given_its_weights(bundle_dir, tmp_path):
    """One weights-as-inputs graph serves every expert of an architecture (issue 26): its inputs
    are the image and the weights, its outputs open; given an expert's safetensors weights it
    computes what that expert's own file computes."""
    import shutil

    import onnx
    import onnxruntime as ort
    from safetensors.numpy import load_file

    m = json.loads((bundle_dir / "manifest.json").read_text())
    assert len(m["templates"]) == 1 and "num_outputs" not in m["templates"][0]["net"]
    t = m["templates"][0]
    model = onnx.load(str(bundle_dir / t["file"]))
    assert model.graph.output[0].type.tensor_type.shape.dim[1].dim_param == "k"
    tmpl = ort.InferenceSession(str(bundle_dir / t["file"]), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(16, 1, 28, 28)).astype(np.float32)
    for e in m["experts"]:
        own = ort.InferenceSession(str(bundle_dir / e["file"]), providers=["CPUExecutionProvider"])
        want = own.run(None, {"input": x})[0]
        got = tmpl.run(None, {"input": x, **load_file(str(bundle_dir / e["weights"]["file"]))})[0]
        assert got.shape == (16, len(e["children"])) and np.abs(got - want).max() <= 1e-4
    report = json.loads((bundle_dir / "export_report.json").read_text())
    assert report["templates"][0]["template"] == t["file"] and len(report["templates"][0]["experts"]) == 5
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    (copy / t["file"]).write_bytes(b"not onnx")
    r = hmoe_edge("verify", str(copy))
    assert r.returncode == 1 and t["file"] in r.stderr and "sha256" in r.stderr
    m["templates"] = [{"file": t["file"]}]
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"templates\[0\]: malformed template entry"):
        load_bundle(copy)


def test_bundle_reproduces_torch_f1(run_dir, bundle_dir):
    prep = prepare(CFG)
    fed = Federation(run_dir, "hmoe", CFG, prep)
    d = prep.data
    torch_f1 = fed.evaluate(d.test_x, d.test_y)["info_f1"]
    engine = Engine(bundle_dir)
    x = ((d.test_x.astype(np.float32) / 255 - 0.5) / 0.25).astype(np.float32)
    onnx_f1 = float(info_f1(d.tree, d.tree.leaves[d.test_y], engine.decode(x).nodes).mean())
    assert abs(onnx_f1 - torch_f1) <= 0.002


def test_flipped_byte_fails_verify_and_names_the_file(bundle_dir, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    assert hmoe_edge("verify", str(copy)).returncode == 0
    m = json.loads((copy / "manifest.json").read_text())
    victim = m["experts"][2]["file"]
    data = bytearray((copy / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / victim).write_bytes(bytes(data))
    r = hmoe_edge("verify", str(copy))
    assert r.returncode == 1 and victim in r.stderr and "sha256" in r.stderr
    with pytest.raises(BundleError, match=victim):
        Engine(copy).session(m["experts"][2]["node"])
    (copy / victim).unlink()
    r = hmoe_edge("verify", str(copy))
    assert r.returncode == 1 and "missing" in r.stderr


def test_subtree_bundle_holds_only_that_subtree(run_dir, tmp_path):
    out = tmp_path / "shoes"
    export_run(run_dir, out, subtree="Goods", progress=False)
    b = load_bundle(out)
    assert sorted(b.experts) == ["Goods", "Shoes"] and b.flat is None
    assert b.tree.names[0] == "Goods" and [b.tree.names[i] for i in b.tree.leaves] == \
        ["Sandal", "Sneaker", "Bag", "Ankle boot"]
    pred = Engine(out).predict(np.zeros((1, 1, 28, 28), dtype=np.float32))[0]
    assert pred.path[0] == "Goods" and pred.leaf in ("Sandal", "Sneaker", "Bag", "Ankle boot")


def test_bad_runs_leave_nothing(run_dir, tmp_path):
    with pytest.raises(ExportError, match="no such run directory"):
        export_run(tmp_path / "nope", tmp_path / "o1", progress=False)
    with pytest.raises(ExportError, match="unknown --subtree node 'Hats'"):
        export_run(run_dir, tmp_path / "o2", subtree="Hats", progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    ckpt = next((broken / "experts").glob("*Tops*"))
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(ExportError, match="Tops"):
        export_run(broken, tmp_path / "o3", progress=False)
    swapped = tmp_path / "swapped"
    shutil.copytree(run_dir, swapped)
    shoes = next((swapped / "experts").glob("*Shoes*"))
    tops = next((swapped / "experts").glob("*Tops*"))
    shutil.copy(shoes, tops)
    with pytest.raises(ExportError, match="checkpoint is for node 'Shoes'"):
        export_run(swapped, tmp_path / "o4", progress=False)
    assert not any(p.name.startswith(("o1", "o2", "o3", "o4", ".o")) for p in tmp_path.iterdir())


def test_cli_export_errors_are_clear(tmp_path):
    exe = shutil.which("hmoe", path=str(Path(sys.executable).parent))
    r = subprocess.run([exe, "export", "--run", str(tmp_path / "missing"), "--out", str(tmp_path / "b")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no such run directory" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_int8_report(run_dir, tmp_path):
    out = tmp_path / "q"
    res = export_run(run_dir, out, quantize="int8", progress=False)
    q = res.report["int8"]
    assert q["int8"]["total_bytes"] < q["fp32"]["total_bytes"]
    assert "info_f1_drop" in q and set(q["int8"]["median_latency_ms"]) == set(q["fp32"]["median_latency_ms"])
    e = Engine(out, variant="int8")
    assert e.decode(np.zeros((2, 1, 28, 28), dtype=np.float32)).nodes.shape == (2,)
    assert hmoe_edge("verify", str(out)).returncode == 0


def test_manifest_is_one_schema_written_and_read_by_the_same_code(bundle_dir):
    from hierarchy.manifest import Manifest
    m = Manifest.read(bundle_dir)
    on_disk = json.loads((bundle_dir / "manifest.json").read_text())
    assert m.to_dict() == on_disk and Manifest.from_dict(on_disk).to_dict() == on_disk   # nothing lost either way
    assert m.input == load_bundle(bundle_dir).input_spec and m.experts["Shoes"].weights is not None
    report = json.loads((bundle_dir / "export_report.json").read_text())
    assert report["greedy_checked_images"] > 0   # export opened its own bundle through the edge engine


def test_export_refuses_data_whose_normalisation_disagrees_with_the_run(run_dir, tmp_path):
    from dataclasses import replace
    data = prepare(CFG).data
    other = replace(data, mean=(0.9,), std=(0.1,))
    with pytest.raises(ExportError, match="mean, std"):
        export_run(run_dir, tmp_path / "b", data=other, progress=False)
    assert not (tmp_path / "b").exists()
