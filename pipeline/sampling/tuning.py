"""Noise levels fitted to a model: the few-step schedule whose steps stay closest to the model's own many-step
probability-flow trajectory, found by dynamic programming over a fine grid of levels (GITS: Chen et al. 2024, "On
the Trajectory Regularity of ODE-based Diffusion Sampling").

    sigmas, record = fit_levels(model, settings, steps=6, chains=64, seed=0)

1. The teacher: the probability-flow ODE dz/dsigma = sigma grad E solved by Heun's method on a fine Karras grid of
   `grid` levels over the settings' [sigma_min, sigma_max], then one Euler step to sigma 0 (the clean estimate),
   from `chains` of the model's own chain starts.
2. The cost of a step from grid level i to a lower level j: the RMS distance, over the chains, between one Euler
   step from the teacher's state at i and the teacher's state at j (the step's local error; the slope at i is the
   teacher's, so every cost comes from the grid's evaluations alone, no more), weighted by how much of it reaches
   the data: the flow carries an error made at level sigma down shrunk by about s / sqrt(s^2 + sigma^2), s the data's
   scale (exactly so for Gaussian data of std s; s here is the std of the teacher's samples). Unweighted, the search
   spends the levels where the absolute errors are largest, at high noise, and its samples lose detail
   (bench/tuned-levels.md has both).
3. The path of exactly `steps` steps from the top level to sigma 0 whose summed cost is least (exact, by dynamic
   programming). Its starting points are the levels: a sampler with one evaluation per level (ipndm, euler,
   dpmpp_2m) visits them and ends at sigma 0 (an Euler step to 0 is the clean estimate those samplers end with).

Everything here is pure: the model's gradients, then arithmetic. `training.sampler_tuning` runs it on a model folder.
"""

from __future__ import annotations

import math

import torch

from .schedules import karras_sigmas
from .settings import NoiseLevelSettings

GRID = 60  # fine levels the teacher visits: 2 x GRID - 1 gradient evaluations of the chains


def teacher_trajectory(model, z: torch.Tensor, grid: list[float]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The teacher's state at each grid level and at sigma 0 (len(grid) + 1 states), and its slope dz/dsigma at
    each grid level (Heun between grid levels, Euler from the last one to 0)."""
    states, slopes = [z], []
    for i, sigma in enumerate(grid):
        _, grad = model(z, sigma)
        slope = sigma * grad
        slopes.append(slope)
        nxt = grid[i + 1] if i + 1 < len(grid) else 0.0
        euler = z + (nxt - sigma) * slope
        if nxt > 0:
            _, grad_next = model(euler, nxt)
            z = z + (nxt - sigma) * (slope + nxt * grad_next) / 2
        else:
            z = euler
        states.append(z.detach())
    return states, slopes


def step_costs(levels: list[float], states: list[torch.Tensor], slopes: list[torch.Tensor],
               weighted: bool = True) -> torch.Tensor:
    """cost[i, j] (i < j, j up to len(levels), the index of sigma 0): RMS error of one Euler step from the teacher's
    state at level i to level j, times the share of it that reaches the data (`weighted`); infinity elsewhere."""
    n = len(levels)
    targets = levels + [0.0]
    scale = float(states[-1].double().std())
    cost = torch.full((n + 1, n + 1), math.inf, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n + 1):
            step = states[i] + (targets[j] - levels[i]) * slopes[i]
            error = (step - states[j]).double().pow(2).flatten(1).mean(1).sqrt().mean()
            cost[i, j] = error * (scale / math.hypot(scale, targets[j]) if weighted else 1.0)
    return cost


def cheapest_path(cost: torch.Tensor, steps: int) -> tuple[list[int], float]:
    """The indices 0 = p_0 < p_1 < ... < p_steps = last of the path of `steps` steps through the cost matrix whose
    summed cost is least, and that sum."""
    n = cost.shape[0]
    best = torch.full((steps + 1, n), math.inf, dtype=torch.float64)
    parent = torch.zeros((steps + 1, n), dtype=torch.long)
    best[0, 0] = 0.0
    for k in range(1, steps + 1):
        total = best[k - 1][:, None] + cost  # from i (rows) to j (columns)
        best[k], parent[k] = total.min(0)
    path = [n - 1]
    for k in range(steps, 0, -1):
        path.append(int(parent[k, path[-1]]))
    return path[::-1], float(best[steps, n - 1])


@torch.no_grad()
def fit_levels(model, settings: NoiseLevelSettings, steps: int, chains: int = 64, seed: int = 0,
               grid: int = GRID, weighted: bool = True) -> tuple[list[float], dict]:
    """`steps` levels (top to bottom) for `model`, and a record of how they were found: the summed local error of
    the fitted path and of the Karras schedule with as many levels, on the same grid's teacher."""
    if not 2 <= steps < grid:
        raise ValueError(f"steps must be in [2, {grid - 1}], got {steps}")
    levels = karras_sigmas(grid, settings.sigma_min, settings.sigma_max, settings.rho).tolist()
    generators = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(chains)]
    z = model.initial_latents(chains, settings, generators, "cpu")
    wrapped = model.sampling_model(settings, None)
    with torch.enable_grad():  # an energy's gradient is autograd's
        states, slopes = teacher_trajectory(wrapped, z, levels)
    cost = step_costs(levels, states, slopes, weighted)
    path, fitted = cheapest_path(cost, steps)
    sigmas = [round(levels[i], 6) for i in path[:-1]]
    # the Karras schedule's own levels on this grid: the nearest grid level to each of its levels
    karras = karras_sigmas(steps, settings.sigma_min, settings.sigma_max, settings.rho).tolist()
    nearest = [min(range(grid), key=lambda g: abs(math.log(levels[g] / s))) for s in karras] + [grid]
    baseline = sum(float(cost[a, b]) for a, b in zip(nearest, nearest[1:]) if a < b)
    record = {"method": "GITS dynamic programming (Chen et al. 2024) on Euler local errors"
                        + (", weighted by the share reaching the data" if weighted else ""),
              "grid": grid, "chains": chains, "seed": seed, "teacher": f"heun on {grid} Karras levels",
              "teacher_gradients_per_chain": 2 * grid - 1, "steps": steps,
              "summed_local_error": round(fitted, 6), "karras_summed_local_error": round(baseline, 6)}
    return sigmas, record
