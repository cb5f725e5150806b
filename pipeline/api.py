"""The Python front door: a diffusers pipeline (`DiffusionPipeline`) over an ebd model and the VAE it learned.

    from pipeline import EBDPipeline
    pipe = EBDPipeline.from_pretrained("models/demo").to("cpu")  # the VAE in vae/, the model model_index.json names
    out = pipe(num_images=16, generator=torch.Generator().manual_seed(0))
    out.images                                                     # PIL; out.latents, out.energies, out.image_keys

Image i of seed s is the image `jobs.generate --seed s` writes under key out.image_keys[i]: the same chain seed, the
same sampler, the same decoder. diffusers' own loader opens the same folder (the folder ships the two small files that
name ebd's classes): `DiffusionPipeline.from_pretrained("models/demo", trust_remote_code=True)`.
`generated_dataset(...)` gives the generation DAG's rows as a Ray Dataset, for users who compose their own Ray Data
pipelines. No Ray is needed for the pipeline object.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from .common.config import EbdError, require
from .io.pipeline_folder import INDEX_FILE, MODEL_DIR, write_pipeline_index


@dataclass
class EBDOutput(BaseOutput):
    images: list            # PIL images (output_type "pil") or uint8 arrays H x W x 3 ("np"); empty for "latent"
    latents: torch.Tensor   # (N, C, h, w), scaled as the model and the latent shards are
    energies: torch.Tensor  # (N,), the energy generation records (NaN for a model without one)
    image_keys: list[str]   # the keys jobs.generate gives these images (`keys` is a dict method: BaseOutput is one)


class EBDPipeline(DiffusionPipeline):
    """Components: `vae` (the AutoencoderKL whose latents the model learned, or a tiny decoder paired with it) and
    `ebm` (any model kind `load_model` knows); config: `sampler`, changes to the model's own sampler settings (what
    `--set sampler.KEY=...` changes for jobs.generate). The model stays float32 whatever `torch_dtype` the VAE gets:
    the samplers' small steps need it."""

    model_cpu_offload_seq = "ebm->vae"

    def __init__(self, vae, ebm, sampler: dict | None = None):
        super().__init__()
        self.register_modules(vae=vae, ebm=ebm)
        self.register_to_config(sampler=dict(sampler or {}))
        ebm.resolve_sampler(self.config.sampler)  # a bad key or value: one line now, not at the first call

    @property
    def model(self):
        return self.ebm

    @classmethod
    def from_pretrained(cls, folder: str | Path, model: str | Path | None = None, vae: str | Path | None = None,
                        device: torch.device | str | None = None, torch_dtype: torch.dtype | str | None = "auto",
                        decoder: str | Path | None = None, sampler: dict | None = None) -> "EBDPipeline":
        """`folder`: a Stable Diffusion-layout folder with vae/ and the model in the subfolder its model_index.json
        names under "ebm" (models/demo). `model=` / `vae=` point elsewhere (`model` relative to `folder`, or a
        path); `decoder=`, a tiny decoder folder paired with the VAE, decodes instead of the VAE's own decoder.
        `torch_dtype` is the VAE's ("auto": float16 on CUDA unless the VAE's config forbids it, else float32)."""
        from .models import load_model
        from .vae.autoencoder import load_vae, pick_device, resolve_decoder, resolve_dtype, resolve_vae

        root = Path(folder)
        require(root.is_dir(), f"{root} is not a folder")
        if model is None:
            index = root / INDEX_FILE
            names = json.loads(index.read_text()) if index.is_file() else {}
            model = MODEL_DIR if MODEL_DIR in names or (root / MODEL_DIR).is_dir() else None
            require(model is not None, f"{root} names no model (model_index.json has no {MODEL_DIR!r}): pass "
                                       "model=FOLDER")
        model_dir = root / model if not Path(model).is_absolute() and (root / model).is_dir() else Path(model)
        ebm = load_model(model_dir)
        spec = resolve_vae(vae if vae is not None else root)
        ebm.check_vae(spec, spec.path)
        device = torch.device(device) if device is not None else pick_device(True)
        decoder_spec = resolve_decoder(decoder, spec)
        dtype = (resolve_dtype(torch_dtype, device, decoder_spec) if isinstance(torch_dtype, str)
                 else torch_dtype or torch.float32)
        return cls(load_vae(decoder_spec, device, dtype), ebm.to(device), sampler)

    def save_pretrained(self, save_directory: str | Path, **_unused) -> None:
        """Writes vae/, ebm/ (config.json + model.safetensors) and model_index.json, with the two files that let
        diffusers' own loader open the folder (`DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`)."""
        root = Path(save_directory)
        self.vae.save_pretrained(root / "vae", safe_serialization=True)
        self.ebm.save_pretrained(root / MODEL_DIR)
        write_pipeline_index(root, vae=["diffusers", type(self.vae).__name__],
                             **{MODEL_DIR: ["", type(self.ebm).__name__]}, sampler=self.config.sampler)

    def to(self, *args, **kwargs):
        """diffusers' `to` (device and/or dtype), with the model kept in float32 (see the class docstring)."""
        super().to(*args, **kwargs)
        self.ebm.float()
        return self

    @torch.no_grad()
    def __call__(self, num_images: int = 1, generator: torch.Generator | list[torch.Generator] | None = None, *,
                 seed: int | None = None, start: int = 0, sampler: dict[str, Any] | None = None,
                 batch_size: int = 64, output_type: str = "pil", return_dict: bool = True, callback=None,
                 condition: str | None = None) -> EBDOutput | tuple:
        """Images start .. start + num_images - 1 of a run seed, sampled with the model's own sampler (the pipeline's
        `sampler` config and then `sampler` here change keys of it).

        The run seed: `seed`, else `generator.initial_seed()` (one generator: image i is `jobs.generate --seed S`'s
        image i), else 0. A list of generators, one per image, seeds each image on its own: image j is image
        `start` of run seed generators[j].initial_seed(). `callback(info)` sees every network evaluation;
        `condition` (a conditional model), e.g. "shape=ring AND NOT background=stripes", applies to every image."""
        from PIL import Image

        from .sampling.conditions import canonical, check_condition, parse_condition
        from .sampling.core import sample_latents
        from .sampling.noise import image_key
        from .vae.autoencoder import decode, to_uint8

        require(num_images >= 1 and start >= 0 and batch_size >= 1, "num_images, batch_size >= 1 and start >= 0")
        require(output_type in ("pil", "np", "latent"), "output_type must be pil, np or latent")
        if isinstance(generator, list):
            require(len(generator) == num_images, f"{len(generator)} generators for {num_images} images: pass one "
                                                  "per image, or one for all")
            seeds = [int(g.initial_seed()) for g in generator]
            indices = [start] * num_images
        else:
            seeds = seed if seed is not None else int(generator.initial_seed()) if generator is not None else 0
            indices = list(range(start, start + num_images))
        settings = self.ebm.resolve_sampler({**self.config.sampler, **(sampler or {})})
        if condition is not None:
            condition = canonical(condition)
            check_condition(parse_condition(condition), self.ebm.label_vocabulary)

        device = next(self.ebm.parameters()).device
        bar = self.progress_bar(total=math.ceil(num_images / batch_size) * settings.gradient_evaluations())

        def step(info: dict) -> None:
            bar.update(1)
            if callback is not None:
                callback(info)

        with bar:
            samples = sample_latents(self.ebm, indices, seeds, settings,
                                     None if condition is None else [condition] * num_images, batch_size, step,
                                     device=device)
        images = []
        for a in range(0, num_images, batch_size) if output_type != "latent" else ():
            pixels = to_uint8(decode(self.vae, samples.latents[a:a + batch_size])).permute(0, 2, 3, 1).cpu().numpy()
            images += [Image.fromarray(p) if output_type == "pil" else p for p in pixels]
        run_seeds = seeds if isinstance(seeds, list) else [seeds] * num_images
        out = EBDOutput(images, samples.latents.cpu(), samples.energies.cpu(),
                        [image_key(s, i) for s, i in zip(run_seeds, indices)])
        return out if return_dict else out.to_tuple()


