"""The energy-based model over scaled VAE latents: U(z) = E_theta(z) + ||z||^2 / (2 sigma0^2).

Energy convention: low energy = data-like; p(z) ~ exp(-U(z)). (The original project's "score" is minus this
energy.) E_theta is a small convolutional network (SiLU, optional spectral norm, no batch norm, so a sample's
energy never depends on its batch) over C x h x w latents of any size; the Gaussian base term keeps Langevin
chains bounded where the network has not learned anything yet.

This is the contrastive-divergence model (`objective: cd`), sampled by short-run Langevin from its fitted chain
starts; `noise_energy.NoiseConditionalEnergy` is the denoising-score-matching one. Like a diffusers model, it
carries its config (`models.base.PretrainedModel`: config.json + model.safetensors, no Ray, no pickle).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from ..common.config import require
from ..sampling.noise import initial_noise
from .base import PretrainedModel


@dataclass
class EnergyModelConfig:
    latent_shape: list[int] = field(default_factory=lambda: [4, 64, 64])  # C, h, w of the scaled latents
    channels: list[int] = field(default_factory=lambda: [64, 128, 256])  # one residual stage per entry
    spectral_norm: bool = False
    sigma0: float = 1.0              # std of the Gaussian base density, in scaled-latent units
    # Where Langevin chains start. None: N(0, init_std^2 I). r: a Gaussian fitted to the training latents (mean +
    # top-r principal directions + isotropic rest), so chains start with the data's mean and correlations and the
    # network only has to refine them (an initialiser, as VAEBM or cooperative learning use a generator for one).
    init_rank: int | None = None
    # With init_rank: k > 1 fits a mixture of k such Gaussians, one per k-means cluster of the training latents, so
    # chains start near the data's modes instead of between them. Memory: k x latent dims x init_rank floats.
    init_components: int = 1

    def validate(self) -> None:
        require(len(self.latent_shape) == 3 and min(self.latent_shape) >= 1, "latent_shape must be [C, h, w]")
        require(len(self.channels) >= 1 and min(self.channels) >= 1, "channels must be a non-empty list of ints")
        require(self.sigma0 > 0, "sigma0 must be > 0")
        require(self.init_rank is None or 1 <= self.init_rank <= math.prod(self.latent_shape),
                "init_rank must be null or in [1, latent dims]")
        require(self.init_components >= 1 and (self.init_rank or self.init_components == 1),
                "init_components must be >= 1, and > 1 only with init_rank")


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, wrap):
        super().__init__()
        self.conv1 = wrap(nn.Conv2d(c_in, c_out, 3, padding=1))
        self.conv2 = wrap(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = wrap(nn.Conv2d(c_in, c_out, 1)) if c_in != c_out else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x):
        return self.skip(x) + self.conv2(self.act(self.conv1(self.act(x))))


class EnergyModel(PretrainedModel):
    CONFIG, FORMAT = EnergyModelConfig, "ebd.ebm/1"

    def __init__(self, config: EnergyModelConfig, metadata: dict | None = None):
        super().__init__(config, metadata)
        wrap = _spectral_norm if config.spectral_norm else (lambda m: m)
        c_latent, h, _ = config.latent_shape
        self.stem = wrap(nn.Conv2d(c_latent, config.channels[0], 3, padding=1))
        blocks, c_prev, side = [], config.channels[0], h
        for c in config.channels:
            blocks.append(_ResBlock(c_prev, c, wrap))
            if side >= 8:  # downsample while there is room: large latents get cheap deep features
                blocks.append(nn.AvgPool2d(2))
                side //= 2
            c_prev = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), wrap(nn.Linear(c_prev, 1)))
        if config.init_rank:  # filled by fit_initializer before training; saved with the weights
            k, dims = config.init_components, math.prod(config.latent_shape)
            self.register_buffer("init_weight", torch.full((k,), 1.0 / k))
            self.register_buffer("init_mean", torch.zeros(k, *config.latent_shape))
            self.register_buffer("init_factor", torch.zeros(k, dims, config.init_rank))
            self.register_buffer("init_residual_std", torch.zeros(k))

    def network_energy(self, z: torch.Tensor) -> torch.Tensor:
        """E_theta(z), shape (B,)."""
        return self.head(self.blocks(self.stem(z))).squeeze(1)

    def base_energy(self, z: torch.Tensor) -> torch.Tensor:
        return z.flatten(1).pow(2).sum(1) / (2 * self.config.sigma0 ** 2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """U(z) = E_theta(z) + ||z||^2 / (2 sigma0^2), shape (B,)."""
        return self.network_energy(z) + self.base_energy(z)

    def energy(self, z: torch.Tensor) -> torch.Tensor:
        """The energy generation records per image: U(z)."""
        return self(z)

    def initial_latents(self, num: int, settings, generator=None, device="cpu") -> torch.Tensor:
        """Chain starts: N(0, init_std^2 I) (init_std from the sampler settings), or, with init_rank, a draw from the
        fitted Gaussian (mixture): component j with probability weight_j, then mean_j + init_std (F_j w + r_j eps)
        (init_std < 1 narrows each component around its mean, a truncation). With one generator per chain, chain i's
        start depends only on its own."""
        shape, init_std = tuple(self.config.latent_shape), settings.init_std
        if not self.config.init_rank or settings.start == "noise":
            return initial_noise((num, *shape), init_std, generator, device)
        # The component from a normal draw through its CDF: a uniform that per-chain generators handle like noise.
        uniform = torch.special.ndtr(initial_noise((num,), 1.0, generator, device))
        cumulative = self.init_weight.to(device).cumsum(0)
        component = torch.searchsorted(cumulative / cumulative[-1], uniform).clamp(max=len(cumulative) - 1)
        w = initial_noise((num, self.config.init_rank), 1.0, generator, device)
        rest = initial_noise((num, math.prod(shape)), 1.0, generator, device)
        spread = self.init_residual_std.to(device)[component, None] * rest
        # One matmul per component (no num x dims x rank gather), in float64 so that a chain's start does not depend
        # on how many chains share the batch (float32 GEMMs of different shapes round differently).
        for j in component.unique().tolist():
            chains = component == j
            spread[chains] += (w[chains].double() @ self.init_factor[j].to(device).double().T).to(spread.dtype)
        return self.init_mean.to(device)[component] + init_std * spread.reshape(num, *shape)

    def fit_initializer(self, latents: torch.Tensor, seed: int = 0) -> None:
        """Sets the chain starts from training latents (N, C, h, w): k-means into init_components clusters (one
        cluster: all of them), then per cluster its share, mean, top init_rank principal directions scaled by their
        standard deviations, and the remaining variance spread evenly."""
        k, rank = self.config.init_components, self.config.init_rank
        flat = latents.flatten(1).double()
        require(len(flat) >= 2 * k, f"fitting {k} chain-start component(s) needs at least {2 * k} latents")
        labels = _kmeans(flat, k, seed)
        for j in range(k):
            members = flat[labels == j]
            if len(members) < 2:  # an empty or single-point cluster never starts a chain
                self.init_weight[j] = 0.0
                continue
            self.init_weight[j] = len(members) / len(flat)
            mean, factor, residual_std = _low_rank_gaussian(members, rank)
            self.init_mean[j] = mean.reshape(self.init_mean.shape[1:])
            self.init_factor[j] = factor
            self.init_residual_std[j] = residual_std

    def upgrade_state_dict(self, tensors: dict) -> dict:
        if "init_mean" in tensors and "init_weight" not in tensors:  # saved before mixtures: one component
            tensors = {k: v.unsqueeze(0) if k.startswith("init_") else v for k, v in tensors.items()}
            tensors["init_weight"] = torch.ones(1)
        return tensors


def _low_rank_gaussian(flat: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, D x rank factor, residual std) of the points `flat` (N, D): the top principal directions scaled by
    their standard deviations, and the remaining variance spread evenly over all D dimensions."""
    mean = flat.mean(0)
    centred = (flat - mean) / (len(flat) - 1) ** 0.5
    if rank >= min(centred.shape) // 2 or centred.numel() <= 2**24:  # a full SVD is exact and cheap enough here
        _, s, vh = torch.linalg.svd(centred, full_matrices=False)
        v = vh.T
    else:  # Stable Diffusion-sized latents: a randomized low-rank SVD instead of a full one
        _, s, v = torch.svd_lowrank(centred, q=rank, niter=4)
    s, v = s[:rank], v[:, :rank]
    factor = torch.zeros(flat.shape[1], rank, dtype=flat.dtype)
    factor[:, : len(s)] = v * s
    rest = (centred.pow(2).sum() - s.pow(2).sum()).clamp(min=0) / flat.shape[1]
    return mean, factor, rest.sqrt()


def _kmeans(flat: torch.Tensor, k: int, seed: int, iterations: int = 100) -> torch.Tensor:
    """Cluster labels of `flat` (N, D) by Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii 2007);
    deterministic for a given seed."""
    gen = torch.Generator().manual_seed(seed)
    centres = flat[torch.randint(len(flat), (1,), generator=gen)]
    closest = torch.cdist(flat, centres).squeeze(1).pow(2)
    for _ in range(k - 1):  # each next centre with probability proportional to its squared distance
        pick = torch.multinomial(closest.float() + 1e-12, 1, generator=gen)
        centres = torch.cat([centres, flat[pick]])
        closest = torch.minimum(closest, torch.cdist(flat, flat[pick]).squeeze(1).pow(2))
    labels = torch.full((len(flat),), -1, dtype=torch.long)
    for _ in range(iterations):
        new = torch.cdist(flat, centres).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
        counts = torch.bincount(labels, minlength=k).unsqueeze(1).to(flat.dtype)
        sums = torch.zeros_like(centres).index_add_(0, labels, flat)
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)  # an emptied cluster keeps its centre
    return labels
