"""Benchmark: sampler images/s of a model's shipped sampler against other settings, interleaved in one process.

    .venv/bin/python bench/sampler_speed.py --model models/demo/ebm \
        --against '{"name": "heun", "levels": 25}' [--images 256] [--repeats 3]

Each setting samples the same images (0..N-1 of seed 0) through the one sampling core on every core, alternately,
`repeats` times; the best time of each counts (the machine's other load only ever slows a run). Also the shipped
sampler under bfloat16 autocast (`sampler_precision: bfloat16`) and under `auto` (the default: bfloat16 only where
this CPU computes it natively, AVX512-BF16 or AMX, else float32; the table says which it resolved to). Reported:
images/s of each, network evaluations per image, the speed ratio and how far each moves the latents (RMS against the
shipped sampler's, latents of std about 1), measured in this one run; the quality of those changes is
bench/pareto.md's to judge. Writes bench/out/sampler_speed.json and bench/sampler_speed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from common import REPO, write_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO / "models" / "demo" / "ebm"))
    p.add_argument("--against", action="append", default=None,
                   help="sampler overrides as JSON (repeatable; default: the 25-level Heun sampler shipped before)")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--no-bfloat16", action="store_true", help="skip the shipped sampler under bfloat16 autocast")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import torch

    from pipeline.common.precision import native_bfloat16, resolve_precision
    from pipeline.models import load_model
    from pipeline.sampling.core import sample_latents

    torch.set_num_threads(os.cpu_count())
    model = load_model(args.model)
    settings = {"shipped": (model.sampler, "float32")}
    if not args.no_bfloat16:  # the network under bfloat16 autocast on this CPU (sampler_precision: bfloat16)
        settings["shipped, bfloat16 autocast"] = (model.sampler, "bfloat16")
    auto = resolve_precision("cpu", "auto")  # what sampler_precision: auto runs on this CPU
    settings[f"shipped, auto ({auto} here)"] = (model.sampler, auto)
    for text in args.against or ['{"name": "heun", "levels": 25}']:
        settings[text] = (model.resolve_sampler(json.loads(text)), "float32")
    best, latents = {name: float("inf") for name in settings}, {}
    for _ in range(args.repeats):
        for name, (s, precision) in settings.items():
            tick = time.perf_counter()
            latents[name] = sample_latents(model, range(args.images), 0, s, batch_size=args.images,
                                           precision=precision).latents
            best[name] = min(best[name], time.perf_counter() - tick)
    reference = latents["shipped"]
    rows = [{"settings": name, "sampler": s.name, "levels": s.levels, "evaluations": s.gradient_evaluations(),
             "images_per_s": round(args.images / best[name], 2),
             "rms_latent_change_vs_shipped": round((latents[name] - reference).pow(2).mean().sqrt().item(), 4)}
            for name, (s, _) in settings.items()]
    shipped = rows[0]["images_per_s"]
    for row in rows:
        row["shipped_speedup"] = round(shipped / row["images_per_s"], 2)
    result = {"benchmark": "sampler_speed", "model": str(Path(args.model).resolve().relative_to(REPO)),
              "images": args.images, "repeats": args.repeats, "threads": os.cpu_count(),
              "native_bfloat16": native_bfloat16("cpu"), "rows": rows}
    write_result(REPO / "bench" / "out" / "sampler_speed.json", result)
    lines = ["# Sampler speed (`bench/sampler_speed.py`)", "",
             f"{result['model']}: {args.images} images (one batch), best of {args.repeats} interleaved runs on "
             f"{result['threads']} threads, in one process; this CPU "
             f"{'computes' if result['native_bfloat16'] else 'does not compute'} bfloat16 natively.", "",
             "| settings | sampler | evaluations/image | images/s | shipped sampler's speed-up | RMS latent change "
             "against the shipped sampler's |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['settings']} | {r['sampler']} | {r['evaluations']} | {r['images_per_s']} | "
              f"{r['shipped_speedup']}x | {r['rms_latent_change_vs_shipped']} |" for r in rows]
    (REPO / "bench" / "sampler_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
