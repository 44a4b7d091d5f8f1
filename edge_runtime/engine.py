"""The narrow edge engine: float32 arrays in, node indices and probabilities out.

Experts are opened only when decoding visits them (sha256 checked on first load),
and kept in an LRU cache bounded by a memory budget. No torch, no HTTP, no images.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from edge_runtime.bundle import Bundle, BundleError, ModelEntry, load_bundle
from hierarchy import Decoded, decode, leaf_rule
from hierarchy.decode import DecodeError
from hierarchy.errors import HmoeError, UnknownNameError, UsageError


class InputError(HmoeError, ValueError):
    """An input batch has the wrong shape, dtype or values."""


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class Prediction:
    leaf: str
    node: str
    path: list[str]
    step_probs: list[float]
    prob: float
    experts_evaluated: int

    def to_dict(self) -> dict:
        return {"leaf": self.leaf, "node": self.node, "path": self.path, "step_probs": self.step_probs,
                "prob": self.prob, "experts_evaluated": self.experts_evaluated}


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    loaded: list[str] = field(default_factory=list)


def session_options(threads: int = 1):
    """onnxruntime options for small resident memory."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.enable_cpu_mem_arena = False
    opts.enable_mem_pattern = False
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, value: int | bytes | str) -> bytes:
    """One protobuf field: an integer (varint) or bytes/str (length-delimited)."""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def identity_model_bytes() -> bytes:
    """A weightless ONNX model, y = Identity(x) over float32[1], encoded by hand (the edge
    install has no ``onnx`` package). Field numbers are those of onnx.proto."""
    def value_info(name: str) -> bytes:
        shape = _field(1, _field(1, 1))                       # TensorShapeProto.dim { dim_value: 1 }
        tensor = _field(1, 1) + _field(2, shape)              # elem_type FLOAT, shape
        return _field(1, name) + _field(2, _field(1, tensor))  # name, type { tensor_type }
    node = _field(1, "x") + _field(2, "y") + _field(4, "Identity")
    graph = _field(1, node) + _field(2, "warm_up") + _field(11, value_info("x")) + _field(12, value_info("y"))
    opset = _field(1, "") + _field(2, 18)
    return _field(1, 8) + _field(7, graph) + _field(8, opset)   # ir_version 8, graph, opset_import


_runtime_warm = False


def warm_up_runtime(threads: int = 1) -> None:
    """Pay onnxruntime's once-per-process start-up now, with a model that has no weights.

    The first session a process creates, whatever its model, builds the CPU kernel
    registry and pages in ~8 MB of the library's code (about 9 MB resident and 4-6 ms
    in all, measured by benchmarks/edge_inference.py). Doing it when the engine opens keeps
    it out of the first request's latency and out of what loading an expert costs.
    """
    global _runtime_warm
    if _runtime_warm:
        return
    import onnxruntime as ort
    sess = ort.InferenceSession(identity_model_bytes(), session_options(threads), providers=["CPUExecutionProvider"])
    sess.run(None, {"x": np.zeros(1, dtype=np.float32)})
    _runtime_warm = True


