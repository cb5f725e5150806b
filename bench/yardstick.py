"""Does the yardstick rank what a person ranks? jobs.evaluate's headline figures on a ladder of known degradations of
real images and on generation runs (a model's checkpoints), beside a person's count of nameable images per grid.

    .venv/bin/python bench/yardstick.py --latents LATENTS --vae VAE --evaluator EVALUATOR \\
        --run 5000=build/checkpoints/gen-5000 --run 38300=build/checkpoints/gen-38300 --output bench/yardstick-emoji

Sets (n = the held-out count, at most --num-samples): decoded training real, the same blurred to 1/2, 1/4 and 1/8 of
their side and back, with Gaussian pixel noise (std 25 of 255), blended half and half with another image, with their
4 x 4 patches shuffled, and each --run's first n images. Figures, all against the decoded held-out real images and
as jobs.evaluate computes them: recognisable share over held-out real's, the share called "none of these", class TV,
FD in the evaluator's features, and the realism test (networks of its own for every set, per fold; accuracy and the
share taken for real over real's). Writes OUT.json, OUT.md and OUT/<set>.png (64 images each, for the count).
`--counts FILE` (JSON {set: nameable of 64}) adds a person's counts and the rank agreement of each figure with them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.evaluation import quality  # noqa: E402
from pipeline.evaluation.baselines import blurred  # noqa: E402
from pipeline.evaluation.copies import copy_ratios, near_copies  # noqa: E402
from pipeline.evaluation.features import ImageEvaluator  # noqa: E402
from pipeline.evaluation.non_images import shuffled_patches  # noqa: E402
from pipeline.evaluation.realism import realism_test  # noqa: E402
from pipeline.evaluation.references import read_latents  # noqa: E402
from pipeline.io import latent_shards as sh  # noqa: E402
from pipeline.io.image_shards import read_generated  # noqa: E402
from pipeline.io.pictures import preview_grid, save_png  # noqa: E402
from pipeline.vae.autoencoder import cached_vae, decode_images, pick_device, resolve_vae  # noqa: E402


def blur_to(images: torch.Tensor, factor: int) -> torch.Tensor:
    from torch.nn import functional as F
    h, w = images.shape[-2:]
    small = F.interpolate(images.float(), size=(h // factor, w // factor), mode="area")
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False).round().clamp(0, 255).byte()


def ladder(real: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    x = real.float()
    partner = torch.roll(torch.arange(len(real)), 1)
    return {"real (training, decoded)": real, "blur 1/2": blur_to(real, 2), "blur 1/4": blur_to(real, 4),
            "blur 1/8": blurred(real),
            "noise (std 25)": (x + 25 * torch.randn(x.shape, generator=generator)).round().clamp(0, 255).byte(),
            "blend of two": (0.5 * x + 0.5 * x[partner]).round().byte(),
            "patches shuffled": shuffled_patches(x, generator).round().byte()}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = torch.tensor(a).argsort().argsort().double(), torch.tensor(b).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latents", required=True)
    p.add_argument("--vae", required=True)
    p.add_argument("--evaluator", required=True)
    p.add_argument("--run", action="append", default=[], help="NAME=GENERATED_DIR, repeatable")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--counts", help="JSON {set: nameable images of 64, counted by a person}")
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default=None, help="a paragraph for the top of OUT.md (e.g. what the evaluator saw)")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    manifest = sh.read_manifest(args.latents)
    train_files, held_files = sh.split_held_out(manifest, "auto")
    vae = cached_vae(resolve_vae(args.vae, "auto"), pick_device(True), "float32")
    held = read_latents(args.latents, held_files)
    n = min(args.num_samples, len(held["latents"]))
    reference = decode_images(vae, held["latents"][:n])
    train = read_latents(args.latents, train_files, torch.randperm(sum(
        s["count"] for s in manifest["shards"] if s["file"] in train_files), generator=generator)[:n])
    sets = ladder(decode_images(vae, train["latents"]), generator)
    for item in args.run:
        name, folder = item.split("=", 1)
        sets[name] = read_generated(folder, torch.arange(n))[1]
    evaluator = ImageEvaluator.from_pretrained(args.evaluator)
    ref_features = evaluator.features(reference)
    ref_probs = evaluator.classify(ref_features)
    ref_histogram, ref_recognisable = quality.class_histogram(ref_probs), evaluator.recognisable_share(ref_probs)
    realism = realism_test(reference, sets, seed=args.seed, real_groups=held["groups"][:n],
                           groups={"real (training, decoded)": train["groups"]})
    # calibration: the control split by image instead of by group, and the copy check on a near-copier
    by_image = realism_test(reference, {"control": sets["real (training, decoded)"]}, seed=args.seed)["control"]
    pool = decode_images(vae, read_latents(args.latents, train_files)["latents"][:5000])
    ref_ratios, _ = copy_ratios(reference, pool)
    copied, _ = copy_ratios(near_copies(pool[:n], generator), pool)
    calibration = {"realism_control_by_group": realism["real (training, decoded)"]["accuracy"],
                   "realism_control_by_image": by_image["accuracy"],
                   "near_copies_flagged": round(quality.copy_share(copied, ref_ratios), 4),
                   "held_out_flagged": round(quality.copy_share(ref_ratios, ref_ratios), 4), "pool": len(pool)}
    rows = {}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for name, images in sets.items():
        features = evaluator.features(images)
        probs = evaluator.classify(features)
        rows[name] = {"recognisable_ratio": round(evaluator.recognisable_share(probs) / ref_recognisable, 4),
                      "none_share": round(evaluator.none_share(probs), 4),
                      "class_tv": round(quality.total_variation(quality.class_histogram(probs), ref_histogram), 4),
                      "fd": round(quality.frechet_distance(ref_features, features), 3),
                      "realism_accuracy": realism[name]["accuracy"],
                      "realism_ratio": realism[name]["realism_ratio"]}
        save_png(out / f"{slug(name)}.png", preview_grid([x.permute(1, 2, 0).numpy() for x in images[:64]]))
    result = {"latents": args.latents, "evaluator": args.evaluator, "samples": n, "rows": rows,
              "reference_recognisable": round(ref_recognisable, 4), "calibration": calibration,
              "evaluator_held_out": {k: v for k, v in evaluator.config.get("held_out", {}).items()
                                     if k not in ("confusion", "files")}}
    if args.counts:
        counts = json.loads(Path(args.counts).read_text())
        named = [k for k in rows if k in counts]
        people = [counts[k] for k in named]
        higher_is_better = {"recognisable_ratio": 1, "none_share": -1, "class_tv": -1, "fd": -1,
                            "realism_accuracy": -1, "realism_ratio": 1}
        result["counts"] = {k: counts[k] for k in named}
        result["rank_agreement"] = {m: round(spearman([sign * rows[k][m] for k in named], people), 3)
                                    for m, sign in higher_is_better.items()}
    Path(f"{args.output}.json").write_text(json.dumps(result, indent=1) + "\n")
    Path(f"{args.output}.md").write_text(render(result, args))
    print(render(result, args))


def render(r: dict, args) -> str:
    counted = "counts" in r
    lines = [f"# Does the yardstick rank what a person ranks? ({Path(args.output).name})", "",
             f"`{' '.join(['.venv/bin/python bench/yardstick.py', *sys.argv[1:]])}` (numbers: "
             f"{Path(args.output).name}.json). {r['samples']} images a set, against as many decoded held-out real "
             f"images (recognisable {r['reference_recognisable']:.3f}).", "",
             *([args.note, ""] if args.note else []),
             "| set | " + ("nameable of 64 (a person) | " if counted else "") + "recognisable x real's | none of these "
             "| class TV | FD | realism accuracy | taken for real x real's |",
             "|---|" + ("---|" if counted else "") + "---|---|---|---|---|---|"]
    for name, row in r["rows"].items():
        count = f"{r['counts'][name]} | " if counted and name in r["counts"] else ("- | " if counted else "")
        lines.append(f"| {name} | {count}{row['recognisable_ratio']:.3f} | {row['none_share']:.3f} | "
                     f"{row['class_tv']:.3f} | {row['fd']:.2f} | {row['realism_accuracy']:.3f} | "
                     f"{row['realism_ratio']:.3f} |")
    c, e = r["calibration"], r["evaluator_held_out"]
    lines += ["", f"Calibration: the realism test's control (decoded training real against held-out real) reads "
              f"{c['realism_control_by_group']:.3f} with twins kept in one fold and "
              f"{c['realism_control_by_image']:.3f} split by image; the copy check flags "
              f"{c['near_copies_flagged']:.3f} of a near-copier (training images "
              f"shifted, jittered, JPEG) and {c['held_out_flagged']:.3f} of held-out real (pool of {c['pool']} "
              f"training images). The evaluator on its held-out images: accuracy {e.get('accuracy')}, recognised "
              f"{e.get('recognised')}, calls none {e.get('none_on_real')} of them and {e.get('none_on_non_images')} "
              "of held-out synthetic non-images."]
    if counted:
        lines += ["", "Rank agreement with the person's counts (Spearman, sign set so 1 means the figure orders the "
                  "sets as the person does): " + ", ".join(f"{k} {v:+.3f}" for k, v in r["rank_agreement"].items())
                  + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
