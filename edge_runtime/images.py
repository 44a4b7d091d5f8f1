"""Image bytes -> the float32 tensor a bundle's manifest asks for, with limits."""

from __future__ import annotations

import io
import warnings

import numpy as np

from hierarchy.errors import HmoeError
from hierarchy.spec import InputSpec

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_PIXELS = 4096 * 4096
MAX_SIDE = 8192          # a 1 x 16,000,000 image is within MAX_PIXELS but costs seconds to decode
FORMATS = ("PNG", "JPEG")
MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I")


class ImageError(HmoeError, ValueError):
    """Bytes that are not an acceptable image; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def decode_image(data: bytes, spec: InputSpec, max_bytes: int = MAX_BODY_BYTES,
                 max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode PNG/JPEG bytes into the (C, H, W) float32 model input ``spec`` describes."""
    return spec.normalize(decode_pixels(data, spec, max_bytes, max_pixels))


def decode_pixels(data: bytes, spec: InputSpec, max_bytes: int = MAX_BODY_BYTES,
                  max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode PNG/JPEG bytes into (C, H, W) float32 pixels in [0, 255], converted and resized per ``spec``."""
    from PIL import Image, UnidentifiedImageError
    if not data:
        raise ImageError("empty body; expected the bytes of a PNG or JPEG image", 400)
    if len(data) > max_bytes:
        raise ImageError(f"image of {len(data)} bytes; the limit is {max_bytes}", 413)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            if im.format not in FORMATS:
                raise ImageError(f"a {im.format} image; expected PNG or JPEG", 415)
            w, h = im.size
            if w * h > max_pixels or max(w, h) > MAX_SIDE:
                raise ImageError(f"image of {w}x{h} pixels; the limit is {max_pixels} pixels and {MAX_SIDE} "
                                 "on a side", 413)
            if im.mode not in MODES:
                raise ImageError(f"image mode {im.mode!r} has an unsupported channel layout; expected "
                                 "grayscale, RGB or RGBA", 422)
            im.load()
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"not a readable PNG or JPEG image ({exc.__class__.__name__})", 415) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"corrupt or truncated image ({exc})", 422) from None
    return to_pixels(im, spec)


def to_pixels(im, spec: InputSpec) -> np.ndarray:
    """A PIL image -> (C, H, W) float32 pixels in the spec's colour mode and size."""
    from PIL import Image
    c, h, w = spec.shape
    mode = spec.color
    if im.mode in ("I;16", "I"):
        im = Image.fromarray((np.asarray(im, dtype=np.float64) / 256).clip(0, 255).astype(np.uint8))
    im = im.convert(mode)
    if im.size != (w, h):
        im = im.resize((w, h), Image.BILINEAR)
    arr = np.asarray(im, dtype=np.float32)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    if arr.shape[0] != c:
        raise ImageError(f"image gives {arr.shape[0]} channels; the bundle expects {c}", 422)
    return arr
