"""Image decoding and preprocessing: bytes -> RGB uint8 array of `resolution` x `resolution`, or a rejection.

Every input is untrusted. In order:
1. the format must be on the allow-list (`DEFAULT_FORMATS`, widened by precompute's `image_formats`), told from the
   first bytes before any decoder runs: Pillow only tries the allowed plugins (a PostScript file named .png never
   reaches Ghostscript; a format Pillow knows but the list leaves out is `format_not_allowed`);
2. the pixel count is checked from the header, before any pixel is decoded, so a decompression bomb costs nothing,
   and so is the memory decoding will take: pixels x the decoder's measured bytes per pixel for that format and mode
   (`DECODE_BYTES_PER_PIXEL`, bench/hostile.md) against `max_decode_bytes`;
3. JPEGs decode at the smallest DCT scale that still covers the output (Pillow's draft), and high-bit-depth images are
   brought to 8 bits in integer arithmetic: decoding holds about max_pixels x 4 bytes at most, plus one 8-bit copy;
4. decode time is bounded by `max_decode_seconds` in two ways. A JPEG's time is predicted from its header before any
   pixel is decoded: a progressive JPEG decodes every scan over the whole image, and libjpeg does that work after its
   last byte is read, so scans x pixels x `JPEG_SECONDS_PER_SCAN_PIXEL` (measured, rounded up) must fit the limit, and
   more than `MAX_JPEG_SCANS` scans is refused outright (a real encoder writes about 10). Every other decoder pulls
   its input in blocks of 64 KiB through a reader that checks the clock before each block, so a slow item stops
   within one block of its limit (`decode_too_slow`);
5. EXIF orientation is applied before the crop, read as one tag (`exif_orientation`: the first IFD's entries, at most
   MAX_IFD_ENTRIES, nothing else of the block expanded, whatever its size); transparency is composited on white.
Whatever a decoder raises on one file (Pillow raises many types on hostile bytes) is that file's rejection, with the
exception's type in its detail; nothing escapes to fail the shard.
"""

from __future__ import annotations

import io
import struct
import sys
import time
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
MAX_JPEG_SCANS = 100  # libjpeg's progressive encoders write about 10; a real file never needs 100
# One scan over one pixel, on a busy 2-CPU machine: 0.4-4 ns measured (scan-repeating JPEGs of 2-8 megapixels), and
# 3 ns for a real 10-scan progressive photo; rounded up so a prediction never falls short.
JPEG_SECONDS_PER_SCAN_PIXEL = 5e-9
MAX_DECODE_BYTES = 1024 ** 3  # the memory one image's decoding may take (precompute's max_decode_bytes)
MAX_DECODE_SECONDS = 30.0  # the time one image's decoding may take (precompute's max_decode_seconds)
# Peak bytes per pixel while decoding and converting to 8-bit RGB, measured on 3000 x 3000 images in a fresh process
# (bench/hostile.py writes the table to bench/hostile.md), rounded up: Pillow's WebP decoder holds several RGBA
# copies; palettes with transparency and RGBA are composited on white; JPEGs decode at a draft scale, often far less.
DECODE_BYTES_PER_PIXEL = {"WEBP": 17.0, "transparent": 11.0, "alpha": 10.0, "wide": 8.0, "rgb": 5.0, "grey": 2.0}
ORIENTATION_TAG, MAX_IFD_ENTRIES = 0x0112, 1024  # a camera writes a few dozen entries in the first IFD
# EXIF orientation -> the transpose that displays the image as meant (the EXIF 2.3 table, as ImageOps.exif_transpose)
ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}


