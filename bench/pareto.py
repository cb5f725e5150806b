"""Benchmark: quality against compute for every model x solver, from one run on the same latents, decoder and cores.

    .venv/bin/python bench/pareto.py --latents build/demo/latents-<id>     (make pareto, after make demo)

Models (the shipped demo models, one network width): the noise-conditional energy (models/demo/ebm), the score
network trained exactly like it (models/demo/score: the energy's output replaced by a direct noise prediction), and
the DDPM noise-prediction UNet (models/demo/unet: Stable Diffusion's schedule, sampled on its own trained noise
range). Solvers (pipeline/sampling/samplers.py, one interface, so every solver runs every model): heun, euler,
dpmpp_2m, ipndm, and DDIM on the UNet's own timesteps. Each at 5, 8, 10, 15, 20, 30 and 50 network evaluations per
image (Heun: the largest level count within the budget, 2 levels - 1 evaluations).

For each: the samples of images 0..N-1 of seed 0 through the one sampling core (the code generation's sampler
actors run), timed in this process on every core; decoded by the demo VAE; scored against the held-out shard in the
demo evaluator's feature space (FD, recognisable, class TV, density, coverage: the same metrics jobs.evaluate
reports). GFLOP per image = FLOPs of one evaluation (counted with common.flops.FlopCount: an energy's gradient is its
forward and backward, measured, not assumed) x evaluations. The cost of a gradient against a forward on the same
network is measured in the same run (time and FLOPs).

Writes bench/pareto.md, bench/pareto.png (FD against GFLOP per image, one line per model x solver) and
bench/out/pareto.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from common import REPO, write_result

EVALUATIONS = (5, 8, 10, 15, 20, 30, 50)
MODELS = {"energy": "ebm", "score": "score", "ddpm unet": "unet"}
SOLVERS = ("heun", "euler", "dpmpp_2m", "ipndm")


def settings_for(model, solver: str, evaluations: int) -> dict | None:
    """Sampler overrides giving `solver` at most `evaluations` network evaluations on `model`'s trained range."""
    levels = (evaluations + 1) // 2 if solver == "heun" else evaluations
    if levels < 2:
        return None
    if solver == "ddim":  # the UNet's own timesteps, as Stable Diffusion samples it
        return {"name": "ddim", "levels": levels, "schedule": "model", "eta": 0.0}
    low, high = model.sigma_range() if hasattr(model, "sigma_range") else (model.config.sigma_min,
                                                                           model.config.sigma_max)
    return {"name": solver, "levels": levels, "schedule": "karras", "sigma_min": low, "sigma_max": high,
            "rho": 7.0, "mala_levels": 0}


def evaluation_cost(model, batch: int = 256, repeats: int = 5) -> dict:
    """FLOPs and seconds of one evaluation as the samplers run it (grad E for an energy: forward + backward), and of
    the network's forward alone, on the same batch."""
    import torch

    from pipeline.common.flops import FlopCount
    from pipeline.sampling import cost as sampling_cost

    z = torch.randn(batch, *model.config.latent_shape)
    sigma = 1.0
    evaluate = model.sampling_model(model.sampler)
    forward = model.evaluation_forward if not hasattr(model, "sigma_range") else (lambda x: model(x, 500))

    def timed(fn) -> float:
        fn()
        best = float("inf")
        for _ in range(repeats):
            tick = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - tick)
        return best

    with torch.no_grad():
        forward_s = timed(lambda: forward(z))
        with FlopCount() as count:
            forward(z)
        forward_flops = count.flops / batch
    evaluation_s = timed(lambda: evaluate(z, sigma))
    evaluation_flops = sampling_cost.evaluation_flops(model)  # an energy's: forward + backward, counted
    return {"forward_gflop": forward_flops / 1e9, "evaluation_gflop": evaluation_flops / 1e9,
            "evaluation_over_forward_flops": evaluation_flops / forward_flops,
            "evaluation_over_forward_seconds": evaluation_s / forward_s,
            "forward_images_per_s": batch / forward_s, "evaluation_images_per_s": batch / evaluation_s}


