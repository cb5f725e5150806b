"""Samplers, written as pure functions in the style of k-diffusion's samplers.

Every sampler has one signature, and its settings are a dataclass saved with the model (`settings.py`):

    z = sampler(model, z0, settings, generator=None, callback=None)

`model` is a model wrapped for sampling (`denoisers.py`): `model(z, sigma)` -> (energy, grad_z E), sigma None for a
clean-data energy (short-run `langevin`), so every noise-level sampler runs every model kind: an energy (grad E by
autograd), a score network or a noise predictor (grad = eps / sigma). In k-diffusion's terms the denoiser is
D(z, sigma) = z - sigma^2 grad E and the probability-flow ODE is dz/dsigma = (z - D) / sigma = sigma grad E.
Every noise-level sampler visits `noise_levels(model, settings)` and ends with the clean estimate at the last level.

`callback(info)` is called after every network evaluation with {"i", "z", "sigma", "energy", "grad_norm",
"denoised"} (and "accepted", per chain, after a Metropolis test), so counting calls counts evaluations. `generator`
is one torch.Generator for the batch or a list of one per chain: with a list, chain i depends on nothing but its own
seed, whatever batch it shares. `core.sample_latents` runs the sampler a model's settings name.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .denoisers import denoised as tweedie
from .noise import Generators, rand, randn
from .schedules import noise_levels
from .settings import LangevinSettings, NoiseLevelSettings

Callback = Callable[[dict], None] | None


def langevin(model, z: torch.Tensor, settings: LangevinSettings, generator: Generators = None,
             callback: Callback = None) -> torch.Tensor:
    """Unadjusted Langevin dynamics (Welling & Teh 2011; short-run form of Nijkamp et al. 2019).

    z <- z - (eta / 2) * grad U(z) + sqrt(eta) * tau * eps,  eps ~ N(0, I), for `steps` steps from z0.
    """
    z = z.detach().clone()
    noise_std = math.sqrt(settings.step_size) * settings.noise_scale
    for i in range(settings.steps):
        u, grad = model(z, None)
        if settings.grad_clip is not None:
            grad = grad.clamp(-settings.grad_clip, settings.grad_clip)
        _report(callback, i, z, None, u, grad)
        noise = randn(z, generator) if noise_std else 0.0
        z = z - 0.5 * settings.step_size * grad + noise_std * noise
    return z.detach()


def heun(model, z: torch.Tensor, settings: NoiseLevelSettings, generator: Generators = None,
         callback: Callback = None) -> torch.Tensor:
    """Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1), ending with a Tweedie
    denoising step at the last level; optional MALA corrector."""
    sigmas = noise_levels(model, settings)
    z = z.detach().clone()
    for i, sigma in enumerate(sigmas):
        u, grad = model(z, sigma)
        _report(callback, i, z, sigma, u, grad)
        if i == len(sigmas) - 1:
            return tweedie(z, sigma, grad).detach()
        nxt = sigmas[i + 1]
        slope = sigma * grad
        euler_z = z + (nxt - sigma) * slope
        u2, grad2 = model(euler_z, nxt)
        _report(callback, i, euler_z, nxt, u2, grad2)
        z = z + (nxt - sigma) * 0.5 * (slope + nxt * grad2)
        z = _corrector(model, z, nxt, i + 1, settings, generator, callback)
    return z.detach()


def euler(model, z: torch.Tensor, settings: NoiseLevelSettings, generator: Generators = None,
          callback: Callback = None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022; DDIM, Song et al. 2021, is this method in
    other coordinates), ending with a Tweedie denoising step; optional MALA corrector."""
    return _euler_ancestral(model, z, settings, 0.0, generator, callback)


def ddim(model, z: torch.Tensor, settings: NoiseLevelSettings, generator: Generators = None,
         callback: Callback = None) -> torch.Tensor:
    """DDIM (Song et al. 2021): Euler steps with a share `eta` of each step's variance drawn afresh (eta 0:
    deterministic; 1: DDPM's ancestral sampling), usually on the network's own timesteps (`schedule: model`)."""
    return _euler_ancestral(model, z, settings, settings.eta, generator, callback)


