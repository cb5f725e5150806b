"""The baseline, not an energy: a noise-predicting UNet (Ho et al. 2020; `models.noise_predictor.DiffusionUNet`),
sampled by DDIM along its own timesteps (any noise-level sampler runs it), to compare the energy models with a
working peer.

    loss = mean (eps_theta(z_t, t) - eps)^2,   t ~ U{0, ..., T - 1},   z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ...common.config import require
from ...models.noise_predictor import DiffusionUNet, DiffusionUNetConfig
from ...sampling.settings import NoiseLevelSettings, with_overrides


@dataclass
class DDPMSettings:
    name: Literal["ddpm"] = "ddpm"
    channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    layers_per_block: int = 1
    norm_groups: int = 16
    attention: bool = False
    num_train_timesteps: int = 1000
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"] = "scaled_linear"

    def validate(self) -> None:
        require(self.num_train_timesteps >= 2, "objective num_train_timesteps must be >= 2")


class NoisePrediction:
    NAME = "ddpm"
    Settings = DDPMSettings
    METRICS = ("loss_early_t", "loss_late_t")
    MAX_HEALTHY_LOSS = 10.0

    def __init__(self, settings: DDPMSettings, sampler, latent_shape, generator: torch.Generator):
        self.settings, self.gen, self.scheduler = settings, generator, None

    @staticmethod
    def prepare_samples(settings: DDPMSettings) -> int:
        return 0

    @staticmethod
    def prepare(settings: DDPMSettings, latents, seed: int) -> dict:
        return {}

    @staticmethod
    def placeholder(settings: DDPMSettings) -> dict:
        return {}

    @staticmethod
    def model_config(settings: DDPMSettings, latent_shape, prepared: dict) -> DiffusionUNetConfig:
        return DiffusionUNetConfig(list(latent_shape), settings.channels, settings.layers_per_block,
                                   settings.norm_groups, settings.attention, settings.num_train_timesteps,
                                   beta_schedule=settings.beta_schedule)

    @staticmethod
    def sampler_settings(settings: DDPMSettings, overrides: dict, prepared: dict) -> NoiseLevelSettings:
        """DDIM in 50 steps along its own timesteps, with the config's `sampler` keys changed."""
        return with_overrides(NoiseLevelSettings("ddim", 50, schedule="model"), overrides, "objective ddpm")

    @classmethod
    def build_model(cls, settings: DDPMSettings, latent_shape, prepared: dict, metadata: dict) -> DiffusionUNet:
        return DiffusionUNet(cls.model_config(settings, latent_shape, prepared), metadata)

    def loss(self, forward, model: DiffusionUNet, pos: torch.Tensor, labels=None) -> tuple[torch.Tensor, dict, bool]:
        if self.scheduler is None:
            self.scheduler = model.training_scheduler()
        steps = model.config.num_train_timesteps
        t = torch.randint(steps, (len(pos),), generator=self.gen).to(pos.device)
        eps = torch.randn(pos.shape, generator=self.gen).to(pos.device)
        per_sample = noise_prediction_loss(forward, self.scheduler, pos, t, eps)
        loss = per_sample.mean()
        early = t < steps // 2   # the less noisy half, where detail forms
        metrics = {"loss_early_t": per_sample[early].mean().item() if early.any() else float("nan"),
                   "loss_late_t": per_sample[~early].mean().item() if (~early).any() else float("nan")}
        return loss, metrics, bool(torch.isfinite(loss)) and loss.item() <= self.MAX_HEALTHY_LOSS

    def state_tensors(self) -> dict:
        return {}

    def load_state_tensors(self, tensors: dict) -> None:
        pass


def noise_prediction_loss(model, scheduler, z: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Per-sample mean (eps_theta(z_t, t) - eps)^2 (Ho et al. 2020's simple loss)."""
    noisy = scheduler.add_noise(z, eps, t)
    return (model(noisy, t) - eps).flatten(1).pow(2).mean(1)
