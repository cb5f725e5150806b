"""What a sampler evaluates: every model kind wrapped so that `model(z, sigma)` returns (energy, gradient).

    energy, grad = model(z, sigma)    # grad = grad_z E(z, sigma) = -score; energy (B,), NaN without one
    denoised = z - sigma^2 * grad     # Tweedie's estimate of the clean latent (k-diffusion's denoiser D)

Samplers see only this interface, so every sampler runs every model kind (as k-diffusion wraps every network as a
denoiser). Noise levels are variance-exploding: z = x + sigma eps, x a clean scaled latent.
- `EnergyGradient(energy)`: an energy E(z, sigma) (or U(z) for `sigma=None`, the short-run models); one evaluation
  is a forward and a backward through it, and the energy comes for free. Composed conditional energies
  (`conditions.py`) wrap the same way.
- `ScorePrediction(predict)`: a network that outputs its noise prediction eps(z, sigma) directly (a score network):
  grad = eps / sigma, no energy (NaN), one forward.
- `NoisePrediction(model)`: a DDPM noise predictor eps(x_t, t) trained on discrete timesteps: z is mapped to its
  variance-preserving input x_t = z / sqrt(1 + sigma^2) and sigma to a (fractional) timestep t, as k-diffusion's
  DiscreteEpsDDPMDenoiser does; its own timesteps are `native_sigmas` (DDIM's spacing).
"""

from __future__ import annotations

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


def no_energy(z: torch.Tensor) -> torch.Tensor:
    return torch.full((len(z),), float("nan"), device=z.device)


class EnergyGradient:
    """An energy as a sampler evaluates it: (E, grad_z E) from one forward and one backward."""

    has_energy = True

    def __init__(self, energy: Energy):
        self.energy = energy

    def __call__(self, z: torch.Tensor, sigma: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return energy_grad(self.energy, z, sigma)


class ScorePrediction:
    """A network's own noise prediction eps(z, sigma) as a sampler evaluates it: grad = eps / sigma."""

    has_energy = False

    def __init__(self, predict: Callable[[torch.Tensor, float], torch.Tensor]):
        self.predict = predict

    def __call__(self, z: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            eps = self.predict(z, sigma)
        return no_energy(z), eps / sigma


class NoisePrediction:
    """A DDPM noise predictor eps(x_t, t) on its discrete schedule (`alphas_cumprod`) as a sampler evaluates it."""

    has_energy = False

    def __init__(self, network: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], alphas_cumprod: torch.Tensor):
        self.network = network
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().double()   # sigma of timestep t, increasing
        self.log_sigmas = self.sigmas.log()

    def timestep(self, sigma: float) -> float:
        """The fractional timestep whose noise level is `sigma` (log sigma interpolated between the two nearest
        timesteps; an exact timestep's sigma gives that timestep)."""
        log_sigma = torch.tensor(sigma, dtype=torch.float64).log()
        low = int((self.log_sigmas <= log_sigma).sum().clamp(1, len(self.sigmas) - 1)) - 1
        w = ((log_sigma - self.log_sigmas[low]) / (self.log_sigmas[low + 1] - self.log_sigmas[low])).clamp(0, 1)
        t = low + float(w)
        return float(round(t)) if abs(t - round(t)) < 1e-6 else t

    def __call__(self, z: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.full((len(z),), self.timestep(sigma), dtype=z.dtype, device=z.device)
        with torch.no_grad():
            eps = self.network(z / (1 + sigma ** 2) ** 0.5, t)
        return no_energy(z), eps / sigma

    def native_sigmas(self, levels: int) -> list[float]:
        """The noise levels of `levels` of its own timesteps, spaced as Stable Diffusion's DDIM spaces them
        (diffusers' "leading" spacing with steps_offset 1: 981, 961, ..., 1 for 50 of 1000)."""
        step = len(self.sigmas) // levels
        timesteps = [min(i * step + 1, len(self.sigmas) - 1) for i in range(levels)][::-1]
        return [float(self.sigmas[t]) for t in timesteps]