def generated_dataset(model: str, vae: str, num_images: int, seed: int = 0, **settings: Any):
    """The generation DAG (sampler actors -> decoder actors) as a Ray Dataset of image rows {key, seed, image (uint8
    H x W x 3), latent, energy}, for users who compose their own Ray Data pipelines; nothing is written. `settings`
    are jobs.generate's config keys (images_per_shard, sampler, batch_size, sampler_actors, decoder_actors, ...);
    batch sizes default to 64 rather than a memory probe. Runs on the connected Ray cluster (ray.init first)."""
    from .common.config import from_dict
    from .generation import GenerateConfig
    from .generation.config import with_plan
    from .generation.dag import decoded_shards, place_stages
    from .generation.job import run_plan
    from .generation.probes import sampler_precision
    from .models import load_model
    from .vae.autoencoder import resolve_decoder, resolve_vae

    cfg = with_plan(from_dict(GenerateConfig, {"model": str(model), "vae": str(vae), "output": "unused",
                                               "num_images": num_images, "seed": seed} | settings))
    spec, loaded = resolve_vae(cfg.vae), load_model(cfg.model)
    loaded.check_vae(spec, cfg.vae)
    sampler = loaded.resolve_sampler(cfg.sampler)
    size = cfg.batch_size or 64
    batch_sizes = {"sampler": cfg.sampler_batch_size or size, "decode": cfg.decode_batch_size or size}
    shards = list(range((num_images + cfg.images_per_shard - 1) // cfg.images_per_shard))
    decoder = resolve_decoder(cfg.decoder, spec)
    placement = place_stages(cfg, loaded, sampler, decoder, len(shards))
    decoded = decoded_shards(cfg, shards, sampler, decoder, placement, batch_sizes,
                             precision=sampler_precision(cfg, placement), plan=run_plan(cfg, loaded))
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
