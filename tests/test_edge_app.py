"""The edge runtime over real HTTP: hmoe-edge serve on 127.0.0.1, real requests, bad input."""

import io
import json
import socket
import subprocess
import sys

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support import edge_exe, png, start_serve
from edge_runtime.engine import Engine, InputError
from tests.support import serve_in_thread

TOKEN = "s3cret"


def jpeg(size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(bundle_dir):
    proc, url = start_serve(bundle_dir, "--token", TOKEN, "--max-body-bytes", "200000", "--max-pixels", "65536",
                            "--body-timeout", "2")
    yield url
    proc.terminate()
    proc.wait(10)


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_predict_raw_and_multipart(server):
    r = httpx.post(server + "/predict", content=png(), headers={**AUTH, "Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["path"][0] == "root" and body["leaf"] == body["path"][-1]
    assert len(body["step_probs"]) == len(body["path"]) and 1 <= body["experts_evaluated"] <= 3
    r = httpx.post(server + "/predict", files={"file": ("x.jpg", jpeg(), "image/jpeg")}, headers=AUTH)
    assert r.status_code == 200, r.text
    r = httpx.post(server + "/predict?decode=beam:2", content=png(mode="RGB"), headers=AUTH)
    assert r.status_code == 200 and r.json()["decode"] == "beam:2"


def test_only_path_experts_are_loaded(bundle_dir):
    engine = Engine(bundle_dir)
    pred = engine.predict(np.zeros((1, 1, 28, 28), dtype=np.float32))[0]
    on_path = [n for n in pred.path if n in engine.bundle.experts]
    assert sorted(engine.loaded) == sorted(on_path)


def test_one_input_greedy_is_the_batch_decoders_answer(bundle_dir):
    """Engine.decode takes a shorter path for one input under greedy (issue 26): the same
    node, path and expert count as hierarchy.decode's greedy, and its step probabilities
    (computed in float64 from the logits instead of numpy's float32 softmax) within 1e-6."""
    from edge_runtime.engine import softmax
    from hierarchy import decode
    engine = Engine(bundle_dir)
    x = np.random.default_rng(0).normal(size=(64, 1, 28, 28)).astype(np.float32)
    for i in range(len(x)):
        fast = engine.decode(x[i:i + 1])
        slow = decode(engine.tree, lambda node, idx: softmax(engine.run(engine.tree.names[node], x[i:i + 1][idx])),
                      1, "greedy")
        assert fast.nodes.tolist() == slow.nodes.tolist() and fast.paths == slow.paths
        assert np.allclose(fast.step_probs, slow.step_probs, rtol=0, atol=1e-6)
        assert np.allclose(fast.prob, slow.prob, rtol=0, atol=1e-6)
        assert fast.experts_evaluated.tolist() == slow.experts_evaluated.tolist()
    # one input at a time runs through bindings made once, the flat model's too: the same
    # answers as a batch, with batches run in between on the same sessions
    flat = engine.flat_nodes(x)
    assert [int(engine.flat_nodes(x[i:i + 1])[0]) for i in range(len(x))] == flat.tolist()
    assert engine.flat_nodes(x).tolist() == flat.tolist()


def test_warm_up_model_is_the_onnx_identity_graph():
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from edge_runtime.engine import identity_model_bytes
    model = onnx.load_from_string(identity_model_bytes())
    onnx.checker.check_model(model, full_check=True)
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1])  # noqa: E731
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "warm_up", [value("x")], [value("y")])
    expected = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    assert model == expected
    assert not model.graph.initializer


def test_opening_the_engine_loads_no_model_and_preload_skips_flat(bundle_dir):
    engine = Engine(bundle_dir)
    assert engine.loaded == [] and engine.stats.misses == 0
    engine.preload()
    assert sorted(engine.loaded) == sorted(engine.bundle.experts)
    engine.preload(flat=True)
    assert "flat" in engine.loaded


def test_experts_endpoint(server):
    r = httpx.get(server + "/experts", headers=AUTH)
    assert r.status_code == 200
    body = r.json()
    assert "root" in body["loaded"] and body["resident_mb"] > 0 and body["misses"] >= 1