class Rejected(Exception):
    """An input the pipeline skips and records: `reason` is a stable code, `detail` a human sentence, `exception` the
    type of the error a decoder or reader raised (None when ebd refused the input itself)."""

    def __init__(self, reason: str, detail: str, exception: str | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.exception = reason, detail, exception


class _DeadlineReader(io.BytesIO):
    """The image's bytes, handed to the decoder only while its time lasts: Pillow's decoders pull their input block
    by block through `read`, so the clock is checked between blocks, inside the decode."""

    def __init__(self, data: bytes, seconds: float):
        super().__init__(data)
        self.size, self.seconds, self.deadline = len(data), seconds, time.monotonic() + seconds

    def read(self, n: int | None = -1) -> bytes:
        if time.monotonic() > self.deadline:
            raise Rejected("decode_too_slow", f"still decoding after {self.seconds:g} s (max_decode_seconds), "
                                              f"{self.tell()} of {self.size} bytes read")
        return super().read(n)


def sniff_format(head: bytes) -> str | None:
    """The format whose signature `head` (the first bytes) carries, by Pillow's own signature checks (no plugin
    parses anything); None when no format claims it."""
    Image.init()
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        try:
            if accept is not None and accept(head):
                return name
        except Exception:  # noqa: BLE001 - a signature check that cannot read a short header claims nothing
            continue
    return None


def decode_image(data: bytes, resolution: int, max_pixels: int, min_side: int,
                 formats: tuple[str, ...] | list[str] = DEFAULT_FORMATS,
                 max_decode_bytes: int = MAX_DECODE_BYTES,
                 max_decode_seconds: float = MAX_DECODE_SECONDS) -> tuple[np.ndarray, tuple[int, int]]:
    """Returns (resolution x resolution x 3 uint8 array, original (width, height) as displayed, after EXIF)."""
    if not data:
        raise Rejected("empty_file", "zero bytes")
    allowed = tuple(f.upper() for f in formats)
    found = sniff_format(data[:64])
    scans = 0
    if found is None:
        # a few formats (TGA) carry no signature: when allowed, only their readers try bytes no signature claims
        readers = tuple(f for f in allowed if f in Image.OPEN and Image.OPEN[f][1] is None)
        if not readers:
            raise Rejected("not_an_image", "no image format's signature")
    elif found in allowed or (found == "MPO" and "JPEG" in allowed):
        readers = (found,)
        # Start-of-scan markers: entropy-coded data stuffs every 0xFF with 0x00, so FF DA is only ever a marker.
        if found in ("JPEG", "MPO") and (scans := data.count(b"\xff\xda")) > MAX_JPEG_SCANS:
            raise Rejected("too_many_scans", f"a JPEG of {scans} scans > {MAX_JPEG_SCANS}: its decode time would have "
                                             "no bound")
    else:
        raise Rejected("format_not_allowed", f"{found} is not an allowed image format (allowed: "
                                             f"{', '.join(allowed)}; precompute's image_formats widens the list)")
    try:
        return _decode(_DeadlineReader(data, max_decode_seconds), resolution, max_pixels, min_side, readers,
                       max_decode_bytes, scans)
    except Rejected:
        raise
    except UnidentifiedImageError:  # the reader could not even parse the header
        if found is None:  # no signature, and no signature-less reader made sense of it
            raise Rejected("not_an_image", "no image format's signature") from None
        raise Rejected("corrupt_image", f"a {found} signature, but its header does not parse",
                       "UnidentifiedImageError") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Rejected("too_many_pixels", str(e)) from None
    except MemoryError:
        raise Rejected("too_large_to_decode", "decoding ran out of memory", "MemoryError") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure on one file is that file's rejection
        raise Rejected("corrupt_image", f"{type(e).__name__}: {_first_line(e)}", type(e).__name__) from None


def decode_bytes_estimate(img: Image.Image) -> float:
    """The peak memory decoding `img` (opened, not loaded) will take, from its format, mode and size."""
    if img.format == "WEBP":
        per_pixel = DECODE_BYTES_PER_PIXEL["WEBP"]
    elif img.mode in ("P", "PA") and ("transparency" in img.info or img.mode == "PA"):
        per_pixel = DECODE_BYTES_PER_PIXEL["transparent"]
    elif img.mode in ("RGBA", "RGBa", "LA", "La", "CMYK", "YCbCr", "LAB", "HSV"):
        per_pixel = DECODE_BYTES_PER_PIXEL["alpha"]
    elif img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        per_pixel = DECODE_BYTES_PER_PIXEL["wide"]
    elif img.mode in ("L", "1"):
        per_pixel = DECODE_BYTES_PER_PIXEL["grey"]
    else:
        per_pixel = DECODE_BYTES_PER_PIXEL["rgb"]
    return per_pixel * img.size[0] * img.size[1]


def _decode(source: _DeadlineReader, resolution: int, max_pixels: int, min_side: int, readers: tuple[str, ...],
            max_decode_bytes: int = MAX_DECODE_BYTES, jpeg_scans: int = 0):
    # Pillow's own bomb limit (89.5 megapixels by default) would otherwise refuse what a larger max_pixels allows
    Image.MAX_IMAGE_PIXELS = max(max_pixels, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # decoders warn about what is odd in a hostile file: it decodes or not
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(source, formats=readers)
        width, height = img.size
        if width * height > max_pixels:
            raise Rejected("too_many_pixels", f"{width}x{height} exceeds max_pixels={max_pixels}")
        if min(width, height) < min_side:
            raise Rejected("too_small", f"{width}x{height} is under min_side={min_side}")
        if (need_s := JPEG_SECONDS_PER_SCAN_PIXEL * jpeg_scans * width * height) > source.seconds:
            raise Rejected("too_slow_to_decode", f"a {width}x{height} JPEG of {jpeg_scans} scans takes about "
                                                 f"{need_s:.1f} s to decode > max_decode_seconds={source.seconds:g}")
        if (need := decode_bytes_estimate(img)) > max_decode_bytes:
            raise Rejected("too_large_to_decode", f"a {width}x{height} {img.format} {img.mode} image takes about "
                                                  f"{need / 2**20:.0f} MiB to decode > max_decode_bytes="
                                                  f"{max_decode_bytes / 2**20:.0f} MiB")
        img.seek(0)  # first frame of animated GIF/WebP
        if img.format in ("JPEG", "MPO"):
            img.draft("RGB", (resolution, resolution))  # decode at 1/2, 1/4 or 1/8 scale when that still covers it
        img.load()
        if (method := ORIENTATIONS.get(image_orientation(img))) is not None:
            img = img.transpose(method)
    shown = _displayed_size(img, (width, height))
    img = to_8bit(img)  # the full-size image at 8 bits (L, RGB): the high-bit-depth original can go
    fitted = ImageOps.fit(img, (resolution, resolution), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))
    return np.asarray(fitted.convert("RGB"), dtype=np.uint8), shown


def image_orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8) of an opened image, 1 when it has none: a TIFF's from the tags Pillow parsed at
    open, every other format's (JPEG's APP1, PNG's eXIf, WebP's EXIF chunk) from the raw block by `exif_orientation`.
    Pillow's getexif() would expand every tag of the block, which a small hostile file makes gigabytes."""
    tags = getattr(img, "tag_v2", None)
    if tags is not None:
        value = tags.get(ORIENTATION_TAG, 1)
        return value if isinstance(value, int) and 1 <= value <= 8 else 1
    raw = img.info.get("exif")
    return exif_orientation(raw) if isinstance(raw, bytes) else 1


