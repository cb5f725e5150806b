"""Denoising score matching across noise levels (Vincent 2011; Song & Ermon 2019) on a noise-conditional energy
E(z, sigma) (`models.noise_energy.NoiseConditionalEnergy`), or with `output: score` on the same network with a
direct noise prediction (`models.noise_score.NoiseConditionalScore`): no MCMC while training; samples come from plain
Gaussian noise along a Karras schedule (the sampler it names, `ipndm` by default).

    loss = w(sigma) mean_d (eps_hat(z + sigma eps, sigma) - eps)^2,   ln sigma ~ N(ln s + p_mean, p_std^2)
           (Karras et al. 2022's log-normal, relative to the data's std s) or log-uniform on [sigma_min, sigma_max]
    eps_hat = sigma grad_z E (an energy: a double backward per step) or the network's output (a score network)
    w       = 1 (epsilon), 1 + sigma^2 / s^2 (edm: Karras et al. 2022's weight on the denoised image, in epsilon
              units) or min(1, gamma sigma^2 / s^2) (min_snr: Hang et al. 2023's min(SNR, gamma) / SNR, SNR = s^2 /
              sigma^2)

`preconditioning: edm` scales the network's part of eps_hat by s / sqrt(s^2 + sigma^2) (the model's config keeps it).
bench/recipe.md measures each of these at equal training time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from ...common.config import require
from ...models.noise_energy import NoiseConditionalEnergy, NoiseConditionalEnergyConfig
from ...models.noise_score import NoiseConditionalScore
from ...sampling.settings import NoiseLevelSettings, with_overrides


@dataclass
class DSMSettings:
    name: Literal["dsm"] = "dsm"
    channels: list[int] = field(default_factory=lambda: [64, 128, 256])   # UNet stage widths (one down/up each)
    layers_per_block: int = 1
    norm_groups: int = 16
    sigma_data: float | None = None          # null: the training latents' std
    sigma_min: float = 0.002
    sigma_max: float | None = None           # null: the largest distance between two training latents
    sigma_sampling: Literal["lognormal", "log_uniform"] = "lognormal"
    sigma_p_mean: float = -0.5               # lognormal: ln sigma ~ N(ln sigma_data + p_mean, p_std^2)
    sigma_p_std: float = 1.2
    loss_weighting: Literal["epsilon", "edm", "min_snr"] = "epsilon"   # w(sigma) above
    min_snr_gamma: float = 5.0
    preconditioning: Literal["epsilon", "edm"] = "epsilon"            # the network's output scale per level
    # Conditioning (sampling/conditions.py): the label fields the energy takes ("label" is the single label; named
    # fields come from precompute's label_fields). Each field is dropped independently with probability
    # label_dropout, so the network also learns the unconditional energy and every single-field one.
    condition_on: list[str] = field(default_factory=list)
    label_dropout: float = 0.3
    # energy: a scalar energy whose gradient is the score (Metropolis tests, composition, per-image energies); score:
    # the same network predicting the noise directly (one forward per evaluation), the fair baseline of the energy.
    output: Literal["energy", "score"] = "energy"

    def validate(self) -> None:
        require(self.sigma_min > 0, "objective sigma_min must be > 0")
        require(self.sigma_max is None or self.sigma_max > self.sigma_min, "objective sigma_max must exceed sigma_min")
        require(self.sigma_data is None or self.sigma_data > 0, "objective sigma_data must be > 0 or null")
        require(self.sigma_p_std > 0, "objective sigma_p_std must be > 0")
        require(self.min_snr_gamma > 0, "objective min_snr_gamma must be > 0")
        require(0 <= self.label_dropout < 1, "objective label_dropout must be in [0, 1)")
        require(len(set(self.condition_on)) == len(self.condition_on), "objective condition_on lists a field twice")


class DenoisingScoreMatching:
    NAME = "dsm"
    Settings = DSMSettings
    METRICS = ("loss_small_sigma", "loss_large_sigma")
    MAX_HEALTHY_LOSS = 10.0   # a per-dimension epsilon error; the untrained (Gaussian) energy scores <= about 1

    def __init__(self, settings: DSMSettings, sampler, latent_shape, generator: torch.Generator):
        self.settings, self.gen = settings, generator

    # driver side ------------------------------------------------------------------------------------------
    @staticmethod
    def prepare_samples(settings: DSMSettings) -> int:
        return 4096

    @staticmethod
    def prepare(settings: DSMSettings, latents: torch.Tensor, seed: int) -> dict:
        """The data's std s and, unless set, sigma_max = the largest distance between two training latents (of up
        to 4,096), so the modes merge at the top level and the start N(0, s^2 + sigma_max^2) covers them all."""
        flat = latents.flatten(1).double()
        sigma_data = settings.sigma_data or float(flat.std())
        sigma_max = settings.sigma_max or float(torch.cdist(flat, flat).max())
        return {"sigma_data": float(f"{sigma_data:.5g}"), "sigma_max": float(f"{sigma_max:.4g}")}

    @staticmethod
    def placeholder(settings: DSMSettings) -> dict:
        """What `prepare` gives, as far as it is known before the data is read (for validating a config)."""
        return {"sigma_data": settings.sigma_data or 1.0, "sigma_max": settings.sigma_max or 2 * settings.sigma_min}

    @staticmethod
    def model_config(settings: DSMSettings, latent_shape, prepared: dict) -> NoiseConditionalEnergyConfig:
        return NoiseConditionalEnergyConfig(list(latent_shape), settings.channels, settings.layers_per_block,
                                            settings.norm_groups, prepared["sigma_data"], settings.sigma_min,
                                            prepared["sigma_max"], prepared.get("labels"),
                                            settings.preconditioning)

    @staticmethod
    def sampler_settings(settings: DSMSettings, overrides: dict, prepared: dict) -> NoiseLevelSettings:
        """iPNDM on 12 Karras levels over the trained noise range (bench/pareto.md: on the demo energy its FD is 1.11x
        that of 25-level Heun, 49 gradients, at a quarter of the gradients), with the config's `sampler` keys
        changed."""
        base = NoiseLevelSettings("ipndm", 12, settings.sigma_min, prepared["sigma_max"])
        return with_overrides(base, overrides, "objective dsm")

    @classmethod
    def build_model(cls, settings: DSMSettings, latent_shape, prepared: dict, metadata: dict) -> NoiseConditionalEnergy:
        return MODELS[settings.output](cls.model_config(settings, latent_shape, prepared), metadata)

    # worker side ------------------------------------------------------------------------------------------
    def sigmas(self, n: int, model: NoiseConditionalEnergy) -> torch.Tensor:
        c, s = model.config, self.settings
        if s.sigma_sampling == "log_uniform":
            log_sigma = math.log(c.sigma_min) + torch.rand(n, generator=self.gen) * math.log(c.sigma_max / c.sigma_min)
        else:
            log_sigma = math.log(c.sigma_data) + s.sigma_p_mean + s.sigma_p_std * torch.randn(n, generator=self.gen)
        return log_sigma.exp().clamp(c.sigma_min, c.sigma_max)

    def loss(self, forward, model: NoiseConditionalEnergy, pos: torch.Tensor,
             labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict, bool]:
        sigma = self.sigmas(len(pos), model).to(pos.device)
        eps = torch.randn(pos.shape, generator=self.gen).to(pos.device)
        if labels is not None:  # each field dropped on its own: the unconditional and single-field energies too
            dropped = torch.rand(labels.shape, generator=self.gen).to(labels.device) < self.settings.label_dropout
            labels = labels.masked_fill(dropped, 0)
        per_sample = denoising_score_matching(forward, pos, sigma, eps, labels, self.settings.output)
        loss = (self.weights(sigma, model.config.sigma_data) * per_sample).mean()
        small = sigma < model.config.sigma_data   # the levels where detail forms vs where layout does
        metrics = {"loss_small_sigma": per_sample[small].mean().item() if small.any() else float("nan"),
                   "loss_large_sigma": per_sample[~small].mean().item() if (~small).any() else float("nan")}
        # health is judged on the unweighted epsilon error, whatever the weighting: the same bound for every recipe
        healthy = bool(torch.isfinite(loss)) and per_sample.mean().item() <= self.MAX_HEALTHY_LOSS
        return loss, metrics, healthy

    def weights(self, sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
        """w(sigma) of `loss_weighting`, per sample."""
        inverse_snr = (sigma / sigma_data) ** 2
        if self.settings.loss_weighting == "edm":
            return 1 + inverse_snr
        if self.settings.loss_weighting == "min_snr":
            return (self.settings.min_snr_gamma * inverse_snr).clamp(max=1.0)
        return torch.ones_like(sigma)

    def state_tensors(self) -> dict:
        return {}

    def load_state_tensors(self, tensors: dict) -> None:
        pass


MODELS = {"energy": NoiseConditionalEnergy, "score": NoiseConditionalScore}


def denoising_score_matching(model, z: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor,
                             labels: torch.Tensor | None = None, output: str = "energy") -> torch.Tensor:
    """Per-sample loss mean_d (eps_hat(z + sigma eps, sigma[, labels]) - eps)^2 (Vincent 2011, weighted by sigma^2 so
    every level is an epsilon prediction). For an energy eps_hat = sigma grad_z E, with the graph kept for the
    parameter update (double backward); for a score network it is the network's output."""
    noisy = z + sigma.view(-1, 1, 1, 1) * eps
    if output == "score":
        predicted = model(noisy, sigma) if labels is None else model(noisy, sigma, labels)
    else:
        noisy = noisy.requires_grad_(True)
        energy = model(noisy, sigma) if labels is None else model(noisy, sigma, labels)
        (grad,) = torch.autograd.grad(energy.sum(), noisy, create_graph=True)
        predicted = sigma.view(-1, 1, 1, 1) * grad
    return (predicted - eps).flatten(1).pow(2).mean(1)
