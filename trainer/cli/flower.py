"""`hmoe flower`: a run under Flower's simulation runtime (virtual SuperNodes on Ray)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from hierarchy.errors import UsageError
from trainer.cli import command
from trainer.cli.train import _add_run_flags, _config
from trainer.protocol.run import RunConfig

QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def backend_config(client_cpus: float, client_gpus: float, ray_cpus: int) -> dict:
    """Ray on the loopback interface, no dashboard, the given resources per virtual client."""
    return {"client_resources": {"num_cpus": client_cpus, "num_gpus": client_gpus},
            "init_args": {"num_cpus": ray_cpus or os.cpu_count() or 1, "include_dashboard": False,
                          "_node_ip_address": "127.0.0.1", "logging_level": "warning"}}


def flower_simulation(out: Path, cfg: RunConfig, kind: str, resume: bool, supernodes: int = 0,
                      client_cpus: float = 1.0, client_gpus: float = 0.0, ray_cpus: int = 0,
                      round_timeout: float = 600.0) -> dict:
    """Create (or continue) a run and train it under Flower's simulation runtime; returns the report."""
    import json

    from trainer.transports.inprocess import Federation

    from trainer.prepare import open_run
    for k, v in QUIET.items():
        os.environ.setdefault(k, v)
    try:
        from flwr.simulation import run_simulation
    except ModuleNotFoundError as exc:
        raise UsageError(f"Flower is not installed ({exc.name}); pip install 'hmoe-edge[flwr]'") from None
    from trainer.transports.flower.server import make_server_app
    from trainer.transports.flower.client import make_client_app
    cfg, prep = open_run(out, cfg, resume, kinds=(kind,))
    Federation(out, kind, cfg, prep)   # initial checkpoints and the schedule's state, as `hmoe train` writes them
    run_simulation(make_server_app(str(out), kind, round_timeout, min_nodes=supernodes or cfg.clients),
                   make_client_app(str(out)), num_supernodes=supernodes or cfg.clients,
                   backend_config=backend_config(client_cpus, client_gpus, ray_cpus))
    return json.loads((out / "report.json").read_text())


NETNS_ENV = "HMOE_LOOPBACK_NAMESPACE"


def loopback_command(cmd: list[str]) -> list[str]:
    """``cmd`` wrapped to run in a new network namespace whose only interface is loopback
    (Linux; root, or unprivileged user namespaces): Ray's gRPC servers bind every
    interface, and there every interface is the loopback one, so nothing they open is
    reachable from outside. Raises UsageError where no such namespace can be made."""
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if not unshare or not ip:
        raise UsageError("--loopback-only needs unshare (util-linux) and ip (iproute2); install them, or pass "
                         "--no-loopback-only (then Ray's processes listen on every network interface)")
    prefix = [unshare, "--net"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    probe = subprocess.run(prefix + [ip, "link", "set", "lo", "up"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise UsageError(f"cannot make a loopback-only network namespace ({probe.stderr.strip()}); run as root, "
                         "enable unprivileged user namespaces, or pass --no-loopback-only (then Ray's processes "
                         "listen on every network interface)")
    return prefix + ["sh", "-c", f'{ip} link set lo up && exec "$@"', "sh", *cmd]


def run_in_loopback_namespace(argv: list[str]) -> int:
    """Run ``hmoe ARGV`` in a loopback-only network namespace (``loopback_command``)."""
    cmd = loopback_command([sys.executable, "-m", "exporter.cli", *argv])
    return subprocess.call(cmd, env={**os.environ, NETNS_ENV: "1"})


def _flower(args: argparse.Namespace) -> int:
    if args.loopback_only and os.environ.get(NETNS_ENV) != "1":
        return run_in_loopback_namespace(sys.argv[1:])
    from trainer.device.cost import summary, table1
    report = flower_simulation(Path(args.out), _config(args), args.model, args.resume, args.supernodes,
                               args.client_cpus, args.client_gpus, args.ray_cpus, args.round_timeout)
    print(table1(summary(report)))
    print(f"\nrun directory: {args.out} (report.json, plots/)")
    return 0


@command("flower")
def _add_flower(p: argparse.ArgumentParser) -> None:
    """Federated training under Flower's simulation runtime (same strategy and local update)."""
    p.add_argument("--model", choices=["hmoe", "flat"], default="hmoe")
    p.add_argument("--out", required=True, help="run directory (the same layout as hmoe train's)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last completed round")
    g = p.add_argument_group("Flower simulation runtime")
    g.add_argument("--supernodes", type=int, default=0, help="virtual SuperNodes (default: --clients, one per client)")
    g.add_argument("--client-cpus", type=float, default=1.0, help="CPUs Ray reserves per virtual client")
    g.add_argument("--client-gpus", type=float, default=0.0, help="GPUs Ray reserves per virtual client")
    g.add_argument("--ray-cpus", type=int, default=0, help="CPUs Ray may use (default: all)")
    g.add_argument("--round-timeout", type=float, default=600.0, help="seconds a round waits for replies")
    g.add_argument("--loopback-only", action=argparse.BooleanOptionalAction, default=True,
                   help="run in a network namespace with only the loopback interface (Linux: root or user "
                        "namespaces), since Ray's processes otherwise listen on every interface")
    _add_run_flags(p, RunConfig())
    p.set_defaults(run=_flower)
