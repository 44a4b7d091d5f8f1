"""`hmoe-edge`: the device-side command line (never imports torch for inference)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from edge_runtime.bundle import load_bundle
from edge_runtime.sync import DeviceBounds
from hierarchy.errors import HmoeError, UsageError


def _verify(args: argparse.Namespace) -> int:
    bundle = load_bundle(args.bundle)
    problems = bundle.verify()
    entries = bundle.all_entries()
    for entry in entries:
        bad = [p for p in problems if entry.file in p]
        print(f"{'FAIL' if bad else 'ok  '} {entry.file:<24} {entry.node}")
    for t in bundle.manifest.templates:
        bad = [p for p in problems if t.file.file in p]
        print(f"{'FAIL' if bad else 'ok  '} {t.file.file:<24} (template of width {t.net.get('width')})")
    if problems:
        for p in problems:
            print(f"hmoe-edge verify: {p}", file=sys.stderr)
        return 1
    print(f"{args.bundle}: {len(entries) + len(bundle.manifest.templates)} files match the manifest")
    return 0


def _predict(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from edge_runtime.engine import Engine
    from edge_runtime.images import ImageError, decode_image
    engine = Engine(args.bundle, memory_budget_mb=args.memory_budget_mb, threads=args.threads, pack=args.pack,
                    mmap=args.mmap)
    if engine.bundle.manifest.subtree_of and not args.json:
        print(f"note: this bundle holds only the subtree under {engine.tree.names[0]}: every answer is a node inside "
              "it, the best one for an image of another class", file=sys.stderr)
    failed = 0
    for name in args.images:
        try:
            x = decode_image(Path(name).read_bytes(), engine.bundle.input_spec)
        except (OSError, ImageError) as exc:
            print(f"hmoe-edge predict: {name}: {exc}", file=sys.stderr)
            failed += 1
            continue
        pred = engine.predict(x[None], args.decode)[0]
        if args.json:
            print(json.dumps({"image": name, **pred.to_dict(), "subtree": engine.bundle.manifest.subtree_of is not None,
                              "bundle_root": engine.tree.names[0]}))
        else:
            steps = " > ".join(f"{n} ({p:.2f})" for n, p in zip(pred.path[1:], pred.step_probs[1:]))
            print(f"{name}: {pred.node}  [{pred.path[0]} > {steps}]  p={pred.prob:.3f}")
    return 1 if failed else 0


def _serve(args: argparse.Namespace) -> int:
    from edge_runtime.app import create_app
    from hierarchy.serving import serve
    app = create_app(args.bundle, memory_budget_mb=args.memory_budget_mb, token=args.token,
                     max_body_bytes=args.max_body_bytes, max_pixels=args.max_pixels, threads=args.threads,
                     decoder=args.decode, workers=args.workers, body_timeout=args.body_timeout, pack=args.pack,
                     mmap=args.mmap, max_uploads=args.max_uploads)
    serve(app, args.host, args.port, args.log_level)
    return 0


def _pack(args: argparse.Namespace) -> int:
    from edge_runtime.packing import pack_bundle
    bundle = load_bundle(args.bundle)
    if not bundle.manifest.templates:
        raise UsageError(f"{args.bundle}: this bundle has no templates (exported before they existed): nothing is "
                         "streamed, so nothing needs packing; export it again with `hmoe export`")
    index = pack_bundle(bundle, args.out, args.threads)
    print(f"{args.out}: {len(index['experts'])} experts packed for {index['machine']} ({index['cpu'] or 'this CPU'}), "
          f"onnxruntime {index['onnxruntime']}; use it with --pack {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    try:
        from edge_runtime.local_train import load_local_data, train_expert, write_update
        from trainer.device.client import LocalConfig
    except ModuleNotFoundError as exc:
        raise UsageError(f"local training needs the training extra ({exc.name} is missing): "
                         "pip install 'hmoe-edge[device]'") from None
    bundle = load_bundle(args.bundle)
    x, labels = load_local_data(args.data, bundle)
    # one device fine-tuning on its own data, outside any federation: plain cross entropy (the
    # label-skew remedies are for a federated round, whose assignment carries them)
    local = LocalConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, logit_adjust=0.0)
    weights, report = train_expert(bundle, args.expert, x, labels, args.memory_cap_mb, local, args.seed)
    path = write_update(args.out, weights, report)
    print(f"trained {args.expert} on {report['samples']} samples in {report['seconds']:.1f} s; loss "
          f"{report['loss_before']:.4f} -> {report['loss_after']:.4f}")
    if "peak_growth_mb" in report:
        print(f"memory: cap {args.memory_cap_mb:g} MB, micro-batch {report['micro_batch']} of "
              f"{report['effective_batch']}, peak growth {report['peak_growth_mb']:.1f} MB")
    print(f"update written to {path} and {path.with_suffix('.json')}")
    return 0 if report.get("within_cap", True) else 3


def _bench(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from edge_runtime import bench
    bundle = load_bundle(args.bundle)
    out: dict = {"bundle": str(args.bundle), "machine": bench.machine()}
    x = labels = None
    if args.data:
        from edge_runtime.local_train import load_local_data
        x, labels = load_local_data(args.data, bundle)
        images = bundle.input_spec.normalize(x[: args.images])
    else:
        images = bench.random_images(args.bundle, args.images)
    out["inference"] = bench.inference(args.bundle, images, threads=args.threads)
    print(f"{'mode':<8}{'median ms':>11}{'p95 ms':>9}{'added MB':>10}{'resident MB':>13}")
    for mode, r in out["inference"].items():
        if isinstance(r, dict):
            print(f"{mode:<8}{r['latency_ms_median']:>11.2f}{r['latency_ms_p95']:>9.2f}{r['added_mb']:>10.1f}"
                  f"{r['resident_mb']:>13.1f}")
    print("added MB: resident memory the loaded models add over the engine open and idle "
          "(onnxruntime started, no model loaded)")
    from importlib.util import find_spec
    if find_spec("torch") is None:
        print("\ntraining part skipped: torch is not installed (pip install 'hmoe-edge[device]')")
    else:
        from trainer.device.cost import table1
        out["training"] = bench.training(args.bundle, x, labels, samples=args.samples)
        print("\n" + table1({"cost": out["training"]}))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return 0


def _sync(args: argparse.Namespace) -> int:
    from edge_runtime.sync import sync
    subtree = args.subtree
    if args.bundle:   # a personalised (subtree) bundle: train only what it carries
        carried = load_bundle(args.bundle).manifest.subtree_of
        if subtree and carried and subtree != carried:
            raise UsageError(f"--subtree {subtree} but --bundle {args.bundle} holds the subtree {carried}")
        subtree = subtree or carried
    if subtree:
        print(f"this device carries the subtree {subtree}: it trains only the experts inside it")
    done = sync(args.server, read_token(args.token, args.token_file), args.data, args.memory_cap_mb, args.rounds,
                args.state,
                poll=args.poll, name=args.name, until_round=args.until_round, subtree=subtree,
                bounds=DeviceBounds(max_epochs=args.max_epochs, max_lr=args.max_lr,
                                    max_sample_passes=args.max_sample_passes, reply_seconds=args.reply_seconds,
                                    max_weights_bytes=int(args.max_weights_mb * (1 << 20))))
    print(f"took part in {done} rounds")
    return 0


def read_token(token: str | None, token_file: str | None) -> str:
    """The enrolment secret: ``token``, or the first line of ``token_file``."""
    if token is not None:
        return token
    try:
        text = Path(token_file).read_text().strip()
    except OSError as exc:
        raise UsageError(f"--token-file {token_file}: cannot read it ({exc.strerror}); expected a file holding the "
                         "enrolment secret or one-time token") from None
    if not text:
        raise UsageError(f"--token-file {token_file} is empty; expected the enrolment secret or one-time token")
    return text.splitlines()[0].strip()


def _install_service(args: argparse.Namespace) -> int:
    from edge_runtime.service import install
    install(args.bundle, args.dest, args.memory_max, args.port, args.memory_budget_mb, args.sync_server, args.data,
            args.token_file, args.state, args.memory_cap_mb, args.every, args.user)
    return 0


def _engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="bundle directory (manifest.json + ONNX files)")
    p.add_argument("--memory-budget-mb", type=float, default=None,
                   help="bound on the ONNX bytes of experts kept loaded (least recently used evicted first)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--decode", default="greedy", help="greedy | beam:K | threshold:T")
    p.add_argument("--pack", default=None, help="with --memory-budget-mb: a folder `hmoe-edge pack` wrote for this "
                   "bundle on this device (streamed experts run with weights in this CPU's layout)")
    p.add_argument("--mmap", action="store_true", help="with --pack: memory-map the packed weights instead of reading "
                   "them per run (nothing copied; their pages are page cache the kernel keeps while memory is free)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hmoe-edge", description="hmoe-edge device side: verify bundles, "
                                     "predict, serve, train one expert locally, sync with a coordinator.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("verify", help="check every file of a bundle against its manifest (size, sha256)")
    p.add_argument("bundle", help="bundle directory (manifest.json + ONNX files)")
    p.set_defaults(run=_verify)
    p = sub.add_parser("predict", help="classify image files (PNG or JPEG)")
    _engine_flags(p)
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.set_defaults(run=_predict)
    p = sub.add_parser("serve", help="serve POST /predict, GET /health, GET /experts over local HTTP")
    _engine_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this device only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--token", default=os.environ.get("HMOE_EDGE_TOKEN"),
                   help="require 'Authorization: Bearer TOKEN' (default: $HMOE_EDGE_TOKEN, or none)")
    p.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024, help="largest accepted upload")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest accepted image (width x height)")
    p.add_argument("--workers", type=int, default=2, help="threads that decode images and run the experts")
    p.add_argument("--body-timeout", type=float, default=30.0, help="seconds a request body may take to arrive (408)")
    p.add_argument("--max-uploads", type=int, default=8, help="request bodies held in memory at once (each up to "
                   "--max-body-bytes); past that a prediction is answered 503 before its body is read")
    p.add_argument("--log-level", default="warning")
    p.set_defaults(run=_serve)
    p = sub.add_parser("pack", help="lay out every expert's weights for this CPU once, so experts streamed under "
                       "--memory-budget-mb run as fast as open ones (use the folder with --pack)")
    p.add_argument("--bundle", required=True)
    p.add_argument("--out", required=True, help="folder for the pack (a few files: the experts' weights, reordered)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (as you will serve with)")
    p.set_defaults(run=_pack)
    p = sub.add_parser("train", help="train one expert on local labelled images under a memory cap")
    p.add_argument("--bundle", required=True)
    p.add_argument("--expert", required=True, help="expert node name (see the bundle's manifest)")
    p.add_argument("--data", required=True, help="folder with one sub-folder per leaf class, or an .npz")
    p.add_argument("--memory-cap-mb", type=float, default=None,
                   help="keep peak memory growth under this (micro-batches + gradient accumulation)")
    p.add_argument("--out", required=True, help="update path: writes OUT.safetensors and OUT.json")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32, help="effective batch (unchanged by the cap)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_train)
    p = sub.add_parser("bench", help="can this board join? latency, memory, one training round per expert")
    p.add_argument("--bundle", required=True)
    p.add_argument("--data", help="local labelled data (class folders or .npz); random data when absent")
    p.add_argument("--images", type=int, default=200, help="images for the latency measurement")
    p.add_argument("--samples", type=int, default=512, help="random training samples when --data is absent")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write all figures to this JSON file")
    p.set_defaults(run=_bench)
    p = sub.add_parser("sync", help="take part in federated rounds run by a coordinator")
    p.add_argument("--server", required=True, help="coordinator URL, e.g. http://127.0.0.1:8000")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--token", help="the fleet's enrolment secret, or a one-time enrolment token from the operator "
                     "(used once; the device's own token is then kept in --state, mode 0600). Visible in `ps` to "
                     "every user: prefer --token-file")
    who.add_argument("--token-file", help="a file holding the enrolment secret or one-time token (systemd: "
                     "LoadCredential= and %%d/NAME); never in the process's arguments")
    p.add_argument("--data", required=True, help="local labelled data (class folders or .npz)")
    p.add_argument("--memory-cap-mb", type=float, default=None)
    p.add_argument("--rounds", type=int, default=None, help="rounds to take part in (default: until stopped)")
    p.add_argument("--until-round", type=int, default=None,
                   help="stop once the coordinator's open round reaches this number (default: never)")
    p.add_argument("--state", default=None, help="state file (default: next to --data)")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between assignment polls while waiting")
    p.add_argument("--name", default="", help="a name for this device in the coordinator")
    p.add_argument("--bundle", help="the bundle this device serves: a subtree bundle (hmoe export --subtree) makes it "
                   "train only the experts inside its subtree")
    p.add_argument("--subtree", help="train only the experts inside this node's subtree (the others' rounds are "
                   "excused)")
    b = DeviceBounds()
    p.add_argument("--max-epochs", type=int, default=b.max_epochs,
                   help="refuse an assignment asking for more local epochs than this")
    p.add_argument("--max-lr", type=float, default=b.max_lr, help="refuse a larger learning rate")
    p.add_argument("--max-weights-mb", type=float, default=b.max_weights_bytes / (1 << 20),
                   help="refuse an expert whose weights are larger, whatever the coordinator's manifest declares "
                        "(with --memory-cap-mb: at most a quarter of it)")
    p.add_argument("--max-sample-passes", type=int, default=b.max_sample_passes,
                   help="refuse a round whose epochs x samples is larger (its work)")
    p.add_argument("--reply-seconds", type=float, default=b.reply_seconds,
                   help="give up on a reply not complete within this (every reply also has a size limit)")
    p.set_defaults(run=_sync)
    p = sub.add_parser("install-service", help="write systemd units: serve always on, sync every --every, each under "
                       "--memory-max with a restart policy (docs/DEVICE.md, 'Running unattended')")
    p.add_argument("--bundle", required=True, help="the bundle to serve")
    p.add_argument("--dest", default="/etc/systemd/system", help="where the unit files go")
    p.add_argument("--memory-max", default="300M", help="hard memory limit of each unit (systemd MemoryMax, e.g. 300M)")
    p.add_argument("--port", type=int, default=8080, help="serve's port on 127.0.0.1")
    p.add_argument("--memory-budget-mb", type=float, default=None, help="serve's model-session budget")
    p.add_argument("--sync-server", help="coordinator URL: also write a sync service and its timer")
    p.add_argument("--data", help="the device's labelled images for sync (class folders or .npz)")
    p.add_argument("--token-file", help="file holding the enrolment secret or one-time token (read at each start)")
    p.add_argument("--state", help="sync's state file (default: next to --data)")
    p.add_argument("--memory-cap-mb", type=float, default=None, help="sync's local-training memory cap")
    p.add_argument("--every", default="15min", help="how often the timer starts a sync round (systemd time span)")
    p.add_argument("--user", default="root", help="the user the units run as")
    p.set_defaults(run=_install_service)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (HmoeError, OSError) as exc:   # a user's error or the system's: one line; a bug keeps its traceback
        print(f"hmoe-edge {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
