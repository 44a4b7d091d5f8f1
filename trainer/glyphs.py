"""The ``hanzi`` data set: GB2312 level-1 characters rendered from Debian's CJK fonts.

Every (character, face) pair gives ``copies`` images (1 by default), each rendered with its
own seeded augmentation; the test split uses font families that training never sees
(``TEST_FAMILIES``), so accuracy there is accuracy on an unseen typeface. Built once, in
parallel, deterministically; cached under the data root with its sha256 beside it.

Rendering, per image (at twice the final size, then reduced with a box filter):
the glyph is drawn at 96 px and cropped to its ink; strokes are thickened or thinned
(max or min filter, each with probability 1/4); it is scaled to fit a box of 70-92% of the
side keeping its aspect ratio, rotated by up to 8 degrees, and placed at the centre moved by
up to 8% of the side; after the reduction a Gaussian blur (radius up to 0.7 px, half the
time), ink and background levels (ink 0.6-1.0, background 0-0.3 of full scale) and Gaussian
noise (sigma up to 8 grey levels) are applied. White ink on black, like Fashion-MNIST.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hierarchy.errors import HmoeError
from hierarchy.npz import read_npz
from hierarchy.tree import write_bytes_atomic, write_text_atomic

VERSION = 1
SIZE = 32
# (Debian package, file, family); every face of a .ttc collection is used.
FONT_FILES = (
    ("fonts-noto-cjk", "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc", "Noto Sans CJK"),
    ("fonts-noto-cjk", "/usr/share/fonts/opentype/noto/NotoSansCJK-Bold.ttc", "Noto Sans CJK"),
    ("fonts-noto-cjk", "/usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc", "Noto Serif CJK"),
    ("fonts-noto-cjk", "/usr/share/fonts/opentype/noto/NotoSerifCJK-Bold.ttc", "Noto Serif CJK"),
    ("fonts-arphic-uming", "/usr/share/fonts/truetype/arphic/uming.ttc", "AR PL UMing"),
    ("fonts-arphic-gbsn00lp", "/usr/share/fonts/truetype/arphic-gbsn00lp/gbsn00lp.ttf", "AR PL SungtiL GB"),
    ("fonts-arphic-gkai00mp", "/usr/share/fonts/truetype/arphic-gkai00mp/gkai00mp.ttf", "AR PL KaitiM GB"),
    ("fonts-wqy-microhei", "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc", "WenQuanYi Micro Hei"),
    ("fonts-droid-fallback", "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf", "Droid Sans Fallback"),
    ("fonts-arphic-ukai", "/usr/share/fonts/truetype/arphic/ukai.ttc", "AR PL UKai"),
    ("fonts-wqy-zenhei", "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc", "WenQuanYi Zen Hei"),
)
TEST_FAMILIES = ("AR PL UKai", "WenQuanYi Zen Hei")
PACKAGES = tuple(dict.fromkeys(p for p, _, _ in FONT_FILES))


class GlyphError(HmoeError):
    """A font is missing, truncated or unreadable, or the cache does not match its checksum."""


@dataclass(frozen=True)
class Face:
    package: str
    file: str
    index: int
    family: str
    name: str

    @property
    def split(self) -> str:
        return "test" if self.family in TEST_FAMILIES else "train"


def face_count(path: str) -> int:
    """Faces in a font file: a TrueType collection's count from its header, else 1."""
    with open(path, "rb") as f:
        head = f.read(12)
    if head[:4] == b"ttcf":
        if len(head) < 12:
            raise GlyphError(f"{path}: truncated font collection header; reinstall its package")
        return struct.unpack(">I", head[8:12])[0]
    return 1


