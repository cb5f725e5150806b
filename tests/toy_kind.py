"""A test-only model kind, added the way docs/model-kinds.md says: one model class and one objective class, each
registered in one line, imported by jobs through `plugins: [tests.toy_kind]`.

The model is a noise-conditional Gaussian energy with a learned mean m and scale s,
E(z, sigma) = ||z - m||^2 / (2 (s^2 + sigma^2)); the objective fits it by denoising score matching. Exact, tiny, and
fast: training moves m and s to the data's mean and spread, which the test checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from pipeline.common.config import require
from pipeline.models import register
from pipeline.models.base import PretrainedModel
from pipeline.sampling.denoisers import EnergyGradient
from pipeline.sampling.noise import initial_noise
from pipeline.sampling.settings import NoiseLevelSettings, with_overrides
from pipeline.training.objectives import register as register_objective


@dataclass
class ToyGaussianConfig:
    latent_shape: list[int] = field(default_factory=lambda: [4, 4, 4])
    sigma_min: float = 0.01
    sigma_max: float = 20.0

    def validate(self) -> None:
        require(0 < self.sigma_min < self.sigma_max, "toy: need 0 < sigma_min < sigma_max")


@register
class ToyGaussian(PretrainedModel):
    CONFIG, FORMAT = ToyGaussianConfig, "ebd.toy/1"

    def __init__(self, config: ToyGaussianConfig, metadata: dict | None = None):
        super().__init__(config, metadata)
        self.mean = torch.nn.Parameter(torch.zeros(config.latent_shape))
        self.log_scale = torch.nn.Parameter(torch.zeros(()))

    def forward(self, z: torch.Tensor, sigma) -> torch.Tensor:
        var = self.log_scale.exp() ** 2 + torch.as_tensor(sigma, dtype=z.dtype) ** 2
        return (z - self.mean).flatten(1).pow(2).sum(1) / (2 * var.reshape(-1))

    def energy(self, z: torch.Tensor) -> torch.Tensor:
        return self(z, self.config.sigma_min)

    def sampling_model(self, settings, conditions=None):
        return EnergyGradient(self)

    def initial_latents(self, num: int, settings, generator=None, device="cpu") -> torch.Tensor:
        return initial_noise((num, *self.config.latent_shape), math.sqrt(1 + settings.sigma_max ** 2), generator,
                             device)


@dataclass
class ToySettings:
    name: Literal["toy"] = "toy"
    sigma_max: float = 20.0

    def validate(self) -> None:
        require(self.sigma_max > 0.01, "toy: sigma_max must exceed 0.01")


@register_objective
class ToyDenoising:
    NAME, Settings, METRICS = "toy", ToySettings, ()

    def __init__(self, settings, sampler, latent_shape, generator):
        self.gen = generator

    @staticmethod
    def prepare_samples(settings) -> int:
        return 0

    @staticmethod
    def prepare(settings, latents, seed) -> dict:
        return {}

    @staticmethod
    def placeholder(settings) -> dict:
        return {}

    @staticmethod
    def model_config(settings, latent_shape, prepared) -> ToyGaussianConfig:
        return ToyGaussianConfig(list(latent_shape), sigma_max=settings.sigma_max)

    @staticmethod
    def sampler_settings(settings, overrides, prepared) -> NoiseLevelSettings:
        return with_overrides(NoiseLevelSettings("euler", 8, 0.01, settings.sigma_max), overrides, "objective toy")

    @classmethod
    def build_model(cls, settings, latent_shape, prepared, metadata) -> ToyGaussian:
        return ToyGaussian(cls.model_config(settings, latent_shape, prepared), metadata)

    def loss(self, forward, model, pos, labels=None):
        sigma = torch.exp(torch.empty(len(pos)).uniform_(math.log(0.01), math.log(20.0), generator=self.gen))
        eps = torch.randn(pos.shape, generator=self.gen)
        noisy = (pos + sigma.view(-1, 1, 1, 1) * eps).requires_grad_(True)
        (grad,) = torch.autograd.grad(forward(noisy, sigma).sum(), noisy, create_graph=True)
        loss = (sigma.view(-1, 1, 1, 1) * grad - eps).pow(2).mean()
        return loss, {}, bool(torch.isfinite(loss))

    def state_tensors(self) -> dict:
        return {}

    def load_state_tensors(self, tensors: dict) -> None:
        pass
