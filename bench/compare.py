"""Benchmark: the energy models and the diffusion baseline side by side, on the same latents, decoder and cores.

    .venv/bin/python bench/compare.py [--images 1000]          (make compare: the demo data must exist, make demo)

Methods (the shipped demo models): the short-run CD energy as shipped; the seed's original setting (the same CD
energy, 100 short-run steps from N(0, I)); the noise-conditional DSM energy (Heun, 25 levels); DDIM-50 and DDIM-10
on the noise-predicting UNet. For each: network evaluations per image (energy gradients or UNet forwards),
parameters, GFLOP per image (FlopCounterMode, x2 for a gradient), sampling-stage images/s in this process,
end-to-end images/s through the generation DAG (start-up apart from the steady state between the first and the
last finished shard), and the feature-space quality of its images against the same held-out set in one
`jobs.evaluate` run (FD, recognisable, density, coverage). Writes bench/compare.md and bench/out/compare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from common import REPO, write_result

METHODS = {  # name: (model folder under models/demo, sampler overrides)
    "cd (shipped)": ("ebm-cd", {}),
    "seed original (cd, 100 steps from noise)": ("ebm-cd", {"steps": 100, "start": "noise"}),
    "dsm energy (heun 25)": ("ebm", {}),
    "ddim-50": ("unet", {"steps": 50}),
    "ddim-10": ("unet", {"steps": 10}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--latents", default=None, help="the demo latents (default: build/demo/latents-<vae id>)")
    p.add_argument("--work", default=str(REPO / "build" / "compare"))
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    args = p.parse_args()

    import ray
    import torch
    from generate import matmul_peak, sampler_stage  # bench/generate.py

    from pipeline.common.config import from_dict
    from pipeline.evaluation.report import EvaluateConfig, run_evaluation
    from pipeline.generation import GenerateConfig, run_generation
    from pipeline.sampling.settings import sampler_settings
    from pipeline.vae.autoencoder import resolve_vae

    demo = REPO / "models" / "demo"
    latents = Path(args.latents or REPO / "build" / "demo" / f"latents-{resolve_vae(demo).weights_sha256()[:12]}")
    if not (latents / "manifest.json").is_file():
        raise SystemExit(f"no demo latents at {latents}: run `make demo` first")
    torch.set_num_threads(args.cpus)
    work = Path(args.work)
    peak = matmul_peak()
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    rows, folders = [], {}
    for i, (name, (folder, overrides)) in enumerate(METHODS.items()):
        out = work / f"method-{i}"
        tick = time.perf_counter()
        summary = run_generation(from_dict(GenerateConfig, dict(
            model=str(demo / folder), vae=str(demo), output=str(out), num_images=args.images, images_per_shard=125,
            format="parquet", sampler=overrides, progress_interval_s=1e9)))
        seconds = time.perf_counter() - tick
        finished = sorted(f.stat().st_mtime for f in (out / "parquet").glob("images-*.parquet"))
        steady = (len(finished) - 1) * 125 / (finished[-1] - finished[0]) if len(finished) > 1 else None
        stage = sampler_stage(demo / folder, overrides, peak)
        rows.append({"method": name, "model": folder, "sampler": summary["sampler"], **stage,
                     "dag_images_per_s": round(args.images / seconds, 2),
                     "dag_steady_images_per_s": round(steady, 2) if steady else None,
                     "dag_startup_s": round(seconds - (args.images - 125) / steady, 1) if steady else None})
        folders[name] = out
    ray.shutdown()

    first, *others = folders.values()
    report = run_evaluation(from_dict(EvaluateConfig, dict(
        generated=str(first), reference=str(latents), evaluator=str(demo / "evaluator"), output=str(work / "report"),
        compare=[str(f) for f in others], num_samples=args.images)))
    space = report["features"]["evaluator"]
    names = ["generated"] + [f"{f.resolve().name} ({sampler_settings(read_manifest(f)['sampler']).name})"
                             for f in others]
    for row, key in zip(rows, names):
        m = space["metrics"][key]
        row.update({k: round(m[k], 3) for k in ("fd", "recognisable", "class_tv", "density", "coverage")})
    real = space["reference"]["recognisable"]
    write_result(REPO / "bench" / "out" / "compare.json", {"benchmark": "compare", "images": args.images,
                                                          "cpus": args.cpus, "matmul_gflops_peak": peak / 1e9,
                                                          "real_recognisable": real, "rows": rows})
    (REPO / "bench" / "compare.md").write_text(markdown(rows, real, args))


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def markdown(rows: list[dict], real: float, args) -> str:
    lines = ["# Energy models vs the diffusion baseline (`make compare`)", "",
             f"{args.images} images per method from the shipped demo models, {args.cpus} CPUs, one run "
             f"(bench/compare.py). Quality in the demo evaluator's feature space against the held-out shard, decoded "
             f"by the same VAE (held-out real images: recognisable {real:.3f}).", "",
             "| method | evaluations/image | parameters | GFLOP/image | sampler images/s | DAG images/s (steady) "
             "| DAG start-up s | FD | recognisable | class TV | density | coverage |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['evaluations_per_image']} | {r['parameters'] / 1e6:.2f}M | "
                     f"{r['gflop_per_image']} | {r['sampler_images_per_s']} | {r['dag_steady_images_per_s']} | "
                     f"{r['dag_startup_s']} | {r['fd']} | {r['recognisable']} | {r['class_tv']} | {r['density']} | "
                     f"{r['coverage']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