@pytest.mark.parametrize("name, kwargs, status, words", [
    ("no token", dict(content=png(), headers={}), 401, "bearer"),
    ("wrong token", dict(content=png(), headers={"Authorization": "Bearer nope"}), 403, "wrong token"),
    ("empty body", dict(content=b"", headers=AUTH), 400, "empty body"),
    ("not an image", dict(content=b"hello, I am text" * 10, headers=AUTH), 415, "PNG or JPEG"),
    ("truncated png", dict(content=png(seed=3)[:60], headers=AUTH), 422, "corrupt or truncated"),
    ("gif", dict(content=None, headers=AUTH), 415, "GIF"),
    ("too many pixels", dict(content=png(size=(300, 300)), headers=AUTH), 413, "pixels"),
    ("too long a side", dict(content=None, headers=AUTH), 413, "on a side"),
    ("chunked multipart too large", dict(content=None, headers=AUTH), 413, "limit"),
    ("body too large", dict(content=b"\x89PNG" + b"0" * 300000, headers=AUTH), 413, "limit"),
    ("bad decoder", dict(content=png(), headers=AUTH, params={"decode": "beam:0"}), 422, "unknown decoder"),
    ("multipart without file", dict(files={"other": ("a", b"x")}, headers=AUTH), 400, "'file'"),
    ("float image", dict(content=None, headers=AUTH), 422, "channel layout"),
])
def test_bad_input_gets_a_clear_4xx_and_server_keeps_serving(server, name, kwargs, status, words):
    if name == "gif":
        buf = io.BytesIO()
        Image.new("L", (10, 10)).save(buf, "GIF")
        kwargs["content"] = buf.getvalue()
    if name == "too long a side":   # 9,000 x 1 is within --max-pixels, but not within a side's limit
        buf = io.BytesIO()
        Image.new("L", (9000, 1)).save(buf, "PNG")
        kwargs["content"] = buf.getvalue()
    if name == "chunked multipart too large":   # no Content-Length: refused while streaming, never spooled whole
        def body():
            yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n\r\n"
            for _ in range(400):
                yield b"\0" * 65536
            yield b"\r\n--b--\r\n"
        kwargs["content"] = body()
        kwargs["headers"] = {**AUTH, "Content-Type": "multipart/form-data; boundary=b"}
    if name == "float image":
        buf = io.BytesIO()
        Image.fromarray(np.zeros((8, 8), dtype=np.float32), "F").save(buf, "TIFF")
        kwargs["content"] = buf.getvalue()
        status, words = 415, "PNG or JPEG"
    r = httpx.post(server + "/predict", **kwargs)
    assert r.status_code == status, (name, r.status_code, r.text)
    assert words.lower() in r.json()["detail"].lower()
    assert httpx.post(server + "/predict", content=png(), headers=AUTH).status_code == 200


def test_engine_rejects_wrong_shapes_and_nans(bundle_dir):
    engine = Engine(bundle_dir)
    with pytest.raises(InputError, match=r"expected \(N, 1, 28, 28\)"):
        engine.predict(np.zeros((1, 3, 28, 28), dtype=np.float32))
    with pytest.raises(InputError, match="NaN"):
        engine.predict(np.full((1, 1, 28, 28), np.nan, dtype=np.float32))
    with pytest.raises(InputError, match="dtype"):
        engine.predict(np.zeros((1, 1, 28, 28), dtype=np.uint8))
    with pytest.raises(KeyError, match="unknown expert 'Hats'"):
        engine.session("Hats")


def test_memory_budget_evicts_least_recently_used(bundle_dir):
    engine = Engine(bundle_dir)
    one = max(e.bytes for e in engine.bundle.experts.values())
    small = Engine(bundle_dir, memory_budget_mb=1.5 * one / 2**20, stream=False)
    for node in ("root", "Clothes", "Tops"):
        small.session(node)
    assert small.loaded == ["Tops"] and small.stats.evictions == 2
    small.session("Tops")
    assert small.stats.hits == 1


