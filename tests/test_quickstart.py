"""The README's fleet quick starts, run line by line as written (in a scratch folder): the
coordinator's four `hmoe-edge sync` devices, and a real Flower SuperLink with three
SuperNodes, each end with the experts `hmoe train` gives for the same flags."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
KILL_JOBS = "trap 'for p in $(jobs -p); do kill -9 -- -$p 2>/dev/null || true; done' EXIT\n"


def quickstart(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- quickstart:{name} -->\n```\n(.*?)```\n<!-- /quickstart:{name} -->", text, re.S)
    assert found, f"README.md has no quickstart:{name} block"
    return found.group(1)


@pytest.mark.slow
def test_the_readme_coordinator_quickstart_gives_the_simulations_experts(tmp_path):
    from tests.support import fashion_available
    if not fashion_available():
        pytest.skip("Fashion-MNIST files not installed (make setup installs them)")
    script = quickstart("coordinator")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    # bash -e with job control for the `&` lines; every job's process group ends with the script
    up = ("python -c \"import urllib.request as u; u.urlopen('http://127.0.0.1:8765/health', timeout=1)\" "
          "2>/dev/null")
    done = ("python -c \"import json; s = json.load(open('runs/fleet/state-hmoe.json')); "
            "raise SystemExit(s['completed_rounds'] < 5)\"")
    wait_up = f"for i in $(seq 150); do {up} && break; sleep 0.2; done\n"
    wait_done = f"for i in $(seq 150); do {done} && break; sleep 0.2; done\n"
    body = f"set -em\n{KILL_JOBS}" + script.replace("--secret S &\n", "--secret S &\n" + wait_up) + wait_done
    r = subprocess.run(["bash", "-c", body], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    same_experts(tmp_path / "runs" / "sim", tmp_path / "runs" / "fleet")


def same_experts(sim: Path, fleet: Path) -> None:
    from trainer.protocol.checkpoint import load_checkpoint
    experts = sorted((sim / "experts").glob("*.safetensors"))
    assert len(experts) == 5
    for path in experts:
        ours, theirs = load_checkpoint(path)[0], load_checkpoint(fleet / "experts" / path.name)[0]
        for name, arr in ours.items():
            np.testing.assert_allclose(theirs[name], arr, rtol=0, atol=1e-6, err_msg=f"{path.name}/{name}")


@pytest.mark.slow
def test_the_readme_flower_quickstart_gives_the_simulations_experts(tmp_path):
    from tests.support import fashion_available
    pytest.importorskip("flwr")
    if not fashion_available():
        pytest.skip("Fashion-MNIST files not installed (make setup installs them)")
    (tmp_path / "flower").symlink_to(ROOT / "flower")   # the app, where the README runs it from
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    # every job's process group is ended when the script ends, whatever happened
    body = f"set -em\n{KILL_JOBS}" + quickstart("flower")
    r = subprocess.run(["bash", "-c", body], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    state = json.loads((tmp_path / "runs" / "fl" / "state-hmoe.json").read_text())
    assert state["completed_rounds"] == 3
    same_experts(tmp_path / "runs" / "sim-fl", tmp_path / "runs" / "fl")
