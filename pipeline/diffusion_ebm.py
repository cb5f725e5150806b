"""A noise-conditional energy E_theta(z, sigma) over scaled VAE latents, trained by denoising score matching.

    E(z, sigma) = ||z||^2 / (2 (s^2 + sigma^2)) + (sqrt(s^2 + sigma^2) / sigma) <u, g_theta(u, sigma)>,
    u = z / sqrt(s^2 + sigma^2)

s is the data's standard deviation. The first term is the exact energy of N(0, (s^2 + sigma^2) I): the density of
data-scaled noise at the top level, so sampling from plain Gaussian noise starts where the model is right. The
second is a scalar learned residual: g_theta is a diffusers UNet2DModel (noise-level embedding added inside every
block, the way diffusion networks add the time embedding) whose last convolution starts at zero, so an untrained
energy is exactly that Gaussian. The factors make sigma * grad_z E an epsilon prediction of unit scale at every
level (Salimans & Ho 2021: an energy parameterisation matches a score one), while keeping a scalar energy that
Metropolis tests and (later) composition need. Sampling: `langevin.heun` / `langevin.ancestral` along a Karras
schedule, settings saved with the weights.

`context_dim` is reserved for conditioning: the UNet's class embedding is added to the noise-level embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .config import require
from .diffusion_unet import latent_unet, validate_latent_unet
from .langevin import initial_noise
from .models import PretrainedModel


@dataclass
class NoiseConditionalEnergyConfig:
    latent_shape: list[int] = field(default_factory=lambda: [4, 64, 64])   # C, h, w of the scaled latents
    channels: list[int] = field(default_factory=lambda: [64, 128, 256])   # UNet stage widths (one down/up each)
    layers_per_block: int = 1
    norm_groups: int = 16
    sigma_data: float = 1.0          # s: the training latents' standard deviation
    sigma_min: float = 0.002         # the noise range trained on; the sampler's schedule spans it
    sigma_max: float = 80.0
    num_classes: int | None = None   # reserved for conditioning: a class embedding added to the noise embedding

    def validate(self) -> None:
        validate_latent_unet(self.latent_shape, self.channels, self.layers_per_block, self.norm_groups)
        require(self.sigma_data > 0 and 0 < self.sigma_min < self.sigma_max, "need sigma_data > 0 and "
                "0 < sigma_min < sigma_max")


class NoiseConditionalEnergy(PretrainedModel):
    CONFIG, FORMAT = NoiseConditionalEnergyConfig, "ebd.nce/1"

    def __init__(self, config: NoiseConditionalEnergyConfig, metadata: dict | None = None):
        super().__init__(config, metadata)
        # No attention blocks: scaled-dot-product attention has no double backward on CPU, and DSM needs one.
        self.net = latent_unet(config.latent_shape, config.channels, config.layers_per_block, config.norm_groups,
                               attention=False, num_classes=config.num_classes)
        torch.nn.init.zeros_(self.net.conv_out.weight)   # g = 0: the untrained energy is the Gaussian base
        torch.nn.init.zeros_(self.net.conv_out.bias)

    def noise_embedding_input(self, sigma: torch.Tensor) -> torch.Tensor:
        """log sigma mapped linearly onto the [0, 1000] timestep range the UNet's sinusoidal embedding expects."""
        lo, hi = math.log(self.config.sigma_min), math.log(self.config.sigma_max)
        return 1000 * (sigma.log() - lo) / (hi - lo)

    def forward(self, z: torch.Tensor, sigma: float | torch.Tensor, class_labels=None) -> torch.Tensor:
        """E(z, sigma), shape (B,); sigma a number or one per sample."""
        sigma = torch.as_tensor(sigma, dtype=z.dtype, device=z.device).expand(len(z))
        var = self.config.sigma_data ** 2 + sigma ** 2
        u = z / var.sqrt().view(-1, 1, 1, 1)
        g = self.net(u, self.noise_embedding_input(sigma), class_labels=class_labels).sample
        residual = (u * g).flatten(1).sum(1) * var.sqrt() / sigma
        return z.flatten(1).pow(2).sum(1) / (2 * var) + residual

    def energy(self, z: torch.Tensor) -> torch.Tensor:
        """The energy generation records per image: E at the smallest trained noise level."""
        return self(z, self.config.sigma_min)

    def check_sampler(self, settings: dict) -> None:
        """The sampler's noise levels must lie in the range the energy was trained on: outside it the noise-level
        embedding extrapolates."""
        lo, hi = self.config.sigma_min, self.config.sigma_max
        require(lo * (1 - 1e-6) <= settings["sigma_min"] and settings["sigma_max"] <= hi * (1 + 1e-6),
                f"sampler sigma_min/sigma_max ({settings['sigma_min']:g}, {settings['sigma_max']:g}) must lie in the "
                f"noise range this energy was trained on ({lo:g}, {hi:g})")

    def initial_latents(self, num: int, settings, generator=None, device="cpu") -> torch.Tensor:
        """Plain Gaussian noise at the sampler's top level: N(0, (s^2 + sigma_max^2) I)."""
        std = math.sqrt(self.config.sigma_data ** 2 + settings.sigma_max ** 2)
        return initial_noise((num, *self.config.latent_shape), std, generator, device)


def denoising_score_matching(model, z: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Per-sample loss mean_d (sigma grad_z E(z + sigma eps, sigma) - eps)^2 (Vincent 2011, weighted by sigma^2 so
    every level is an epsilon prediction), with the graph kept for the parameter update (double backward)."""
    noisy = (z + sigma.view(-1, 1, 1, 1) * eps).requires_grad_(True)
    energy = model(noisy, sigma)
    (grad,) = torch.autograd.grad(energy.sum(), noisy, create_graph=True)
    return (sigma.view(-1, 1, 1, 1) * grad - eps).flatten(1).pow(2).mean(1)
