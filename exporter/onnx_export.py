"""Spec + export + validate for one network (the Optimum habit)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from hierarchy.errors import HmoeError
from trainer.device.nets import ConvNet

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 18


@dataclass(frozen=True)
class ExportSpec:
    """What an exported expert looks like from outside."""

    opset: int = DEFAULT_OPSET
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    atol: float = 1e-4          # max |logit difference| torch vs onnxruntime (fp32)


class ValidationError(HmoeError, ValueError):
    """onnxruntime disagrees with torch beyond the tolerance."""

    def __init__(self, what: str, max_diff: float, atol: float, detail: str = "") -> None:
        self.what, self.max_diff, self.atol = what, max_diff, atol
        super().__init__(f"{what}: onnxruntime differs from torch by {max_diff:.3g} (tolerance {atol:g}){detail}")


def export_net(net: ConvNet, path: str | os.PathLike, spec: ExportSpec = ExportSpec(),
               metadata: dict[str, str] | None = None) -> Path:
    """Write ``net`` as ONNX with a dynamic batch axis and ``metadata`` as model properties."""
    path = Path(path)
    net = net.eval().cpu()
    example = (torch.zeros(2, *net.cfg.in_shape),)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(net, example, dynamo=True, input_names=[spec.input_name],
                                    output_names=[spec.output_name], dynamic_shapes=({0: batch},),
                                    opset_version=spec.opset, verbose=False)
    model = program.model_proto
    for key, value in (metadata or {}).items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return path


def session(path: str | os.PathLike):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def max_logit_diff(path: str | os.PathLike, net: ConvNet, x: np.ndarray, spec: ExportSpec = ExportSpec(),
                   batch: int = 512) -> tuple[float, np.ndarray, np.ndarray]:
    """Largest |torch - onnxruntime| over float32 inputs ``x``; also both logit arrays."""
    sess = session(path)
    net = net.eval().cpu()
    ort_out, torch_out = [], []
    with torch.no_grad():
        for lo in range(0, len(x), batch):
            xb = np.ascontiguousarray(x[lo:lo + batch], dtype=np.float32)
            ort_out.append(sess.run([spec.output_name], {spec.input_name: xb})[0])
            torch_out.append(net(torch.from_numpy(xb)).numpy())
    a, b = np.concatenate(ort_out), np.concatenate(torch_out)
    return float(np.abs(a - b).max()) if a.size else 0.0, a, b


def weights_as_inputs(model_path: str | os.PathLike, weights: dict[str, np.ndarray], out: str | os.PathLike,
                      spec: ExportSpec = ExportSpec()) -> Path:
    """Write ``model_path``'s graph with the initializers named in ``weights`` turned into graph
    inputs, the number of outputs left symbolic ("k"): one template runs every expert of the same
    architecture, given that expert's weights (the edge engine's streamed path, docs/DEVICE.md).

    Every initializer must be either one of ``weights`` with exactly its values (the template
    must compute what the expert's own file computes) or a constant the caller checks is the
    same in every expert it will serve (:func:`constants`)."""
    model = onnx.load(str(model_path))
    graph = model.graph
    out_dim = graph.output[0].type.tensor_type.shape.dim
    k = out_dim[1].dim_value if len(out_dim) == 2 else 0
    kept, moved = [], []
    for init in graph.initializer:
        if init.name in weights:
            value = onnx.numpy_helper.to_array(init)
            if value.dtype != np.float32 or not np.array_equal(value, weights[init.name]):
                raise ValueError(f"{model_path}: initializer {init.name!r} differs from the weights file")
            moved.append(init)
        else:
            kept.append(init)
    missing = sorted(set(weights) - {i.name for i in moved})
    if missing:
        raise ValueError(f"{model_path}: weights {missing[:3]} are not initializers of the graph")
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for init in moved:
        dims = [("k" if d == k and i == 0 and len(init.dims) <= 2 and init.name.startswith(_last_layer(weights))
                 else d) for i, d in enumerate(init.dims)]
        graph.input.append(onnx.helper.make_tensor_value_info(init.name, onnx.TensorProto.FLOAT, dims))
    if k:
        out_dim[1].ClearField("dim_value")
        out_dim[1].dim_param = "k"
    del graph.value_info[:]
    del model.metadata_props[:]
    onnx.checker.check_model(model)
    onnx.save_model(model, str(out))
    return Path(out)


def _last_layer(weights: dict[str, np.ndarray]) -> str:
    """The prefix of the output layer's parameters ("head.3."): the last weight in the net's order."""
    last = list(weights)[-1]
    return last.rsplit(".", 1)[0] + "."


def constants(model_path: str | os.PathLike, weights: dict[str, np.ndarray]) -> dict[str, bytes]:
    """The initializers of ``model_path`` that are not weights, as raw bytes (shape constants)."""
    model = onnx.load(str(model_path))
    return {i.name: onnx.numpy_helper.to_array(i).tobytes() + repr(tuple(i.dims)).encode()
            for i in model.graph.initializer if i.name not in weights}
