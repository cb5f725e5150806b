"""Image decoding and preprocessing: bytes -> RGB uint8 array of `resolution` x `resolution`, or a rejection.

Order matters: the pixel limit is checked from the header, before any pixel is decoded, so a decompression bomb
costs nothing; EXIF orientation is applied before the crop; transparency is composited on white.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class Rejected(Exception):
    """An input the pipeline skips and records: `reason` is a stable code, `detail` a human sentence."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def decode_image(data: bytes, resolution: int, max_pixels: int, min_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Returns (resolution x resolution x 3 uint8 array, original (width, height) as displayed, after EXIF)."""
    if not data:
        raise Rejected("empty_file", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise Rejected("too_many_pixels", f"{width}x{height} exceeds max_pixels={max_pixels}")
            img.seek(0)  # first frame of animated GIF/WebP
            img.load()
    except Rejected:
        raise
    except UnidentifiedImageError:
        raise Rejected("not_an_image", "not a decodable image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Rejected("too_many_pixels", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated or corrupt data
        raise Rejected("corrupt_image", f"{type(e).__name__}: {e}") from None
    if min(width, height) < min_side:
        raise Rejected("too_small", f"{width}x{height} is under min_side={min_side}")
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block costs the orientation, not the image  # noqa: BLE001
        pass
    rgb = to_rgb(img)
    fitted = ImageOps.fit(rgb, (resolution, resolution), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))
    return np.asarray(fitted, dtype=np.uint8), rgb.size


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: alpha composited on white, palette/CMYK/16-bit/float/grayscale converted."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max(initial=0)
        peak = 1.0 if img.mode == "F" and top <= 1.0 else (255.0 if top <= 255 else 65535.0)
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def to_model_input(pixels: np.ndarray) -> np.ndarray:
    """uint8 H x W x 3 -> float32 3 x H x W in [-1, 1], the range Stable Diffusion's VAE was trained on."""
    return (pixels.astype(np.float32).transpose(2, 0, 1) / 127.5) - 1.0
