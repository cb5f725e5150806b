"""Contrastive divergence with short-run Langevin negatives (Nijkamp et al. 2019) on a clean-data energy U(z)
(`models.short_run_energy.EnergyModel`); samples come from its fitted chain starts plus K Langevin steps, exactly
the sampler it trains with (`sampler: {name: langevin, steps: 40, ...}`).

    loss = mean U(z+) - mean U(z-) + alpha mean(E(z+)^2 + E(z-)^2),  z- = Langevin(U, z0, K)

with z0 from a replay buffer (probability 1 - reinit_prob) or the model's chain starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from ...common.config import require
from ...models.short_run_energy import EnergyModel, EnergyModelConfig
from ...sampling.denoisers import EnergyGradient
from ...sampling.samplers import langevin
from ...sampling.settings import LangevinSettings, with_overrides


@dataclass
class CDSettings:
    name: Literal["cd"] = "cd"
    channels: list[int] = field(default_factory=lambda: [64, 128, 256])  # one residual stage per entry
    spectral_norm: bool = False
    sigma0: float = 1.0                      # std of the Gaussian base density, in scaled-latent units
    init_rank: int | None = None             # chains start from a rank-r Gaussian fit of the data (EnergyModelConfig)
    init_components: int = 1                 # ... or a mixture of that many, one per k-means cluster
    init_fit_samples: int = 10_000           # training latents the driver reads to fit it
    # L2 penalty on the network energies E(z+), E(z-). The base term makes energies O(latent dims), and E must
    # offset it by as much to carve modes, so alpha is small: 0.1 (IGEBM's scale) pins the chains to the origin.
    alpha: float = 0.001
    # Replay buffer per worker; 0 (default): pure short-run chains from noise, exactly what generation runs.
    # A buffer trains long-run chains, which generation from noise with the same K does not reproduce.
    buffer_size: int = 0
    reinit_prob: float = 0.05
    energy_bound_per_dim: float = 5.0        # |E| beyond this x latent dims counts as divergence (a rollback)

    def validate(self) -> None:
        require(self.sigma0 > 0, "objective sigma0 must be > 0")
        require(self.alpha >= 0, "objective alpha must be >= 0")
        require(self.buffer_size >= 0 and 0 <= self.reinit_prob <= 1, "buffer_size >= 0, reinit_prob in [0, 1]")
        require(self.init_rank is None or (self.init_rank >= 1 and self.init_fit_samples >= 2 * self.init_components),
                "init_rank must be null or >= 1, init_fit_samples >= 2 x init_components")
        require(self.init_components >= 1 and (self.init_rank or self.init_components == 1),
                "init_components must be >= 1, and > 1 only with init_rank")
        require(self.energy_bound_per_dim > 0, "objective energy_bound_per_dim must be > 0")


class ContrastiveDivergence:
    NAME = "cd"
    Settings = CDSettings
    METRICS = ("energy_pos", "energy_neg", "energy_gap", "chain_grad_norm")

    def __init__(self, settings: CDSettings, sampler: LangevinSettings, latent_shape, generator: torch.Generator):
        self.settings, self.sampler, self.latent_shape, self.gen = settings, sampler, tuple(latent_shape), generator
        self.energy_bound = settings.energy_bound_per_dim * math.prod(latent_shape)
        self.buffer = torch.empty((0, *latent_shape))

    # driver side ------------------------------------------------------------------------------------------
    @staticmethod
    def prepare_samples(settings: CDSettings) -> int:
        return settings.init_fit_samples if settings.init_rank else 0

    @staticmethod
    def prepare(settings: CDSettings, latents: torch.Tensor, seed: int) -> dict:
        """The chain-start Gaussian (mixture) fitted to training latents, when init_rank asks for one."""
        if not settings.init_rank:
            return {}
        model = EnergyModel(ContrastiveDivergence.model_config(settings, latents.shape[1:], {}))
        model.fit_initializer(latents, seed=seed)
        return {"tensors": {k: v.contiguous() for k, v in model.state_dict().items() if k.startswith("init_")}}

    @staticmethod
    def placeholder(settings: CDSettings) -> dict:
        return {}

    @staticmethod
    def model_config(settings: CDSettings, latent_shape, prepared: dict) -> EnergyModelConfig:
        return EnergyModelConfig(list(latent_shape), settings.channels, settings.spectral_norm, settings.sigma0,
                                 settings.init_rank, settings.init_components)

    @staticmethod
    def sampler_settings(settings: CDSettings, overrides: dict, prepared: dict) -> LangevinSettings:
        """Short-run Langevin (40 steps of 0.1) with the config's `sampler` keys changed: generation runs exactly it."""
        return with_overrides(LangevinSettings(), overrides, "objective cd")

    @classmethod
    def build_model(cls, settings: CDSettings, latent_shape, prepared: dict, metadata: dict) -> EnergyModel:
        model = EnergyModel(cls.model_config(settings, latent_shape, prepared), metadata)
        model.load_state_dict(prepared.get("tensors", {}), strict=False)
        return model

    # worker side ------------------------------------------------------------------------------------------
    def loss(self, forward, model: EnergyModel, pos: torch.Tensor, labels=None) -> tuple[torch.Tensor, dict, bool]:
        s, n = self.settings, len(pos)
        chain_grad_norms: list[float] = []
        start = model.initial_latents(n, self.sampler, self.gen).to(pos.device)
        if s.buffer_size and len(self.buffer):
            reuse = torch.rand(n, generator=self.gen) >= s.reinit_prob
            picks = torch.randint(len(self.buffer), (n,), generator=self.gen)
            start[reuse] = self.buffer[picks[reuse]].to(pos.device)
        neg = langevin(EnergyGradient(model), start, self.sampler, self.gen,
                       callback=lambda info: chain_grad_norms.append(info["grad_norm"].mean().item()))
        if s.buffer_size:
            self.buffer = torch.cat([neg.detach().cpu(), self.buffer])[: s.buffer_size]
        both = torch.cat([pos, neg])
        u = forward(both)
        e = u - model.base_energy(both)  # the network's part: the L2 penalty leaves the fixed base term alone
        u_pos, u_neg, e_pos, e_neg = u[:n], u[n:], e[:n], e[n:]
        loss = u_pos.mean() - u_neg.mean() + s.alpha * (e_pos.pow(2).mean() + e_neg.pow(2).mean())
        metrics = {"energy_pos": u_pos.mean().item(), "energy_neg": u_neg.mean().item(),
                   "energy_gap": (u_pos.mean() - u_neg.mean()).item(),
                   "chain_grad_norm": sum(chain_grad_norms) / len(chain_grad_norms)}
        healthy = bool(torch.isfinite(loss)) and e.abs().max().item() <= self.energy_bound
        return loss, metrics, healthy

    def state_tensors(self) -> dict:
        return {"buffer": self.buffer.to(torch.float16)}

    def load_state_tensors(self, tensors: dict) -> None:
        self.buffer = tensors["buffer"].float() if "buffer" in tensors else self.buffer