class Engine:
    def __init__(self, bundle: Bundle | str | os.PathLike, memory_budget_mb: float | None = None,
                 threads: int = 1, variant: str = "fp32", warm_up: bool = True, eviction: str = "deepest") -> None:
        if eviction not in ("deepest", "lru"):
            raise UsageError(f"unknown eviction {eviction!r}; expected deepest or lru")
        self.eviction = eviction
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.tree = self.bundle.tree
        self.budget = memory_budget_mb * 2**20 if memory_budget_mb else None
        self.threads = threads
        self.entries = self._entries(variant)
        self.cache: OrderedDict[str, object] = OrderedDict()
        self._inputs: dict[int, str] = {}   # id(session) -> its input's name
        self._kids = [tuple(int(c) for c in self.tree.children(v)) for v in range(len(self.tree))]
        self.stats = CacheStats()
        shape = list(self.bundle.input_spec.shape)
        self.input_shape = tuple(int(s) for s in shape)
        if warm_up:
            warm_up_runtime(threads)

    def _entries(self, variant: str) -> dict[str, ModelEntry]:
        if variant == "fp32":
            out = dict(self.bundle.experts)
            if self.bundle.flat:
                out["flat"] = self.bundle.flat
            return out
        if variant == "int8":
            out = self.bundle.int8_entries()
            if not out:
                raise BundleError(f"{self.bundle.root}: no int8 models in this bundle; export with --quantize int8")
            return out
        raise UsageError(f"unknown variant {variant!r}; expected fp32 or int8")

    # --------------------------------------------------------------- sessions
    def _model_bytes(self, key: str) -> int:
        return self.entries[key].bytes

    def session(self, key: str):
        """The onnxruntime session of expert ``key`` (node name) or 'flat', loading it on first use."""
        if key in self.cache:
            self.stats.hits += 1
            self.cache.move_to_end(key)
            return self.cache[key]
        if key not in self.entries:
            raise UnknownNameError(f"unknown expert {key!r}; this bundle has {', '.join(self.entries)}")
        import onnxruntime as ort
        self.stats.misses += 1
        path = self.bundle.check_file(self.entries[key])
        if self.budget is not None:
            need = self._model_bytes(key)
            while self.cache and sum(self._model_bytes(k) for k in self.cache) + need > self.budget:
                old = self.cache.pop(self._victim())
                self._inputs.pop(id(old), None)
                self.stats.evictions += 1
        sess = ort.InferenceSession(str(path), session_options(self.threads), providers=["CPUExecutionProvider"])
        self.cache[key] = sess
        self.stats.loaded.append(key)
        return sess

    def _victim(self) -> str:
        """Which session to close for room: the deepest expert, the least recently used among
        equals. Every input visits the root and most visit the upper levels, so keeping them
        and cycling the lower ones costs the fewest session creations (plain LRU closes the
        root as soon as a path is longer than the budget, and every expert then misses)."""
        if self.eviction == "lru":   # (for comparison: benchmarks/greedy_latency.py)
            return next(iter(self.cache))
        depth = {k: (int(self.tree.depths[self.tree.index(k)]) if k != "flat" else -1) for k in self.cache}
        deepest = max(depth.values())
        return next(k for k in self.cache if depth[k] == deepest)   # the cache is in LRU order

    def preload(self, flat: bool = False) -> None:
        """Open every expert (and the flat model too when ``flat``)."""
        for key in self.entries:
            if key != "flat" or flat:
                self.session(key)

    def session_and_input(self, key: str):
        """The session of ``key`` and its input's name (read once per session)."""
        sess = self.session(key)
        name = self._inputs.get(id(sess))
        if name is None:
            name = self._inputs[id(sess)] = sess.get_inputs()[0].name
        return sess, name

    def run(self, key: str, x: np.ndarray) -> np.ndarray:
        sess, name = self.session_and_input(key)
        return sess.run(None, {name: x})[0]

    # ---------------------------------------------------------------- inputs
    def check_input(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise InputError(f"input of shape {tuple(x.shape)}; expected (N, {', '.join(map(str, self.input_shape))})")
        if not np.issubdtype(x.dtype, np.floating):
            raise InputError(f"input dtype {x.dtype}; expected float32, normalised as the manifest says")
        if not np.all(np.isfinite(x)):
            raise InputError("input holds NaN or infinite values")
        return np.ascontiguousarray(x, dtype=np.float32)

    # ------------------------------------------------------------- predicting
    def decode(self, x: np.ndarray, decoder: str = "greedy") -> Decoded:
        x = self.check_input(x)
        if len(x) == 1 and decoder in ("greedy", "threshold:0"):
            return self._greedy_one(x)

        def expert_fn(node: int, idx: np.ndarray) -> np.ndarray:
            return softmax(self.run(self.tree.names[node], x[idx]))

        return decode(self.tree, expert_fn, len(x), decoder)

    def _greedy_one(self, x: np.ndarray) -> Decoded:
        """Greedy decoding of one input without the batch decoder's bookkeeping: the same
        softmax, argmax and checks as ``hierarchy.decode.greedy`` (so the same answer, to the
        bit), one expert after another. Per input the batch decoder spent about twice the
        experts' own time in Python (benchmarks/edge_inference.py)."""
        tree, kids = self.tree, self._kids
        v, prob, count = 0, 1.0, 0
        path, steps = [0], [1.0]
        while True:
            k = kids[v]
            if not k:
                break
            if len(k) > 1:
                sess, name = self.session_and_input(tree.names[v])
                p = softmax(sess.run(None, {name: x})[0]).astype(np.float64)
                if p.shape != (1, len(k)):
                    raise DecodeError(f"expert {tree.names[v]!r} returned shape {p.shape}; expected {(1, len(k))}")
                if not np.all(np.isfinite(p)):
                    raise DecodeError(f"expert {tree.names[v]!r} returned non-finite probabilities")
                j = int(p[0].argmax())
                count += 1
                step = float(p[0, j])
                prob *= step
            else:
                j, step = 0, 1.0
            v = k[j]
            path.append(v)
            steps.append(step)
        return Decoded(np.array([v], dtype=np.int64), np.array([prob]), np.array([count], dtype=np.int64), [path],
                       [steps])

    def predict(self, x: np.ndarray, decoder: str = "greedy") -> list[Prediction]:
        d = self.decode(x, decoder)
        names = self.tree.names
        out = []
        for i in range(len(d.nodes)):
            node = int(d.nodes[i])
            out.append(Prediction(leaf=names[node] if self.tree.num_children[node] == 0 else "",
                                  node=names[node], path=[names[v] for v in d.paths[i]],
                                  step_probs=[float(p) for p in d.step_probs[i]], prob=float(d.prob[i]),
                                  experts_evaluated=int(d.experts_evaluated[i])))
        return out

    def greedy_from(self, node: str, x: np.ndarray) -> list[str]:
        """Greedy decisions started at ``node`` instead of the root: what this bundle's experts
        say inside one subtree (a subtree bundle's answers must equal the full bundle's here)."""
        x = self.check_input(x)
        start = self.tree.index(node)
        out = []
        for i in range(len(x)):
            v = start
            while self.tree.num_children[v] > 0:
                kids = self.tree.children(v)
                v = int(kids[0] if len(kids) == 1 else kids[int(np.argmax(self.run(self.tree.names[v], x[i:i + 1])[0]))])
            out.append(self.tree.names[v])
        return out

    def flat_nodes(self, x: np.ndarray) -> np.ndarray:
        if "flat" not in self.entries:
            raise BundleError(f"{self.bundle.root}: no flat model in this bundle")
        x = self.check_input(x)
        return leaf_rule(self.tree, softmax(self.run("flat", x)))

    @property
    def loaded(self) -> list[str]:
        return list(self.cache)
