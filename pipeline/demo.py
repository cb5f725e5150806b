"""Demo assets made by the project, so nothing is downloaded: a procedural labelled image set and a small VAE.

Images: coloured shapes (circle, square, triangle, cross, ring, diamond) on varied backgrounds (flat, gradient,
stripes, checker), generated deterministically from (seed, index), ~2000 images/s on one core. They are written as
webdataset tars (`shapes-000000.tar`: KEY.png, KEY.cls with the shape's name, KEY.json with both factors
{"shape", "background"}), the img2dataset layout precompute reads (`label_fields: [shape, background]` keeps both).
Patterns are at least 8 px wide, so a VAE with Stable Diffusion's 8x down-sampling can represent them.

VAE: a diffusers AutoencoderKL saved in the layout of a Stable Diffusion checkpoint (`DIR/vae/`,
`DIR/model_index.json`), so it is loaded by exactly the code path a real SD checkpoint goes through. Tests use a
random one (`write_sd_style_vae`); the demo ships one fitted to these images (`jobs/fit_vae.py`, `models/demo/`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .common.config import JobConfig, require

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
BACKGROUNDS = ("flat", "gradient", "stripes", "checker")


def render_shape_image(index: int, size: int = 64, seed: int = 0, draw_shape: bool = True) -> tuple[Image.Image, str]:
    """Image `index` of the demo set and its label; the same (index, size, seed) always gives the same pixels.
    `draw_shape=False` gives the same image's background alone (a degraded set for tests of the evaluation)."""
    rng = np.random.default_rng([seed, index])
    shape = SHAPES[index % len(SHAPES)]
    img = _background(rng, size)
    if not draw_shape:
        return img, shape
    draw = ImageDraw.Draw(img)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    r = size * rng.uniform(0.18, 0.32)
    cx, cy = size * rng.uniform(0.35, 0.65, 2)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "cross":
        w = r / 3
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(r / 3)))
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    return img, shape


def demo_labels(index: int, seed: int = 0) -> dict[str, str]:
    """Both factors of image `index`: {"shape": ..., "background": ...} (the background is the first draw of the
    image's generator, as render_shape_image makes it)."""
    kind = BACKGROUNDS[int(np.random.default_rng([seed, index]).integers(len(BACKGROUNDS)))]
    return {"shape": SHAPES[index % len(SHAPES)], "background": kind}


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    a, b = rng.integers(0, 256, (2, 3)).astype(np.float32)
    if kind == "flat":
        arr = np.broadcast_to(a, (size, size, 3))
    elif kind == "gradient":
        t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
        arr = np.broadcast_to(a * (1 - t) + b * t, (size, size, 3))
    else:
        period = int(rng.integers(8, 17))
        yy, xx = np.mgrid[0:size, 0:size]
        mask = (yy // period) % 2 if kind == "stripes" else ((yy // period) + (xx // period)) % 2
        arr = np.where(mask[..., None] == 1, a, b)
    return Image.fromarray(np.ascontiguousarray(arr).astype(np.uint8), "RGB")


def _has_labels(path: Path) -> bool:
    import tarfile

    if not path.exists():
        return False
    with tarfile.open(path) as tar:
        return any(name.endswith(".json") for name in tar.getnames())


@dataclass(frozen=True)
class DemoAssetsConfig(JobConfig):
    output: str | None = None                    # folder for the images (OUTPUT/images) and their labels
    num_images: int = 10000                      # images to render
    size: int = 64                               # image side in pixels
    seed: int = 0                                # random seed

    def validate(self) -> None:
        require(self.output is not None, "missing output: pass --output or set it in the config")
        require(self.num_images >= 1 and self.size >= 16, "num_images must be >= 1 and size >= 16")


def write_demo_images(folder: str | Path, count: int, size: int = 64, seed: int = 0,
                      images_per_shard: int = 1000) -> list[Path]:
    """Writes images [0, count) as `folder/shapes-NNNNNN.tar` (KEY.png, KEY.cls, KEY.json), atomically. A shard
    already there is kept (unless it predates KEY.json): the set is deterministic, so a re-run only fills in what is
    missing. Returns the shard
    paths."""
    from .io.image_shards import png_bytes
    from .io.tars import write_tar

    folder = Path(folder)
    paths = []
    for shard, start in enumerate(range(0, count, images_per_shard)):
        path = folder / f"shapes-{shard:06d}.tar"
        if not _has_labels(path):  # absent, or written before the images carried KEY.json (both factors)
            samples = []
            for i in range(start, min(start + images_per_shard, count)):
                img, label = render_shape_image(i, size, seed)
                samples.append({"__key__": f"{label}_{i:06d}", "png": png_bytes(np.asarray(img)),
                                "cls": label.encode(), "json": json.dumps(demo_labels(i, seed)).encode()})
            write_tar(path, samples)
        paths.append(path)
    return paths


def write_sd_style_vae(folder: str | Path, seed: int = 0, **config) -> Path:
    """Saves a randomly initialised AutoencoderKL (`vae.autoencoder_config(**config)`) as `folder/vae/` of a Stable
    Diffusion-layout checkpoint."""
    import torch
    from diffusers import AutoencoderKL

    from .vae.autoencoder import autoencoder_config, save_sd_checkpoint

    torch.manual_seed(seed)
    save_sd_checkpoint(AutoencoderKL(**autoencoder_config(**config)), folder)
    return Path(folder)


def write_tiny_decoder(folder: str | Path, vae: str | Path, seed: int = 0, **config) -> Path:
    """Saves a randomly initialised AutoencoderTiny (diffusers' defaults are the TAESD architecture; `config`
    changes them, e.g. two decoder blocks for a VAE that down-samples 2x) to `folder`, paired with the VAE in
    `vae` (see jobs.pair_decoder)."""
    import torch
    from diffusers import AutoencoderTiny

    from .vae.autoencoder import pair_decoder, resolve_vae

    torch.manual_seed(seed)
    AutoencoderTiny(**config).save_pretrained(folder, safe_serialization=True)
    pair_decoder(folder, resolve_vae(vae))
    return Path(folder)
