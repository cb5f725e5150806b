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


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
