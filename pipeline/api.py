"""The Python front door, in the diffusers idiom: load a model and its VAE from folders, get images.

    from pipeline import EBDPipeline
    pipe = EBDPipeline.from_pretrained("models/demo")       # the VAE in vae/, the model named in model_index.json
    out = pipe(num_images=16, seed=0)                        # out.images (PIL), out.latents, out.energies, out.keys

Image i of seed s is the image `jobs.generate --seed s` writes under key out.keys[i]: the same chain seed, the same
sampler, the same decoder. `generated_dataset(...)` gives the generation DAG's rows as a Ray Dataset, for users who
compose their own Ray Data pipelines. No Ray is needed for the pipeline object.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common.config import EbdError, require

log = logging.getLogger(__name__)
INDEX_FILE = "model_index.json"
DEFAULT_MODEL = "ebm"


@dataclass
class EBDOutput:
    images: list            # PIL images (output_type "pil") or uint8 arrays H x W x 3 ("np"); empty for "latent"
    latents: torch.Tensor   # (N, C, h, w), scaled as the model and the latent shards are
    energies: torch.Tensor  # (N,), the energy generation records (NaN for a model without one)
    keys: list[str]         # the keys jobs.generate gives these images


class EBDPipeline:
    """A model (any kind `load_model` knows) and the VAE whose latents it learned; `decoder`, a tiny decoder folder
    paired with that VAE, decodes instead of the VAE's own decoder."""

    def __init__(self, model, vae_spec, device: torch.device | str | None = None, vae_dtype: str = "auto",
                 decoder: str | Path | None = None):
        from .vae.autoencoder import load_vae, pick_device, resolve_decoder, resolve_dtype

        model.check_vae(vae_spec, vae_spec.path)
        self.model, self.vae_spec = model.eval(), vae_spec
        self.device = torch.device(device) if device is not None else pick_device(True)
        decoder_spec = resolve_decoder(decoder, vae_spec)
        self.vae = load_vae(decoder_spec, self.device, resolve_dtype(vae_dtype, self.device, decoder_spec))

    @classmethod
    def from_pretrained(cls, folder: str | Path, model: str | Path | None = None, vae: str | Path | None = None,
                        device: torch.device | str | None = None, vae_dtype: str = "auto",
                        decoder: str | Path | None = None) -> "EBDPipeline":
        """`folder`: a Stable Diffusion-layout folder with vae/ and the model in the subfolder its model_index.json
        names under "ebm" (models/demo). `model=` / `vae=` point elsewhere (`model` relative to `folder`, or a
        path)."""
        from .models import load_model
        from .vae.autoencoder import resolve_vae

        root = Path(folder)
        require(root.is_dir(), f"{root} is not a folder")
        if model is None:
            index = root / INDEX_FILE
            names = json.loads(index.read_text()) if index.is_file() else {}
            model = DEFAULT_MODEL if DEFAULT_MODEL in names or (root / DEFAULT_MODEL).is_dir() else None
            require(model is not None, f"{root} names no model (model_index.json has no {DEFAULT_MODEL!r}): pass "
                                       "model=FOLDER")
        model_dir = root / model if not Path(model).is_absolute() and (root / model).is_dir() else Path(model)
        return cls(load_model(model_dir), resolve_vae(vae if vae is not None else root), device, vae_dtype, decoder)

    @torch.no_grad()
    def __call__(self, num_images: int = 1, seed: int = 0, start: int = 0, sampler: dict[str, Any] | None = None,
                 batch_size: int = 64, output_type: str = "pil", callback=None,
                 condition: str | None = None) -> EBDOutput:
        """Images start .. start + num_images - 1 of run seed `seed`, sampled with the model's own sampler (`sampler`
        changes keys of it, as `--set sampler=...` does); `callback` is the samplers' per-evaluation hook;
        `condition` (a conditional model) e.g. "shape=ring AND NOT background=stripes" for every image."""
        from PIL import Image

        from .sampling.conditions import canonical, check_condition, parse_condition
        from .sampling.core import sample_latents
        from .sampling.noise import image_key
        from .vae.autoencoder import decode, to_uint8

        require(num_images >= 1 and start >= 0 and batch_size >= 1, "num_images, batch_size >= 1 and start >= 0")
        require(output_type in ("pil", "np", "latent"), "output_type must be pil, np or latent")
        settings = self.model.resolve_sampler(sampler or {})
        if condition is not None:
            condition = canonical(condition)
            check_condition(parse_condition(condition), self.model.label_vocabulary)
        indices, done = range(start, start + num_images), [0]

        def progress(n: int, _seconds: float) -> None:
            done[0] += n
            log.info("sampled %d of %d images", done[0], num_images)

        samples = sample_latents(self.model, indices, seed, settings,
                                 None if condition is None else [condition] * num_images, batch_size, callback,
                                 on_chunk=progress)
        images = []
        for a in range(0, num_images, batch_size) if output_type != "latent" else ():
            pixels = to_uint8(decode(self.vae, samples.latents[a:a + batch_size])).permute(0, 2, 3, 1).cpu().numpy()
            images += [Image.fromarray(p) if output_type == "pil" else p for p in pixels]
        return EBDOutput(images, samples.latents, samples.energies, [image_key(seed, i) for i in indices])


