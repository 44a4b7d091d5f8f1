"""`hmoe coordinator`: serve federated rounds to real devices."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

from trainer.transports.coordinator.admission import Limits, Secrets
from trainer.cli import command
from trainer.protocol.schedules import SCHEDULES


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from trainer.transports.coordinator.service import Coordinator
    from trainer.transports.coordinator.http import create_app
    secrets = Secrets(args.secret or os.environ.get("HMOE_ENROL_SECRET"), args.secret_file)
    limits = Limits(max_devices=args.max_devices, enrol_per_second=args.enrol_rate, enrol_burst=args.enrol_burst,
                    max_samples=args.max_samples)
    coord = Coordinator(args.run_dir, args.db, secrets, min_devices=args.min_devices, round_seconds=args.round_seconds,
                        schedule=args.schedule, limits=limits)

    def ticker() -> None:  # rounds whose deadline passed close even when nobody asks
        while True:
            time.sleep(min(5.0, args.round_seconds / 4))
            try:
                coord.tick()
            except Exception as exc:   # noqa: BLE001 - one failed tick must not stop deadlines for good
                print(f"coordinator: tick failed: {exc!r}", file=sys.stderr, flush=True)

    threading.Thread(target=ticker, daemon=True).start()
    print(f"coordinator for {args.run_dir} on http://{args.host}:{args.port} (state in {args.db})", flush=True)
    uvicorn.run(create_app(coord, args.max_update_bytes), host=args.host, port=args.port, log_level=args.log_level,
                access_log=False, backlog=4096)
    return 0


@command("coordinator")
def _add_coordinator(p: argparse.ArgumentParser) -> None:
    """Serve federated rounds over HTTP (the round driver, state in SQLite, no torch)."""
    p.add_argument("--run", dest="run_dir", required=True, help="run directory (config, hierarchy, expert checkpoints)")
    p.add_argument("--db", required=True, help="SQLite state file (created if missing, reused after a restart)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--secret", help="enrolment secret devices present (default: $HMOE_ENROL_SECRET)")
    p.add_argument("--secret-file", help="file of enrolment secrets, one a line, read again when it changes: "
                   "rotate a secret by editing it (enrolled devices keep their tokens)")
    p.add_argument("--max-devices", type=int, default=Limits.max_devices, help="ceiling on enrolled devices")
    p.add_argument("--enrol-rate", type=float, default=Limits.enrol_per_second,
                   help="enrolments a second, sustained (more get 429 with Retry-After)")
    p.add_argument("--enrol-burst", type=int, default=Limits.enrol_burst, help="enrolments that may come at once")
    p.add_argument("--max-samples", type=int, default=Limits.max_samples,
                   help="samples one device may claim in its label counts and updates (above: 422)")
    p.add_argument("--min-devices", type=int, default=None,
                   help="plan the first round once this many devices have reported their samples (default: the "
                        "run's --clients). A round then samples the run's clients as the simulation does, and closes "
                        "when every device it assigned has answered, or at its deadline")
    p.add_argument("--schedule", choices=sorted(SCHEDULES), default=None,
                   help="which expert a round trains (default: the run's; fixed once the database exists)")
    p.add_argument("--round-seconds", type=float, default=600.0, help="round deadline: aggregate what arrived by then")
    p.add_argument("--max-update-bytes", type=int, default=16 * 1024 * 1024)
    p.add_argument("--log-level", default="warning")
    p.set_defaults(run=_serve)
