"""The narrow edge engine: float32 arrays in, node indices and probabilities out.

Experts are opened only when decoding visits them (sha256 checked on first load),
and kept in an LRU cache bounded by a memory budget. No torch, no HTTP, no images.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_runtime.bundle import Bundle, BundleError, ModelEntry, load_bundle
from edge_runtime.onnx_wire import field as _field
from edge_runtime.onnx_wire import session_options  # noqa: F401  (re-exported: callers import it here)
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
    streamed: int = 0      # runs through a template, the weights read for that run
    loaded: list[str] = field(default_factory=list)


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


def _safetensors_layout(data, path: Path) -> list[tuple[str, int, int, tuple]]:
    """(name, byte offset, element count, shape) of every float32 tensor in a safetensors file
    (``data``: its bytes, or a memoryview of them; only the header is copied)."""
    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(bytes(data[8:8 + n]))
        header.pop("__metadata__", None)
        out = []
        for name, t in header.items():
            shape = tuple(int(d) for d in t["shape"])
            lo, hi = (int(o) for o in t["data_offsets"])
            count = math.prod(shape)
            if t["dtype"] != "F32" or hi - lo != 4 * count or 8 + n + hi > len(data):
                raise ValueError(f"tensor {name!r} is not float32 of its shape inside the file")
            out.append((name, 8 + n + lo, count, shape))
        return out
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BundleError(f"{path}: not a safetensors file of float32 weights ({exc})") from None


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


def path_only_bytes(bundle: Bundle, variant: str = "fp32") -> int:
    """The path-only memory budget: the models of the longest root-to-leaf path (by bytes),
    plus the templates when the engine can stream (fp32 with templates), so that the path's
    experts fit whether they are open or streamed."""
    models = bundle.int8_entries() if variant == "int8" else bundle.experts
    names = bundle.tree.names
    longest = max((sum(models[names[v]].bytes for v in bundle.tree.path(int(leaf)) if names[v] in models)
                   for leaf in bundle.tree.leaves), default=0)
    if variant == "fp32":
        m = bundle.manifest
        longest += sum({t.file.file: t.file.bytes for k in m.experts if (t := m.template_for(k))}.values())
    return longest


ADMIT_EVERY = 8   # a streamed expert is weighed for a session at every 8th visit (``Engine._admit``)
KEPT_BINDINGS = 16   # template bindings kept (``Engine._bound_run``): about 10 KB of onnxruntime's each


def _keep_recent(cache: OrderedDict) -> None:
    """Drop the least recently used entries of ``cache`` beyond KEPT_BINDINGS."""
    while len(cache) > KEPT_BINDINGS:
        cache.popitem(last=False)


def ort_value(array: np.ndarray):
    """An onnxruntime value over ``array``'s memory (no copy: a run reads or writes the array)."""
    import onnxruntime as ort
    return ort.OrtValue.ortvalue_from_numpy(array)


def bound_run(sess, binding):
    """A call with no arguments that runs ``sess`` on ``binding``: onnxruntime's own (pybind)
    run when its Python classes expose it, else their ``run_with_iobinding``. The Python method
    adds only checks for WebGPU graph capture, which a CPU session never does, and cost about
    0.8 us of a 25 us expert run here (benchmarks/greedy_latency.py runs a few per image)."""
    c_sess, c_binding = getattr(sess, "_sess", None), getattr(binding, "_iobinding", None)
    if c_binding is not None and getattr(binding, "_session", c_sess) is c_sess and \
            callable(getattr(c_sess, "run_with_iobinding", None)):
        return functools.partial(c_sess.run_with_iobinding, c_binding, None)
    return functools.partial(sess.run_with_iobinding, binding)


