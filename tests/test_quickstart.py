"""The README's coordinator quick start, run line by line as written (in a scratch folder):
the fleet of four `hmoe-edge sync` devices ends with the experts `hmoe train` gives."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def quickstart(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- quickstart:{name} -->\n```\n(.*?)```\n<!-- /quickstart:{name} -->", text, re.S)
    assert found, f"README.md has no quickstart:{name} block"
    return found.group(1)


@pytest.mark.slow
def test_the_readme_coordinator_quickstart_gives_the_simulations_experts(tmp_path):
    from tests.support import fashion_available
    from trainer.protocol.checkpoint import load_checkpoint
    if not fashion_available():
        pytest.skip("Fashion-MNIST files not installed (make setup installs them)")
    script = quickstart("coordinator")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    # bash -e with job control for the `&` lines; the coordinator (job %1) is stopped at the end
    up = ("python -c \"import urllib.request as u; u.urlopen('http://127.0.0.1:8765/status', timeout=1)\" "
          "2>/dev/null")
    done = ("python -c \"import json; s = json.load(open('runs/fleet/state-hmoe.json')); "
            "raise SystemExit(s['completed_rounds'] < 5)\"")
    body = ("set -em\n" + script.replace("--secret S &\n", f"--secret S &\nfor i in $(seq 150); do {up} && break; "
                                                            "sleep 0.2; done\n")
            + f"for i in $(seq 150); do {done} && break; sleep 0.2; done\nkill %1\n")
    r = subprocess.run(["bash", "-c", body], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    fleet, sim = tmp_path / "runs" / "fleet", tmp_path / "runs" / "sim"
    experts = sorted((sim / "experts").glob("*.safetensors"))
    assert len(experts) == 5
    for path in experts:
        ours, theirs = load_checkpoint(path)[0], load_checkpoint(fleet / "experts" / path.name)[0]
        for name, arr in ours.items():
            np.testing.assert_allclose(theirs[name], arr, rtol=0, atol=1e-6, err_msg=f"{path.name}/{name}")
