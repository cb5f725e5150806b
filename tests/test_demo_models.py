"""The models shipped in models/demo/ do what their cards claim, checked on images they never saw."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline.demo import render_shape_image
from pipeline.ebm import EnergyModel
from pipeline.evaluate import decode_images, moment_matched_gaussian
from pipeline.langevin import sample
from pipeline.quality import density_coverage, pool_latents
from pipeline.shards import file_sha256
from pipeline.vae import encode, load_vae, resolve_vae
from pipeline.vae_fit import to_unit_range
from tests.conftest import REPO

DEMO = REPO / "models" / "demo"


def render(indices, seed: int = 0) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(render_shape_image(i, 64, seed)[0])) for i in indices]
                       ).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def vae():
    return load_vae(resolve_vae(DEMO), torch.device("cpu"), torch.float32)


def test_the_demo_vae_reconstructs_unseen_images_recognisably(vae):
    """Images rendered with another seed: each reconstruction is nearest to its own original among 256, and the
    PSNR is near the figure the fit recorded on its held-out images."""
    record = json.loads((DEMO / "fit_vae.json").read_text())
    assert file_sha256(DEMO / "vae" / "diffusion_pytorch_model.safetensors") == record["weights_sha256"]
    originals = render(range(256), seed=1)
    with torch.no_grad():
        out = vae.decode(vae.encode(to_unit_range(originals)).latent_dist.mode()).sample.clamp(-1, 1)
    recon = ((out + 1) * 127.5).round()
    psnr = 10 * math.log10(255 ** 2 / (recon - originals.float()).pow(2).mean().item())
    assert psnr > record["held_out_psnr_db"] - 1.5, (psnr, record["held_out_psnr_db"])
    nearest = torch.cdist(recon.flatten(1), originals.float().flatten(1)).argmin(1)
    assert (nearest == torch.arange(256)).float().mean().item() >= 0.95


def test_the_demo_ebm_meets_the_quality_bar_on_held_out_images(vae):
    """Latents of the held-out demo images (the last shard of 1000, never trained on) against 1000 samples of the
    shipped EBM under its own sampler, as its model card reports: on pooled latents (4 x 4 x 4) and on decoded images
    (16 x 16), density and coverage >= 0.7 and above a moment-matched Gaussian's."""
    model = EnergyModel.from_pretrained(DEMO / "ebm")
    assert model.metadata["latents"]["vae"]["weights_sha256"] == resolve_vae(DEMO).weights_sha256()
    assert [s["file"] for s in model.metadata["latents"]["held_out"]] == ["latents-000009.tar"]

    def latents(indices):
        pixels = render(indices)
        return torch.cat([encode(vae, to_unit_range(pixels[a:a + 250]), seeds=list(range(a, a + 250)))[0]
                          for a in range(0, len(pixels), 250)])

    def images(z):
        return pool_latents(decode_images(vae, z).float() / 255, 16).flatten(1)

    real, train = latents(range(9000, 10000)), latents(range(0, 2000))
    generators = [torch.Generator().manual_seed(i) for i in range(1000)]
    fake = torch.cat([sample(model, 250, tuple(model.config.latent_shape), model.sampler, generators[a:a + 250])
                      for a in range(0, 1000, 250)])
    gaussian = moment_matched_gaussian(train, 1000, torch.Generator().manual_seed(0))

    ours, baseline = density_coverage(images(real), images(fake)), density_coverage(images(real), images(gaussian))
    assert ours["density"] >= 0.7 and ours["coverage"] >= 0.7, ours
    assert ours["density"] > baseline["density"] and ours["coverage"] > baseline["coverage"], (ours, baseline)

    pooled = lambda z: pool_latents(z, 4).flatten(1)  # noqa: E731
    ours, baseline = density_coverage(pooled(real), pooled(fake)), density_coverage(pooled(real), pooled(gaussian))
    assert ours["density"] >= 0.7 and ours["coverage"] >= 0.7, ours
    assert ours["density"] > baseline["density"] and ours["coverage"] > baseline["coverage"], (ours, baseline)
