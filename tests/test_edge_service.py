"""`hmoe-edge install-service`: systemd units for serve (always on) and sync (a timer), each
under a hard memory limit with a restart policy, checked by `systemd-analyze verify`."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from edge_runtime.service import verify
from tests.support import edge_exe

needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")


def test_units_are_written_with_limits_and_restart(bundle_dir, tmp_path):
    token = tmp_path / "token"
    token.write_text("secret\n")
    r = subprocess.run([edge_exe(), "install-service", "--bundle", str(bundle_dir), "--dest", str(tmp_path / "units"),
                        "--memory-max", "300M", "--sync-server", "http://127.0.0.1:8000", "--data", str(bundle_dir),
                        "--token-file", str(token), "--every", "30min"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    serve = (tmp_path / "units" / "hmoe-edge-serve.service").read_text()
    sync = (tmp_path / "units" / "hmoe-edge-sync.service").read_text()
    timer = (tmp_path / "units" / "hmoe-edge-sync.timer").read_text()
    assert "MemoryMax=300M" in serve and "Restart=on-failure" in serve and "--host 127.0.0.1" in serve
    assert "MemoryMax=300M" in sync and "secret" not in sync and str(token) in sync   # the token stays in its file
    assert "OnUnitActiveSec=30min" in timer
    assert "systemctl" in r.stdout


def test_bad_settings_are_refused_before_anything_is_written(bundle_dir, tmp_path):
    r = subprocess.run([edge_exe(), "install-service", "--bundle", str(bundle_dir), "--dest", str(tmp_path / "u"),
                        "--memory-max", "lots"], capture_output=True, text=True)
    assert r.returncode == 2 and "--memory-max 'lots'" in r.stderr and not (tmp_path / "u").exists()
    r = subprocess.run([edge_exe(), "install-service", "--bundle", str(bundle_dir), "--dest", str(tmp_path / "u"),
                        "--sync-server", "http://x"], capture_output=True, text=True)
    assert r.returncode == 2 and "--token-file" in r.stderr and not (tmp_path / "u").exists()


@needs_systemd
def test_systemd_analyze_finds_a_broken_unit(bundle_dir, tmp_path):
    from edge_runtime.service import serve_unit
    from pathlib import Path
    good = tmp_path / "hmoe-edge-serve.service"
    good.write_text(serve_unit(edge_exe(), Path(bundle_dir), "300M", 8080, None, "root"))
    assert verify([good]) is None
    bad = tmp_path / "hmoe-edge-bad.service"
    bad.write_text(good.read_text().replace("MemoryMax=300M", "MemoryMax=lots"))
    assert "lots" in verify([bad])
