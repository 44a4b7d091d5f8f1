"""The hanzi taxonomy (Unihan) and glyph data set (Debian's CJK fonts), real files only."""

import bz2
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hierarchy import hanzi, load_taxonomy
from trainer import glyphs
from trainer.datasets import DatasetError, load_dataset

pytestmark = pytest.mark.skipif(not (hanzi.unicode_dir() / "Unihan_IRGSources.txt.bz2").is_file(),
                                reason="Debian's unicode-data is not installed (make setup installs it)")


def test_the_full_tree_is_gb2312_level_1_under_its_radicals():
    tree = load_taxonomy("hanzi")
    kids = {tree.names[v]: len(tree.children(v)) for v in tree.experts}
    assert tree.num_leaves == 3755 and int(tree.depths.max()) == 2
    assert len(tree.children(0)) == 206                   # every radical used, single-character ones collapsed
    assert len(kids) == 1 + 206 - 25 and kids["64 hand 手"] == 221
    assert min(kids.values()) == 2
    chars = hanzi.characters()
    assert [c.char for c in chars][:3] == ["啊", "阿", "埃"]   # GB2312 order (pinyin)
    radical = {c.char: c.radical for c in chars}
    names = hanzi.radical_names()
    for leaf in tree.leaves[:: 50]:
        parent = tree.names[tree.parents[leaf]]
        char = tree.names[leaf]
        assert parent == "root" or parent == names[radical[char]]


