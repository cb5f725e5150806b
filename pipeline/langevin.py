"""Samplers, written as pure functions in the style of k-diffusion's samplers.

Every sampler has one signature, and its settings are a dataclass saved with the model:

    z = sampler(model, z0, settings, generator=None, callback=None)

`model` is the energy: `model(z)` -> U(z) for a clean-data energy (short-run `langevin`), `model(z, sigma)` ->
E(z, sigma) for a noise-conditional one (`heun`, `ancestral`); shape (B,), low energy = data-like, p ~ exp(-E).
The baseline `ddim` takes a noise predictor instead, `model(z, t)` -> eps.
`callback(info)` is called after every network evaluation (an energy gradient, or ddim's forward) with {"i", "z",
"sigma", "energy", "grad_norm"}, "denoised" (the estimate of the clean latent at that point: Tweedie's
z - sigma^2 grad E, or ddim's predicted x0; noise-level samplers only) and "accepted" (per chain, after a
Metropolis test), so counting calls counts evaluations. `generator` is one torch.Generator for the batch or a list of one per chain: with a list, chain i
depends on nothing but its own seed, whatever batch it shares.

A model folder's config.json names its sampler (`"sampler": {"name": "heun", "levels": 25, ...}`) and
`sample(model, num, settings)` runs it from the model's own chain starts: generation never needs to know which
kind of model or sampler it runs. A short-run EBM is only valid under the sampler it was trained with (Nijkamp et
al. 2019), which is why the settings travel with the weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Literal

import torch

from .config import EbdError, from_dict, require

Energy = Callable[..., torch.Tensor]
Callback = Callable[[dict], None] | None
Generators = torch.Generator | list[torch.Generator] | None  # one for the batch, or one per chain


# --------------------------------------------------------------------------------------------- settings

@dataclass
class LangevinSettings:
    """Short-run Langevin on a clean-data energy U(z) (the contrastive-divergence models)."""
    name: Literal["langevin"] = "langevin"
    steps: int = 40                  # K, Langevin steps per chain
    step_size: float = 0.1           # eta
    noise_scale: float = 0.1         # tau: 1 is true Langevin on exp(-U); < 1 is the "cold" short-run variant
    grad_clip: float | None = None   # clamp each element of grad U to [-c, c] (IGEBM); None: no clipping
    init_std: float = 1.0            # chains start from N(0, init_std^2 I) (or the model's fitted starts)
    start: Literal["model", "noise"] = "model"   # noise: N(0, init_std^2 I) even where the model fitted starts

    def validate(self) -> None:
        require(self.steps >= 1, f"sampler steps must be >= 1, got {self.steps}")
        require(self.step_size > 0 and self.noise_scale >= 0 and self.init_std > 0,
                "sampler step_size and init_std must be > 0, noise_scale >= 0")
        require(self.grad_clip is None or self.grad_clip > 0, "sampler grad_clip must be > 0 or null")

    def gradient_evaluations(self) -> int:
        return self.steps


@dataclass
class AnnealedSettings:
    """Noise-level annealing on a noise-conditional energy E(z, sigma), from N(0, (s^2 + sigma_max^2) I) to data."""
    name: Literal["heun", "ancestral"] = "heun"
    levels: int = 25                 # noise levels on the Karras schedule, sigma_max ... sigma_min
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0                 # Karras et al. 2022: rho = 7 spends the levels where detail forms
    # Metropolis-adjusted Langevin corrector (uses E itself for the accept/reject test): `mala_steps` steps at each
    # of the last `mala_levels` levels, step size mala_step_scale * sigma^2.
    mala_levels: int = 0
    mala_steps: int = 1
    mala_step_scale: float = 0.25
    # Conditional energies: each condition term's weight w in E_none + w (E_c - E_none) (conditions.py); 1 is plain
    # conditioning, more sharpens it (classifier-free guidance, Ho & Salimans 2022).
    guidance: float = 1.0

    def validate(self) -> None:
        require(self.levels >= 2, f"sampler levels must be >= 2, got {self.levels}")
        require(self.guidance >= 0, f"sampler guidance must be >= 0, got {self.guidance}")
        require(0 < self.sigma_min < self.sigma_max, "sampler needs 0 < sigma_min < sigma_max")
        require(self.rho > 0 and self.mala_step_scale > 0, "sampler rho and mala_step_scale must be > 0")
        require(0 <= self.mala_levels < self.levels and self.mala_steps >= 1,
                "sampler mala_levels must be in [0, levels - 1] (no corrector at the top level), mala_steps >= 1")

    def gradient_evaluations(self) -> int:
        """Per chain: Heun 2 per level but the last (which takes the final denoising Euler step), ancestral 1 per
        level; each MALA level 1 to start plus 1 per step."""
        base = 2 * self.levels - 1 if self.name == "heun" else self.levels
        return base + self.mala_levels * (1 + self.mala_steps)


@dataclass
class DDIMSettings:
    """DDIM on a noise-predicting diffusion model (the baseline, `diffusion_unet.DiffusionUNet`)."""
    name: Literal["ddim"] = "ddim"
    steps: int = 50                  # network evaluations per image
    eta: float = 0.0                 # 0: deterministic DDIM; 1: DDPM-like ancestral noise

    def validate(self) -> None:
        require(self.steps >= 1 and 0 <= self.eta <= 1, "ddim steps must be >= 1, eta in [0, 1]")

    def gradient_evaluations(self) -> int:
        return self.steps  # forward evaluations of the noise predictor


SETTINGS = {"langevin": LangevinSettings, "heun": AnnealedSettings, "ancestral": AnnealedSettings,
            "ddim": DDIMSettings}


def sampler_settings(values: dict) -> LangevinSettings | AnnealedSettings | DDIMSettings:
    """The settings dataclass a model's saved `sampler` dict names (no name: short-run Langevin, the original)."""
    name = values.get("name", "langevin")
    if name not in SETTINGS:
        raise EbdError(f"unknown sampler {name!r} (known: {', '.join(SETTINGS)})")
    return from_dict(SETTINGS[name], values | {"name": name})


