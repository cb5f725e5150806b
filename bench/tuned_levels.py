"""Benchmark: few-gradient sampling on levels fitted to the model (`ebd tune-sampler`) against the Karras schedule with
as many levels, and against Heun with 49 gradients, on the demo energy, in one run on the same chains and cores.

    .venv/bin/python bench/tuned_levels.py --latents build/demo/latents-<id>     (after make demo)
    .venv/bin/python bench/tuned_levels.py --latents build/demo/emoji-latents-<id> --model models/emoji/ebm \\
        --num-samples 375 --output bench/tuned-levels-emoji                    (after make demo-emoji)

For each gradient budget K: the levels `sampling.tuning.fit_levels` fits for K (seed 0, 64 chains, the default
grid; the fitting's own cost is recorded), with its local errors weighted by the share that reaches the data (the
default) and unweighted, then images 0..N-1 of seed 0 sampled with iPNDM, DPM-Solver++(2M) and (3M) on the Karras
levels and on the fitted ones; every set scored against the held-out shard in the demo evaluator's feature
space as bench/pareto.py scores (FD, recognisable, class TV, density, coverage). Writes bench/tuned-levels.json and
bench/tuned-levels.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

from common import REPO, write_result
from pareto import demo_scorer

BUDGETS = (5, 6, 8, 12)
SOLVERS = ("ipndm", "dpmpp_2m", "dpmpp_3m")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latents", required=True, help="the demo latents folder (make demo precomputes it)")
    p.add_argument("--model", default=str(REPO / "models" / "demo" / "ebm"),
                   help="a model folder inside a shipped folder with its vae/ and evaluator/ (models/emoji/ebm)")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--output", default=str(REPO / "bench" / "tuned-levels"))
    args = p.parse_args()

    import torch

    from pipeline.models import load_model
    from pipeline.sampling.core import sample_latents
    from pipeline.sampling.tuning import fit_levels

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    base = replace(model.sampler, schedule="karras", sigmas=None, mala_levels=0)
    score, real = demo_scorer(args.latents, args.num_samples, Path(args.model).parent, Path(args.model).name)

    def point(settings, **extra) -> dict:
        tick = time.perf_counter()
        samples = sample_latents(model, range(args.num_samples), 0, settings, batch_size=args.batch_size)
        row = {"solver": settings.name, "levels": settings.levels, "schedule": settings.schedule,
               "gradients": settings.gradient_evaluations(), "sampler_seconds": round(time.perf_counter() - tick, 1),
               **extra, **{k: round(v, 4) for k, v in score(samples.latents).items()}}
        print(json.dumps(row), flush=True)
        return row

    rows = [point(replace(base, name="heun", levels=25))]  # 49 gradients: the reference bench/pareto.md uses
    fits = {}
    for k in (int(b) for b in args.budgets.split(",")):
        for weighted in (True, False):
            tick = time.perf_counter()
            sigmas, record = fit_levels(model, base, k, weighted=weighted)
            fits[f"{k}{'' if weighted else ' unweighted'}"] = record | {"sigmas": sigmas,
                                                                       "seconds": round(time.perf_counter() - tick, 1)}
            for solver in SOLVERS:
                if weighted:
                    rows.append(point(replace(base, name=solver, levels=k)))
                tuned = replace(base, name=solver, levels=k, schedule="tuned", sigmas=sigmas)
                rows.append(point(tuned, **({} if weighted else {"variant": "unweighted"})))
    result = {"benchmark": "tuned-levels", "model": str(args.model), "num_samples": args.num_samples,
              "threads": args.threads, "reference_recognisable": real["recognisable"], "fits": fits, "rows": rows}
    write_result(f"{args.output}.json", result)
    Path(f"{args.output}.md").write_text(markdown(result))


def markdown(result: dict) -> str:
    heun = result["rows"][0]
    lines = ["# Few-gradient sampling on fitted levels (`bench/tuned_levels.py`)", "",
             f"{result['num_samples']} samples per point (images 0..{result['num_samples'] - 1} of seed 0) of "
             f"`{os.path.relpath(result['model'], REPO)}`, {result['threads']} threads, in one run; quality in the "
             "evaluator's feature space of its folder against the held-out shard (held-out real images: recognisable "
             f"{result['reference_recognisable']:.3f}). Reference: Heun with 49 gradients, FD {heun['fd']:.3f}.", "",
             "| solver | gradients | levels | FD | FD / Heun-49's | recognisable | class TV | density | coverage |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        schedule = r["schedule"] + (f" ({r['variant']})" if r.get("variant") else "")
        lines.append(f"| {r['solver']} | {r['gradients']} | {schedule} | {r['fd']:.3f} | "
                     f"{r['fd'] / heun['fd']:.2f} | {r['recognisable']:.3f} | {r['class_tv']:.3f} | "
                     f"{r['density']:.3f} | {r['coverage']:.3f} |")
    lines += ["", "Fitted levels (`sampling.tuning.fit_levels`: 64 chains, seed 0; the fitting's cost in this run):",
              "", "| gradients | levels (top to bottom) | summed local error, fitted / Karras | seconds |",
              "|---|---|---|---|"]
    for k, f in result["fits"].items():
        lines.append(f"| {k} | {', '.join(f'{s:.3g}' for s in f['sigmas'])} | {f['summed_local_error']:.3f} / "
                     f"{f['karras_summed_local_error']:.3f} | {f['seconds']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
