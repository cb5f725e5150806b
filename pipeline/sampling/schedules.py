"""Noise-level schedules: the levels a noise-level sampler visits, from the top level down to the last."""

from __future__ import annotations

import torch

from ..common.config import EbdError


def karras_sigmas(levels: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho (Karras et al. 2022),
    in float64: the levels do not depend on the dtype the chains run in."""
    ramp = torch.linspace(0, 1, levels, dtype=torch.float64)
    top, bottom = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (top + ramp * (bottom - top)) ** rho


def noise_levels(model, settings) -> list[float]:
    """The levels `settings` asks for on `model` (a model wrapped for sampling): the Karras schedule over
    [sigma_min, sigma_max], with `schedule: model` the network's own trained timesteps (`native_sigmas`), with
    `schedule: tuned` the levels fitted to the model (`settings.sigmas`)."""
    if settings.schedule == "tuned":
        return list(settings.sigmas)
    if settings.schedule == "model":
        native = getattr(model, "native_sigmas", None)
        if native is None:
            raise EbdError("sampler schedule 'model' needs a network trained on discrete timesteps (a DDPM noise "
                           "predictor): use schedule: karras")
        return native(settings.levels)
    return karras_sigmas(settings.levels, settings.sigma_min, settings.sigma_max, settings.rho).tolist()
