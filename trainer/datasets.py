"""Data sets by name, held in memory as uint8 N x C x H x W plus leaf labels."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hierarchy import Hierarchy, load_taxonomy
from hierarchy.errors import HmoeError
from hierarchy.spec import InputSpec


class DatasetError(HmoeError):
    """A data set is missing or malformed; the message says where we looked and what to do."""


@dataclass
class Dataset:
    name: str
    taxonomy: str
    tree: Hierarchy
    train_x: np.ndarray   # uint8 (N, C, H, W)
    train_y: np.ndarray   # int64 leaf labels in the tree's leaf order
    test_x: np.ndarray
    test_y: np.ndarray
    mean: tuple[float, ...]
    std: tuple[float, ...]
    color: str            # "L" (grayscale) or "RGB": how a device turns an image file into the input

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.train_x.shape[1:])

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(self.shape, tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std),
                         self.color)


def data_root(root: str | os.PathLike | None = None) -> Path:
    return Path(root or os.environ.get("HMOE_DATA", "data"))


# ------------------------------------------------------------- Fashion-MNIST
FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte.gz", "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz", "test_y": "t10k-labels-idx1-ubyte.gz",
}
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    """The original MNIST idx format (optionally gzipped)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype != 0x08:
            raise ValueError("not an unsigned-byte idx file")
        shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).copy()
        return arr.reshape(shape)
    except (OSError, ValueError, struct.error, EOFError) as exc:
        raise DatasetError(f"{path}: not a valid idx file ({exc})") from None


def _fashion_dirs(root: Path) -> list[Path]:
    return [root / "fashion-mnist", root / "FashionMNIST" / "raw", DEBIAN_FASHION]


def load_fashion_mnist(root: Path, download: bool = True) -> Dataset:
    dirs = _fashion_dirs(root)
    found = next((d for d in dirs if all((d / f).is_file() for f in FASHION_FILES.values())), None)
    if found is None and download:
        try:
            from torchvision.datasets import FashionMNIST
            FashionMNIST(str(root), train=True, download=True)
            FashionMNIST(str(root), train=False, download=True)
            found = root / "FashionMNIST" / "raw"
        except Exception as exc:  # noqa: BLE001 - any download failure becomes the same advice
            print(f"note: torchvision could not download Fashion-MNIST ({exc})")
    if found is None:
        raise DatasetError(
            "Fashion-MNIST not found; looked in " + ", ".join(str(d) for d in dirs) +
            " for " + ", ".join(FASHION_FILES.values()) +
            ". Get it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or let torchvision "
            "download it with internet access.")
    arrays = {k: read_idx(found / f) for k, f in FASHION_FILES.items()}
    return Dataset("fashion-mnist", "fashion-mnist", load_taxonomy("fashion-mnist"),
                   arrays["train_x"][:, None], arrays["train_y"].astype(np.int64),
                   arrays["test_x"][:, None], arrays["test_y"].astype(np.int64),
                   mean=(0.2860,), std=(0.3530,), color="L")


# ----------------------------------------------------------------- CIFAR-100
def load_cifar100(root: Path, download: bool = False) -> Dataset:
    folder = root / "cifar-100-python"
    files = [folder / "train", folder / "test"]
    if not all(f.is_file() for f in files):
        raise DatasetError(f"CIFAR-100 not found: expected {files[0]} and {files[1]} (the "
                           "'cifar-100-python' pickles from the official tarball, unpacked under the "
                           f"data root {root}; set --data-root or HMOE_DATA)")
    tree = load_taxonomy("cifar100")
    out = []
    for f in files:
        try:
            with f.open("rb") as fh:
                d = pickle.load(fh, encoding="bytes")
            x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(d[b"fine_labels"], dtype=np.int64)
        except (KeyError, ValueError, pickle.UnpicklingError, EOFError) as exc:
            raise DatasetError(f"{f}: not a CIFAR-100 pickle with 'data' and 'fine_labels' ({exc!r})") from None
        if len(x) != len(y) or (len(y) and (y.min() < 0 or y.max() >= 100)):
            raise DatasetError(f"{f}: {len(x)} images for {len(y)} labels, or labels outside 0..99")
        out += [x, y]
    return Dataset("cifar100", "cifar100", tree, *out, mean=(0.5071, 0.4865, 0.4409),
                   std=(0.2673, 0.2564, 0.2762), color="RGB")


# ------------------------------------------------------------- Tiny ImageNet
def _read_image(path: Path) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB").resize((64, 64)), dtype=np.uint8).transpose(2, 0, 1)
    except OSError as exc:
        raise DatasetError(f"{path}: not a readable image ({exc})") from None


