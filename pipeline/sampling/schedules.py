"""Noise-level schedules."""

from __future__ import annotations

import torch


def karras_sigmas(levels: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho (Karras et al. 2022),
    in float64: the levels do not depend on the dtype the chains run in."""
    ramp = torch.linspace(0, 1, levels, dtype=torch.float64)
    top, bottom = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (top + ramp * (bottom - top)) ** rho
