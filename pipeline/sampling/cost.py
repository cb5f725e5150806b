"""What sampling an image costs, in FLOPs (torch's FlopCounterMode), for placement decisions and the benchmarks.

    evaluation_flops(model)      # one network evaluation of one image, under the model's own sampler
    sampling_flops(model)        # one image: x the evaluations that sampler takes
    cpu_gflops(model)            # GFLOP/s one CPU thread evaluates it at, timed here (the capacity model's CPU rate)

An energy's evaluation is its gradient, a forward and a backward (counted, not assumed: FlopCounterMode follows
`backward`, not `autograd.grad`, so the count runs the same graph through `backward`); a score or noise-prediction
network's is one forward.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .denoisers import EnergyGradient


def evaluation_flops(model, settings=None) -> float:
    """FLOPs of one sampler evaluation of one image on `model` (any kind) under `settings` (default: its own)."""
    settings = settings if settings is not None else model.sampler
    evaluate = model.sampling_model(settings)
    z = torch.zeros(1, *model.config.latent_shape, device=next(model.parameters()).device)
    sigma = 1.0 if hasattr(settings, "sigma_max") else None  # a short-run energy takes no noise level
    with FlopCounterMode(display=False) as counter:
        if isinstance(evaluate, EnergyGradient):  # what energy_grad runs, through backward (see above)
            x = z.requires_grad_(True)
            (evaluate.energy(x) if sigma is None else evaluate.energy(x, sigma)).sum().backward(inputs=[x])
        else:
            evaluate(z, sigma)
    return float(counter.get_total_flops())


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