def faces(files=None) -> list[Face]:
    """Every face of the installed font files (``FONT_FILES``); a missing or unreadable file is
    an error that names its Debian package."""
    from fontTools.ttLib import TTLibError, TTCollection, TTFont
    out = []
    for package, file, family in files or FONT_FILES:
        if not os.path.isfile(file):
            raise GlyphError(f"{file}: missing; the hanzi data set needs Debian's {package} package "
                             f"(make setup installs it, or apt-get install {package})")
        try:
            n = face_count(file)
            fonts = TTCollection(file, lazy=True).fonts if n > 1 or file.endswith(".ttc") else [TTFont(file, lazy=True)]
            names = [str(f["name"].getDebugName(4)) for f in fonts]
        except (TTLibError, OSError, struct.error, KeyError, AssertionError) as exc:
            raise GlyphError(f"{file}: not a readable font ({exc.__class__.__name__}: {exc}); the file is "
                             f"truncated or corrupt: reinstall {package}") from None
        out += [Face(package, file, i, family, name) for i, name in enumerate(names)]
    return out


def coverage(face: Face, chars: list[str]) -> list[str]:
    """The characters ``face`` has no glyph for (its cmap)."""
    from fontTools.ttLib import TTCollection, TTFont
    font = TTCollection(face.file, lazy=True).fonts[face.index] if face.file.endswith(".ttc") else \
        TTFont(face.file, lazy=True)
    cmap = font.getBestCmap()
    return [c for c in chars if ord(c) not in cmap]


def _render_face(args) -> tuple[np.ndarray, list[int]]:
    """Images of ``chars`` in one face: (len(chars) * copies, 1, S, S) uint8, and the indices of
    characters the face lacks (their rows are left black and dropped by the caller)."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont
    face, chars, copies, size, seed, missing = args
    try:
        font = ImageFont.truetype(face.file, 96, index=face.index)
    except OSError as exc:
        raise GlyphError(f"{face.file} (face {face.index}): unreadable by FreeType ({exc}); reinstall "
                         f"{face.package}") from None
    big = 2 * size
    out = np.zeros((len(chars) * copies, 1, size, size), dtype=np.uint8)
    lacking = set(missing)
    for i, ch in enumerate(chars):
        if ch in lacking:
            continue
        ink = Image.new("L", (160, 160), 0)
        ImageDraw.Draw(ink).text((80, 80), ch, font=font, fill=255, anchor="mm")
        box = ink.getbbox()
        if box is None:
            lacking.add(ch)
            continue
        glyph = ink.crop(box)
        for c in range(copies):
            rng = np.random.default_rng([seed, i, c])
            g = glyph
            r = rng.random()
            if r < 0.25:
                g = g.filter(ImageFilter.MaxFilter(5))
            elif r < 0.5:
                g = g.filter(ImageFilter.MinFilter(3))
            side = big * rng.uniform(0.70, 0.92)
            scale = side / max(g.size)
            g = g.resize((max(1, round(g.size[0] * scale)), max(1, round(g.size[1] * scale))), Image.LANCZOS)
            g = g.rotate(rng.uniform(-8, 8), resample=Image.BICUBIC, expand=True)
            canvas = Image.new("L", (big, big), 0)
            dx, dy = rng.uniform(-0.08, 0.08, 2) * big
            canvas.paste(g, (round((big - g.size[0]) / 2 + dx), round((big - g.size[1]) / 2 + dy)))
            small = canvas.resize((size, size), Image.BOX)
            if rng.random() < 0.5:
                small = small.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.7)))
            a = np.asarray(small, dtype=np.float32) / 255.0
            fg, bg = rng.uniform(0.6, 1.0), rng.uniform(0.0, 0.3)
            a = (bg + (fg - bg) * a) * 255.0 + rng.normal(0, rng.uniform(0, 8), a.shape)
            out[i * copies + c, 0] = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return out, sorted(chars.index(ch) for ch in lacking)


def cache_name(n: int | str | None, size: int, copies: int, chars: list[str] | None = None) -> str:
    """The cache file: by count, or for a character list (``n`` a path) by its characters' hash."""
    if isinstance(n, str):
        n = "list-" + hashlib.sha256("".join(chars or []).encode()).hexdigest()[:12]
    return f"hanzi-{n or 'all'}-{size}px-x{copies}-v{VERSION}.npz"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def build(chars: list[str], size: int = SIZE, copies: int = 1, seed: int = 0, jobs: int | None = None,
          progress: bool = True) -> dict:
    """Render every (character, face); arrays and statistics (faces per split, what each lacks)."""
    all_faces = faces()
    lacking = {f.name: coverage(f, chars) for f in all_faces}
    jobs = jobs or min(len(all_faces), os.cpu_count() or 1)
    work = [(f, chars, copies, size, seed * 1000 + k, lacking[f.name]) for k, f in enumerate(all_faces)]
    parts: dict[str, list] = {"train": [], "test": []}
    labels: dict[str, list] = {"train": [], "test": []}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(work), desc="rendering hanzi faces", unit="face")
    with ProcessPoolExecutor(jobs) as pool:
        for face, (images, missing) in zip(all_faces, pool.map(_render_face, work)):
            lacking[face.name] = sorted(set(lacking[face.name]) | {chars[i] for i in missing})
            keep = np.ones(len(chars), dtype=bool)
            keep[missing] = False
            keep[[chars.index(c) for c in lacking[face.name]]] = False
            rows = np.repeat(keep, copies)
            parts[face.split].append(images[rows])
            labels[face.split].append(np.repeat(np.arange(len(chars)), copies)[rows])
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    stats = {
        "characters": len(chars), "size": size, "copies": copies, "seed": seed, "version": VERSION,
        "faces": {s: [f.name for f in all_faces if f.split == s] for s in ("train", "test")},
        "families": {s: sorted({f.family for f in all_faces if f.split == s}) for s in ("train", "test")},
        "packages": list(dict.fromkeys(p for p, _, _ in FONT_FILES)), "lacking": {k: v for k, v in lacking.items() if v},
        "font_bytes": {f: os.path.getsize(f) for _, f, _ in FONT_FILES},
    }
    return {"train_x": np.concatenate(parts["train"]), "train_y": np.concatenate(labels["train"]),
            "test_x": np.concatenate(parts["test"]), "test_y": np.concatenate(labels["test"]), "stats": stats}


