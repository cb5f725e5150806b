"""Training compute, counted: the basis of comparing an energy with a score network at equal training FLOPs."""

from __future__ import annotations

import pytest
import torch

from pipeline.common.config import from_dict
from pipeline.common.flops import FlopCount
from pipeline.training.config import TrainConfig
from pipeline.training.cost import training_flops_per_sample
from pipeline.training.objectives import OBJECTIVES

SHAPE = (4, 8, 8)


def objective_and_model(output: str):
    cfg = from_dict(TrainConfig, dict(latents="x", output="y", objective=dict(
        name="dsm", output=output, channels=[16, 32], norm_groups=8)))
    cls = OBJECTIVES["dsm"]
    model = cls.build_model(cfg.objective, SHAPE, cls.placeholder(cfg.objective), {})
    return cls(cfg.objective, None, SHAPE, torch.Generator().manual_seed(0)), model


def forward_flops(model, z) -> int:
    with FlopCount() as count, torch.no_grad():
        model(z, torch.ones(len(z)))
    return count.flops


def test_an_energy_step_costs_six_forwards_and_twice_a_score_network_step_of_the_same_widths():
    z = torch.randn(4, *SHAPE)
    energy_objective, energy = objective_and_model("energy")
    score_objective, score = objective_and_model("score")
    energy_step = training_flops_per_sample(energy_objective, energy, z)
    score_step = training_flops_per_sample(score_objective, score, z)
    forward = forward_flops(energy, z) / len(z)
    assert forward > 0 and forward == forward_flops(score, z) / len(z)  # the same network under both
    # forward, gradient (a backward), double backward (two); a score network: forward, backward. Not exactly 6 and
    # 3: a backward skips what nothing needs (the first convolution's input gradient in the score network's)
    assert energy_step == pytest.approx(6 * forward, rel=0.01)
    assert score_step == pytest.approx(3 * forward, rel=0.01)
    assert energy_step / score_step == pytest.approx(2, rel=0.01)
    # counting runs a real step's loss and backward, but leaves no gradients behind for a later step to apply
    assert all(p.grad is None for p in energy.parameters())
