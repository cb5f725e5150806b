"""Langevin samplers for energy-based models, written as pure functions in the style of k-diffusion's samplers.

Convention: `energy(z)` returns U(z) per sample, shape (B,); low energy = data-like. With noise scale tau the
chain's stationary density is p(z) ~ exp(-U(z) / tau^2); tau = 1 is plain Langevin dynamics on exp(-U).

A short-run EBM is only valid under the sampler it was trained with (Nijkamp et al. 2019), so the settings live
in `SamplerSettings`, are saved with the model, and generation uses them unless told otherwise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .config import require

Energy = Callable[[torch.Tensor], torch.Tensor]
Generators = torch.Generator | list[torch.Generator] | None  # one for the batch, or one per chain


@dataclass
class SamplerSettings:
    steps: int = 40                  # K, Langevin steps per chain
    step_size: float = 0.1           # eta
    noise_scale: float = 0.1         # tau: 1 is true Langevin on exp(-U); < 1 is the "cold" short-run variant
    grad_clip: float | None = None   # clamp each element of grad U to [-c, c] (IGEBM); None: no clipping
    init_std: float = 1.0            # chains start from N(0, init_std^2 I) in scaled-latent units

    def validate(self) -> None:
        require(self.steps >= 1, f"sampler steps must be >= 1, got {self.steps}")
        require(self.step_size > 0 and self.noise_scale >= 0 and self.init_std > 0,
                "sampler step_size and init_std must be > 0, noise_scale >= 0")
        require(self.grad_clip is None or self.grad_clip > 0, "sampler grad_clip must be > 0 or null")

    def to_dict(self) -> dict:
        return asdict(self)


def energy_grad(energy: Energy, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U(z), grad_z U(z)) without touching any parameter's .grad."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        u = energy(z)
        (grad,) = torch.autograd.grad(u.sum(), z)
    return u.detach(), grad


def langevin(energy: Energy, z0: torch.Tensor, steps: int, step_size: float, noise_scale: float = 1.0,
             grad_clip: float | None = None, callback: Callable[[dict], None] | None = None,
             generator: Generators = None) -> torch.Tensor:
    """Unadjusted Langevin dynamics (Welling & Teh 2011; short-run form of Nijkamp et al. 2019).

    z <- z - (eta / 2) * grad U(z) + sqrt(eta) * tau * eps,  eps ~ N(0, I), for `steps` steps from z0.
    `callback({"i", "z", "energy", "grad_norm"})` is called after each step's gradient, before the move.
    """
    z = z0.detach().clone()
    noise_std = math.sqrt(step_size) * noise_scale
    for i in range(steps):
        u, grad = energy_grad(energy, z)
        if grad_clip is not None:
            grad = grad.clamp(-grad_clip, grad_clip)
        if callback is not None:
            callback({"i": i, "z": z, "energy": u, "grad_norm": grad.flatten(1).norm(dim=1)})
        noise = _randn(z, generator) if noise_std else 0.0
        z = z - 0.5 * step_size * grad + noise_std * noise
    return z.detach()


def _randn(like: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Noise shaped like `like`, drawn on the generator's device (CPU generators keep chains reproducible on any
    device). A list holds one generator per chain: chain i's noise then depends on nothing but its own seed."""
    if isinstance(generator, list):
        return torch.stack([_randn(like[i], g) for i, g in enumerate(generator)])
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def initial_noise(shape: tuple[int, ...], init_std: float, generator: Generators = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    return _randn(torch.empty(shape, device=device), generator) * init_std


def sample(energy: Energy, num: int, latent_shape: tuple[int, ...], settings: SamplerSettings,
           generator: Generators = None, device: torch.device | str = "cpu",
           callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """`num` latents from fresh chains under `settings`: what generation runs. Chains start where the energy
    model says (`energy.initial_latents`, e.g. a Gaussian fitted to the data), else from N(0, init_std^2 I)."""
    start = getattr(energy, "initial_latents", None)
    z0 = start(num, settings.init_std, generator, device) if start is not None else \
        initial_noise((num, *latent_shape), settings.init_std, generator, device)
    return langevin(energy, z0, settings.steps, settings.step_size, settings.noise_scale, settings.grad_clip,
                    callback, generator)