def test_memory_budget_keeps_the_upper_levels(bundle_dir):
    """Under a budget of two experts, a path root -> Clothes -> Tops closes Clothes (the deeper
    of the two held), not the root every input visits next (issue 26)."""
    one = max(e.bytes for e in Engine(bundle_dir).bundle.experts.values())
    small = Engine(bundle_dir, memory_budget_mb=2.5 * one / 2**20, stream=False)
    for node in ("root", "Clothes", "Tops", "root", "Goods", "Shoes", "root"):
        small.session(node)
    assert sorted(small.loaded) == ["Shoes", "root"] and small.stats.hits == 2 and small.stats.evictions == 3


def test_runs_call_onnxruntime_directly_or_through_its_public_method(bundle_dir):
    from edge_runtime.engine import bound_run
    engine = Engine(bundle_dir)
    x = np.random.default_rng(5).normal(size=(1, 1, 28, 28)).astype(np.float32)
    engine._load_one(x)
    want = engine.run("root", x)
    engine._run_one("root")
    run, out, sess, binding = engine._ones["root"]
    assert run.func == sess._sess.run_with_iobinding   # the compiled run, its Python checks skipped
    out[:] = 0
    run()
    assert np.allclose(out, want, atol=1e-6)
    xs = np.random.default_rng(6).normal(size=(20, 1, 28, 28)).astype(np.float32)   # flat: one input, as a batch
    assert [int(engine.flat_nodes(xs[i:i + 1])[0]) for i in range(20)] == engine.flat_nodes(xs).tolist()
    calls = []

    class Wrapped:   # a session whose classes expose no compiled run: the public method is used
        def run_with_iobinding(self, b):
            calls.append(b)
    bound_run(Wrapped(), "binding")()
    assert calls == ["binding"]


def test_greedy_latency_benchmark_writes_every_setting_and_each_models_runs(bundle_dir, tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("greedy_latency", Path(__file__).parent.parent / "benchmarks" /
                                                  "greedy_latency.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["greedy_latency.py", "--bundle", str(bundle_dir), "--images", "60",
                                      "--budgets", "0.5", "--out", str(tmp_path)])
    assert bench.main() == 0
    got = json.loads((tmp_path / "greedy_latency.json").read_text())
    assert got["images"] == 60 and "flat" in got["rows"]
    assert all(r["same_leaf_as_batch_decoder"] == 60 for k, r in got["rows"].items() if k != "flat")
    runs = got["model_runs"]
    assert set(runs["flat"]) == {"flat"} and runs["flat"]["flat"]["runs"] == 60
    assert runs["greedy, every expert open"]["root"]["runs"] == 60   # every image visits the root
    assert set(runs["repeated on one image"]) == set(Engine(bundle_dir).entries)


def test_streamed_experts_answer_as_open_ones_within_the_budget(bundle_dir):
    """Under the path-only budget the engine keeps the experts visited most open and streams
    the others through their template (issue 26): every image gets the leaf and path of the
    engine with every expert open, and what it holds never exceeds the budget."""
    from edge_runtime.engine import path_only_bytes
    full = Engine(bundle_dir)
    budget = path_only_bytes(full.bundle)
    small = Engine(bundle_dir, memory_budget_mb=budget / 2**20)
    assert small.templates and set(small.templates) == set(full.bundle.experts)
    x = np.random.default_rng(1).normal(size=(300, 1, 28, 28)).astype(np.float32)
    for i in range(len(x)):
        a, b = full.decode(x[i:i + 1]), small.decode(x[i:i + 1])
        assert a.paths == b.paths and np.allclose(a.step_probs, b.step_probs, rtol=0, atol=1e-5)
        assert small.held_bytes <= budget
    assert small.stats.streamed > 0 and 0 < len(small.loaded) < len(full.bundle.experts)
    assert small.stats.misses - small.stats.streamed <= len(full.bundle.experts)   # sessions created
    assert "root" in small.loaded
    batch = small.decode(x, "threshold:0.0")   # the batch decoder streams too
    assert batch.nodes.tolist() == full.decode(x, "threshold:0.0").nodes.tolist()


