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


def test_the_sync_unit_passes_the_secret_as_a_credential_and_ps_never_shows_it(bundle_dir, tmp_path):
    """Issue 37: the unit ran `sh -c '... --token "$(cat FILE)"'`, so the secret was in the
    process's arguments. Now systemd hands the file over (LoadCredential=) and sync reads it;
    here the unit's ExecStart runs as systemd would run it (%d: the credentials folder) against
    a real coordinator, and no process's arguments hold the secret while it enrols."""
    import os
    import time

    import numpy as np

    from edge_runtime.service import sync_units
    from tests.support import ALL, SECRET, Server, make_run
    service, _ = sync_units(edge_exe(), "http://127.0.0.1:1", tmp_path, tmp_path / "enrol-token", tmp_path / "s.json",
                            "300M", None, "15min", "root")
    assert f"LoadCredential=enrol-token:{tmp_path / 'enrol-token'}" in service
    assert "--token-file %d/enrol-token" in service and "cat" not in service and "--token " not in service
    run = make_run(tmp_path / "run", ALL)
    server = Server(run, tmp_path / "db.sqlite", min_devices=2)
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "enrol-token").write_text(SECRET + "\n")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (16, 28, 28), dtype=np.uint8),
             labels=rng.integers(0, 10, 16))
    exec_start = next(line for line in service.splitlines() if line.startswith("ExecStart="))[len("ExecStart="):]
    argv = [a.replace("%d", str(creds)) for a in exec_start.split()]
    argv[argv.index("--server") + 1] = server.url
    argv[argv.index("--data") + 1] = str(tmp_path / "d.npz")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        seen = []
        while time.monotonic() < deadline and proc.poll() is None:
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    seen.append(open(f"/proc/{pid}/cmdline", "rb").read())
                except OSError:
                    pass
            if (tmp_path / "s.json").exists() and "token" in (tmp_path / "s.json").read_text():
                break
            time.sleep(0.05)
        assert "token" in (tmp_path / "s.json").read_text()   # enrolled: the secret was read from the file
        device = [c for c in seen if b"hmoe-edge" in c]   # (the test's coordinator has the secret as a flag)
        assert any(b"--token-file" in c for c in device)
        assert not any(SECRET.encode() in c for c in device)
    finally:
        proc.kill()
        proc.wait(10)
        server.stop()
