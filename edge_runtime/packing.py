"""Packed streaming: an expert's weights in the layout this CPU's onnxruntime runs fastest.

A streamed expert (``Engine`` under a memory budget) runs through its architecture's
template, the weights fed as inputs. onnxruntime re-lays out a convolution's weights for
its blocked (NCHWc) kernels only when they are constants of the model, so a template run
cost about twice an open session's (docs/DEVICE.md, "Memory budget and streaming").
``hmoe-edge pack`` closes that gap once per device: for each expert it lets onnxruntime
optimise the expert's model for this CPU (``optimized_model_filepath``), then moves the
optimised model's float weights, already in the blocked layout, out of the graph into a
weights file, leaving a *packed template* with those weights as inputs. Experts of one
architecture share one packed template. Each packed expert is checked before it is
written: on a seeded probe input its packed run must give the expert's own logits (within
1e-4). The result is for this CPU and this onnxruntime release only (the block size is
the CPU's), which ``index.json`` records; the engine refuses a pack made elsewhere.

The ONNX files are read and rewritten at the protobuf wire level (a model is a protobuf
message; only the graph's initializers and inputs are touched), so the edge runtime
needs no ``onnx`` package.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import struct
import tempfile
from pathlib import Path

import numpy as np

from edge_runtime.onnx_wire import field as _enc
from edge_runtime.onnx_wire import fields, read_varint, session_options
from hierarchy.errors import HmoeError
from hierarchy.tree import write_bytes_atomic, write_text_atomic

FORMAT = 1
FLOAT = 1   # TensorProto.DataType FLOAT


class PackError(HmoeError, RuntimeError):
    """A pack that is missing, made for another CPU or onnxruntime, or damaged."""


# ------------------------------------------------------------ the optimised model
def _tensor(buf: bytes) -> tuple[str, int, list[int], np.ndarray | None]:
    """A TensorProto's name, data type, dims and (float tensors) values."""
    name, dtype, dims, raw, floats = "", 0, [], None, []
    for num, wt, value, _ in fields(buf):
        if num == 1:
            if wt == 2:   # packed dims
                j = 0
                while j < len(value):
                    d, j = read_varint(value, j)
                    dims.append(d)
            else:
                dims.append(value)
        elif num == 2:
            dtype = value
        elif num == 8:
            name = value.decode()
        elif num == 9:
            raw = value
        elif num == 4:
            floats.extend(struct.unpack(f"<{len(value) // 4}f", value) if wt == 2 else struct.unpack("<f", value))
        elif num == 13:   # external data: the optimiser writes none for models this small
            raise PackError(f"initializer {name!r} has external data")
    arr = None
    if dtype == FLOAT:
        arr = (np.frombuffer(raw, "<f4") if raw is not None else np.asarray(floats, "<f4")).astype(np.float32)
        arr = arr.reshape(dims)
    return name, dtype, dims, arr


def _value_info(name: str, rank: int | None) -> bytes:
    """A float tensor ValueInfoProto: ``rank`` symbolic dims (named after the tensor), or no shape."""
    shape = b"" if rank is None else _enc(2, b"".join(_enc(1, _enc(2, f"{name}:{j}".encode())) for j in range(rank)))
    return _enc(1, name.encode()) + _enc(2, _enc(1, _enc(1, FLOAT) + shape))


def _name(value_info: bytes) -> str:
    return next(v.decode() for num, _, v, _ in fields(value_info) if num == 1)


def weights_out(model: bytes) -> tuple[bytes, dict[str, np.ndarray]]:
    """``model`` with every float initializer of more than one value moved out: the graph
    without them (each now a graph input of symbolic shape) and the arrays, in graph order.
    What differs between experts of one architecture goes too (the model's metadata, the
    graph's shape annotations, the outputs' sizes), so they share one template."""
    graph_field, rest = None, []
    for num, _, value, raw in fields(model):
        if num == 7:
            graph_field = value
        elif num != 14:   # metadata_props: the expert's node and children
            rest.append(raw)
    if graph_field is None:
        raise PackError("the optimised model has no graph")
    kept, inputs, weights = [], [], {}
    for num, _, value, raw in fields(graph_field):
        if num == 5:
            name, dtype, dims, arr = _tensor(value)
            if dtype == FLOAT and arr is not None and arr.size > 1:
                weights[name] = arr
                inputs.append(_enc(11, _value_info(name, len(dims))))
                continue
        elif num == 13:   # value_info: intermediate shapes, some the expert's own
            continue
        elif num == 12:   # an output: its name and type, not its size (the expert's children)
            raw = _enc(12, _value_info(_name(value), None))
        kept.append(raw)
    graph = b"".join(kept) + b"".join(inputs)
    return b"".join(rest) + _enc(7, graph), weights


# ------------------------------------------------------------ packing a bundle
def cpu_key() -> dict:
    """What a pack is valid for: onnxruntime's release, the machine, and the CPU's model and
    feature flags (the blocked layout's block size follows the vector width)."""
    import onnxruntime as ort
    model, flags = platform.processor(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "cpu part") and not model:
                model = value.strip()
            elif key in ("flags", "features") and not flags:
                flags = value.strip()
    except OSError:
        pass
    return {"onnxruntime": ort.__version__, "machine": platform.machine(), "cpu": model,
            "features_sha256": hashlib.sha256(flags.encode()).hexdigest()}