def test_streaming_keeps_a_bounded_state_however_many_experts_it_visits(bundle_dir, monkeypatch):
    """What the engine keeps for streamed experts is per weight layout, not per expert, and its
    template bindings are capped (KEPT_BINDINGS): on the 182-expert hanzi tree one binding per
    expert grew the process by about 10 KB per expert visited (issues 26 and 27). Answers stay
    those of the engine with every expert open."""
    from edge_runtime import engine as engine_module
    from edge_runtime.engine import path_only_bytes
    monkeypatch.setattr(engine_module, "KEPT_BINDINGS", 2)
    full = Engine(bundle_dir)
    least = Engine(bundle_dir, memory_budget_mb=path_only_bytes(full.bundle) / 2**20, warm_up=False)
    small = Engine(bundle_dir, memory_budget_mb=least.reserved / 2**20)   # every expert streamed
    x = np.random.default_rng(3).normal(size=(40, 1, 28, 28)).astype(np.float32)
    experts = list(full.bundle.experts)
    for i in range(len(x)):
        a, b = full.decode(x[i:i + 1]), small.decode(x[i:i + 1])
        assert a.paths == b.paths and np.allclose(a.step_probs, b.step_probs, rtol=0, atol=1e-5)
        for k in experts[i % 2::2]:   # every expert, in turns, on one input and on two
            np.testing.assert_allclose(small.run(k, x[i:i + 1 + i % 2]), full.run(k, x[i:i + 1 + i % 2]),
                                       rtol=0, atol=1e-5)
        assert len(small._bindings) <= 2 and len(small._streamed_ones) <= 2
    assert small.loaded == [] and small.stats.streamed > len(experts)
    tree = full.bundle.tree
    arities = {len(tree.children(tree.index(k))) for k in experts}   # one layout per number of children
    assert len(small._views) == len(arities) < len(experts)


def test_streamed_weights_are_checked_again_when_the_file_changes(bundle_dir, tmp_path):
    import shutil
    import time

    from edge_runtime.bundle import BundleError
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    one = max(e.bytes for e in Engine(copy).bundle.experts.values())
    engine = Engine(copy, memory_budget_mb=1.1 * one / 2**20)   # room for templates and one expert's weights
    x = np.zeros((1, 1, 28, 28), dtype=np.float32)
    before = engine.run("Tops", x)
    assert before.shape == (1, 3) and engine.loaded == [] and engine.stats.streamed == 1
    f = copy / engine.bundle.experts["Tops"].weights.file
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01   # one bit of the last weight
    time.sleep(0.01)
    f.write_bytes(bytes(data))
    # the buffer still holds the copy checked when it was read: the next run of the same
    # expert reads nothing, and the changed file is found when it is read again
    np.testing.assert_array_equal(engine.run("Tops", x), before)
    other = next(k for k in engine.templates if k != "Tops" and len(engine.bundle.tree.children(
        engine.bundle.tree.index(k))) > 1)
    engine.run(other, x)
    with pytest.raises(BundleError, match=f.name + ".*sha256"):
        engine.run("Tops", x)
    f.unlink()
    engine.run(other, x)
    with pytest.raises(BundleError, match=f.name):
        engine.run("Tops", x)