def load_tiny_imagenet(root: Path, download: bool = False) -> Dataset:
    folder = root / "tiny-imagenet-200"
    if not (folder / "wnids.txt").is_file() or not (folder / "val" / "val_annotations.txt").is_file():
        raise DatasetError(f"Tiny ImageNet not found: expected {folder}/wnids.txt, "
                           f"{folder}/train/<wnid>/images/*.JPEG and {folder}/val/val_annotations.txt "
                           f"(the official tiny-imagenet-200.zip unpacked under {root})")
    tree = load_taxonomy("tiny-imagenet")
    leaf_names = [tree.names[i] for i in tree.leaves]
    label_of = {w: k for k, w in enumerate(leaf_names)}
    wnids = (folder / "wnids.txt").read_text().split()
    unknown = [w for w in wnids if w not in label_of]
    if unknown:
        raise DatasetError(f"{folder}/wnids.txt lists {unknown[:3]}, not in the Tiny ImageNet taxonomy")
    train_x, train_y = [], []
    for w in wnids:
        for p in sorted((folder / "train" / w / "images").glob("*.JPEG")):
            train_x.append(_read_image(p))
            train_y.append(label_of[w])
    test_x, test_y = [], []
    for line in (folder / "val" / "val_annotations.txt").read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        if parts[1] not in label_of:
            raise DatasetError(f"val_annotations.txt: unknown wnid {parts[1]!r} for {parts[0]}")
        test_x.append(_read_image(folder / "val" / "images" / parts[0]))
        test_y.append(label_of[parts[1]])
    if not train_x or not test_x:
        raise DatasetError(f"{folder}: no training or validation images found")
    return Dataset("tiny-imagenet", "tiny-imagenet", tree, np.stack(train_x), np.array(train_y),
                   np.stack(test_x), np.array(test_y), mean=(0.480, 0.448, 0.398),
                   std=(0.277, 0.269, 0.282), color="RGB")


# ---------------------------------------------------------------------- hanzi
def load_hanzi(name: str, root: Path, download: bool = True) -> Dataset:
    """``hanzi``, ``hanzi:N`` (the N most frequent of GB2312 level 1) or ``hanzi:@FILE`` (the
    characters a file lists), each optionally followed by ``:xC`` (C augmented images per
    character and face, 1 by default) and ``:Spx`` (side S, 32 by default): glyphs rendered from
    Debian's CJK fonts (trainer/glyphs.py), the test split in held-out font families, under
    the ``hanzi[:N]`` taxonomy. Rendered once and cached under ``root``/hanzi."""
    from hierarchy.hanzi import UnihanError, copies, parse, select, side
    from trainer import glyphs
    try:
        _, n = parse(name)
        chars = [c.char for c in select(n)]
        tree = load_taxonomy(name)
        d = glyphs.load(root / "hanzi", chars, n, size=side(name), copies=copies(name), progress=download)
    except (UnihanError, glyphs.GlyphError) as exc:
        raise DatasetError(str(exc)) from None
    order = [tree.names[v] for v in tree.leaves]
    if order != chars:   # labels are indices into ``chars``; the tree's leaf order must match
        index = {c: i for i, c in enumerate(order)}
        remap = np.array([index[c] for c in chars])
        d["train_y"], d["test_y"] = remap[d["train_y"]], remap[d["test_y"]]
    return Dataset(name, name, tree, d["train_x"], d["train_y"].astype(np.int64), d["test_x"],
                   d["test_y"].astype(np.int64), mean=(0.31,), std=(0.26,), color="L")


# ------------------------------------------------------------------ synthetic
def load_synthetic(spec: str, seed: int = 0) -> Dataset:
    """``synthetic:C,H,W:TAXONOMY:N``: random pixels and labels of a real taxonomy's
    shape. For cost benchmarks only: there is nothing to learn."""
    try:
        _, shape, rest = spec.split(":", 2)
        taxonomy, n = rest.rsplit(":", 1)   # (the taxonomy's name may hold a colon: hanzi:500)
        c, h, w = (int(v) for v in shape.split(","))
        n = int(n)
        if min(c, h, w, n) <= 0:
            raise ValueError
    except ValueError:
        raise DatasetError(f"bad synthetic spec {spec!r}; expected synthetic:C,H,W:TAXONOMY:N, "
                           "e.g. synthetic:3,32,32:cifar100:50000") from None
    tree = load_taxonomy(taxonomy)
    rng = np.random.default_rng(seed)
    n_test = max(1, n // 5)
    return Dataset(spec, taxonomy, tree,
                   rng.integers(0, 256, (n, c, h, w), dtype=np.uint8), rng.integers(0, tree.num_leaves, n),
                   rng.integers(0, 256, (n_test, c, h, w), dtype=np.uint8),
                   rng.integers(0, tree.num_leaves, n_test),
                   mean=(0.5,) * c, std=(0.25,) * c, color="L" if c == 1 else "RGB")


LOADERS: dict[str, Callable[[Path, bool], Dataset]] = {
    "fashion-mnist": load_fashion_mnist,
    "cifar100": load_cifar100,
    "tiny-imagenet": load_tiny_imagenet,
}


def load_dataset(name: str, root: str | os.PathLike | None = None, download: bool = True) -> Dataset:
    if name.startswith("synthetic:"):
        return load_synthetic(name)
    if name == "hanzi" or name.startswith("hanzi:"):
        return load_hanzi(name, data_root(root), download)
    try:
        loader = LOADERS[name]
    except KeyError:
        raise DatasetError(f"unknown data set {name!r}; expected one of {', '.join(LOADERS)}, hanzi[:N] "
                           "or synthetic:C,H,W:TAXONOMY:N") from None
    return loader(data_root(root), download)
