"""The baseline: a latent diffusion model as the seeds trained it, a diffusers UNet2DModel predicting the noise.

    training   t ~ U{0, ..., T - 1}, z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps (DDPMScheduler.add_noise),
               loss = mean (eps_theta(z_t, t) - eps)^2 (Ho et al. 2020)
    sampling   DDIM (Song et al. 2021) along its own timesteps (`sampler: {name: ddim, levels: 50, schedule: model}`),
               or any noise-level sampler: the network is evaluated at z / sqrt(1 + sigma^2) with its timestep
               interpolated from sigma (`sampling.denoisers.NoisePrediction`)

It is not an energy model: it has no scalar energy, so no Metropolis test and no composition; generation records
NaN in the energy column. It exists so that the energy models are compared with a working peer on the same latents,
decoder and machine (`bench/compare.py`). The noise schedule is Stable Diffusion's (scaled linear betas 0.00085 to
0.012 over 1000 steps), which suits unit-variance latents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..common.config import require
from ..sampling.denoisers import NoisePrediction, no_energy
from ..sampling.noise import initial_noise
from ..sampling.schedules import noise_levels
from .base import PretrainedModel
from .unet import latent_unet, validate_latent_unet


@dataclass
class DiffusionUNetConfig:
    latent_shape: list[int] = field(default_factory=lambda: [4, 64, 64])
    channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    layers_per_block: int = 1
    norm_groups: int = 16
    attention: bool = False              # a self-attention block in the UNet's middle (forward only: no limit here)
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"

    def validate(self) -> None:
        validate_latent_unet(self.latent_shape, self.channels, self.layers_per_block, self.norm_groups)
        require(self.num_train_timesteps >= 2 and 0 < self.beta_start < self.beta_end < 1,
                "need num_train_timesteps >= 2 and 0 < beta_start < beta_end < 1")
        require(self.beta_schedule in ("linear", "scaled_linear", "squaredcos_cap_v2"),
                "beta_schedule must be linear, scaled_linear or squaredcos_cap_v2")


class DiffusionUNet(PretrainedModel):
    CONFIG, FORMAT = DiffusionUNetConfig, "ebd.unet/1"
    EVALUATION_IS_GRADIENT = False  # a sampler runs the network forward only
    HAS_ENERGY = False

    def __init__(self, config: DiffusionUNetConfig, metadata: dict | None = None):
        super().__init__(config, metadata)
        self.net = latent_unet(config.latent_shape, config.channels, config.layers_per_block, config.norm_groups,
                               attention=config.attention)

    def scheduler_config(self) -> dict:
        c = self.config
        return {"num_train_timesteps": c.num_train_timesteps, "beta_start": c.beta_start, "beta_end": c.beta_end,
                "beta_schedule": c.beta_schedule, "clip_sample": False, "prediction_type": "epsilon"}

    def training_scheduler(self):
        from diffusers import DDPMScheduler
        return DDPMScheduler(**self.scheduler_config())

    def forward(self, z: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """eps_theta(z_t, t), the predicted noise (t may be fractional: the embedding is sinusoidal)."""
        return self.net(z, t).sample

    def energy(self, z: torch.Tensor) -> torch.Tensor:
        """A noise predictor has no energy: NaN per sample (the energy column stays, empty)."""
        return no_energy(z)

    def sampling_model(self, settings=None, conditions: list[str] | None = None) -> NoisePrediction:
        """Itself on variance-exploding noise levels: z = x + sigma eps, x_t = z / sqrt(1 + sigma^2)."""
        if conditions is not None:
            super().sampling_model(settings, conditions)  # the one-line refusal
        return NoisePrediction(self, self.training_scheduler().alphas_cumprod)

    def sigma_range(self) -> tuple[float, float]:
        """The noise levels of its first and last trained timesteps."""
        sigmas = self.sampling_model().sigmas
        return float(sigmas[0]), float(sigmas[-1])

    def check_sampler(self, settings: dict) -> None:
        """A Karras schedule must lie in the trained noise range; no Metropolis corrector without an energy."""
        require(not settings.get("mala_levels"), "a noise predictor has no energy for a Metropolis test: set "
                "mala_levels: 0")
        if settings.get("schedule") == "karras":
            lo, hi = self.sigma_range()
            require(lo * (1 - 1e-6) <= settings["sigma_min"] and settings["sigma_max"] <= hi * (1 + 1e-6),
                    f"sampler sigma_min/sigma_max ({settings['sigma_min']:g}, {settings['sigma_max']:g}) must lie "
                    f"in this network's trained noise range ({lo:.4g}, {hi:.4g})")

    def evaluation_forward(self, z: torch.Tensor) -> torch.Tensor:
        return self(z, torch.zeros(len(z), dtype=torch.long))

    def initial_latents(self, num: int, settings, generator=None, device="cpu") -> torch.Tensor:
        """N(0, (1 + sigma_top^2) I): the noised data (unit variance, as DDPM assumes) at the first level."""
        top = noise_levels(self.sampling_model(settings), settings)[0]
        return initial_noise((num, *self.config.latent_shape), math.sqrt(1 + top ** 2), generator, device)
