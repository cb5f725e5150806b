"""Benchmark: do channels_last or torch.compile speed up the two hot loops, the energy gradient and the decoder?

    .venv/bin/python bench/kernels.py [--model models/demo/ebm] [--vae models/demo] [--batch 64] [--repeats 5]

For each variant (eager, channels_last memory format, torch.compile with the inductor backend) it times, in this
process on every core, the sampler's unit of work (one energy gradient of a batch, as `langevin` samplers call it)
and one decode of a batch, after a warm-up that includes compilation (reported apart), as the median of rounds that
run every variant in turn. The outputs are compared with eager's (max abs difference beside the largest eager
value). Writes bench/out/kernels.json.
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
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--output", default=str(REPO / "bench" / "out" / "kernels.json"))
    args = p.parse_args()

    import torch

    from pipeline.models import load_model
    from pipeline.sampling.denoisers import energy_grad
    from pipeline.vae.autoencoder import decode, load_vae, resolve_vae

    torch.set_num_threads(os.cpu_count())
    model = load_model(args.model).eval()
    vae = load_vae(resolve_vae(args.vae), torch.device("cpu"), torch.float32)
    z = torch.randn(args.batch, *model.config.latent_shape, generator=torch.Generator().manual_seed(0))
    sigma = getattr(model.config, "sigma_data", None)  # a noise-conditional energy at a mid level; else U(z)

    def gradient(m):
        return lambda x: energy_grad(m, x, sigma)[1]

    def decoder(v):
        return lambda x: decode(v, x)

    def compiled(m):
        # torch.compile wraps forward(); the decoder path calls vae.decode(), so compile the modules it runs
        if hasattr(m, "decoder"):
            m.decoder, m.post_quant_conv = torch.compile(m.decoder), torch.compile(m.post_quant_conv)
            return m
        return torch.compile(m)

    variants = {"eager": (lambda m: m, lambda x: x),
                "channels_last": (lambda m: m.to(memory_format=torch.channels_last),
                                  lambda x: x.contiguous(memory_format=torch.channels_last)),
                "compile": (compiled, lambda x: x)}
    result = {"benchmark": "kernels", "batch": args.batch, "cpus": os.cpu_count(), "model": args.model,
              "latent_shape": list(model.config.latent_shape), "repeats": args.repeats, "stages": {}}
    for stage, make, module in (("energy_gradient", gradient, model), ("decode", decoder, vae)):
        reference = make(module)(z)
        runs, rows = {}, {}
        for name, (wrap, fmt) in variants.items():
            import copy

            run = make(wrap(copy.deepcopy(module)))
            tick = time.perf_counter()
            out = run(fmt(z))  # warm-up (and compilation)
            rows[name] = {"first_call_seconds": round(time.perf_counter() - tick, 2),
                          "max_abs_difference": float((out - reference).abs().max()),
                          "reference_max_abs": float(reference.abs().max())}
            runs[name] = (run, fmt, [])
        for _ in range(args.repeats):  # rounds over the variants: drift on a shared machine hits all alike
            for name, (run, fmt, times) in runs.items():
                tick = time.perf_counter()
                run(fmt(z))
                times.append(time.perf_counter() - tick)
        for name, (_, _, times) in runs.items():
            rows[name]["seconds_per_batch"] = round(sorted(times)[len(times) // 2], 4)  # the median
        for row in rows.values():
            row["speed_over_eager"] = round(rows["eager"]["seconds_per_batch"] / row["seconds_per_batch"], 3)
        result["stages"][stage] = rows
    write_result(args.output, result)


if __name__ == "__main__":
    main()
