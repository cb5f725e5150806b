"""Benchmark: each model's sampler through the Ray generation DAG and a bare loop, in one run, on the same cores.

    .venv/bin/python bench/generate.py [--images 512] [--models models/demo/ebm-cd models/demo/ebm] [--vae models/demo]

For every model folder (default: the shipped short-run CD model and the shipped noise-conditional energy):
- Ray DAG vs bare loop: the same model, sampler, VAE decoder, PNG encoding and shard writer; the bare loop runs
  them one after another in this process with every core as a torch thread; the DAG has configs/generate.yaml's
  shape (sampler actors fill the CPUs). Start-up (cluster, actors, batch probes) is reported apart from the steady
  state (images/s between the first and the last finished shard).
- Sampling stage alone: images/s of the sampler in this process, gradient evaluations per image, FLOPs per image
  (2 x the energy forward's FLOPs per gradient, counted by torch's FlopCounterMode: a forward plus an input-gradient
  backward), and the achieved GFLOP/s as a share of a float32 4096^2 matrix-multiply peak from the same run. The
  count is that of direct convolution; oneDNN may use cheaper algorithms, so a share near 1 means GEMM speed.
- A batch-size sweep of the sampling stage with the size the memory probe picks marked.
Writes bench/out/generate.json. Ratios measured in one run are the figures to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from common import REPO, write_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--models", nargs="+", default=[str(REPO / "models/demo/ebm-cd"), str(REPO / "models/demo/ebm")])
    p.add_argument("--vae", default=str(REPO / "models/demo"))
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--output", default=str(REPO / "bench" / "out" / "generate.json"))
    args = p.parse_args()

    import ray
    import torch

    torch.set_num_threads(args.cpus)
    work = Path(tempfile.mkdtemp(prefix="ebd-bench-gen-"))
    try:
        peak = matmul_peak()
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        models = [bench_model(Path(m), args, work / f"m{i}", peak) for i, m in enumerate(args.models)]
        ray.shutdown()
        write_result(args.output, {"benchmark": "generate", "images": args.images, "cpus": args.cpus,
                                   "matmul_gflops_peak": round(peak / 1e9, 2), "models": models})
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_model(model_dir: Path, args, work: Path, peak: float) -> dict:
    import numpy as np
    import torch

    from pipeline.common.config import load_config
    from pipeline.common.memory import probe_batch_size
    from pipeline.generation import GenerateConfig, run_generation
    from pipeline.io import image_shards as sinks
    from pipeline.models import load_model
    from pipeline.sampling.core import sample
    from pipeline.sampling.noise import chain_seed, image_key
    from pipeline.vae.autoencoder import decode, load_vae, resolve_vae

    model = load_model(model_dir)
    settings, shape = model.sampler, tuple(model.config.latent_shape)
    vae = load_vae(resolve_vae(args.vae), torch.device("cpu"), torch.float32)
    per_shard, batch = 64, 64  # 8 shards in the default 512 images: enough finish times for a steady rate

    # Bare loop: the same stages one after another in this process.
    start = time.perf_counter()
    for shard in range(args.images // per_shard):
        first = shard * per_shard
        seeds = [chain_seed(0, i) for i in range(first, first + per_shard)]
        pixels, energies = [], []
        for a in range(0, per_shard, batch):
            z = sample(model, len(seeds[a:a + batch]), settings, [torch.Generator().manual_seed(s)
                                                                  for s in seeds[a:a + batch]])
            with torch.no_grad():
                energies.append(model.energy(z))
                x = decode(vae, z)
            pixels.append(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
        sinks.write_image_shard(work / "bare", shard, "parquet",
                                [image_key(0, i) for i in range(first, first + per_shard)], np.concatenate(pixels),
                                seeds, torch.cat(energies).numpy(), "bench", extra_stats={})
    bare_s = time.perf_counter() - start

    # The Ray DAG on a local cluster of the same cores; steady state from the shards' finish times.
    cfg = load_config(GenerateConfig, REPO / "configs" / "generate.yaml", model=str(model_dir), vae=args.vae,
                      output=str(work / "ray"), num_images=args.images, images_per_shard=per_shard,
                      format="parquet", batch_size=batch, progress_interval_s=1e9)
    start = time.perf_counter()
    summary = run_generation(cfg)
    ray_s = time.perf_counter() - start
    finished = sorted(Path(work / "ray" / "parquet").glob("images-*.parquet"), key=lambda f: f.stat().st_mtime)
    times = [f.stat().st_mtime for f in finished]
    steady = (len(times) - 1) * per_shard / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None

    stage = sampler_stage(model_dir, {}, peak, batch)
    probe = probe_batch_size(lambda n: sample(model, n, _short(settings)), torch.device("cpu"), 2 * 1024**3)
    sweep = []
    for size in sorted({8, 32, 128, 256, probe["batch_size"]}):
        tick = time.perf_counter()
        sample(model, size, _short(settings, 4))
        sweep.append({"batch_size": size, "sampler_images_per_s_at_4_gradients": round(
            size / (time.perf_counter() - tick), 1), "auto": size == probe["batch_size"]})
    return {"model": model_dir.name, "kind": type(model).__name__, "sampler": settings.name,
            "settings": json.loads(json.dumps(settings.__dict__)), "latent_shape": list(shape), **stage,
            "gradient_evaluations_per_image": stage["evaluations_per_image"],
            "summary_gradient_evaluations_per_image": summary["gradient_evaluations_per_image"],
            "bare_images_per_s": round(args.images / bare_s, 2), "ray_images_per_s": round(args.images / ray_s, 2),
            "ray_steady_images_per_s": round(steady, 2) if steady else None,
            "ray_startup_s": round(ray_s - (args.images - per_shard) / steady, 1) if steady else None,
            "ray_over_bare": round(bare_s / ray_s, 3), "sampler_actors": summary["sampler_actors"],
            "ray_steady_over_bare": round(steady / (args.images / bare_s), 3) if steady else None,
            "sweep": sweep, "auto_batch": probe["batch_size"]}


def sampler_stage(model_dir: Path, overrides: dict, peak: float, batch: int = 64) -> dict:
    """The sampling stage alone, in this process: images/s, network evaluations and GFLOP per image (an energy
    gradient counted as 2 forwards), and the achieved GFLOP/s as a share of the GEMM peak."""
    from dataclasses import asdict

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.models import load_model
    from pipeline.sampling.core import SamplerStats, sample
    from pipeline.sampling.settings import sampler_settings

    model = load_model(model_dir)
    settings = sampler_settings(asdict(model.sampler) | overrides)
    stats = SamplerStats()
    sample(model, 8, settings, torch.Generator().manual_seed(0), callback=stats)  # warm-up, and the count
    evaluations = stats.evaluations
    tick = time.perf_counter()
    sample(model, batch, settings, torch.Generator().manual_seed(1))
    seconds = time.perf_counter() - tick
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.evaluation_forward(torch.randn(batch, *model.config.latent_shape))
    per_evaluation = counter.get_total_flops() / batch * (2 if model.EVALUATION_IS_GRADIENT else 1)
    achieved = per_evaluation * evaluations * batch / seconds
    return {"evaluations_per_image": evaluations, "parameters": sum(p.numel() for p in model.parameters()),
            "gflop_per_image": round(per_evaluation * evaluations / 1e9, 3),
            "sampler_images_per_s": round(batch / seconds, 2), "sampler_gflops_achieved": round(achieved / 1e9, 2),
            "sampler_fraction_of_peak": round(achieved / peak, 3)}


def _short(settings, gradients: int = 2):
    """The same sampler cut to about `gradients` gradient evaluations (memory and per-gradient speed do not depend
    on how many there are)."""
    from dataclasses import replace
    return replace(settings, steps=gradients) if settings.name == "langevin" else \
        replace(settings, levels=max(2, gradients // 2 + 1), mala_levels=0)


def matmul_peak() -> float:
    """The best float32 4096^2 matrix multiply of five, in FLOP/s: the machine's GEMM peak under this run."""
    import torch

    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    a @ b
    best = float("inf")
    for _ in range(5):
        tick = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - tick)
    return 2 * 4096**3 / best


if __name__ == "__main__":
    main()