def demo_scorer(latents: str, num_samples: int, folder: Path = REPO / "models" / "demo", model: str = "ebm"):
    """(score(latents) -> {fd, recognisable, class_tv, density, coverage} of generated latents, {recognisable} of the
    held-out real images): against the first `num_samples` held-out latents of the latents folder, decoded by the
    VAE of `folder` (models/demo, models/emoji), in its evaluator's feature space (the metrics jobs.evaluate
    reports); `model` names the folder's model whose record says which shards are held out."""
    import torch

    from pipeline.common.config import from_dict
    from pipeline.evaluation import quality
    from pipeline.evaluation.features import ImageEvaluator
    from pipeline.evaluation.references import read_latents, reference_sets
    from pipeline.evaluation.report import EvaluateConfig
    from pipeline.models import load_model
    from pipeline.vae.autoencoder import cached_vae, decode_images, pick_device, resolve_vae

    folder = Path(folder)
    vae = cached_vae(resolve_vae(folder), pick_device(False), "float32")
    evaluator = ImageEvaluator.from_pretrained(folder / "evaluator")
    refs = reference_sets(from_dict(EvaluateConfig, dict(generated="-", reference=latents, output="-",
                                                         evaluator=str(folder / "evaluator"))),
                          load_model(folder / model).metadata, None)
    held = read_latents(latents, refs["held_out_files"])
    ref_features = evaluator.features(decode_images(vae, held["latents"][:num_samples]))
    ref_histogram = quality.class_histogram(evaluator.classify(ref_features))

    def score(generated: torch.Tensor) -> dict:
        features = evaluator.features(decode_images(vae, generated))
        m = quality.feature_metrics(ref_features, features)
        probs = evaluator.classify(features)
        return {"fd": m["fd"], "recognisable": evaluator.recognisable_share(probs),
                "class_tv": quality.total_variation(quality.class_histogram(probs), ref_histogram),
                "density": m["density"], "coverage": m["coverage"]}

    return score, {"fd": 0.0, "recognisable": evaluator.recognisable_share(evaluator.classify(ref_features))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latents", required=True, help="the demo latents folder (make demo precomputes it)")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--evaluations", default=",".join(map(str, EVALUATIONS)))
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--only", default=None, help="comma-separated model names (default: all)")
    p.add_argument("--variant", default=None, metavar="KEY=VALUE,...",
                   help="sampler settings changed for these points (e.g. sigma_min=0.02), recorded with each point")
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"],
                   help="the network's arithmetic while sampling (autocast); other than float32 it is a variant")
    p.add_argument("--report-only", action="store_true",
                   help="write pareto.md/.png from the rows file's points (and this run's cost measurements) alone")
    p.add_argument("--solvers", default=",".join(SOLVERS), help="comma-separated solvers (ddim: the UNet only)")
    p.add_argument("--note", default=None, help="a paragraph for the top of pareto.md (e.g. which points are older)")
    p.add_argument("--rows", default=str(REPO / "build" / "bench" / "pareto-rows.jsonl"),
                   help="one JSON line per finished point; a rerun skips the points already there (resume)")
    args = p.parse_args()

    import torch

    from pipeline.common.config import parse_yaml
    from pipeline.models import load_model
    from pipeline.sampling.core import sample_latents

    torch.set_num_threads(args.threads)
    demo = REPO / "models" / "demo"
    budget = [int(e) for e in args.evaluations.split(",")]
    score, real = demo_scorer(args.latents, args.num_samples)

    variant = {k: parse_yaml(v) for k, v in (item.split("=", 1) for item in args.variant.split(","))} \
        if args.variant else {}
    if args.precision != "float32":
        args.variant = ",".join(filter(None, [args.variant, f"precision={args.precision}"]))
    rows_file = Path(args.rows)
    rows_file.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if rows_file.exists():  # resume: FD and GFLOP are deterministic; only sampler_images_per_s is from that run
        for line in rows_file.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[row["model"], row["solver"], row["budget"], row.get("variant")] = row
    rows, costs = [], {}
    models = {k: v for k, v in MODELS.items() if not args.only or k in args.only.split(",")}
    for name, folder in models.items():
        model = load_model(demo / folder)
        costs[name] = evaluation_cost(model)
        solvers = tuple(args.solvers.split(",")) + (("ddim",) if name == "ddpm unet" else ())
        for solver in solvers if not args.report_only else ():
            for evaluations in budget:
                overrides = settings_for(model, solver, evaluations)
                if overrides is None:
                    continue
                if (name, solver, evaluations, args.variant) in done:
                    rows.append(done[name, solver, evaluations, args.variant])
                    continue
                settings = model.resolve_sampler(overrides | variant)
                tick = time.perf_counter()
                samples = sample_latents(model, range(args.num_samples), 0, settings, batch_size=args.batch_size,
                                         precision=args.precision)
                seconds = time.perf_counter() - tick
                row = {"model": name, "solver": solver, "budget": evaluations, "levels": settings.levels,
                       **({"variant": args.variant} if args.variant else {}),
                       "evaluations": settings.gradient_evaluations(),
                       "gflop_per_image": round(costs[name]["evaluation_gflop"] * settings.gradient_evaluations(), 3),
                       "sampler_images_per_s": round(args.num_samples / seconds, 2),
                       **{k: round(v, 4) for k, v in score(samples.latents).items()}}
                assert samples.evaluations_per_chain == row["evaluations"]
                rows.append(row)
                print(json.dumps(row), flush=True)
                with rows_file.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    # points of an earlier run of these models with other solvers or counts (the rows file) stay in the front
    rows += [row for key, row in done.items() if key[0] in models and row not in rows]
    rows.sort(key=lambda r: (list(models).index(r["model"]), r["solver"], r.get("variant") or "", r["evaluations"]))
    result = {"benchmark": "pareto", "num_samples": args.num_samples, "threads": args.threads, "costs": costs,
              "reference_recognisable": real["recognisable"], "rows": rows, "note": args.note,
              "models": {name: str(Path("models/demo") / folder) for name, folder in models.items()}}
    write_result(REPO / "bench" / "out" / "pareto.json", result)
    (REPO / "bench" / "pareto.md").write_text(markdown(result))
    plot(result, REPO / "bench" / "pareto.png")


