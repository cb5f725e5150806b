"""A noise-conditional energy E_theta(z, sigma) over scaled VAE latents, trained by denoising score matching.

    E(z, sigma) = ||z||^2 / (2 (s^2 + sigma^2)) + (sqrt(s^2 + sigma^2) / sigma) <u, g_theta(u, sigma)>,
    u = z / sqrt(s^2 + sigma^2)

s is the data's standard deviation. The first term is the exact energy of N(0, (s^2 + sigma^2) I): the density of
data-scaled noise at the top level, so sampling from plain Gaussian noise starts where the model is right. The
second is a scalar learned residual: g_theta is a diffusers UNet2DModel (noise-level embedding added inside every
block, the way diffusion networks add the time embedding) whose last convolution starts at zero, so an untrained
energy is exactly that Gaussian. The factors make sigma * grad_z E an epsilon prediction of unit scale at every
level (Salimans & Ho 2021: an energy parameterisation matches a score one), while keeping a scalar energy that
Metropolis tests and composition need. Sampling: `sampling.samplers.heun` / `ancestral` along a Karras
schedule, settings saved with the weights.

Conditioning: with `labels` ({field: [values]}, e.g. shape and background) the energy is E(z, sigma, c). Each field
has its own embedding table (row 0: "not given"); their sum is the context, which every res-block multiplies into
its features with the noise level (`latent_unet(context=True)`). Training drops each field independently
(`label_dropout`), so one network gives the unconditional energy (no field given), each single-field energy and the
joint one; `sampling/conditions.py` adds them up for guidance and composition.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from ..common.config import require
from ..sampling.conditions import conditioned_energy
from ..sampling.denoisers import EnergyGradient
from ..sampling.noise import initial_noise
from .base import PretrainedModel
from .unet import context_dim, latent_unet, validate_latent_unet


@dataclass
class NoiseConditionalEnergyConfig:
    latent_shape: list[int] = field(default_factory=lambda: [4, 64, 64])   # C, h, w of the scaled latents
    channels: list[int] = field(default_factory=lambda: [64, 128, 256])   # UNet stage widths (one down/up each)
    layers_per_block: int = 1
    norm_groups: int = 16
    sigma_data: float = 1.0          # s: the training latents' standard deviation
    sigma_min: float = 0.002         # the noise range trained on; the sampler's schedule spans it
    sigma_max: float = 80.0
    labels: dict[str, list[str]] | None = None   # conditioning: each label field's values, in embedding order
    # How the network's part of sigma grad E is scaled per level: "epsilon" at unit scale (the first energies), "edm"
    # by c_out / sigma = s / sqrt(s^2 + sigma^2) (Karras et al. 2022's preconditioning: the network's target has unit
    # variance at every level, and its errors are not amplified at high noise).
    preconditioning: str = "epsilon"

    def validate(self) -> None:
        validate_latent_unet(self.latent_shape, self.channels, self.layers_per_block, self.norm_groups)
        if self.labels:  # fields in name order: a labels tensor's columns mean the same before and after a save
            self.labels = dict(sorted(self.labels.items()))
        require(self.sigma_data > 0 and 0 < self.sigma_min < self.sigma_max, "need sigma_data > 0 and "
                "0 < sigma_min < sigma_max")
        require(self.preconditioning in ("epsilon", "edm"), "preconditioning must be epsilon or edm")
        require(self.labels is None or (len(self.labels) >= 1 and all(
            re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name) and isinstance(values, list) and values
            and all(isinstance(v, str) for v in values) and len(set(values)) == len(values)
            for name, values in self.labels.items())),
            "labels must map each field ([A-Za-z0-9_-] name) to a non-empty list of distinct values")


class NoiseConditionalEnergy(PretrainedModel):
    CONFIG, FORMAT = NoiseConditionalEnergyConfig, "ebd.nce/1"

    def __init__(self, config: NoiseConditionalEnergyConfig, metadata: dict | None = None):
        super().__init__(config, metadata)
        # No attention blocks: scaled-dot-product attention has no double backward on CPU, and DSM needs one.
        self.net = latent_unet(config.latent_shape, config.channels, config.layers_per_block, config.norm_groups,
                               attention=False, context=bool(config.labels))
        torch.nn.init.zeros_(self.net.conv_out.weight)   # g = 0: the untrained energy is the Gaussian base
        torch.nn.init.zeros_(self.net.conv_out.bias)
        # One table per label field, row 0 meaning "not given"; all zero at the start, so an untrained conditional
        # energy is the unconditional one.
        self.label_embeddings = torch.nn.ModuleDict({
            name: torch.nn.Embedding(len(values) + 1, context_dim(config.channels))
            for name, values in (config.labels or {}).items()})
        for table in self.label_embeddings.values():
            torch.nn.init.zeros_(table.weight)

    @classmethod
    def upgrade_config(cls, model: dict) -> dict:
        """Configs saved before conditioning had a reserved `num_classes: null`."""
        return {k: v for k, v in model.items() if not (k == "num_classes" and v is None)}

    @property
    def label_vocabulary(self) -> dict[str, list[str]]:
        return self.config.labels or {}

    def context(self, labels: torch.Tensor | None, batch: int, device) -> torch.Tensor | None:
        """The context embedding of `labels` (B x fields in `label_vocabulary` order, each a value's index + 1,
        0 = not given); None for an unconditional network. No labels: no field given (the unconditional energy)."""
        if not self.label_embeddings:
            return None
        if labels is None:
            labels = torch.zeros(batch, len(self.label_embeddings), dtype=torch.long, device=device)
        return sum(self.label_embeddings[name](labels[:, f]) for f, name in enumerate(self.label_vocabulary))

    def sampling_model(self, settings, conditions: list[str] | None = None):
        """E(z, sigma) for the samplers; with `conditions` (one per chain, `sampling.conditions` syntax) the energy
        composed for them, guidance from the sampler settings."""
        if conditions is None:
            return EnergyGradient(self)
        return EnergyGradient(conditioned_energy(self, conditions, settings.guidance))

    def noise_embedding_input(self, sigma: torch.Tensor) -> torch.Tensor:
        """log sigma mapped linearly onto the [0, 1000] timestep range the UNet's sinusoidal embedding expects."""
        lo, hi = math.log(self.config.sigma_min), math.log(self.config.sigma_max)
        return 1000 * (sigma.log() - lo) / (hi - lo)

    def output_scale(self, var: torch.Tensor) -> torch.Tensor | float:
        """The factor on the network's part of the noise prediction (`preconditioning`); var = s^2 + sigma^2."""
        return self.config.sigma_data / var.sqrt() if self.config.preconditioning == "edm" else 1.0

    def forward(self, z: torch.Tensor, sigma: float | torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """E(z, sigma[, labels]), shape (B,); sigma a number or one per sample; labels as `context` takes them."""
        sigma = torch.as_tensor(sigma, dtype=z.dtype, device=z.device).expand(len(z))
        var = self.config.sigma_data ** 2 + sigma ** 2
        u = z / var.sqrt().view(-1, 1, 1, 1)
        g = self.net(u, self.noise_embedding_input(sigma), class_labels=self.context(labels, len(z), z.device)).sample
        residual = (u * g).flatten(1).sum(1) * var.sqrt() / sigma * self.output_scale(var)
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