def generated_dataset(model: str, vae: str, num_images: int, seed: int = 0, **settings: Any):
    """The generation DAG (sampler actors -> decoder actors) as a Ray Dataset of image rows {key, seed, image (uint8
    H x W x 3), latent, energy}, for users who compose their own Ray Data pipelines; nothing is written. `settings`
    are jobs.generate's config keys (images_per_shard, sampler, batch_size, sampler_actors, decoder_actors, ...);
    batch sizes default to 64 rather than a memory probe. Runs on the connected Ray cluster (ray.init first)."""
    from .common.config import from_dict
    from .distributed.generation import GenerateConfig, decoded_shards, resolve_decoder_gpus, run_plan
    from .models import load_model
    from .vae.autoencoder import resolve_decoder, resolve_vae

    cfg = from_dict(GenerateConfig, {"model": str(model), "vae": str(vae), "output": "unused",
                                     "num_images": num_images, "seed": seed} | settings)
    spec, loaded = resolve_vae(cfg.vae), load_model(cfg.model)
    loaded.check_vae(spec, cfg.vae)
    sampler = asdict(loaded.resolve_sampler(cfg.sampler))
    size = cfg.batch_size or 64
    batch_sizes = {"sampler": cfg.sampler_batch_size or size, "decode": cfg.decode_batch_size or size}
    shards = list(range((num_images + cfg.images_per_shard - 1) // cfg.images_per_shard))
    decoded = decoded_shards(cfg, shards, sampler, resolve_decoder(cfg.decoder, spec), resolve_decoder_gpus(cfg),
                             batch_sizes, run_plan(cfg, loaded))
    return decoded.flat_map(lambda row: _image_rows(row, cfg.seed, cfg.images_per_shard))


def _image_rows(row: dict, seed: int, images_per_shard: int) -> list[dict]:
    from .sampling.noise import image_key

    info = json.loads(row["info"])
    n = info["count"]
    pixels = np.frombuffer(row["images"], dtype=np.uint8).reshape(n, *info["image_shape"])
    latents = np.frombuffer(row["latents"], dtype=np.float32).reshape(n, *info["latent_shape"])
    start = int(row["shard"]) * images_per_shard
    conditions = info.get("conditions") or [None] * n
    return [{"key": image_key(seed, start + i), "seed": info["seeds"][i], "image": pixels[i], "latent": latents[i],
             "energy": float(info["energy"][i])} | ({"condition": conditions[i]} if conditions[i] else {})
            for i in range(n)]


__all__ = ["EBDPipeline", "EBDOutput", "generated_dataset", "EbdError"]