def ancestral(model, z: torch.Tensor, settings: NoiseLevelSettings, generator: Generators = None,
              callback: Callback = None) -> torch.Tensor:
    """Ancestral reverse diffusion (DDPM, Ho et al. 2020, in k-diffusion's Euler-ancestral form), ending with a
    Tweedie denoising step; optional MALA corrector."""
    return _euler_ancestral(model, z, settings, 1.0, generator, callback)


def _euler_ancestral(model, z, settings: NoiseLevelSettings, eta: float, generator, callback) -> torch.Tensor:
    sigmas = noise_levels(model, settings)
    z = z.detach().clone()
    for i, sigma in enumerate(sigmas):
        u, grad = model(z, sigma)
        _report(callback, i, z, sigma, u, grad)
        if i == len(sigmas) - 1:
            return tweedie(z, sigma, grad).detach()
        nxt = sigmas[i + 1]
        # The posterior step of a Gaussian transition from sigma to nxt: a deterministic part down to sigma_down and
        # fresh noise sigma_up, sigma_down^2 + sigma_up^2 = nxt^2 (eta scales sigma_up; 0 is the Euler step).
        sigma_up = min(nxt, eta * math.sqrt(nxt ** 2 * (sigma ** 2 - nxt ** 2) / sigma ** 2))
        sigma_down = math.sqrt(nxt ** 2 - sigma_up ** 2)
        z = z + (sigma_down - sigma) * sigma * grad
        if sigma_up:
            z = z + sigma_up * randn(z, generator)
        z = _corrector(model, z, nxt, i + 1, settings, generator, callback)
    return z.detach()


def dpmpp_2m(model, z: torch.Tensor, settings: NoiseLevelSettings, generator: Generators = None,
             callback: Callback = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), a multistep solver of the probability-flow ODE in log sigma that reuses the
    previous level's denoised estimate; one evaluation per level, the clean estimate at the last."""
    sigmas = noise_levels(model, settings)
    z = z.detach().clone()
    previous = None
    for i, sigma in enumerate(sigmas):
        u, grad = model(z, sigma)
        _report(callback, i, z, sigma, u, grad)
        denoised = tweedie(z, sigma, grad)
        if i == len(sigmas) - 1:
            return denoised.detach()
        nxt = sigmas[i + 1]
        h = math.log(sigma / nxt)
        if previous is not None:  # second order: extrapolate the denoised estimate along log sigma
            r = math.log(sigmas[i - 1] / sigma) / h
            estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous
        else:
            estimate = denoised
        z = (nxt / sigma) * z - math.expm1(-h) * estimate
        previous = denoised
        z = _corrector(model, z, nxt, i + 1, settings, generator, callback)
    return z.detach()


def dpmpp_3m(model, z: torch.Tensor, settings: NoiseLevelSettings, generator: Generators = None,
             callback: Callback = None) -> torch.Tensor:
    """DPM-Solver++(3M) (Lu et al. 2022; k-diffusion's sample_dpmpp_3m_sde at eta 0): a third-order multistep solver
    of the probability-flow ODE in log sigma that reuses the two previous levels' denoised estimates (first and second
    order on the first two steps); one evaluation per level, the clean estimate at the last."""
    sigmas = noise_levels(model, settings)
    z = z.detach().clone()
    previous: list[torch.Tensor] = []  # the last two denoised estimates, newest first
    steps: list[float] = []            # the last two steps in log sigma, newest first
    for i, sigma in enumerate(sigmas):
        u, grad = model(z, sigma)
        _report(callback, i, z, sigma, u, grad)
        denoised = tweedie(z, sigma, grad)
        if i == len(sigmas) - 1:
            return denoised.detach()
        nxt = sigmas[i + 1]
        h = math.log(sigma / nxt)
        z = (nxt / sigma) * z - math.expm1(-h) * denoised
        phi_2 = math.expm1(-h) / h + 1
        if len(previous) == 2:
            r0, r1 = steps[0] / h, steps[1] / h
            d1_0, d1_1 = (denoised - previous[0]) / r0, (previous[0] - previous[1]) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            z = z + phi_2 * d1 - (phi_2 / h - 0.5) * d2
        elif previous:
            z = z + phi_2 * (denoised - previous[0]) / (steps[0] / h)
        previous, steps = [denoised, *previous[:1]], [h, *steps[:1]]
        z = _corrector(model, z, nxt, i + 1, settings, generator, callback)
    return z.detach()