def exif_orientation(raw: bytes) -> int:
    """The orientation tag of an EXIF block (a TIFF header and its first IFD, optionally after "Exif\\0\\0"), read
    as one tag: at most MAX_IFD_ENTRIES 12-byte entries are looked at, no value is expanded; 1 when it is absent,
    out of range or the block is broken (a broken block costs the orientation, not the image)."""
    if raw.startswith(b"Exif\x00\x00"):
        raw = raw[6:]
    order = {b"II": "<", b"MM": ">"}.get(raw[:2])
    if order is None or len(raw) < 8 or struct.unpack(order + "H", raw[2:4])[0] != 42:
        return 1
    ifd = struct.unpack(order + "I", raw[4:8])[0]
    if ifd + 2 > len(raw):
        return 1
    entries = min(struct.unpack(order + "H", raw[ifd:ifd + 2])[0], MAX_IFD_ENTRIES)
    for at in range(ifd + 2, min(ifd + 2 + 12 * entries, len(raw) - 11), 12):
        tag, kind, count = struct.unpack(order + "HHI", raw[at:at + 8])
        if tag == ORIENTATION_TAG:
            value = struct.unpack(order + "H", raw[at + 8:at + 10])[0] if kind == 3 and count >= 1 else 1
            return value if 1 <= value <= 8 else 1
    return 1


def _displayed_size(img: Image.Image, header: tuple[int, int]) -> tuple[int, int]:
    """The original size as displayed: the header's, swapped when EXIF rotated the image by 90 degrees (the draft
    scale is not a size the user ever saw)."""
    w, h = header
    rotated = img.size[0] != img.size[1] and (img.size[0] > img.size[1]) != (w > h)
    return (h, w) if rotated else (w, h)


def to_8bit(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit L (grayscale stays one channel until after the resize) or RGB: alpha composited on
    white, palettes and CMYK converted, 16-bit and float brought to 8 bits without a wider copy (the top byte of a
    16-bit sample, float32 arithmetic for float data)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img)
        top = float(arr.max(initial=0))
        if img.mode == "F":
            scale = 255.0 if top <= 1.0 else (1.0 if top <= 255 else 255.0 / 65535.0)
            eight = np.clip(arr.astype(np.float32) * scale + 0.5, 0, 255).astype(np.uint8)
        elif top <= 255:  # 8-bit values in a wider container
            eight = np.clip(arr, 0, 255).astype(np.uint8)
        elif arr.dtype.itemsize == 2:  # 16-bit samples: a view of their high bytes, copied once as uint8
            big_endian = arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and sys.byteorder == "big")
            eight = np.ascontiguousarray(arr.view(np.uint8).reshape(*arr.shape, 2)[..., 0 if big_endian else 1])
        else:  # 32-bit integers ("I"): clipped to 16 bits, then the top byte
            eight = (np.clip(arr, 0, 65535) >> 8).astype(np.uint8)
        del arr
        return Image.fromarray(eight)
    if img.mode == "L":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA"):
        img = img.convert("RGBA") if img.mode == "PA" else img
    if img.mode in ("RGBA", "RGBa", "LA", "La"):  # pasted through its own alpha onto white: one 8-bit copy
        grey = img.mode in ("LA", "La")
        background = Image.new("L" if grey else "RGB", img.size, 255 if grey else (255, 255, 255))
        background.paste(img if img.mode in ("RGBA", "LA") else img.convert("LA" if grey else "RGBA"), (0, 0),
                         img.getchannel("A"))
        return background
    return img if img.mode == "RGB" else img.convert("RGB")  # convert() to the same mode would copy it


def to_model_input(pixels: np.ndarray) -> np.ndarray:
    """uint8 H x W x 3 -> float32 3 x H x W in [-1, 1], the range Stable Diffusion's VAE was trained on."""
    return (pixels.astype(np.float32).transpose(2, 0, 1) / 127.5) - 1.0


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else ""