def manifest_digest(bundle) -> str:
    return hashlib.sha256(json.dumps(bundle.manifest.to_dict(), sort_keys=True).encode()).hexdigest()


def pack_bundle(bundle, out: str | os.PathLike, threads: int = 1, log=print) -> dict:
    """Pack every expert of ``bundle`` (an ``edge_runtime.bundle.Bundle``) into ``out``; the
    index, also written to ``out/index.json``."""
    import onnxruntime as ort

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.json").unlink(missing_ok=True)   # a pack half rewritten is no pack until its new index is written
    rng = np.random.default_rng(0)
    probe = rng.standard_normal((2, *bundle.input_spec.shape)).astype(np.float32)
    index = {"format": FORMAT, **cpu_key(), "manifest_sha256": manifest_digest(bundle), "experts": {},
             "templates": {}}
    for i, (key, entry) in enumerate(bundle.experts.items()):
        path = bundle.check_file(entry, f"expert {key}")
        with tempfile.TemporaryDirectory(prefix="hmoe-pack-") as tmp:
            so = session_options(threads)
            so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            want = sess.run(None, {sess.get_inputs()[0].name: probe})[0]
            optimized = Path(so.optimized_model_filepath).read_bytes()
        try:
            graph, weights = weights_out(optimized)
        except (ValueError, IndexError, struct.error) as exc:   # not the protobuf this module reads
            raise PackError(f"expert {key!r}: onnxruntime's optimised model could not be read ({exc}); this "
                            "onnxruntime's models cannot be packed: stream without --pack") from None
        digest = hashlib.sha256(graph).hexdigest()
        tname = f"packed-template-{digest[:16]}.onnx"
        if tname not in index["templates"]:
            write_bytes_atomic(out / tname, graph)
            index["templates"][tname] = {"sha256": digest, "bytes": len(graph)}
        tsess = ort.InferenceSession(graph, template_options(threads), providers=["CPUExecutionProvider"])
        xname = next(i.name for i in tsess.get_inputs() if i.name not in weights)
        got = tsess.run(None, {xname: probe, **weights})[0]
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-4):
            raise PackError(f"expert {key!r}: the packed run differs from the expert's own on the probe "
                            f"(max {float(np.abs(got - want).max()) if got.shape == want.shape else 'shape'}); "
                            "this onnxruntime's optimised model cannot be streamed")
        blob, layout, offset = bytearray(), [], 0
        for name, arr in weights.items():
            data = np.ascontiguousarray(arr, dtype="<f4").tobytes()
            layout.append([name, offset, int(arr.size), list(arr.shape)])
            blob += data
            offset += len(data)
        wname = f"weights-{i:04d}.bin"
        write_bytes_atomic(out / wname, bytes(blob))
        index["experts"][key] = {"template": tname, "input": xname, "weights": wname, "bytes": len(blob),
                                 "sha256": hashlib.sha256(blob).hexdigest(), "layout": layout}
        if log:
            log(f"  packed {key:<24} {len(blob):>10} bytes  template {tname}")
    write_text_atomic(out / "index.json", json.dumps(index, indent=1, ensure_ascii=False) + "\n")
    return index


def template_options(threads: int):
    """A packed template is already optimised for this CPU: onnxruntime must not optimise it again."""
    import onnxruntime as ort

    so = session_options(threads, arena=True)   # (why the arena: onnx_wire.session_options)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return so


def load_index(bundle, folder: str | os.PathLike) -> dict:
    """The pack in ``folder`` once it is for this bundle, this CPU and this onnxruntime."""
    folder = Path(folder)
    try:
        index = json.loads((folder / "index.json").read_text())
    except FileNotFoundError:
        raise PackError(f"{folder}: no pack here (index.json missing); run `hmoe-edge pack --bundle "
                        f"{bundle.root} --out {folder}` on this device") from None
    except (OSError, ValueError) as exc:
        raise PackError(f"{folder}/index.json: unreadable ({exc}); pack again with `hmoe-edge pack`") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise PackError(f"{folder}/index.json: not a pack of format {FORMAT}; pack again with `hmoe-edge pack`")
    here = cpu_key()
    for k, v in here.items():
        if index.get(k) != v:
            raise PackError(f"{folder}: packed for {k} {str(index.get(k))[:40]!r}, this device has {str(v)[:40]!r}: "
                            "a pack is for the CPU and onnxruntime it was made on; pack again with `hmoe-edge pack`")
    if index.get("manifest_sha256") != manifest_digest(bundle):
        raise PackError(f"{folder}: packed for another bundle (its manifest differs from {bundle.root}'s); pack "
                        "again with `hmoe-edge pack`")
    if set(index.get("experts", {})) != set(bundle.experts):
        raise PackError(f"{folder}: the pack's experts differ from the bundle's; pack again with `hmoe-edge pack`")
    for key, e in index["experts"].items():   # the engine reads weights by these offsets: each must fit its file
        try:
            ok = e["template"] in index["templates"] and all(
                0 <= off and count == math.prod(shape) and off + 4 * count <= e["bytes"]
                for _, off, count, shape in e["layout"])
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise PackError(f"{folder}/index.json: the entry of expert {key!r} is malformed (a template it does not "
                            "list, or weights outside their file); pack again with `hmoe-edge pack`")
    return index
