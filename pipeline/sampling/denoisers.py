"""What a sampler evaluates: every model kind wrapped so that `model(z, sigma)` returns (energy, gradient).

    energy, grad = model(z, sigma)    # grad = grad_z E(z, sigma) = -score; energy (B,), NaN without one
    denoised = z - sigma^2 * grad     # Tweedie's estimate of the clean latent (`denoised`)

Samplers see only this interface, so every sampler runs every model kind (as k-diffusion wraps every network as a
denoiser):
- `EnergyGradient(energy)`: an energy E(z, sigma) (or U(z) for `sigma=None`, the short-run models); one evaluation
  is a forward and a backward through it, and the energy comes for free. Composed conditional energies
  (`conditions.py`) wrap the same way.
- `NoisePrediction(model)`: a noise predictor eps(z, t); grad = eps / sigma, no energy (NaN), one forward.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

Energy = Callable[..., torch.Tensor]


def energy_grad(energy: Energy, z: torch.Tensor, sigma: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(E(z[, sigma]), grad_z E) without touching any parameter's .grad."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        u = energy(z) if sigma is None else energy(z, sigma)
        (grad,) = torch.autograd.grad(u.sum(), z)
    return u.detach(), grad


def denoised(z: torch.Tensor, sigma: float, grad: torch.Tensor) -> torch.Tensor:
    """Tweedie's formula: E[x | z] = z - sigma^2 grad_z E(z, sigma)."""
    return z - sigma ** 2 * grad


class EnergyGradient:
    """An energy as a sampler evaluates it: (E, grad_z E) from one forward and one backward."""

    has_energy = True

    def __init__(self, energy: Energy):
        self.energy = energy

    def __call__(self, z: torch.Tensor, sigma: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return energy_grad(self.energy, z, sigma)


class NoisePrediction:
    """A noise predictor eps(z, t) as a sampler evaluates it: grad = eps / sigma, energy NaN.
    `model.sampling_scheduler()` gives its discrete schedule (DDIM steps along it)."""

    has_energy = False

    def __init__(self, model):
        self.model = model

    def __call__(self, z: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError("a noise predictor is sampled along its own timesteps (ddim)")

    def eps(self, z: torch.Tensor, t) -> torch.Tensor:
        with torch.no_grad():
            return self.model(z, t)

    @staticmethod
    def no_energy(z: torch.Tensor) -> torch.Tensor:
        return torch.full((len(z),), float("nan"))

    @staticmethod
    def sigma_of(alpha_cumprod: float) -> float:
        """The variance-exploding noise level of a DDPM timestep: sqrt((1 - abar) / abar)."""
        return math.sqrt((1 - alpha_cumprod) / alpha_cumprod)
