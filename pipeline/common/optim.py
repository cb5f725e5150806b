"""The optimiser every training loop uses (the models, the demo VAE, the evaluator): Adam (AdamW with weight decay),
a linear warm-up, then a constant rate or a cosine decay."""

from __future__ import annotations

import math
from typing import Iterable

import torch


def adam(parameters: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999),
         weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam (Kingma & Ba 2015), or AdamW (decoupled weight decay, Loshchilov & Hutter 2019) when weight_decay > 0."""
    if weight_decay:
        return torch.optim.AdamW(parameters, lr=lr, betas=betas, weight_decay=weight_decay)
    return torch.optim.Adam(parameters, lr=lr, betas=betas)


def learning_rate(step: int, lr: float, warmup_steps: int = 0, total_steps: int | None = None,
                  final_lr: float = 0.0) -> float:
    """The rate at `step` (0-based): linear warm-up to `lr` over `warmup_steps`, then constant, or with
    `total_steps` a cosine decay from `lr` to `final_lr` at the last step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if total_steps is None:
        return lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final_lr + (lr - final_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def power_ema_gamma(sigma_rel: float) -> float:
    """The exponent of EDM2's power-function EMA whose relative standard deviation is `sigma_rel` (Karras et al.
    2024, eq. 3: sigma_rel^2 = (g + 1) / ((g + 2)^2 (g + 3)), solved for its real root)."""
    import numpy as np

    roots = np.roots([1, 7, 16 - sigma_rel ** -2, 12 - sigma_rel ** -2])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def power_ema_decay(step: int, gamma: float) -> float:
    """The power-function EMA's decay at 1-based `step`: (1 - 1/step)^(gamma + 1), so the average always spans the
    same share of the steps so far (EDM2)."""
    return (1 - 1 / step) ** (gamma + 1)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
