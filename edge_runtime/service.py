"""systemd units for a board that runs the runtime unattended: `hmoe-edge serve` always on,
and `hmoe-edge sync` every so often, each under a hard memory limit with a restart policy.

    hmoe-edge install-service --bundle /opt/hmoe/bundle --memory-max 300M \
        --sync-server http://coordinator:8000 --data /opt/hmoe/data --token-file /etc/hmoe/enrol-token

writes hmoe-edge-serve.service (and, with --sync-server, hmoe-edge-sync.service and
hmoe-edge-sync.timer) into --dest (default /etc/systemd/system), checks them with
`systemd-analyze verify` where it exists, and prints the `systemctl` lines that start them.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from hierarchy.errors import UsageError
from hierarchy.tree import write_text_atomic

SIZE_SUFFIXES = ("K", "M", "G")


def check_size(text: str, flag: str) -> str:
    """A systemd byte size such as 300M or 1G."""
    if not (text[:-1].isdigit() and text[-1:].upper() in SIZE_SUFFIXES) and not text.isdigit():
        raise UsageError(f"{flag} {text!r}: expected bytes or a number with K, M or G (e.g. 300M)")
    return text.upper()


def _exec(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def serve_unit(exe: str, bundle: Path, memory_max: str, port: int, budget_mb: float | None, user: str) -> str:
    args = [exe, "serve", "--bundle", str(bundle), "--host", "127.0.0.1", "--port", str(port)]
    if budget_mb:
        args += ["--memory-budget-mb", f"{budget_mb:g}"]
    return f"""[Unit]
Description=hmoe-edge: hierarchical mixture-of-experts inference on 127.0.0.1:{port}
After=network.target

[Service]
Type=simple
User={user}
ExecStart={_exec(args)}
Restart=on-failure
RestartSec=5
LimitNOFILE=65536
MemoryMax={memory_max}
MemorySwapMax=0
NoNewPrivileges=yes
ProtectSystem=full
PrivateTmp=yes

[Install]
WantedBy=multi-user.target
"""


def sync_units(exe: str, server: str, data: Path, token_file: Path, state: Path, memory_max: str,
               cap_mb: float | None, every: str, user: str) -> tuple[str, str]:
    # the secret reaches the process as a systemd credential (a file only this unit reads), never
    # as an argument: `ps` shows the path %d/enrol-token, not the secret
    args = [exe, "sync", "--server", server, "--data", str(data), "--state", str(state), "--rounds", "1"]
    if cap_mb:
        args += ["--memory-cap-mb", f"{cap_mb:g}"]
    command = _exec(args) + " --token-file %d/enrol-token"
    service = f"""[Unit]
Description=hmoe-edge: one federated round with {server}
After=network-online.target
Wants=network-online.target

[Service]
Type=oneshot
User={user}
LoadCredential=enrol-token:{token_file}
ExecStart={command}
MemoryMax={memory_max}
MemorySwapMax=0
TimeoutStartSec=3600
NoNewPrivileges=yes
PrivateTmp=yes
"""
    timer = f"""[Unit]
Description=hmoe-edge: take part in a federated round every {every}

[Timer]
OnBootSec=2min
OnUnitActiveSec={every}
RandomizedDelaySec=30s
Persistent=true

[Install]
WantedBy=timers.target
"""
    return service, timer


# systemd-analyze's own words for what is not a problem of a unit written outside /etc/systemd
# (its text, not an outcome of ours: matched as it prints it)
NOT_PROBLEMS = ("is not a symlink",)


def verify(paths: list[Path]) -> str | None:
    """What `systemd-analyze verify` says is wrong with the units (None: nothing, or no tool)."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        return None
    r = subprocess.run([tool, "verify", *map(str, paths)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (r.stdout + r.stderr).splitlines()
                if line.strip() and "hmoe-edge" in line and not any(n in line for n in NOT_PROBLEMS)]
    return "\n".join(problems) if r.returncode != 0 or problems else None


def install(bundle: str, dest: str, memory_max: str, port: int = 8080, budget_mb: float | None = None,
            server: str | None = None, data: str | None = None, token_file: str | None = None,
            state: str | None = None, cap_mb: float | None = None, every: str = "15min", user: str = "root",
            log=print) -> list[Path]:
    from edge_runtime.bundle import load_bundle
    load_bundle(bundle)   # a bundle that does not open is refused here, not at boot
    memory_max = check_size(memory_max, "--memory-max")
    exe = shutil.which("hmoe-edge", path=str(Path(sys.executable).parent)) or shutil.which("hmoe-edge")
    if exe is None:
        raise UsageError("hmoe-edge is not on PATH; install the package first (pip install 'hmoe-edge[edge]')")
    if server and (not data or not token_file):
        raise UsageError("--sync-server needs --data (the device's labelled images) and --token-file (a file "
                         "holding the enrolment secret or one-time token)")
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    files = {"hmoe-edge-serve.service": serve_unit(exe, Path(bundle).resolve(), memory_max, port, budget_mb, user)}
    if server:
        state_path = Path(state or Path(data).resolve().with_name(Path(data).name + ".hmoe-device.json"))
        files["hmoe-edge-sync.service"], files["hmoe-edge-sync.timer"] = sync_units(
            exe, server, Path(data).resolve(), Path(token_file).resolve(), state_path, memory_max, cap_mb, every, user)
    paths = []
    for name, text in files.items():
        write_text_atomic(out / name, text)
        paths.append(out / name)
    problem = verify(paths)
    if problem:
        raise UsageError(f"systemd-analyze verify found problems in the units written to {out}:\n{problem}")
    log(f"wrote {', '.join(p.name for p in paths)} to {out}" +
        (" (checked with systemd-analyze verify)" if shutil.which("systemd-analyze") else ""))
    log("start them with: systemctl daemon-reload && systemctl enable --now hmoe-edge-serve.service" +
        (" hmoe-edge-sync.timer" if server else ""))
    return paths
