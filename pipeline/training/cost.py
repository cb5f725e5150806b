"""What training costs, in FLOPs, so that models of different kinds are compared at equal training compute.

    training_flops_per_sample(objective, model, latents)   # one latent's share of a step: the loss and its backward

Counted, not assumed (`common.flops.FlopCount`): on the demo's widths a denoising-score-matching energy's step is 6
forwards per latent (forward, gradient, double backward), a score network's 3 (forward, backward), so at equal FLOPs
the score network takes twice the steps. The export records `training.flops` = this x batch x workers x steps.
"""

from __future__ import annotations

import torch

from ..common.flops import FlopCount


def training_flops_per_sample(objective, model, latents: torch.Tensor, labels: torch.Tensor | None = None) -> float:
    """FLOPs of one training step of `objective` on `model`, per latent of the batch `latents` (and `labels`). Runs
    a real step's loss and backward (the gradients it leaves are cleared; the weights are not changed)."""
    with FlopCount() as count:
        loss, _, _ = objective.loss(model, model, latents, labels)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return count.flops / len(latents)