def _signature(st: os.stat_result) -> tuple:
    """What changes whenever a file's bytes can have changed: any write moves its ctime, which
    no unprivileged call can set back."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Engine:
    """Experts open as onnxruntime sessions while the memory budget holds them; with a budget
    and a bundle that carries templates (``hmoe export`` writes them), an expert the budget
    cannot keep open is *streamed*: its weights are read from the bundle for that one run and
    fed to its architecture's template session, then dropped. Which experts stay open is
    decided by how often inputs visit them (an expert replaces open ones only when visited
    more than twice as often as each of them), so the upper levels every input visits stay
    open and a rarely visited expert never forces a session to be created and closed."""

    def __init__(self, bundle: Bundle | str | os.PathLike, memory_budget_mb: float | None = None,
                 threads: int = 1, variant: str = "fp32", warm_up: bool = True, eviction: str = "deepest",
                 stream: bool = True, pack: str | os.PathLike | None = None, mmap: bool = False) -> None:
        """``pack``: a folder ``hmoe-edge pack`` wrote for this bundle on this device; streamed
        experts then run with their weights in this CPU's layout (``edge_runtime.packing``).
        ``mmap`` (with a pack): the packed weights are memory-mapped instead of read into the
        buffer, so a streamed run copies nothing; their pages are the kernel's page cache,
        which it keeps while memory is free and drops under pressure (resident memory then
        counts them; the budget counts what the engine itself holds)."""
        if eviction not in ("deepest", "lru"):
            raise UsageError(f"unknown eviction {eviction!r}; expected deepest or lru")
        self.eviction = eviction
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.tree = self.bundle.tree
        self.budget = memory_budget_mb * 2**20 if memory_budget_mb else None
        self.threads = threads
        self.entries = self._entries(variant)
        self.cache: OrderedDict[str, tuple] = OrderedDict()    # key -> (session, input name), LRU order
        self._open_bytes = 0   # the open sessions' models' bytes
        self._kids = [tuple(int(c) for c in self.tree.children(v)) for v in range(len(self.tree))]
        self._depth = {k: (int(self.tree.depths[self.tree.index(k)]) if k != "flat" else -1) for k in self.entries}
        self.stats = CacheStats()
        self.visits: dict[str, int] = dict.fromkeys(self.entries, 0)
        self._verified: dict[Path, tuple] = {}     # file -> its signature when its sha256 last matched
        self._template_sessions: dict[str, tuple] = {}
        self._slot: bytearray | None = None        # the streamed expert's weights, one at a time
        self._slot_holds: str | None = None        # whose weights the buffer holds, checked when read
        self.templates = self._templates(variant, stream)
        self.pack, self.packs = None, {}
        self.mmap = mmap
        self._maps: dict[str, tuple] = {}   # expert -> (file signature, mmap, weight views), with ``mmap``
        # Streamed experts of one architecture have one layout of their weights in the buffer, so
        # they share its views and its template bindings (``_bound_run``): what the engine keeps
        # per streamed expert is a few bytes, however many experts a run visits.
        self._layout_keys: dict[str, tuple] = {}   # expert -> its layout (weight name, offset, count, shape)
        self._layouts: dict[tuple, tuple] = {}     # layout -> the one object of it
        self._views: dict[tuple, dict] = {}   # layout -> the weights as views of the streaming buffer
        # binding key (layout and template; the expert itself when memory-mapped) ->
        # (views, session, IO binding, input and output names), at most KEPT_BINDINGS, LRU order
        self._bindings: OrderedDict[object, tuple] = OrderedDict()
        # One input at a time (``_greedy_one``): the input is copied once into ``_x1``, which every
        # expert's run reads through a binding made once, and each expert writes into an output
        # array of its own (a few bytes); expert -> (session, IO binding, output array).
        self._x1: np.ndarray | None = None
        self._x1_value = None
        self._ones: dict[str, tuple] = {}            # open sessions
        self._streamed_ones: OrderedDict[object, tuple] = OrderedDict()   # streamed experts' (``_bindings``' keys)
        if pack is not None and self.templates:
            from edge_runtime.packing import load_index
            self.pack = Path(pack)
            self.packs = load_index(self.bundle, self.pack)
        if self.packs:   # the packed templates and room for the largest packed expert's weights
            # (memory-mapped, the weights are never read into a buffer: no room to keep for one)
            self._slot_bytes = 0 if mmap else max(e["bytes"] for e in self.packs["experts"].values())
            self.reserved = sum(t["bytes"] for t in self.packs["templates"].values()) + self._slot_bytes
        else:
            self._slot_bytes = max((self.entries[k].weights.bytes for k in self.templates), default=0)
            self.reserved = sum({t.file.file: t.file.bytes for t in self.templates.values()}.values()) + \
                self._slot_bytes
        shape = list(self.bundle.input_spec.shape)
        self.input_shape = tuple(int(s) for s in shape)
        if self.budget is not None:
            smallest = min((e.bytes for k, e in self.entries.items() if k != "flat"), default=0)
            if self.budget < (self.reserved if self.templates else smallest):
                need = self.reserved if self.templates else smallest
                raise UsageError(f"a memory budget of {self.budget / 2**20:.2f} MB holds no expert; this bundle "
                                 f"needs at least {need / 2**20:.2f} MB")
        if warm_up:
            warm_up_runtime(threads)

    def _templates(self, variant: str, stream: bool) -> dict:
        """Expert -> the template that can stream it (none without a budget: all stay open)."""
        if not stream or self.budget is None or variant != "fp32":
            return {}
        m = self.bundle.manifest
        return {k: t for k in self.bundle.experts if (t := m.template_for(k)) is not None}

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

    @property
    def held_bytes(self) -> int:
        """What the engine holds against its budget: open sessions (by their models' bytes), and
        with streaming, the templates and room for the largest expert's weights."""
        return self._open_bytes + (self.reserved if self.templates else 0)

    def _checked(self, entry, what: str = "") -> Path:
        """``entry``'s path once its sha256 matched the manifest; hashed again only when the
        file's signature (device, inode, size, mtime, ctime) changed since it last matched."""
        f = entry.file_entry if isinstance(entry, ModelEntry) else entry
        path = self.bundle.root / f.file
        try:
            before = _signature(os.stat(path))
        except OSError:
            before = None
        if before is None or self._verified.get(path) != before:
            self.bundle.check_file(entry, what)
            if _signature(os.stat(path)) == before:
                self._verified[path] = before
        return path

    def session(self, key: str):
        """The onnxruntime session of expert ``key`` (node name) or 'flat', opened on first use
        (closing others, deepest first, when the budget needs the room)."""
        return self._open(key)[0]

    def _open(self, key: str, victims: list[str] | None = None) -> tuple:
        if key in self.cache:
            self.stats.hits += 1
            self.cache.move_to_end(key)
            return self.cache[key]
        if key not in self.entries:
            raise UnknownNameError(f"unknown expert {key!r}; this bundle has {', '.join(self.entries)}")
        import onnxruntime as ort
        self.stats.misses += 1
        path = self._checked(self.entries[key])
        for v in victims or []:
            self._close(v)
        if self.budget is not None:
            need = self._model_bytes(key)
            while self.cache and self.held_bytes + need > self.budget:
                self._close(self._victim())
            if self.held_bytes + need > self.budget:
                raise UsageError(f"expert {key!r} ({need / 2**20:.2f} MB) does not fit the memory budget of "
                                 f"{self.budget / 2**20:.2f} MB")
        sess = ort.InferenceSession(str(path), session_options(self.threads), providers=["CPUExecutionProvider"])
        self.cache[key] = (sess, sess.get_inputs()[0].name)
        self._open_bytes += self._model_bytes(key)
        self.stats.loaded.append(key)
        return self.cache[key]

    def _close(self, key: str) -> None:
        del self.cache[key]
        self._open_bytes -= self._model_bytes(key)
        self._ones.pop(key, None)
        self.stats.evictions += 1

    def _victim(self) -> str:
        """Which session to close for room: the deepest expert, the least recently used among
        equals. Every input visits the root and most visit the upper levels, so keeping them
        and cycling the lower ones costs the fewest session creations (plain LRU closes the
        root as soon as a path is longer than the budget, and every expert then misses)."""
        if self.eviction == "lru":   # (for comparison: benchmarks/greedy_latency.py)
            return next(iter(self.cache))
        deepest = max(self._depth[k] for k in self.cache)
        return next(k for k in self.cache if self._depth[k] == deepest)   # the cache is in LRU order

    def _admit(self, key: str) -> list[str] | None:
        """Open ``key`` as a session? [] when it fits beside the open ones; the sessions to close
        when each of them was visited less than half as often; None to stream it instead. An
        expert that does not fit is weighed against the open ones at every ADMIT_EVERY-th visit
        only: visits change slowly, and weighing took about a tenth of a streamed run's time."""
        room = self.budget - self.held_bytes
        need = self._model_bytes(key)
        if need <= room:
            return []
        visits = self.visits
        if visits[key] % ADMIT_EVERY:
            return None
        if not self.cache or 2 * min(visits[k] for k in self.cache) >= visits[key]:   # (the loop's answer, sooner)
            return None
        victims = []
        for k in sorted(self.cache, key=lambda k: (self.visits[k], -self._depth[k])):
            if 2 * self.visits[k] >= self.visits[key]:
                return None
            victims.append(k)
            room += self._model_bytes(k)
            if need <= room:
                return victims
        return None

    def _stream(self, key: str, x: np.ndarray | None) -> np.ndarray:
        """One run of expert ``key`` through its template, its weights read for this run only
        (packed for this CPU when the engine has a pack). ``x`` None: the input in ``_x1``."""
        self.stats.streamed += 1
        if self.packs:
            e = self.packs["experts"][key]
            if self.mmap:
                weights, bkey = self._mapped(key, e), key
            else:
                weights = self._read(key, self.pack / e["weights"], e["bytes"], e["sha256"], e["layout"],
                                     "packed weights")
                bkey = (e["template"], self._layout_keys[key])
            return self._bound_run(bkey, lambda: (self._packed_session(e["template"]), e["input"]), weights, x)
        weights = self._weights(key)
        t = self.templates[key]
        return self._bound_run((t.file.file, self._layout_keys[key]), lambda: self._template_session(t), weights, x)

    def _bound_run(self, bkey, session, weights: dict[str, np.ndarray], x: np.ndarray | None) -> np.ndarray:
        """A template run with the expert's weights bound once (onnxruntime IO binding over the
        buffer's or the mapping's memory, which later reads refill in place): per run only the
        input is bound. ``bkey``: what the binding is kept under (``_stream``), the most recent
        KEPT_BINDINGS kept. ``session``: () -> (template session, its input's name). ``x`` None:
        the one input in ``_x1``, bound once too, the logits written into the binding's own
        output array (returned, overwritten by its next run)."""
        got = self._bindings.get(bkey)
        if got is None or got[0] is not weights:   # first run, or the mapping was replaced
            sess, xname = session()
            binding = sess.io_binding()
            for name, arr in weights.items():
                binding.bind_ortvalue_input(name, ort_value(arr))
            got = self._bindings[bkey] = (weights, sess, binding, xname, sess.get_outputs()[0].name)
            self._streamed_ones.pop(bkey, None)
            _keep_recent(self._bindings)
        else:
            self._bindings.move_to_end(bkey)
        _, sess, binding, xname, out = got
        if x is None:
            one = self._streamed_ones.get(bkey)
            if one is not None:
                self._streamed_ones.move_to_end(bkey)
                one[0]()
                return one[1]
            x = self._x1
        binding.bind_cpu_input(xname, x)
        binding.bind_output(out)
        sess.run_with_iobinding(binding)
        logits = binding.copy_outputs_to_cpu()[0]
        if x is self._x1:   # the next runs of this expert on one input: bound once, weights and all
            one = sess.io_binding()
            for name, arr in weights.items():
                one.bind_ortvalue_input(name, ort_value(arr))
            self._streamed_ones[bkey] = self._bind_one(sess, one, xname, out, logits)
            _keep_recent(self._streamed_ones)
        return logits

    def _bind_one(self, sess, binding, xname: str, out: str, logits: np.ndarray) -> tuple:
        """``binding`` with ``_x1`` as its input and an output array shaped like ``logits``:
        (its run, ``bound_run``; the array; the session and the binding it keeps alive)."""
        array = np.empty_like(logits)
        binding.bind_ortvalue_input(xname, self._x1_value)
        binding.bind_ortvalue_output(out, ort_value(array))
        return bound_run(sess, binding), array, sess, binding

    def _run_one(self, key: str) -> np.ndarray:
        """Expert ``key``'s logits for the input in ``_x1`` (``_greedy_one``): the array is the
        expert's own output array, valid until its next run."""
        self.visits[key] += 1
        one = self._ones.get(key)
        if one is not None:   # (``_close`` drops it with the session)
            self.stats.hits += 1
            self.cache.move_to_end(key)
            one[0]()
            return one[1]
        if self.mmap:   # a memory-mapped expert streamed before: its binding, once its file is unchanged
            m, one = self._maps.get(key), self._streamed_ones.get(key)
            if (m is not None and one is not None and self.visits[key] % ADMIT_EVERY and key not in self.cache
                    and _signature(os.fstat(m[3].fileno())) == m[0]):
                self.stats.misses += 1
                self.stats.streamed += 1
                one[0]()
                return one[1]
        sess, name, logits = self._open_or_stream(key, None)
        if logits is not None:
            return logits
        logits = sess.run(None, {name: self._x1})[0]
        self._ones[key] = self._bind_one(sess, sess.io_binding(), name, sess.get_outputs()[0].name, logits)
        return logits

    def _mapped(self, key: str, e: dict) -> dict[str, np.ndarray]:
        """Expert ``key``'s packed weights as views of its memory-mapped file, mapped and
        checked (sha256) on first use and again whenever the file's signature changed (a file
        written in place shows through a mapping at once, so it is stat'ed every run)."""
        import mmap
        got = self._maps.get(key)
        if got is not None and _signature(os.fstat(got[3].fileno())) == got[0]:
            return got[2]
        path = self.pack / e["weights"]
        if got is not None:   # (its bindings go first: nothing may run on a closed mapping)
            self._bindings.pop(key, None)
            self._streamed_ones.pop(key, None)
            self._maps.pop(key)
            got[3].close()
        try:
            fh = open(path, "rb")
            sig = _signature(os.fstat(fh.fileno()))
            m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise BundleError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc}); it holds the "
                              f"packed weights of {key!r}") from None
        if len(m) != e["bytes"] or hashlib.sha256(m).hexdigest() != e["sha256"]:
            m.close()
            fh.close()
            raise BundleError(f"{path}: sha256 differs from the index: the file is corrupt or was tampered with; "
                              "pack again with `hmoe-edge pack`")
        views = {n: np.frombuffer(m, np.float32, count, off).reshape(shape) for n, off, count, shape in e["layout"]}
        self._maps[key] = (sig, m, views, fh)   # the open file: what is mapped is what is stat'ed
        return views

    def _packed_session(self, file: str):
        sess = self._template_sessions.get(file)
        if sess is None:
            import onnxruntime as ort

            from edge_runtime.packing import PackError, template_options
            data = (self.pack / file).read_bytes()
            if hashlib.sha256(data).hexdigest() != self.packs["templates"][file]["sha256"]:
                raise PackError(f"{self.pack / file}: sha256 differs from the pack's index: damaged or tampered "
                                "with; pack again with `hmoe-edge pack`")
            sess = self._template_sessions[file] = ort.InferenceSession(data, template_options(self.threads),
                                                                        providers=["CPUExecutionProvider"])
        return sess

    def _template_session(self, t) -> tuple:
        got = self._template_sessions.get(t.file.file)
        if got is None:
            import onnxruntime as ort
            path = self._checked(t.file, "an expert template")
            sess = ort.InferenceSession(str(path), session_options(self.threads, arena=True),
                                        providers=["CPUExecutionProvider"])
            got = self._template_sessions[t.file.file] = (sess, sess.get_inputs()[0].name)
        return got

    def _weights(self, key: str) -> dict[str, np.ndarray]:
        """Expert ``key``'s weights read from its safetensors file (``_read``)."""
        f = self.entries[key].weights
        return self._read(key, self.bundle.root / f.file, f.bytes, f.sha256, None, "weights")

    def _read(self, key: str, path: Path, nbytes: int, sha256: str, layout: list | None,
              what: str) -> dict[str, np.ndarray]:
        """A weights file read into the engine's one streaming buffer (the room ``reserved``
        keeps for it), as the expert's views of that buffer (valid until the next read); its
        sha256 is checked again whenever the file's signature changed. ``layout`` None: the
        file is safetensors."""
        if self._slot_holds == key:   # still in the buffer from its last run, checked then: no read
            return self._views[self._layout_keys[key]]
        if self._slot is None:
            self._slot = bytearray(self._slot_bytes + 1)   # (+1: a file longer than its entry reads long)
        self._slot_holds = None
        try:
            with open(path, "rb", buffering=0) as fh:
                sig = _signature(os.fstat(fh.fileno()))
                n = fh.readinto(self._slot)
        except OSError as exc:
            raise BundleError(f"{path}: cannot be read ({exc.strerror}); it holds the {what} of {key!r}") from None
        data = memoryview(self._slot)[:n]
        if self._verified.get(path) != sig:
            if n != nbytes or hashlib.sha256(data).hexdigest() != sha256:
                raise BundleError(f"{path}: sha256 differs from the {'manifest' if what == 'weights' else 'index'}: "
                                  "the file is corrupt or was tampered with; " +
                                  ("re-export or re-copy the bundle" if what == "weights" else
                                   "pack again with `hmoe-edge pack`"))
            self._verified[path] = sig
        lkey = self._layout_keys.get(key)
        if lkey is None:   # the buffer never moves: a layout's views of it are made once
            if layout is None:
                layout = _safetensors_layout(data, path)
            lkey = tuple((str(name), int(off), int(count), tuple(int(d) for d in shape))
                         for name, off, count, shape in layout)
            # one object per layout: an expert's own copy of it would cost about 1.5 KB an expert
            lkey = self._layout_keys[key] = self._layouts.setdefault(lkey, lkey)
        views = self._views.get(lkey)
        if views is None:
            whole = memoryview(self._slot)
            views = self._views[lkey] = {n: np.frombuffer(whole, np.float32, count, off).reshape(shape)
                                         for n, off, count, shape in lkey}
        self._slot_holds = key
        return views

    def _logits(self, key: str, x: np.ndarray) -> np.ndarray:
        """Expert ``key``'s logits for ``x``: from its open session, else opened or streamed."""
        self.visits[key] += 1
        hit = self.cache.get(key)
        if hit is not None:
            self.stats.hits += 1
            self.cache.move_to_end(key)
            return hit[0].run(None, {hit[1]: x})[0]
        sess, name, logits = self._open_or_stream(key, x)
        return logits if logits is not None else sess.run(None, {name: x})[0]

    def _open_or_stream(self, key: str, x: np.ndarray | None) -> tuple:
        """(session, input name, None) with ``key`` open, opened when the budget admits it;
        (None, None, its logits for ``x``) when it was streamed instead (``x`` None: ``_x1``)."""
        if key in self.templates and key not in self.cache:
            victims = self._admit(key)
            if victims is None:
                self.stats.misses += 1
                return None, None, self._stream(key, x)
            return (*self._open(key, victims), None)
        return (*self._open(key), None)

    def preload(self, flat: bool = False) -> None:
        """Open every expert (and the flat model too when ``flat``)."""
        for key in self.entries:
            if key != "flat" or flat:
                self.session(key)

    def run(self, key: str, x: np.ndarray) -> np.ndarray:
        return self._logits(key, x)

    # ---------------------------------------------------------------- inputs
    def check_input(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise InputError(f"input of shape {tuple(x.shape)}; expected (N, {', '.join(map(str, self.input_shape))})")
        if x.dtype != np.float32 and not np.issubdtype(x.dtype, np.floating):
            raise InputError(f"input dtype {x.dtype}; expected float32, normalised as the manifest says")
        if not np.isfinite(x).all():
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

    def _load_one(self, x: np.ndarray) -> None:
        """Copy one input into ``_x1``, the input every one-input run is bound to."""
        if self._x1 is None:
            self._x1 = np.empty((1, *self.input_shape), np.float32)
            self._x1_value = ort_value(self._x1)
        np.copyto(self._x1, x)

    def _greedy_one(self, x: np.ndarray) -> Decoded:
        """Greedy decoding of one input without the batch decoder's bookkeeping: the same
        decisions and checks as ``hierarchy.decode.greedy``, one expert after another, with the
        chosen child's probability computed from the logits in Python (float64; the batch
        decoder's float32 softmax agrees to about 1e-7). Per input the batch decoder spent
        about twice the experts' own time in numpy and Python (benchmarks/greedy_latency.py)."""
        names, kids = self.tree.names, self._kids
        self._load_one(x)
        v, prob, count = 0, 1.0, 0
        path, steps = [0], [1.0]
        exp = math.exp
        while True:
            k = kids[v]
            if not k:
                break
            if len(k) > 1:
                out = self._run_one(names[v])
                if out.shape != (1, len(k)):
                    raise DecodeError(f"expert {names[v]!r} returned shape {out.shape}; expected {(1, len(k))}")
                z = out[0].tolist()
                top = max(z)
                total = 0.0
                for t in z:
                    total += exp(t - top)
                if not math.isfinite(total) or not math.isfinite(top):
                    raise DecodeError(f"expert {names[v]!r} returned non-finite probabilities")
                j = z.index(top)
                count += 1
                step = 1.0 / total
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
        # (the argmax of the logits is that of the probabilities: no softmax)
        if len(x) == 1:   # bound once, as the experts' runs on one input are (``_greedy_one``)
            self._load_one(x)
            return leaf_rule(self.tree, self._run_one("flat"))
        return leaf_rule(self.tree, self.run("flat", x))

    @property
    def loaded(self) -> list[str]:
        return list(self.cache)