def load(folder: Path, chars: list[str], n: int | str | None, size: int = SIZE, copies: int = 1,
         progress: bool = True) -> dict:
    """The cached arrays for these characters, built first when not cached. A cache whose
    sha256 differs from the one written beside it is an error naming both files."""
    path = folder / cache_name(n, size, copies, chars)
    digest = path.with_suffix(".sha256")
    if path.exists():
        if not digest.exists():
            raise GlyphError(f"{path}: no checksum beside it ({digest.name}); delete it to rebuild")
        want = digest.read_text().split()[0]
        if sha256_file(path) != want:
            raise GlyphError(f"{path}: sha256 differs from {digest.name}: the cache is corrupt or was changed; "
                             "delete both files to rebuild")
        d = read_npz(path, ("train_x", "train_y", "test_x", "test_y", "stats"))
        d["stats"] = json.loads(str(d["stats"]))
        if d["stats"].get("chars") != "".join(chars):
            raise GlyphError(f"{path}: built for other characters than Unihan now lists; delete it to rebuild")
        now = {f: os.path.getsize(f) for _, f, _ in FONT_FILES if os.path.isfile(f)}
        if now != d["stats"]["font_bytes"]:
            raise GlyphError(f"{path}: built from other font files than are installed now; delete it to rebuild")
        return d
    d = build(chars, size, copies, progress=progress)
    d["stats"]["chars"] = "".join(chars)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **{k: d[k] for k in ("train_x", "train_y", "test_x", "test_y")},
             stats=np.array(json.dumps(d["stats"], ensure_ascii=False)))
    # each file through its own temporary file and a rename: two processes building the same
    # cache at once (two trainings starting together) each leave whole files, the same bytes
    write_text_atomic(digest, hashlib.sha256(buf.getvalue()).hexdigest() + "  " + path.name + "\n")
    write_bytes_atomic(path, buf.getvalue())
    return d
