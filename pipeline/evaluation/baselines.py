"""The rows a report scores beside the generated set, so a reader can see what the metrics separate: a moment-matched
Gaussian, the same sampler on an untrained model, the chains' starts with no step taken, blurred real images, and
other generation runs (`--compare`). Chains come from the one sampling core with the run's own seeds."""

from __future__ import annotations

import torch

from ..common.config import EbdError, require
from ..io import storage
from ..io.image_shards import generated_manifest, read_generated
from ..sampling.core import chain_starts as core_chain_starts
from ..sampling.core import sample_latents
from ..sampling.settings import sampler_settings


def moment_matched_gaussian(data: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n samples of N(mean, cov) of `data` (N, ...): mean + X_c^T w / sqrt(N - 1) with w ~ N(0, I_N) has exactly
    that mean and covariance, without forming the D x D covariance (16k x 16k for Stable Diffusion latents)."""
    flat = data.flatten(1).double()
    mean = flat.mean(0)
    weights = torch.randn(n, len(flat), generator=generator, dtype=torch.float64)
    return (mean + weights @ (flat - mean) / (len(flat) - 1) ** 0.5).float().reshape(n, *data.shape[1:])


def compared_runs(folders: list[str], vae_info: dict, n: int, subset) -> dict:
    """Other generation runs of the same VAE, as {"folder (sampler)": latents, decoded images, chain starts}."""
    from ..models import load_model

    runs = {}
    for folder in folders:
        folder = storage.canonical(folder)
        manifest = generated_manifest(folder)
        if manifest["vae"].get("weights_sha256") != vae_info.get("weights_sha256"):
            raise EbdError(f"--compare {folder} was decoded by another VAE than the evaluated run: its images are "
                           "not comparable")
        name = f"{storage.name(folder)} ({sampler_settings(manifest['sampler']).name})"
        require(name not in runs, f"--compare names two runs {name}: give them folders of different names")
        model = load_model(manifest["model"]["path"])
        index = subset(manifest["images"], min(n, manifest["images"]))
        latents, images = read_generated(folder, index)
        runs[name] = {"latents": latents, "images": images,
                      "starts": chain_starts(model, manifest["sampler"], index.tolist(), manifest["seed"])}
    return runs


def chain_starts(trained, sampler: dict, indices: list[int], seed: int) -> torch.Tensor:
    """Where images `indices` of a run seeded `seed` started (a fitted Gaussian mixture, or plain noise): the very
    starts of those chains, with no step taken."""
    return core_chain_starts(trained, indices, seed, sampler_settings(sampler))


def untrained_samples(trained, sampler: dict, indices: list[int], seed: int) -> torch.Tensor:
    """The same chains (images `indices` of a run seeded `seed`: same starts, same noise) through the run's sampler
    on the model's architecture with fresh random weights, so only the learned energy differs."""
    model = trained.fresh_copy(seed)
    return sample_latents(model, indices, seed, sampler_settings(sampler), batch_size=256).latents


def blurred(images: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """Images down-sampled to 1/factor of their side and back (bilinear): real content with the detail removed."""
    from torch.nn import functional as F

    x = images.float()
    small = F.interpolate(x, scale_factor=1 / factor, mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False).round().clamp(0, 255).to(
        torch.uint8)
