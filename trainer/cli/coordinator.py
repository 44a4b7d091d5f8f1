"""`hmoe coordinator`: serve federated rounds to real devices."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import threading
import time
from pathlib import Path

from hierarchy.tree import write_text_atomic
from trainer.transports.coordinator.admission import Limits, Secrets
from trainer.cli import command
from trainer.protocol.schedules import SCHEDULES


def operator_token(db: str, given: str | None) -> tuple[str, Path | None]:
    """The operator's token: --operator-token / $HMOE_OPERATOR_TOKEN, else the file beside the
    database (``<db>.operator-token``), made 0600 with a new random token when missing."""
    if given:
        return given, None
    path = Path(str(db) + ".operator-token")
    if not path.exists():
        write_private(path, secrets.token_urlsafe(24) + "\n")
    return path.read_text().strip(), path


def _serve(args: argparse.Namespace) -> int:
    from hierarchy.serving import serve
    from trainer.transports.coordinator.service import Coordinator
    from trainer.transports.coordinator.http import create_app
    secret = args.secret or os.environ.get("HMOE_ENROL_SECRET")
    secrets_ = Secrets(secret, args.secret_file)
    limits = Limits(max_devices=args.max_devices, enrol_per_second=args.enrol_rate, enrol_burst=args.enrol_burst,
                    max_samples=args.max_samples)
    coord = Coordinator(args.run_dir, args.db, secrets_, min_devices=args.min_devices,
                        round_seconds=args.round_seconds, schedule=args.schedule, limits=limits,
                        keep_update_rounds=None if args.keep_update_rounds < 0 else args.keep_update_rounds)
    token, token_file = operator_token(args.db, args.operator_token or os.environ.get("HMOE_OPERATOR_TOKEN"))

    def ticker() -> None:  # rounds whose deadline passed close even when nobody asks
        while True:
            time.sleep(min(5.0, args.round_seconds / 4))
            try:
                coord.tick()
            except Exception as exc:   # noqa: BLE001 - one failed tick must not stop deadlines for good
                print(f"coordinator: tick failed: {exc!r}", file=sys.stderr, flush=True)

    threading.Thread(target=ticker, daemon=True).start()
    print(f"coordinator for {args.run_dir} on http://{args.host}:{args.port} (state in {args.db}; operator token "
          f"{'given' if token_file is None else 'in ' + str(token_file)}; enrolment by "
          f"{'secret or ' if secret or args.secret_file else ''}one-time token)", flush=True)
    serve(create_app(coord, args.max_update_bytes, token), args.host, args.port, args.log_level,
          access_log=False, backlog=4096)
    return 0


def _admin(args: argparse.Namespace) -> int:
    from trainer.transports.coordinator.service import issue_enrol_tokens, list_devices, revoke_device
    if args.action == "tokens":
        tokens = issue_enrol_tokens(args.db, args.count, args.note)
        if args.out:
            write_private(Path(args.out), "".join(t + "\n" for t in tokens))
            print(f"wrote {len(tokens)} one-time enrolment tokens to {args.out} (mode 0600)")
        else:
            print("\n".join(tokens))
    elif args.action == "devices":
        for d in list_devices(args.db):
            state = "revoked" if d["revoked"] else "active"
            print(f"{d['device_id']}  client {d['index']:>5}  {state:8}  {d['name'] or ''}")
    else:
        revoke_device(args.db, args.device)
        print(f"revoked device {args.device}: its token is refused from now on (within a second on a running "
              "coordinator)")
    return 0


def write_private(path: Path, text: str) -> None:
    """A file only its owner can read, so (0600) from its first byte."""
    write_text_atomic(path, text, mode=0o600)


@command("coordinator")
def _add_coordinator(p: argparse.ArgumentParser) -> None:
    """Serve federated rounds over HTTP (the round driver, state in SQLite, no torch)."""
    p.add_argument("--run", dest="run_dir", required=True, help="run directory (config, hierarchy, expert checkpoints)")
    p.add_argument("--db", required=True, help="SQLite state file (created if missing, reused after a restart)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--secret", help="a fleet-wide enrolment secret (default: $HMOE_ENROL_SECRET); without it and "
                   "--secret-file, devices enrol only with one-time tokens from `hmoe coordinator-admin tokens`")
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
    p.add_argument("--keep-update-rounds", type=int, default=2,
                   help="update bodies are deleted once their round is this many rounds behind the last committed "
                        "one (0: at once; -1: never)")
    p.add_argument("--max-update-bytes", type=int, default=None,
                   help="largest update body (default: each expert's own size, its float32 tensors and a header)")
    p.add_argument("--operator-token", help="the token /status and the API docs need (default: "
                   "$HMOE_OPERATOR_TOKEN, else the file DB.operator-token, made with a random token when missing)")
    p.add_argument("--log-level", default="warning")
    p.set_defaults(run=_serve)


@command("coordinator-admin")
def _add_admin(p: argparse.ArgumentParser) -> None:
    """Operator's tools on a coordinator's database (running or not): issue one-time enrolment
    tokens, list devices, revoke a device."""
    p.add_argument("--db", required=True, help="the coordinator's SQLite state file")
    sub = p.add_subparsers(dest="action", required=True)
    tokens = sub.add_parser("tokens", help="issue one-time enrolment tokens (each enrols one device, once)")
    tokens.add_argument("--count", type=int, default=1, help="how many (1 to 100000)")
    tokens.add_argument("--note", default="", help="what they are for (kept with them)")
    tokens.add_argument("--out", help="write them to this file, mode 0600 (default: print them)")
    sub.add_parser("devices", help="list enrolled devices, active or revoked")
    revoke = sub.add_parser("revoke", help="revoke a device: its token is refused from then on")
    revoke.add_argument("device", help="the device id (see `devices`)")
    p.set_defaults(run=_admin)
