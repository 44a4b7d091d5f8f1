"""Flower simulations for the tests, run as `python -m tests.flower_apps MODE RUN_DIR` in a
loopback-only network namespace (Ray's servers bind every interface). MODE picks the
ClientApp: plain (the project's), bad-replies (each client spoils its reply its own way),
bad-data (two nodes' data folders are missing or foreign; DATA_DIR holds them)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

for _k, _v in {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(_k, _v)

from flwr.app import Array, Context, Message, MetricRecord  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from trainer.transports.flower.client import handle_query, handle_train, make_client_app  # noqa: E402


def bad_replies(run: str) -> ClientApp:
    """Client 0 replies NaN weights, 1 a wrong shape, 2 zero samples, 3 raises."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_query(msg, context, run)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        client = int(context.node_config["partition-id"])
        if client == 3:
            raise RuntimeError("node 3's disk is full")
        reply = handle_train(msg, context, run)
        arrays = reply.content["arrays"]
        name = next(iter(arrays.keys()))
        if client == 0:
            arrays[name] = Array.from_numpy_ndarray(np.full(arrays[name].shape, np.nan, dtype=np.float32))
        elif client == 1:
            arrays[name] = Array.from_numpy_ndarray(np.zeros((3, 3), dtype=np.float32))
        elif client == 2:
            reply.content["metrics"] = MetricRecord({"num-examples": 0})
        return reply

    return app


def bad_data(run: str, folders: dict[int, str]) -> ClientApp:
    """Nodes in ``folders`` read their data from there instead of the run's split."""
    app = ClientApp()

    def with_folder(context: Context) -> Context:
        client = int(context.node_config["partition-id"])
        if client in folders:
            context.node_config["data-dir"] = folders[client]
        return context

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_query(msg, with_folder(context), run)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, with_folder(context), run)

    return app


def main(mode: str, run: str, data_dir: str = "") -> int:
    from flwr.simulation import run_simulation

    from trainer.transports.flower.server import make_server_app
    from trainer.cli.flower import backend_config
    from trainer.protocol.run import load_run_config
    cfg = load_run_config(Path(run))
    client_app = {"plain": lambda: make_client_app(run), "bad-replies": lambda: bad_replies(run),
                  "bad-data": lambda: bad_data(run, {1: f"{data_dir}/missing", 2: f"{data_dir}/hats"})}[mode]()
    run_simulation(make_server_app(run, round_timeout=120), client_app, num_supernodes=cfg.clients,
                   backend_config=backend_config(1, 0, 2))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