def test_packed_streaming_answers_as_open_experts_and_refuses_a_foreign_or_damaged_pack(bundle_dir, tmp_path):
    """`hmoe-edge pack` lays the experts' weights out for this CPU (edge_runtime/packing.py): a
    streamed expert then runs on them, with the open engine's answers, inside the budget; a pack
    for another CPU, onnxruntime or bundle, or a changed pack file, is refused by name."""
    import shutil
    import time

    from edge_runtime.bundle import BundleError
    from edge_runtime.cli import main as edge_main
    from edge_runtime.engine import path_only_bytes
    from edge_runtime.packing import PackError
    pack = tmp_path / "pack"
    assert edge_main(["pack", "--bundle", str(bundle_dir), "--out", str(pack)]) == 0
    index = json.loads((pack / "index.json").read_text())
    bundle = Engine(bundle_dir).bundle
    assert set(index["experts"]) == set(bundle.experts)
    assert len(index["templates"]) < len(index["experts"])   # experts of one architecture share them
    full = Engine(bundle_dir)
    budget = path_only_bytes(full.bundle)
    packed = Engine(bundle_dir, memory_budget_mb=budget / 2**20, pack=pack)
    # memory-mapped, no buffer is kept for the weights: the same budget would keep the whole path
    # open, so the mapped engine gets the room for sessions that the packed one has
    mapped = Engine(bundle_dir, memory_budget_mb=(budget - packed._slot_bytes) / 2**20, pack=pack, mmap=True)
    assert mapped.reserved == packed.reserved - packed._slot_bytes and mapped._slot_bytes == 0
    x = np.random.default_rng(2).normal(size=(200, 1, 28, 28)).astype(np.float32)
    for i in range(len(x)):
        a = full.decode(x[i:i + 1])
        for engine in (packed, mapped):
            b = engine.decode(x[i:i + 1])
            assert a.paths == b.paths and np.allclose(a.step_probs, b.step_probs, rtol=0, atol=1e-5)
            assert engine.held_bytes <= budget
    assert packed.stats.streamed > 0 and packed._template_sessions and not packed.templates.keys() - index["experts"]
    assert mapped.stats.streamed > 0 and mapped._maps and mapped._slot is None   # nothing copied
    for engine in (packed, mapped):   # a batch between one-input runs, through the same templates
        batch = engine.decode(x[:50], "threshold:0.0").nodes.tolist()
        assert batch == [int(engine.decode(x[i:i + 1]).nodes[0]) for i in range(50)]
        assert batch == full.decode(x[:50], "threshold:0.0").nodes.tolist()
    lo = np.frombuffer(packed._slot, np.uint8).ctypes.data   # every bound weight is a view of the one buffer
    for views, *_ in packed._bindings.values():
        assert all(lo <= a.ctypes.data and a.ctypes.data + a.nbytes <= lo + len(packed._slot) for a in views.values())
    for field, value in (("onnxruntime", "0.0.1"), ("features_sha256", "0" * 64), ("manifest_sha256", "1" * 64)):
        other = tmp_path / f"other-{field}"
        shutil.copytree(pack, other)
        (other / "index.json").write_text(json.dumps({**index, field: value}))
        with pytest.raises(PackError, match="pack again with `hmoe-edge pack`"):
            Engine(bundle_dir, memory_budget_mb=budget / 2**20, pack=other)
    bad = tmp_path / "bad-layout"
    shutil.copytree(pack, bad)
    first = next(iter(index["experts"]))
    broken = {**index, "experts": {**index["experts"], first: {**index["experts"][first], "layout": [
        ["w", index["experts"][first]["bytes"], 4, [4]]]}}}   # weights past the end of their file
    (bad / "index.json").write_text(json.dumps(broken))
    with pytest.raises(PackError, match=f"expert {first!r} is malformed"):
        Engine(bundle_dir, memory_budget_mb=budget / 2**20, pack=bad)
    with pytest.raises(PackError, match="no pack here"):
        Engine(bundle_dir, memory_budget_mb=budget / 2**20, pack=tmp_path / "none")
    streamed = next(k for k in index["experts"] if k not in packed.loaded and k in mapped._maps)
    mapped._load_one(x[:1])
    mapped._run_one(streamed)   # one input at a time: bound once (the engine's fast path from now on)
    assert streamed in mapped._streamed_ones
    f = pack / index["experts"][streamed]["weights"]
    data = bytearray(f.read_bytes())
    data[5] ^= 0x01
    time.sleep(0.01)
    with open(f, "r+b") as fh:   # in place: the mapping shows it at once, so the engine must notice
        fh.write(bytes(data))
    damaged = Engine(bundle_dir, memory_budget_mb=budget / 2**20, pack=pack)
    mapped.visits[streamed] = 1   # (not a visit that weighs it for a session: the fast path's turn)
    with pytest.raises(BundleError, match=f.name + ".*sha256 differs from the index"):
        mapped._run_one(streamed)
    assert streamed not in mapped._streamed_ones and streamed not in mapped._maps
    for engine in (damaged, mapped):
        with pytest.raises(BundleError, match=f.name + ".*sha256 differs from the index.*hmoe-edge pack"):
            engine._stream(streamed, x[:1])


