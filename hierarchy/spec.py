"""What a model's input is (shape, normalisation, colour mode) and the one function that
turns pixels into it; shared by runs, bundles, the coordinator and the edge runtime (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hierarchy.errors import HmoeError

COLORS = ("L", "RGB")


class SpecError(HmoeError, ValueError):
    """An input specification is missing a field or holds an impossible value."""


@dataclass(frozen=True)
class InputSpec:
    """Images of ``shape`` (C, H, W); a pixel p in [0, 255] becomes (p / 255 - mean) / std per channel."""

    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    color: str              # "L" (grayscale) or "RGB": how an image file is converted before resizing

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or not all(isinstance(s, int) and s > 0 for s in self.shape):
            raise SpecError(f"input shape {list(self.shape)}; expected [C, H, W] of positive integers")
        c = self.shape[0]
        if len(self.mean) != c or len(self.std) != c:
            raise SpecError(f"{len(self.mean)} means and {len(self.std)} stds for {c} channels")
        if not all(np.isfinite(self.mean)) or not all(np.isfinite(s) and s > 0 for s in self.std):
            raise SpecError(f"mean {list(self.mean)} / std {list(self.std)}: expected finite values, std > 0")
        if self.color not in COLORS or (self.color == "L") != (c == 1):
            raise SpecError(f"colour mode {self.color!r} for {c} channels; expected 'L' for 1, 'RGB' for 3")

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "mean": list(self.mean), "std": list(self.std), "color": self.color}

    @classmethod
    def from_dict(cls, d: dict, where: str = "input") -> "InputSpec":
        try:
            return cls(tuple(int(s) for s in d["shape"]), tuple(float(m) for m in d["mean"]),
                       tuple(float(s) for s in d["std"]), str(d["color"]))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, SpecError):
                raise SpecError(f"{where}: {exc}") from None
            raise SpecError(f"{where}: malformed input specification ({exc!r}); expected shape, mean, std, "
                            "color") from None

    def differences(self, other: "InputSpec", tol: float = 1e-6) -> list[str]:
        """Names of the fields on which the two disagree (normalisation within ``tol``)."""
        out = [f for f in ("shape", "color") if getattr(self, f) != getattr(other, f)]
        for f in ("mean", "std"):
            a, b = getattr(self, f), getattr(other, f)
            if len(a) != len(b) or not np.allclose(a, b, rtol=0, atol=tol):
                out.append(f)
        return out

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels in [0, 255] (uint8 or float, channels on axis -3) -> float32 model input."""
        shape = (-1, 1, 1)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(shape)
        std = np.asarray(self.std, dtype=np.float32).reshape(shape)
        return ((np.asarray(pixels, dtype=np.float32) / 255.0 - mean) / std).astype(np.float32)