_IPNDM = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def ipndm(model, z: torch.Tensor, settings: NoiseLevelSettings, generator: Generators = None,
          callback: Callback = None) -> torch.Tensor:
    """Improved pseudo linear multistep (iPNDM; Zhang & Chen 2023): Adams-Bashforth steps of up to 4th order on the
    probability-flow ODE dz/dsigma = sigma grad E, reusing the last three slopes; one evaluation per level, the last
    step down to sigma 0."""
    sigmas = noise_levels(model, settings) + [0.0]
    z = z.detach().clone()
    slopes: list[torch.Tensor] = []
    for i, sigma in enumerate(sigmas[:-1]):
        u, grad = model(z, sigma)
        _report(callback, i, z, sigma, u, grad)
        slopes.insert(0, sigma * grad)
        weights = _IPNDM[min(len(slopes), len(_IPNDM)) - 1]
        z = z + (sigmas[i + 1] - sigma) * sum(w * s for w, s in zip(weights, slopes))
        del slopes[len(_IPNDM) - 1:]
        if i + 1 < len(sigmas) - 1:
            z = _corrector(model, z, sigmas[i + 1], i + 1, settings, generator, callback)
    return z.detach()


def mala(model, z: torch.Tensor, sigma: float | None, step: float, steps: int, generator: Generators = None,
         callback: Callback = None, i: int = 0) -> torch.Tensor:
    """Metropolis-adjusted Langevin (Roberts & Tweedie 1996) on exp(-E(., sigma)): each proposal
    z' = z - h grad E + sqrt(2h) xi is accepted per chain with probability min(1, p(z') q(z | z') / p(z) q(z' | z)).
    Under a low-precision autocast the test's energies are recomputed in float32: bfloat16 energies carry rounding
    of tens of nats at small sigma, which would swamp the log-ratio."""
    u, grad = model(z, sigma)
    if torch.is_autocast_enabled(z.device.type):
        u = _float32_energy(model, z, sigma)
    _report(callback, i, z, sigma, u, grad)
    for _ in range(steps):
        proposal = z - step * grad + math.sqrt(2 * step) * randn(z, generator)
        u_new, grad_new = model(proposal, sigma)
        if torch.is_autocast_enabled(z.device.type):
            u_new = _float32_energy(model, proposal, sigma)
        forward = (proposal - z + step * grad).flatten(1).pow(2).sum(1)
        backward = (z - proposal + step * grad_new).flatten(1).pow(2).sum(1)
        log_ratio = u - u_new - (backward - forward) / (4 * step)
        accept = torch.log(rand(len(z), generator, z.device)) < log_ratio
        keep = accept.view(-1, *[1] * (z.dim() - 1))
        z, u, grad = torch.where(keep, proposal, z), torch.where(accept, u_new, u), torch.where(keep, grad_new, grad)
        _report(callback, i, z, sigma, u, grad, accepted=accept)
    return z.detach()


def _float32_energy(model, z: torch.Tensor, sigma: float | None) -> torch.Tensor:
    """E(z, sigma) in float32, outside any autocast (for a Metropolis test under a low precision)."""
    with torch.autocast(z.device.type, enabled=False), torch.no_grad():
        return model.energy(z.float()) if sigma is None else model.energy(z.float(), sigma)


def _corrector(model, z, sigma: float, level: int, settings: NoiseLevelSettings, generator, callback) -> torch.Tensor:
    if settings.mala_levels and level >= settings.levels - settings.mala_levels:
        z = mala(model, z, sigma, settings.mala_step_scale * sigma ** 2, settings.mala_steps, generator, callback,
                 level)
    return z


SAMPLERS = {"langevin": langevin, "heun": heun, "euler": euler, "ancestral": ancestral, "ddim": ddim,
            "dpmpp_2m": dpmpp_2m, "dpmpp_3m": dpmpp_3m, "ipndm": ipndm}


def _report(callback: Callback, i: int, z, sigma, u, grad, **extra) -> None:
    if callback is not None:
        if sigma is not None and "denoised" not in extra:
            extra["denoised"] = tweedie(z, sigma, grad)
        callback({"i": i, "z": z, "sigma": sigma, "energy": u, "grad_norm": grad.flatten(1).norm(dim=1)} | extra)
