"""`hmoe hierarchy show/build` through the installed console script."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def hmoe(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("hmoe", path=str(Path(sys.executable).parent)) or ""
    cmd = [exe, *args] if exe else [sys.executable, "-m", "exporter.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_show_fashion_mnist():
    r = hmoe("hierarchy", "show", "--taxonomy", "fashion-mnist")
    assert r.returncode == 0, r.stderr
    assert "nodes 19, leaves 10, experts 5 (marked *), depth 3" in r.stdout
    assert "Tops *" in r.stdout


def test_build_writes_json(tmp_path):
    out = tmp_path / "c.json"
    r = hmoe("hierarchy", "build", "--taxonomy", "cifar100", "--out", str(out))
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert len(d["experts"]) == 21 and len(d["leaves"]) == 100


@pytest.mark.parametrize("taxonomy, message", [
    ("nope", "unknown taxonomy 'nope'"),
    ("csv:/does/not/exist.csv", "no such file"),
])
def test_bad_taxonomy_is_a_clear_error(tmp_path, taxonomy, message):
    out = tmp_path / "x.json"
    r = hmoe("hierarchy", "build", "--taxonomy", taxonomy, "--out", str(out))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_help():
    r = hmoe("--help")
    assert r.returncode == 0 and "hierarchy" in r.stdout


def test_a_users_error_is_one_line_without_traceback(tmp_path):
    r = hmoe("export", "--run", str(tmp_path / "missing"), "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "no such run directory" in r.stderr
