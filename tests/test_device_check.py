"""`make device-check` in the test suite: the edge runtime installed from this repository's
wheel inside an emulated arm64 Debian userland answers as it does here (docs/DEVICE.md, "Boards").

Slow (a userland build on first use, a pip install under emulation). It skips, saying why,
where the machine cannot emulate arm64 (not root, no binfmt_misc); HMOE_DEVICE_CHECK=0
skips it on purpose."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_device_check_on_emulated_arm64(bundle_dir, tmp_path):
    if os.environ.get("HMOE_DEVICE_CHECK") == "0":
        pytest.skip("HMOE_DEVICE_CHECK=0")
    out = tmp_path / "check"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "device_check.py"), "--bundle", str(bundle_dir),
                        "--out", str(out), "--images", "10", "--boards", "pi-zero-2w", "--board-predictions", "20"],
                       capture_output=True, text=True, timeout=3000)
    if "[device-check] skipped:" in r.stdout:
        pytest.skip(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    result = json.loads((out / "device_check.json").read_text())
    edge = result["edge"]
    assert edge["machine"] == "aarch64" and edge["verify"]["rc"] == 0
    assert edge["predict"]["same_leaf_as_x86"] == edge["predict"]["images"] == 10
    assert edge["serve"]["same_leaf_as_x86"] == 10
    boards = result["boards"]
    if "refused" in boards:   # no cgroup controller here: the check says which, and passes
        assert "cgroup" in boards["refused"] or "root" in boards["refused"], boards
    else:
        serve = boards["rows"][0]["serve"]
        assert boards["rows"][0]["board"] == "pi-zero-2w" and serve["predictions"] == 20
        assert serve["errors"] == 0 and not serve["killed"] and 0 < serve["peak_rss_mb"] <= 384
