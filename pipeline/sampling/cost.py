"""What sampling an image costs, in FLOPs (counted as it runs), for placement decisions and the benchmarks.

    evaluation_flops(model)      # one network evaluation of one image, under the model's own sampler
    sampling_flops(model)        # one image: x the evaluations that sampler takes
    cpu_gflops(model)            # GFLOP/s one CPU thread evaluates it at, timed here (the capacity model's CPU rate)

An energy's evaluation is its gradient, a forward and a backward; a score or noise-prediction network's is one
forward. Both are counted as they run (`common.flops.FlopCount`), not assumed.
"""

from __future__ import annotations

import torch

from ..common.flops import FlopCount


def evaluation_flops(model, settings=None) -> float:
    """FLOPs of one sampler evaluation of one image on `model` (any kind) under `settings` (default: its own)."""
    settings = settings if settings is not None else model.sampler
    evaluate = model.sampling_model(settings)
    z = torch.zeros(1, *model.config.latent_shape, device=next(model.parameters()).device)
    sigma = 1.0 if hasattr(settings, "sigma_max") else None  # a short-run energy takes no noise level
    with FlopCount() as count:
        evaluate(z, sigma)
    return float(count.flops)


def sampling_flops(model, settings=None) -> float:
    """FLOPs of sampling one image with `settings` (default: the model's own): evaluations x one evaluation."""
    settings = settings if settings is not None else model.sampler
    return evaluation_flops(model, settings) * settings.gradient_evaluations()


def cpu_gflops(model, settings=None, batch: int = 4, repeats: int = 3) -> float:
    """GFLOP/s one CPU thread evaluates `model` at under `settings`: the best of `repeats` timed batches (a
    fraction of a second for the demo, a few seconds at Stable Diffusion's latent size)."""
    import time

    settings = settings if settings is not None else model.sampler
    evaluate = model.sampling_model(settings)
    z = torch.zeros(batch, *model.config.latent_shape)
    sigma = 1.0 if hasattr(settings, "sigma_max") else None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        evaluate(z, sigma)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            tick = time.perf_counter()
            evaluate(z, sigma)
            best = min(best, time.perf_counter() - tick)
    finally:
        torch.set_num_threads(threads)
    return evaluation_flops(model, settings) * batch / best / 1e9
