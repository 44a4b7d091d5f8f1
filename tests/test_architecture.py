"""The layers of docs/ARCHITECTURE.md are import-linter contracts (pyproject.toml); they hold,
and they fail on a deliberately wrong import."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("hierarchy", "trainer", "exporter", "edge_runtime")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` over the packages found under ``root``, with the project's contracts."""
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(exe), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_the_architecture_contracts_hold():
    out = lint_imports(ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_a_wrong_import_breaks_a_contract(tmp_path):
    """The device core importing the round driver (a server module) is refused, naming both."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    nets = tmp_path / "trainer" / "device" / "nets.py"
    nets.write_text(nets.read_text() + "\nfrom trainer.protocol.driver import RoundDriver  # deliberately wrong\n")
    out = lint_imports(tmp_path)
    assert out.returncode != 0
    assert "BROKEN" in out.stdout and "trainer.device.nets -> trainer.protocol.driver" in out.stdout, out.stdout[-3000:]
