"""Samplers, written as pure functions in the style of k-diffusion's samplers.

Every sampler has one signature, and its settings are a dataclass saved with the model (`settings.py`):

    z = sampler(model, z0, settings, generator=None, callback=None)

`model` is a model wrapped for sampling (`denoisers.py`): `model(z, sigma)` -> (energy, grad_z E), sigma None for a
clean-data energy (short-run `langevin`); `ddim` walks a noise predictor's own timesteps. `callback(info)` is called
after every network evaluation with {"i", "z", "sigma", "energy", "grad_norm"}, "denoised" (the estimate of the clean
latent at that point: Tweedie's z - sigma^2 grad E, or ddim's predicted x0; noise-level samplers only) and
"accepted" (per chain, after a Metropolis test), so counting calls counts evaluations. `generator` is one
torch.Generator for the batch or a list of one per chain: with a list, chain i depends on nothing but its own seed,
whatever batch it shares.

A short-run EBM is only valid under the sampler it was trained with (Nijkamp et al. 2019), which is why the settings
travel with the weights; `core.sample_latents` runs the one a model names.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .denoisers import denoised as tweedie
from .noise import Generators, rand, randn
from .schedules import karras_sigmas
from .settings import AnnealedSettings, DDIMSettings, LangevinSettings

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


def heun(model, z: torch.Tensor, settings: AnnealedSettings, generator: Generators = None,
         callback: Callback = None) -> torch.Tensor:
    """Heun's 2nd-order method on the probability-flow ODE dz/dsigma = sigma grad E(z, sigma) (Karras et al. 2022,
    Algorithm 1), ending with a Tweedie denoising step z - sigma_min^2 grad E; optional MALA corrector."""
    sigmas = karras_sigmas(settings.levels, settings.sigma_min, settings.sigma_max, settings.rho)
    z = z.detach().clone()
    for i, sigma in enumerate(sigmas.tolist()):
        u, grad = model(z, sigma)
        _report(callback, i, z, sigma, u, grad)
        if i == len(sigmas) - 1:
            return tweedie(z, sigma, grad).detach()
        nxt = float(sigmas[i + 1])
        slope = sigma * grad
        euler = z + (nxt - sigma) * slope
        u2, grad2 = model(euler, nxt)
        _report(callback, i, euler, nxt, u2, grad2)
        z = z + (nxt - sigma) * 0.5 * (slope + nxt * grad2)
        z = _corrector(model, z, nxt, i + 1, settings, generator, callback)
    return z.detach()


def ancestral(model, z: torch.Tensor, settings: AnnealedSettings, generator: Generators = None,
              callback: Callback = None) -> torch.Tensor:
    """Ancestral reverse diffusion (DDPM, Ho et al. 2020, in k-diffusion's Euler-ancestral form) on the score
    -grad E(z, sigma), ending with a Tweedie denoising step z - sigma_min^2 grad E; optional MALA corrector."""
    sigmas = karras_sigmas(settings.levels, settings.sigma_min, settings.sigma_max, settings.rho)
    z = z.detach().clone()
    for i, sigma in enumerate(sigmas.tolist()):
        u, grad = model(z, sigma)
        _report(callback, i, z, sigma, u, grad)
        if i == len(sigmas) - 1:
            return tweedie(z, sigma, grad).detach()
        nxt = float(sigmas[i + 1])
        # The exact posterior step of a Gaussian transition from sigma to nxt: deterministic part down to
        # sigma_down, fresh noise sigma_up, sigma_down^2 + sigma_up^2 = nxt^2.
        sigma_up = math.sqrt(nxt ** 2 * (sigma ** 2 - nxt ** 2) / sigma ** 2)
        sigma_down = math.sqrt(nxt ** 2 - sigma_up ** 2)
        z = z + (sigma_down - sigma) * sigma * grad + sigma_up * randn(z, generator)
        z = _corrector(model, z, nxt, i + 1, settings, generator, callback)
    return z.detach()


def mala(model, z: torch.Tensor, sigma: float | None, step: float, steps: int, generator: Generators = None,
         callback: Callback = None, i: int = 0) -> torch.Tensor:
    """Metropolis-adjusted Langevin (Roberts & Tweedie 1996) on exp(-E(., sigma)): each proposal
    z' = z - h grad E + sqrt(2h) xi is accepted per chain with probability min(1, p(z') q(z | z') / p(z) q(z' | z))."""
    u, grad = model(z, sigma)
    _report(callback, i, z, sigma, u, grad)
    for _ in range(steps):
        proposal = z - step * grad + math.sqrt(2 * step) * randn(z, generator)
        u_new, grad_new = model(proposal, sigma)
        forward = (proposal - z + step * grad).flatten(1).pow(2).sum(1)
        backward = (z - proposal + step * grad_new).flatten(1).pow(2).sum(1)
        log_ratio = u - u_new - (backward - forward) / (4 * step)
        accept = torch.log(rand(len(z), generator, z.device)) < log_ratio
        keep = accept.view(-1, *[1] * (z.dim() - 1))
        z, u, grad = torch.where(keep, proposal, z), torch.where(accept, u_new, u), torch.where(keep, grad_new, grad)
        _report(callback, i, z, sigma, u, grad, accepted=accept)
    return z.detach()


def _corrector(model, z, sigma: float, level: int, settings: AnnealedSettings, generator, callback) -> torch.Tensor:
    if settings.mala_levels and level >= settings.levels - settings.mala_levels:
        z = mala(model, z, sigma, settings.mala_step_scale * sigma ** 2, settings.mala_steps, generator, callback,
                 level)
    return z


def ddim(model, z: torch.Tensor, settings: DDIMSettings, generator: Generators = None,
         callback: Callback = None) -> torch.Tensor:
    """DDIM (Song et al. 2021) along a noise predictor's own schedule (diffusers' DDIMScheduler). With eta > 0 the
    step's noise comes from each chain's own generator."""
    scheduler = model.model.sampling_scheduler()
    scheduler.set_timesteps(settings.steps)
    z = z.detach().clone()
    for i, t in enumerate(scheduler.timesteps):
        eps = model.eps(z, t)
        if callback is not None:  # its noise level in sigma terms, and its clean estimate
            alpha = float(scheduler.alphas_cumprod[int(t)])
            _report(callback, i, z, math.sqrt((1 - alpha) / alpha), torch.full((len(z),), float("nan")), eps,
                    denoised=(z - math.sqrt(1 - alpha) * eps) / math.sqrt(alpha))
        noise = randn(z, generator) if settings.eta else None
        z = scheduler.step(eps, t, z, eta=settings.eta, variance_noise=noise).prev_sample
    return z.detach()


SAMPLERS = {"langevin": langevin, "heun": heun, "ancestral": ancestral, "ddim": ddim}


def _report(callback: Callback, i: int, z, sigma, u, grad, **extra) -> None:
    if callback is not None:
        if sigma is not None and "denoised" not in extra:
            extra["denoised"] = tweedie(z, sigma, grad)
        callback({"i": i, "z": z, "sigma": sigma, "energy": u, "grad_norm": grad.flatten(1).norm(dim=1)} | extra)
