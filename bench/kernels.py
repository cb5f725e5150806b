"""Benchmark: do channels_last or torch.compile speed up the two hot loops, the energy gradient and the decoder?

    .venv/bin/python bench/kernels.py [--model models/demo/ebm] [--vae models/demo] [--batch 64] [--repeats 5]

For each variant (eager, channels_last memory format, torch.compile with the inductor backend) it times, in this
process on every core, the sampler's unit of work (one energy gradient of a batch, as `langevin` samplers call it)
and one decode of a batch, after a warm-up that includes compilation; compile time is reported apart. The
outputs must agree with eager's (max abs difference reported). Writes bench/out/kernels.json.
"""

from __future__ import annotations

import argparse
import os
import time

from common import REPO, write_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO / "models/demo/ebm"))
    p.add_argument("--vae", default=str(REPO / "models/demo"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", default=str(REPO / "bench" / "out" / "kernels.json"))
    args = p.parse_args()

    import torch

    from pipeline.langevin import energy_grad
    from pipeline.models import load_model
    from pipeline.vae import decode, load_vae, resolve_vae

    torch.set_num_threads(os.cpu_count())
    model = load_model(args.model).eval()
    vae = load_vae(resolve_vae(args.vae), torch.device("cpu"), torch.float32)
    z = torch.randn(args.batch, *model.config.latent_shape, generator=torch.Generator().manual_seed(0))
    sigma = getattr(model.config, "sigma_data", None)  # a noise-conditional energy at a mid level; else U(z)

    def gradient(m):
        return lambda x: energy_grad(m, x, sigma)[1]

    def decoder(v):
        return lambda x: decode(v, x)

    variants = {"eager": (lambda m: m, lambda x: x),
                "channels_last": (lambda m: m.to(memory_format=torch.channels_last),
                                  lambda x: x.contiguous(memory_format=torch.channels_last)),
                "compile": (lambda m: torch.compile(m), lambda x: x)}
    result = {"benchmark": "kernels", "batch": args.batch, "cpus": os.cpu_count(), "model": args.model,
              "latent_shape": list(model.config.latent_shape), "stages": {}}
    for stage, make, module in (("energy_gradient", gradient, model), ("decode", decoder, vae)):
        reference = make(module)(z)
        rows = {}
        for name, (wrap, fmt) in variants.items():
            import copy

            wrapped = wrap(copy.deepcopy(module))
            run = make(wrapped)
            tick = time.perf_counter()
            out = run(fmt(z))  # warm-up (and compilation)
            first = time.perf_counter() - tick
            times = []
            for _ in range(args.repeats):
                tick = time.perf_counter()
                run(fmt(z))
                times.append(time.perf_counter() - tick)
            best = min(times)
            rows[name] = {"seconds_per_batch": round(best, 4), "first_call_seconds": round(first, 2),
                          "max_abs_difference": float((out - reference).abs().max())}
        for row in rows.values():
            row["speed_over_eager"] = round(rows["eager"]["seconds_per_batch"] / row["seconds_per_batch"], 3)
        result["stages"][stage] = rows
    write_result(args.output, result)


if __name__ == "__main__":
    main()