def test_budget_that_holds_no_expert_is_refused_and_old_bundles_open_sessions(bundle_dir, tmp_path):
    import shutil

    from hierarchy.errors import UsageError
    with pytest.raises(UsageError, match="holds no expert"):
        Engine(bundle_dir, memory_budget_mb=0.01)
    copy = tmp_path / "old"
    shutil.copytree(bundle_dir, copy)
    m = json.loads((copy / "manifest.json").read_text())
    del m["templates"]   # a bundle exported before templates
    (copy / "manifest.json").write_text(json.dumps(m))
    one = max(e.bytes for e in Engine(copy).bundle.experts.values())
    engine = Engine(copy, memory_budget_mb=1.5 * one / 2**20)
    assert not engine.templates
    engine.predict(np.zeros((1, 1, 28, 28), dtype=np.float32))
    assert engine.stats.streamed == 0 and len(engine.loaded) == 1


def test_cli_predict(bundle_dir, tmp_path):
    good = tmp_path / "a.png"
    good.write_bytes(png())
    bad = tmp_path / "b.png"
    bad.write_bytes(b"garbage")
    r = subprocess.run([edge_exe(), "predict", "--bundle", str(bundle_dir), str(good), "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[0])["image"] == str(good)
    r = subprocess.run([edge_exe(), "predict", "--bundle", str(bundle_dir), str(good), str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "b.png" in r.stderr and "a.png" in r.stdout


def test_inference_path_never_loads_torch(bundle_dir):
    code = (
        "import sys, numpy as np\n"
        "from edge_runtime.app import create_app\n"
        "from edge_runtime.engine import Engine\n"
        "import edge_runtime.cli\n"
        f"app = create_app({str(bundle_dir)!r})\n"
        f"Engine({str(bundle_dir)!r}).predict(np.zeros((1, 1, 28, 28), dtype=np.float32))\n"
        "bad = [m for m in ('torch', 'trainer', 'exporter') if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_body_that_never_arrives_gets_408(server):
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                  "Content-Type: image/png\r\nContent-Length: 1000\r\n\r\n".encode())
        reply = b""
        while b"}" not in reply:   # headers and body may come in separate segments
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 408") and "did not arrive" in reply, reply   # (the socket gives up after 10 s)
    assert httpx.post(server + "/predict", content=png(), headers=AUTH).status_code == 200


def test_health_answers_while_a_prediction_is_stuck_in_decoding(bundle_dir, monkeypatch):
    """Decoding runs in the worker pool, not on the event loop: with a decode held mid-way,
    /health still answers, and the held prediction completes once released."""
    import threading

    import edge_runtime.app as edge_app
    release, entered = threading.Event(), threading.Event()
    real = edge_app.decode_image

    def held(*args, **kwargs):
        entered.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(edge_app, "decode_image", held)
    url, server, thread = serve_in_thread(edge_app.create_app(bundle_dir))
    try:
        result = {}
        predicting = threading.Thread(target=lambda: result.update(r=httpx.post(url + "/predict", content=png(),
                                                                                timeout=60)), daemon=True)
        predicting.start()
        assert entered.wait(30)
        assert httpx.get(url + "/health", timeout=5).status_code == 200   # answered while the decode is held
        assert predicting.is_alive()
        release.set()
        predicting.join(30)
        assert result["r"].status_code == 200
    finally:
        release.set()
        server.should_exit = True
        thread.join(10)
