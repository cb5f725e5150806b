"""Benchmark: EBM training throughput under Ray Train with one and two workers.

    .venv/bin/python bench/train.py [--steps 60] [--latent 4,16,16] [--langevin-steps 40]

Reports training samples/s and Langevin sample-steps/s (samples x K per second) as measured inside the training
loop (start-up excluded), for 1 worker x 1 CPU, 1 worker x 2 CPUs and 2 workers x 1 CPU, plus the scaling ratio
of two workers over one. Writes bench/out/train.json. Ratios measured in one run are the figures to compare.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
from common import REPO, write_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--latent", default="4,16,16")
    p.add_argument("--langevin-steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--output", default=str(REPO / "bench" / "out" / "train.json"))
    args = p.parse_args()

    import ray

    from pipeline.common.config import from_dict
    from pipeline.io.latent_shards import write_latent_dataset
    from pipeline.training.config import TrainConfig
    from pipeline.training.job import run_training

    shape = tuple(int(x) for x in args.latent.split(","))
    work = Path(tempfile.mkdtemp(prefix="ebd-bench-train-"))
    try:
        rng = np.random.default_rng(0)
        write_latent_dataset(work / "latents", rng.normal(size=(4096, *shape)).astype(np.float32), shard_size=512)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        runs = {}
        for name, workers, cpus in (("1x1cpu", 1, 1.0), ("1x2cpu", 1, 2.0), ("2x1cpu", 2, 1.0)):
            cfg = from_dict(TrainConfig, dict(objective="cd",  # the short-run recipe: Langevin in the loop
                latents=str(work / "latents"), output=str(work / name), max_steps=args.steps,
                num_workers=workers, cpus_per_worker=cpus, batch_size=args.batch_size,
                langevin_steps=args.langevin_steps, channels=[32, 64], log_every=args.steps,
                checkpoint_every=args.steps))
            metrics = run_training(cfg)
            runs[name] = {"samples_per_s": round(metrics["samples_per_s"], 1),
                          "langevin_sample_steps_per_s": round(metrics["samples_per_s"] * args.langevin_steps, 1)}
            print(name, runs[name], flush=True)
        ray.shutdown()
        result = {"benchmark": "train", "latent_shape": list(shape), "steps": args.steps,
                  "langevin_steps": args.langevin_steps, "batch_size_per_worker": args.batch_size, "runs": runs,
                  "two_workers_over_one": round(runs["2x1cpu"]["samples_per_s"] / runs["1x1cpu"]["samples_per_s"], 3),
                  "two_workers_over_one_worker_two_threads":
                      round(runs["2x1cpu"]["samples_per_s"] / runs["1x2cpu"]["samples_per_s"], 3)}
        write_result(args.output, result)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
