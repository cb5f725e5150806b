"""The baseline: a latent diffusion model as the seeds trained it, a diffusers UNet2DModel predicting the noise.

    training   t ~ U{0, ..., T - 1}, z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps (DDPMScheduler.add_noise),
               loss = mean (eps_theta(z_t, t) - eps)^2 (Ho et al. 2020)
    sampling   DDIM (Song et al. 2021) from N(0, I) in `steps` network evaluations (`sampling.samplers.ddim`)

It is not an energy model: it has no scalar energy, so no Metropolis test and no composition; generation records
NaN in the energy column. It exists so that the energy models are compared with a working peer on the same latents,
decoder and machine (`bench/compare.py`). The noise schedule is Stable Diffusion's (scaled linear betas 0.00085 to
0.012 over 1000 steps), which suits unit-variance latents.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..common.config import require
from ..sampling.denoisers import NoisePrediction
from ..sampling.noise import initial_noise
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
    EVALUATION_IS_GRADIENT = False  # DDIM runs the network forward only

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

    def sampling_scheduler(self):
        """DDIM as Stable Diffusion runs it: the last step lands on the data (set_alpha_to_one false, offset 1)."""
        from diffusers import DDIMScheduler
        return DDIMScheduler(**self.scheduler_config(), set_alpha_to_one=False, steps_offset=1)

    def forward(self, z: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """eps_theta(z_t, t), the predicted noise."""
        return self.net(z, t).sample

    def energy(self, z: torch.Tensor) -> torch.Tensor:
        """A noise predictor has no energy: NaN per sample (the energy column stays, empty)."""
        return torch.full((len(z),), float("nan"))

    def sampling_model(self, settings, conditions: list[str] | None = None):
        if conditions is not None:
            super().sampling_model(settings, conditions)  # the one-line refusal
        return NoisePrediction(self)

    def evaluation_forward(self, z: torch.Tensor) -> torch.Tensor:
        return self(z, torch.zeros(len(z), dtype=torch.long))

    def initial_latents(self, num: int, settings, generator=None, device="cpu") -> torch.Tensor:
        return initial_noise((num, *self.config.latent_shape), 1.0, generator, device)