def test_size_knob_and_the_stroke_level():
    small = load_taxonomy("hanzi:500")
    assert small.num_leaves == 500
    common = {c.char for c in hanzi.characters(500)}
    assert {"的", "一", "是"} <= common and set(small.names[v] for v in small.leaves) == common
    strokes = load_taxonomy("hanzi-strokes")
    assert strokes.num_leaves == 3755 and int(strokes.depths.max()) == 3
    assert "4 strokes" in strokes.names and strokes.names[strokes.parents[strokes.index("64 hand 手")]] == "4 strokes"
    with pytest.raises(Exception, match="between 2 and 3755"):
        load_taxonomy("hanzi:5000")
    with pytest.raises(Exception, match="hanzi:N with N a number"):
        load_taxonomy("hanzi:many")
    out = subprocess.run([sys.executable, "-m", "exporter.cli", "hierarchy", "show", "--taxonomy", "hanzi:40"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "9 man 人 *" in out.stdout and "交" in out.stdout


def test_missing_unihan_and_a_character_without_radical_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HMOE_UNICODE_DIR", str(tmp_path))
    hanzi.level1.cache_clear()
    hanzi.radical_names.cache_clear()
    try:
        with pytest.raises(hanzi.UnihanError, match="unicode-data"):
            hanzi.level1()
        for name in ("Unihan_OtherMappings.txt.bz2", "Unihan_DictionaryLikeData.txt.bz2"):
            shutil.copy(f"/usr/share/unicode/{name}", tmp_path / name)
        with bz2.open("/usr/share/unicode/Unihan_IRGSources.txt.bz2", "rt", encoding="utf-8") as f:
            lines = [line for line in f if not line.startswith("U+554A\tkRSUnicode")]   # 啊
        with bz2.open(tmp_path / "Unihan_IRGSources.txt.bz2", "wt", encoding="utf-8") as f:
            f.writelines(lines)
        with pytest.raises(hanzi.UnihanError, match="啊 \\(U\\+554A\\) has no kRSUnicode"):
            hanzi.level1()
    finally:
        hanzi.level1.cache_clear()
        hanzi.radical_names.cache_clear()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return root, load_dataset("hanzi:30", root, download=False)


def test_the_data_set_holds_out_font_families(small):
    root, d = small
    train_faces = [f for f in glyphs.faces() if f.split == "train"]
    test_faces = [f for f in glyphs.faces() if f.split == "test"]
    assert len(train_faces) == 39 and len(test_faces) == 7
    assert {f.family for f in test_faces} == set(glyphs.TEST_FAMILIES)
    assert d.train_x.shape == (30 * 39, 1, 32, 32) and d.test_x.shape == (30 * 7, 1, 32, 32)
    assert np.bincount(d.train_y).tolist() == [39] * 30 and np.bincount(d.test_y).tolist() == [7] * 30
    assert d.tree.num_leaves == 30 and d.train_x.dtype == np.uint8
    assert 0.1 < d.train_x.mean() / 255 < 0.5 and d.train_x.std() > 20   # ink on a dark ground, not blank


def test_the_cache_is_deterministic_and_checked(small):
    root, d = small
    cached = load_dataset("hanzi:30", root, download=False)
    assert np.array_equal(cached.train_x, d.train_x) and np.array_equal(cached.test_y, d.test_y)
    path = root / "hanzi" / glyphs.cache_name(30, glyphs.SIZE, 1)
    digest = path.with_suffix(".sha256").read_text()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=f"{path.name}: sha256 differs"):
        load_dataset("hanzi:30", root, download=False)
    path.unlink()
    path.with_suffix(".sha256").unlink()
    rebuilt = load_dataset("hanzi:30", root, download=False)   # the same bytes again, from the same seed
    assert path.with_suffix(".sha256").read_text() == digest
    assert np.array_equal(rebuilt.train_x, d.train_x)


def test_missing_truncated_and_lacking_fonts_are_errors_or_recorded(tmp_path, monkeypatch):
    real = dict((fam, (pkg, f)) for pkg, f, fam in glyphs.FONT_FILES)
    monkeypatch.setattr(glyphs, "FONT_FILES", ((*real["AR PL SungtiL GB"], "AR PL SungtiL GB"),
                                               ("fonts-imaginary", str(tmp_path / "nope.ttf"), "Nope")))
    with pytest.raises(DatasetError, match="nope.ttf: missing.*fonts-imaginary"):
        load_dataset("hanzi:10", tmp_path / "a", download=False)
    cut = tmp_path / "cut.ttf"
    cut.write_bytes(open(real["AR PL KaitiM GB"][1], "rb").read()[:4000])
    monkeypatch.setattr(glyphs, "FONT_FILES", (("fonts-arphic-gkai00mp", str(cut), "AR PL KaitiM GB"),))
    with pytest.raises(DatasetError, match="cut.ttf: not a readable font.*truncated or corrupt.*fonts-arphic-gkai00mp"):
        load_dataset("hanzi:10", tmp_path / "b", download=False)
    dejavu = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    if not __import__("os").path.isfile(dejavu):
        pytest.skip("no DejaVu font to stand for a face without CJK glyphs")
    monkeypatch.setattr(glyphs, "FONT_FILES", ((*real["AR PL SungtiL GB"], "AR PL SungtiL GB"),
                                               ("fonts-dejavu-core", dejavu, "DejaVu Sans"),
                                               (*real["AR PL UKai"], "AR PL UKai")))
    d = load_dataset("hanzi:10", tmp_path / "c", download=False)
    stats = glyphs.load(tmp_path / "c" / "hanzi", [c.char for c in hanzi.characters(10)], 10)["stats"]
    assert len(stats["lacking"]["DejaVu Sans"]) == 10                # recorded, not silently dropped
    assert np.bincount(d.train_y).tolist() == [1] * 10               # only SungtiL's images remain


def test_benchmark_goals_and_pareto_fronts():
    """benchmarks/hanzi.py's verdicts from its points (issue 27's goals)."""
    sys.path.insert(0, "benchmarks")
    import hanzi as bench
    pts = [{"name": "hmoe-w8", "kind": "hmoe", "width": 8, "f1": 0.60, "live_mb": 2.0, "client_gmacs": 50},
           {"name": "hmoe-w16", "kind": "hmoe", "width": 16, "f1": 0.70, "live_mb": 4.0, "client_gmacs": 90},
           {"name": "flat-w8", "kind": "flat", "width": 8, "f1": 0.55, "live_mb": 3.0, "client_gmacs": 40},
           {"name": "flat-w32", "kind": "flat", "width": 32, "f1": 0.68, "live_mb": 16.0, "client_gmacs": 300}]
    assert bench.pareto(pts, "live_mb") == ["hmoe-w8", "hmoe-w16"]
    assert bench.pareto(pts, "client_gmacs") == ["hmoe-w8", "hmoe-w16", "flat-w8"]
    g = bench.goals(pts)
    assert g["quarter_memory"] == [{"flat": "flat-w32", "hmoe": "hmoe-w16", "margin": pytest.approx(0.02),
                                    "memory_ratio": 0.25}] and g["quarter_memory_met"]
    assert g["same_memory"]["flat"] == "flat-w8" and g["same_memory"]["margin"] == pytest.approx(0.15)
    assert g["same_memory_met"]
    pts[1]["f1"] = 0.66
    assert not bench.goals(pts)["quarter_memory_met"]


def test_more_copies_per_character_and_face(tmp_path):
    d = load_dataset("hanzi:10:x3", tmp_path, download=False)
    assert np.bincount(d.train_y).tolist() == [3 * 39] * 10 and np.bincount(d.test_y).tolist() == [3 * 7] * 10
    assert d.tree.num_leaves == 10 and load_taxonomy("hanzi:10:x3").names == load_taxonomy("hanzi:10").names
    first, second = d.train_x[d.train_y == 0][:2]
    assert not np.array_equal(first, second)   # each copy its own augmentation
    with pytest.raises(Exception, match="between x1 and x64"):
        load_taxonomy("hanzi:10:x99")


def test_another_image_side(tmp_path):
    """``:Spx`` renders at another side (32 by default), with the options in any order."""
    d = load_dataset("hanzi:6:64px:x2", tmp_path, download=False)
    assert d.train_x.shape[1:] == (1, 64, 64) and np.bincount(d.train_y).tolist() == [2 * 39] * 6
    assert hanzi.options("hanzi:6:x2:64px") == ("hanzi:6", 2, 64) and d.tree.names == load_taxonomy("hanzi:6").names
    assert d.train_x.mean() > 10   # ink on every image
    with pytest.raises(DatasetError, match="between 16px and 128px"):
        load_dataset("hanzi:6:8px", tmp_path, download=False)


def test_a_users_own_character_list(tmp_path):
    good = tmp_path / "mine.txt"
    good.write_text("手 把\n山,水\n")
    tree = load_taxonomy(f"hanzi:@{good}")
    assert sorted(tree.names[v] for v in tree.leaves) == sorted("手把山水")
    bad = tmp_path / "bad.txt"
    bad.write_text("手 山 A 龘")
    with pytest.raises(Exception, match=r"2 characters are not in GB2312 level 1.*A \(U\+0041\), 龘 \(U\+9F98\)"):
        load_taxonomy(f"hanzi:@{bad}")
    with pytest.raises(DatasetError, match="not in GB2312 level 1"):
        load_dataset(f"hanzi:@{bad}", tmp_path / "data", download=False)
    d = load_dataset(f"hanzi:@{good}", tmp_path / "data", download=False)
    assert d.tree.num_leaves == 4 and np.bincount(d.train_y).tolist() == [39] * 4


@pytest.mark.slow
def test_the_benchmark_runs_end_to_end_on_its_tiny_profile(tmp_path):
    """benchmarks/hanzi.py (make bench's hanzi step) on 30 characters: the data set, the sweep's
    trainings, the device bundle and one radical's bundles, rendered (Table 1's measurement
    has tests of its own, tests/test_benchmarks.py)."""
    import json
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "benchmarks/hanzi.py", "--profile", "tiny", "--out", str(out), "--work",
                           str(tmp_path / "work"), "--steps", "stats", "sweep", "edge", "subtrees", "seeds", "rounds",
                           "shape"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    h = json.loads((out / "hanzi.json").read_text())
    assert h["stats"]["characters"] == 30 and {p["name"] for p in h["sweep"]["points"]} == {"hmoe-w4", "flat-w2",
                                                                                             "flat-w4"}
    assert set(h["edge"]["modes"]) == {"path", "stream", "all", "flat"}
    assert all(isinstance(r["grown_mb"], float) and np.isfinite(r["grown_mb"]) for r in h["edge"]["modes"].values())
    assert h["edge"]["stream_over_flat_added"] is not None
    log = json.loads((tmp_path / "work" / "hmoe-w4" / "state-hmoe.json").read_text())["log"]
    assert log[1].get("warm_started") and set(log[0]["tasks"]) == {"root"}   # the profile's warm start
    rows = h["subtrees"]["rows"]
    assert rows and all(r["experts"] == 1 and 0 <= r["subtree_accuracy"] <= 1 and r["images"] == 7 * r["characters"]
                        for r in rows)
    md = (out / "hanzi.md").read_text()
    assert "One radical's bundle" in md and rows[0]["node"] in md and (out / "pareto.png").stat().st_size > 0
    seeds = h["seeds"]   # the second goal's pair again with seed 1, judged on the mean margin
    assert seeds["pair"] == ["hmoe-w4", h["sweep"]["goals"]["same_memory"]["flat"]] and [r["seed"] for r in seeds["rows"]] == [0, 1]
    assert seeds["rows"][0]["hmoe_f1"] == next(p["f1"] for p in h["sweep"]["points"] if p["name"] == "hmoe-w4")
    assert np.isclose(seeds["mean_margin"], np.mean([r["hmoe_f1"] - r["flat_f1"] for r in seeds["rows"]]))
    assert seeds["met"] == (seeds["mean_margin"] >= 0.05) and "**Seeds**" in md
    cfg = json.loads((tmp_path / "work" / "seed1" / seeds["pair"][1] / "config.json").read_text())
    assert cfg["seed"] == 1 and cfg["flat_width"] == int(seeds["pair"][1].split("-w")[1])
    eq = h["rounds"]   # that flat model again, for HMoE's 4 rounds instead of the sweep's 2
    assert eq["pair"] == seeds["pair"] and eq["rounds"] == 4 and eq["flat_rounds_sweep"] == 2
    assert json.loads((Path(eq["run"]) / "report.json").read_text())["flat"]["rounds"] == 4
    assert np.isclose(eq["margin"], eq["hmoe_f1"] - eq["flat_f1"]) and "**Equal rounds**" in md
    shape = h["shape"]   # the device figures on a larger tree's shape (the cpu profile's: all 3,755 characters)
    assert shape["characters"] == 60 and shape["modes"]["stream-tour"]["experts_visited"] == shape["experts"]
    assert set(shape["over_flat"]) == {"path", "stream", "all", "stream-tour"} and "**On the device, 60 characters**" in md