def markdown(result: dict) -> str:
    rows, costs = result["rows"], result["costs"]
    lines = ["# Quality against compute (`make pareto`)", "",
             f"{result['num_samples']} samples per point (images 0..{result['num_samples'] - 1} of seed 0), "
             f"{result['threads']} threads, the same code, latents, decoder and cores for every point "
             "(bench/pareto.py; points made by several invocations, resumed from its rows file); quality in the "
             "demo evaluator's feature space "
             f"against the held-out shard (held-out real images: recognisable {result['reference_recognisable']:.3f}).",
             "", "Cost of one network evaluation, measured in the same run (batch 256):", "",
             "| model | forward GFLOP | evaluation GFLOP | evaluation / forward, FLOPs | evaluation / forward, time |",
             "|---|---|---|---|---|"]
    for name, c in costs.items():
        lines.append(f"| {name} | {c['forward_gflop']:.4f} | {c['evaluation_gflop']:.4f} | "
                     f"{c['evaluation_over_forward_flops']:.2f} | {c['evaluation_over_forward_seconds']:.2f} |")
    lines += ["", "| model | solver | evaluations | GFLOP/image | sampler images/s | FD | recognisable | class TV | "
              "density | coverage |", "|---|---|---|---|---|---|---|---|---|---|"]
    if result.get("note"):
        lines[2:2] = [result["note"], ""]
    reference = next((r for r in rows if r["model"] == "energy" and r["solver"] == "heun"
                      and r["evaluations"] == 49 and not r.get("variant")), None)
    if reference is not None:
        within = [r for r in rows if r["model"] == "energy" and r["fd"] <= 1.1 * reference["fd"]]
        best = min(within, key=lambda r: (r["evaluations"], r["fd"]))
        lines[2:2] = [f"The energy's cheapest point within 10% of its 49-evaluation Heun FD ({reference['fd']:.3f}): "
                      f"**{best['solver']}{' (' + best['variant'] + ')' if best.get('variant') else ''}, "
                      f"{best['evaluations']} evaluations, FD {best['fd']:.3f}** "
                      f"({reference['evaluations'] / best['evaluations']:.1f}x fewer evaluations).", ""]
    lines[-2:-2] = ["FD and GFLOP are deterministic; `sampler images/s` is from the invocation that made the point "
                    "(the rows file lets a run resume, and a busy machine slows a point): compare speed by GFLOP.", ""]
    for r in rows:
        solver = r["solver"] + (f" ({r['variant']})" if r.get("variant") else "")
        lines.append(f"| {r['model']} | {solver} | {r['evaluations']} | {r['gflop_per_image']} | "
                     f"{r['sampler_images_per_s']} | {r['fd']:.3f} | {r['recognisable']:.3f} | {r['class_tv']:.3f} | "
                     f"{r['density']:.3f} | {r['coverage']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.subplots()
    lines: dict[tuple[str, str], list] = {}
    for r in result["rows"]:
        solver = r["solver"] + (f" ({r['variant']})" if r.get("variant") else "")
        lines.setdefault((r["model"], solver), []).append((r["gflop_per_image"], r["fd"]))
    styles = {"energy": "-", "score": "--", "ddpm unet": ":"}
    for (model, solver), points in lines.items():
        x, y = zip(*sorted(points))
        ax.plot(x, y, styles.get(model, "-"), marker="o", markersize=3, label=f"{model}, {solver}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("GFLOP per image (network evaluations x cost of one)")
    ax.set_ylabel("FD in the demo evaluator's feature space (lower is better)")
    ax.set_title(f"Quality against compute, {result['num_samples']} samples per point")
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
