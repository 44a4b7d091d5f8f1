"""The HMoE ClientApp for Flower: a SuperNode's side of the round protocol.

A node answers two messages of the ServerApp (trainer.transports.flower.server):

- query: its client id and its samples per leaf (as a device sends ``counts`` to the
  coordinator), so the strategy can assign tasks and hyper-parameters;
- train: one expert's weights with the strategy's decisions (the expert's relabelling
  table, hyper-parameters, seed); the node trains with the project's local update
  (``trainer.device.client.local_update``, under a memory cap when one is configured) and
  replies with the new weights and its sample count.

Data, from the node config: ``data-dir`` (a folder holding ``train.npz`` with uint8
``images`` N,C,H,W and ``labels``: leaf names or indices) with ``partition-id`` (the
node's client id), or, in Flower's simulation runtime, ``partition-id`` alone: the
partition the project's simulation gives that client of the run (``run-dir`` in the
run config). ``memory-cap-mb`` caps a round's memory growth (edge trainer's micro-batch
plan); ``threads`` sets torch's threads (default ``TRAIN_THREADS``, 1, as on every transport:
another count changes the update's last bits, so the node would no longer equal the
simulation; two threads per client on two cores were also 3.4x slower than one).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from hierarchy.errors import HmoeError
from hierarchy.npz import read_npz

_DATA: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
_PREPARED: dict[str, object] = {}   # run dir -> the simulation's data split, once per process


class NodeDataError(HmoeError, ValueError):
    """A SuperNode's data is missing or does not fit the run's hierarchy."""


def to_record(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array.from_numpy_ndarray(np.ascontiguousarray(v)) for k, v in weights.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def node_data(node_config: Mapping, run_config: Mapping, leaves: list[str], shape: tuple[int, int, int],
              run_dir: str | None = None) -> tuple[int, np.ndarray, np.ndarray]:
    """(client id, uint8 images, leaf labels) of this node, loaded once per process."""
    cfg = node_config
    run_dir = run_dir or str(run_config.get("run-dir", ""))
    if "partition-id" not in cfg:
        raise NodeDataError("node config has no partition-id (this node's client id); start the SuperNode with "
                            "--node-config 'partition-id=N data-dir=\"FOLDER\"'")
    client = int(cfg["partition-id"])
    key = (client, str(cfg.get("data-dir", "")), run_dir)
    if key not in _DATA:
        if "data-dir" in cfg:
            _DATA[key] = _load_folder(Path(str(cfg["data-dir"])), leaves, shape)
        else:
            if not run_dir:
                raise NodeDataError("node config has no data-dir and the run config no run-dir: this node has no data")
            _DATA[key] = _load_simulated(Path(run_dir), client)
    x, y = _DATA[key]
    return client, x, y


def _load_folder(folder: Path, leaves: list[str], shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    path = folder / "train.npz"
    if not path.is_file():
        raise NodeDataError(f"node data-dir {folder}: no train.npz (uint8 'images' N,C,H,W and 'labels')")
    try:
        z = read_npz(path, ("images", "labels"))
        x, labels = z["images"], z["labels"]
    except (KeyError, ValueError, OSError) as exc:
        raise NodeDataError(f"{path}: expected arrays 'images' and 'labels' ({exc})") from None
    if x.dtype != np.uint8 or tuple(x.shape[1:]) != tuple(shape):
        raise NodeDataError(f"{path}: images {x.dtype} {tuple(x.shape[1:])}; the run expects uint8 {tuple(shape)}")
    if labels.dtype.kind in "US":
        unknown = sorted({str(v) for v in labels} - set(leaves))
        if unknown:
            raise NodeDataError(f"{path}: classes {unknown[:5]} are not leaves of the run's hierarchy "
                                f"({', '.join(leaves[:6])}, ...)")
        labels = np.array([leaves.index(str(v)) for v in labels])
    labels = labels.astype(np.int64)
    if len(labels) != len(x) or (len(labels) and (labels.min() < 0 or labels.max() >= len(leaves))):
        raise NodeDataError(f"{path}: {len(x)} images and {len(labels)} labels in [0, {len(leaves)}) expected")
    return x, labels


def _load_simulated(run_dir: Path, client: int) -> tuple[np.ndarray, np.ndarray]:
    """Flower's simulation runtime: the client's partition as the project's simulation
    draws it (same data, same order), so the two transports train alike."""
    from trainer.protocol.run import load_run_config
    from trainer.prepare import prepare
    if str(run_dir) not in _PREPARED:
        _PREPARED.clear()
        _PREPARED[str(run_dir)] = prepare(load_run_config(run_dir))
    prep = _PREPARED[str(run_dir)]
    if not 0 <= client < len(prep.parts):
        raise NodeDataError(f"partition-id {client} is not a client of the run ({len(prep.parts)} clients)")
    idx = prep.parts[client]
    return prep.data.train_x[idx], prep.data.train_y[idx]   # copies: the node's own data


def handle_query(msg: Message, context: Context, run_dir: str | None = None) -> Message:
    cfg = msg.content["config"]
    leaves, shape = json.loads(str(cfg["leaves"])), tuple(json.loads(str(cfg["shape"])))
    client, _, y = node_data(context.node_config, context.run_config, leaves, shape, run_dir)
    counts = np.bincount(y, minlength=len(leaves)).tolist()
    return Message(RecordDict({"config": ConfigRecord({"partition-id": client, "counts": counts})}), reply_to=msg)


def train_task(cfg: Mapping, weights: dict[str, np.ndarray], node_config: Mapping, run_config: Mapping,
               run_dir: str | None = None, trunk: dict[str, np.ndarray] | None = None
               ) -> tuple[dict[str, np.ndarray], dict]:
    """A train message's work, without Flower's message types: the node's samples under the
    expert (the message's relabelling table), the device core's local update with the
    strategy's hyper-parameters and seed (under ``memory-cap-mb`` when the node sets it).
    Returns the new weights and the reply's metrics."""
    from trainer.device.client import TRAIN_THREADS, Normalizer, local_update
    from trainer.device.config import LocalConfig, NetConfig
    leaves, shape = json.loads(str(cfg["leaves"])), tuple(json.loads(str(cfg["shape"])))
    client, x, y = node_data(node_config, run_config, leaves, shape, run_dir)
    if client != int(cfg["partition-id"]):
        raise NodeDataError(f"this node is client {client}, the message was for client {int(cfg['partition-id'])}")
    table = np.asarray(cfg["targets"], dtype=np.int64)       # leaf -> child index under the expert, -1: not under it
    target = table[y]
    keep = target >= 0
    net = NetConfig.from_json(str(cfg["net"]))
    local = LocalConfig.from_dict(json.loads(str(cfg["local"])))
    spec = json.loads(str(cfg["input"]))
    normalize = Normalizer(tuple(spec["mean"]), tuple(spec["std"]))
    cap = node_config.get("memory-cap-mb")
    micro = None
    if cap:
        from trainer.device.memory import PeakMeter, plan_micro_batch, warm_up
        warm_up(net, local, normalize)
        micro = plan_micro_batch(net, local, normalize, x[keep], target[keep], float(cap), PeakMeter(),
                                 trunk=trunk).micro_batch
    new, metrics = local_update(net, weights, x[keep], target[keep], local, normalize, int(cfg["seed"]),
                                micro_batch=micro, threads=int(node_config.get("threads", TRAIN_THREADS)), trunk=trunk)
    return new, {"num-examples": int(metrics["num_samples"]), "train-loss": float(metrics["train_loss"]),
                 "train-seconds": float(metrics["train_seconds"])}


def handle_train(msg: Message, context: Context, run_dir: str | None = None) -> Message:
    trunk = from_record(msg.content["trunk"]) if "trunk" in msg.content else None   # an expert on the shared trunk
    new, metrics = train_task(msg.content["config"], from_record(msg.content["arrays"]), context.node_config,
                              context.run_config, run_dir, trunk)
    return Message(RecordDict({"arrays": to_record(new), "metrics": MetricRecord(metrics)}), reply_to=msg)


def make_client_app(run_dir: str | None = None) -> ClientApp:
    """The ClientApp; ``run_dir`` binds the run for Flower's in-process simulation (whose
    nodes get no run config), else the run config's ``run-dir`` is used."""
    client_app = ClientApp()

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_query(msg, context, run_dir)

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, run_dir)

    return client_app


app = make_client_app()   # for `flwr run` (flower/pyproject.toml)