def settings_dict(settings) -> dict:
    return asdict(settings)


# --------------------------------------------------------------------------------------------- samplers

def energy_grad(energy: Energy, z: torch.Tensor, sigma: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(E(z[, sigma]), grad_z E) without touching any parameter's .grad."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        u = energy(z) if sigma is None else energy(z, sigma)
        (grad,) = torch.autograd.grad(u.sum(), z)
    return u.detach(), grad


def langevin(energy: Energy, z: torch.Tensor, settings: LangevinSettings, generator: Generators = None,
             callback: Callback = None) -> torch.Tensor:
    """Unadjusted Langevin dynamics (Welling & Teh 2011; short-run form of Nijkamp et al. 2019).

    z <- z - (eta / 2) * grad U(z) + sqrt(eta) * tau * eps,  eps ~ N(0, I), for `steps` steps from z0.
    """
    z = z.detach().clone()
    noise_std = math.sqrt(settings.step_size) * settings.noise_scale
    for i in range(settings.steps):
        u, grad = energy_grad(energy, z)
        if settings.grad_clip is not None:
            grad = grad.clamp(-settings.grad_clip, settings.grad_clip)
        _report(callback, i, z, None, u, grad)
        noise = _randn(z, generator) if noise_std else 0.0
        z = z - 0.5 * settings.step_size * grad + noise_std * noise
    return z.detach()


def heun(energy: Energy, z: torch.Tensor, settings: AnnealedSettings, generator: Generators = None,
         callback: Callback = None) -> torch.Tensor:
    """Heun's 2nd-order method on the probability-flow ODE dz/dsigma = sigma grad E(z, sigma) (Karras et al. 2022,
    Algorithm 1), ending with a Tweedie denoising step z - sigma_min^2 grad E; optional MALA corrector."""
    sigmas = karras_sigmas(settings.levels, settings.sigma_min, settings.sigma_max, settings.rho)
    z = z.detach().clone()
    for i, sigma in enumerate(sigmas.tolist()):
        u, grad = energy_grad(energy, z, sigma)
        _report(callback, i, z, sigma, u, grad)
        if i == len(sigmas) - 1:
            return (z - sigma ** 2 * grad).detach()
        nxt = float(sigmas[i + 1])
        slope = sigma * grad
        euler = z + (nxt - sigma) * slope
        u2, grad2 = energy_grad(energy, euler, nxt)
        _report(callback, i, euler, nxt, u2, grad2)
        z = z + (nxt - sigma) * 0.5 * (slope + nxt * grad2)
        z = _corrector(energy, z, nxt, i + 1, settings, generator, callback)
    return z.detach()


def ancestral(energy: Energy, z: torch.Tensor, settings: AnnealedSettings, generator: Generators = None,
              callback: Callback = None) -> torch.Tensor:
    """Ancestral reverse diffusion (DDPM, Ho et al. 2020, in k-diffusion's Euler-ancestral form) on the score
    -grad E(z, sigma), ending with a Tweedie denoising step z - sigma_min^2 grad E; optional MALA corrector."""
    sigmas = karras_sigmas(settings.levels, settings.sigma_min, settings.sigma_max, settings.rho)
    z = z.detach().clone()
    for i, sigma in enumerate(sigmas.tolist()):
        u, grad = energy_grad(energy, z, sigma)
        _report(callback, i, z, sigma, u, grad)
        if i == len(sigmas) - 1:
            return (z - sigma ** 2 * grad).detach()
        nxt = float(sigmas[i + 1])
        # The exact posterior step of a Gaussian transition from sigma to nxt: deterministic part down to
        # sigma_down, fresh noise sigma_up, sigma_down^2 + sigma_up^2 = nxt^2.
        sigma_up = math.sqrt(nxt ** 2 * (sigma ** 2 - nxt ** 2) / sigma ** 2)
        sigma_down = math.sqrt(nxt ** 2 - sigma_up ** 2)
        z = z + (sigma_down - sigma) * sigma * grad + sigma_up * _randn(z, generator)
        z = _corrector(energy, z, nxt, i + 1, settings, generator, callback)
    return z.detach()


def mala(energy: Energy, z: torch.Tensor, sigma: float | None, step: float, steps: int, generator: Generators = None,
         callback: Callback = None, i: int = 0) -> torch.Tensor:
    """Metropolis-adjusted Langevin (Roberts & Tweedie 1996) on exp(-E(., sigma)): each proposal
    z' = z - h grad E + sqrt(2h) xi is accepted per chain with probability min(1, p(z') q(z | z') / p(z) q(z' | z))."""
    u, grad = energy_grad(energy, z, sigma)
    _report(callback, i, z, sigma, u, grad)
    for _ in range(steps):
        proposal = z - step * grad + math.sqrt(2 * step) * _randn(z, generator)
        u_new, grad_new = energy_grad(energy, proposal, sigma)
        forward = (proposal - z + step * grad).flatten(1).pow(2).sum(1)
        backward = (z - proposal + step * grad_new).flatten(1).pow(2).sum(1)
        log_ratio = u - u_new - (backward - forward) / (4 * step)
        accept = torch.log(_rand(len(z), generator, z.device)) < log_ratio
        keep = accept.view(-1, *[1] * (z.dim() - 1))
        z, u, grad = torch.where(keep, proposal, z), torch.where(accept, u_new, u), torch.where(keep, grad_new, grad)
        _report(callback, i, z, sigma, u, grad, accepted=accept)
    return z.detach()


def _corrector(energy, z, sigma: float, level: int, settings: AnnealedSettings, generator, callback) -> torch.Tensor:
    if settings.mala_levels and level >= settings.levels - settings.mala_levels:
        z = mala(energy, z, sigma, settings.mala_step_scale * sigma ** 2, settings.mala_steps, generator, callback,
                 level)
    return z


def ddim(model, z: torch.Tensor, settings: DDIMSettings, generator: Generators = None,
         callback: Callback = None) -> torch.Tensor:
    """DDIM (Song et al. 2021) with the model's own noise schedule (diffusers' DDIMScheduler); `model(z, t)`
    predicts the noise. With eta > 0 the step's noise comes from each chain's own generator."""
    scheduler = model.sampling_scheduler()
    scheduler.set_timesteps(settings.steps)
    z = z.detach().clone()
    for i, t in enumerate(scheduler.timesteps):
        with torch.no_grad():
            eps = model(z, t)
        if callback is not None:  # its noise level in sigma terms, and its clean estimate
            alpha = float(scheduler.alphas_cumprod[int(t)])
            _report(callback, i, z, math.sqrt((1 - alpha) / alpha), torch.full((len(z),), float("nan")), eps,
                    denoised=(z - math.sqrt(1 - alpha) * eps) / math.sqrt(alpha))
        noise = _randn(z, generator) if settings.eta else None
        z = scheduler.step(eps, t, z, eta=settings.eta, variance_noise=noise).prev_sample
    return z.detach()


SAMPLERS = {"langevin": langevin, "heun": heun, "ancestral": ancestral, "ddim": ddim}


def karras_sigmas(levels: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho (Karras et al. 2022)."""
    ramp = torch.linspace(0, 1, levels, dtype=torch.float64)
    top, bottom = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (top + ramp * (bottom - top)) ** rho


def sample(model, num: int, settings, generator: Generators = None, device: torch.device | str = "cpu",
           callback: Callback = None, conditions: list[str] | None = None) -> torch.Tensor:
    """`num` latents from fresh chains: the model's own starts (`model.initial_latents`), then the sampler the
    settings name, on the model's energy or, with `conditions` (one per chain), on the energy the model composes for
    them. This is what generation runs for any model kind."""
    z0 = model.initial_latents(num, settings, generator, device)
    energy = model if conditions is None else model.conditioned(conditions, settings)
    return SAMPLERS[settings.name](energy, z0, settings, generator, callback)


class SamplerStats:
    """A callback that counts gradient evaluations per chain and Metropolis acceptances."""

    def __init__(self):
        self.evaluations, self.chains, self.accepted, self.proposed = 0, 0, 0, 0

    def __call__(self, info: dict) -> None:
        self.chains = max(self.chains, len(info["z"]))
        self.evaluations += 1
        if "accepted" in info:
            self.accepted += int(info["accepted"].sum())
            self.proposed += len(info["accepted"])

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None


# ---------------------------------------------------------------------------------------------- noise

def _report(callback: Callback, i: int, z, sigma, u, grad, **extra) -> None:
    if callback is not None:
        if sigma is not None and "denoised" not in extra:  # Tweedie: E[x | z] = z - sigma^2 grad E(z, sigma)
            extra["denoised"] = z - sigma ** 2 * grad
        callback({"i": i, "z": z, "sigma": sigma, "energy": u, "grad_norm": grad.flatten(1).norm(dim=1)} | extra)


def _randn(like: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Noise shaped like `like`, drawn on the generator's device (CPU generators keep chains reproducible on any
    device). A list holds one generator per chain: chain i's noise then depends on nothing but its own seed."""
    if isinstance(generator, list):
        return torch.stack([_randn(like[i], g) for i, g in enumerate(generator)])
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _rand(num: int, generator: Generators, device) -> torch.Tensor:
    """`num` uniforms in [0, 1), one per chain (from each chain's own generator when given a list)."""
    if isinstance(generator, list):
        return torch.cat([torch.rand(1, generator=g, device=g.device) for g in generator]).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.rand(num, generator=generator, device=gen_device).to(device)


def initial_noise(shape: tuple[int, ...], std: float, generator: Generators = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    return _randn(torch.empty(shape, device=device), generator) * std
