"""Sample quality of a generation run, measured where a person would look: in the features of an image network that
reads the decoder's images, against held-out real latents decoded by the same decoder.

    python -m jobs.evaluate --generated GEN_DIR --reference LATENTS_DIR --evaluator EVALUATOR_DIR --output DIR [--check]

Sets (n samples each, n = min(num_samples, what is available)):
    reference  real latents the model never trained on (the shards its training run held out, model metadata
               `latents.held_out`, or every shard of LATENTS_DIR when it held none out), decoded by the VAE: the VAE's
               blur is then on both sides of every comparison
    generated  the run's own decoded images (and, for the pooled-latent tables, its saved latents); a classifier
               also reads recognisable and class TV over up to label_samples of them, beside the table (a class
               share needs no partner set: more images, less noise)
Rows scored against the reference in the same run (REFERENCE sections 3 and 8):
    raw        the same held-out images as they were before the VAE: what the VAE itself loses
    train      training latents, decoded: the floor, what a perfect model scores; also the copier (they are in the
               memorisation pool, so their copy share is 1)
    blurred    training images blurred to 1/8 of their side (the latent grid) and back: a degraded real set whose
               FD must sit clearly above the floor's
    gaussian   N(mean, cov) of the training latents, sampled exactly without forming cov (mean + X_c^T w)
    untrained  the same chains (the scored images' own seeds) through the same sampler on the same architecture
               with fresh random weights
    starts     those chains' starting points alone: what the energy adds is the distance from this row to generated
    compare    (`--compare GEN_DIR`, repeatable) other generation runs from the same VAE, e.g. another kind of
               model, each with its own chain starts: one table, one reference, one run
Spaces:
    features   (first) the evaluator's penultimate layer (evaluation/features.py; `--evaluator DIR`, fitted by
               jobs.fit_evaluator for this VAE) and/or FID's Inception (`--inception-weights FILE`): Frechet
               distance, KID, precision/recall, density/coverage, and for a classifier the recognisable share
               (softmax >= its confidence) and the class histogram's total-variation distance; memorisation as
               each sample's nearest training image (copy share, 8 closest pairs in memorisation.png)
    latents    scaled latents average-pooled to C x pool x pool
    images     decoded images average-pooled to image_side px

The verdict (`check_space`, default the feature space) needs, for the generated set: FD <= max_fd_ratio x the
Gaussian's, recognisable >= min_recognisable_ratio x the reference's, class TV <= max_class_tv (by default the 95th
percentile of what sampling alone gives), copy share <= max_copy_share, density and coverage >= min_density /
min_coverage, and taken for real by the realism test (realism.py, on pixels) >= min_realism_ratio x real's. Every
row gets the same checks, so the report shows that held-out real images pass and the Gaussian and blurred rows
fail. `--check` turns a failed verdict into exit code 1.

A conditional run (`--condition` / `--conditions` in jobs.generate) is also scored per condition: for each term
("shape=ring", "NOT background=stripes") the share of its samples the evaluator's attribute classifier for that
field agrees with (`attribute_fields` in jobs.fit_evaluator), and the share meeting every term; OUT/conditions.png
shows a row of samples per condition.

The steps are functions below, in order (load_inputs, read_rows, decode_sets, the scoring in `scoring.py`,
assemble_report, write_report); `references.py` finds the reference shards, `baselines.py` makes the baseline rows.

Writes OUT/report.json, OUT/report.md, OUT/samples-vs-real.png, OUT/per-class.png (a row of real and a row of
generated images per class), OUT/memorisation.png and, for a conditional run, OUT/conditions.png.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch

from ..common.config import EbdError, JobConfig, require
from ..io import storage
from ..io.files import atomic_write, atomic_write_json
from ..io.image_shards import generated_manifest, iter_generated_images, read_conditions, read_generated
from ..io.pictures import labelled_rows, save_png, side_by_side
from ..vae.autoencoder import cached_vae, decode_images, pick_device, resolve_vae
from . import quality
from .baselines import blurred, chain_starts, compared_runs, moment_matched_gaussian, untrained_samples
from .copies import COPY_SIDE, copy_pool, copy_ratios, near_copies
from .features import ImageEvaluator, InceptionFeatures
from .markdown import BASELINES, POOLED_METRICS, extra_rows, render_markdown
from .realism import realism_test
from .references import read_latents, read_raw_images, reference_sets
from .scoring import condition_checks, condition_scores, pooled_checks, score_feature_space
from .seeds import draw_names, spread_over_draws

REPORT_FORMAT = "ebd.report/2"


@dataclass(frozen=True)
class EvaluateConfig(JobConfig):
    generated: str | None = None                 # output folder of jobs.generate (needs save_latents: true)
    reference: str | None = None                 # latents folder (precompute output) with the held-out shards
    output: str | None = None                    # folder for report.json, report.md and the pictures
    evaluator: str | None = None                 # ImageEvaluator folder (jobs.fit_evaluator) for this VAE
    inception_weights: str | None = None         # local FID Inception weights file (never downloaded)
    train_latents: str | None = None             # where the training latents are, if not in `reference`
    model: str | None = None                     # the model folder, if it moved since generation
    compare: list[str] = field(default_factory=list)  # other generation runs (same VAE) scored as extra rows
    plugins: list[str] = field(default_factory=list)  # modules to import first: model kinds, output formats
    num_samples: int = 1000                      # samples per set
    seeds: int = 1                               # draws of num_samples generated images (disjoint, from the run)
                                                 # scored: each headline figure's mean and spread (seeds.py)
    label_samples: int = 10_000                  # a classifier's recognisable and class TV also over up to this many
                                                 # generated images (a line beside the table; none when <= num_samples)
    memorisation_pool: int = 5000                # training latents decoded for the nearest-neighbour search
    raw_images: bool = True                      # also score the raw held-out images (read from the inputs)
    pool: int = 4                                # latents are pooled to C x pool x pool
    image_side: int = 16                         # images are pooled to image_side x image_side
    seed: int = 0
    max_train_latents: int = 10_000              # fit the Gaussian on at most this many training latents
    # the verdict in the feature space, chosen so held-out real images pass with margin and the Gaussian fails
    max_fd_ratio: float = 0.5                    # FD at most this share of the moment-matched Gaussian's
    min_recognisable_ratio: float = 0.8          # recognisable share at least this share of the reference's
    # class histogram total-variation distance to the reference's; "noise": the 95th percentile of what sampling
    # alone gives at n against n (a mix the check fails is wrong at the 5% level)
    max_class_tv: float | Literal["noise"] = "noise"
    min_condition_match: float = 0.5             # a conditional run: share of each condition's images meeting it
    max_copy_share: float = 0.1                  # held-out real images score 0.05 by construction
    # the realism test (evaluation/realism.py): a CNN told to separate each set from the reference, on pixels
    realism_folds: int = 3                       # 0: no realism test
    realism_epochs: int = 30                     # training epochs of each set's network, per fold
    realism_images: int = 500                    # images a side at most (its cost grows with sets x images)
    min_realism_ratio: float = 0.8               # generated taken for real at least this share of real's
    min_density: float = 0.7                     # density and coverage thresholds (feature and pooled spaces)
    min_coverage: float = 0.7
    check_space: Literal["features", "latents", "images"] = "features"
    threads: int = 0                             # torch threads; 0: all cores

    def validate(self) -> None:
        for name in ("generated", "reference", "output"):
            require(getattr(self, name) is not None, f"missing {name}: pass --{name} or set it in the config")
        require(self.num_samples >= 10, "num_samples must be >= 10 (k-NN metrics need neighbours)")
        require(1 <= self.seeds <= 100, "seeds must be in [1, 100]")
        require(self.label_samples >= 1, "label_samples must be >= 1")
        require(self.pool >= 1 and self.image_side >= 1 and self.max_train_latents >= 2,
                "pool, image_side must be >= 1, max_train_latents >= 2")
        require(self.memorisation_pool >= self.num_samples,
                "memorisation_pool must be >= num_samples (the floor row is drawn from it)")
        require(self.check_space != "features" or self.evaluator or self.inception_weights,
                "the verdict is in the feature space: pass --evaluator DIR (python -m jobs.fit_evaluator makes one) "
                "or --inception-weights FILE, or set check_space: latents")
        require(self.realism_folds == 0 or (2 <= self.realism_folds <= 10 and 1 <= self.realism_epochs <= 1000
                                            and self.realism_images >= 2 * self.realism_folds),
                "realism_folds must be 0 (off) or in [2, 10], realism_epochs in [1, 1000], realism_images at least "
                "twice realism_folds")
        require(self.max_fd_ratio > 0 and (self.max_class_tv == "noise" or 0 <= self.max_class_tv <= 1)
                and 0 <= self.max_copy_share <= 1
                and self.min_recognisable_ratio >= 0, "max_fd_ratio > 0; max_class_tv, max_copy_share in [0, 1]")


def run_evaluation(cfg: EvaluateConfig) -> dict:
    """Scores a generation run (module docstring); writes OUT/report.json, report.md and the pictures."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tick = time.monotonic()
    run = load_inputs(cfg)
    rows = read_rows(cfg, run)
    images = decode_sets(cfg, run, rows)
    scored = {k: images[k] for k in ("generated", *BASELINES, *extra_rows(rows["sets"])) if k in images}
    conditional = bool(run["manifest"].get("conditions"))
    more_generated = partial(iter_generated_images, run["dir"], rows["label_index"])
    copies = score_copies(images, scored)
    feature_spaces = {name: score_feature_space(extractor, name, images["reference"], rows["held_labels"], scored,
                                                copies, cfg, conditional=conditional,
                                                more_generated=more_generated)
                      for name, extractor in run["extractors"].items()}
    if "evaluator" in run["extractors"]:
        evaluator_held = set(run["extractors"]["evaluator"].config.get("held_out", {}).get("files", []))
        if evaluator_held and not set(run["refs"]["held_out_files"]) <= evaluator_held:
            run["refs"]["notes"].append("the evaluator trained on some of the reference shards: its feature space has "
                                        "seen the reference data")
    pooled_spaces = score_pooled_spaces(cfg, rows, images)
    conditions = score_run_conditions(run, rows, images)
    realism = score_realism(cfg, images, scored, rows)
    report = assemble_report(cfg, run, rows, feature_spaces, pooled_spaces, conditions, realism,
                             time.monotonic() - tick)
    report["copies"] = {"description": copies["description"], "reference_copy_share":
                        copies["reference_copy_share"], "rows": copies["rows"]}
    write_report(Path(cfg.output), report, feature_spaces, rows, images, realism, copies)
    return report


def load_inputs(cfg: EvaluateConfig) -> dict:
    """The run's manifest, its model, the feature extractors (checked against the run's VAE) and which shards are
    the reference and the training latents: everything that can fail on user input, before any heavy work."""
    from ..models import load_model

    gen_dir = storage.canonical(cfg.generated)
    manifest = generated_manifest(gen_dir)
    model_dir = storage.canonical(cfg.model or manifest["model"]["path"])  # a folder or a bucket's URI
    if not storage.is_file(storage.join(model_dir, "config.json")):
        raise EbdError(f"the generation run's model is not at {model_dir}: pass --model DIR")
    vae_info = manifest["vae"]
    extractors = {}
    if cfg.evaluator:
        extractors["evaluator"] = ImageEvaluator.from_pretrained(cfg.evaluator)
        fitted_for = extractors["evaluator"].vae_sha256
        if fitted_for and vae_info.get("weights_sha256") and fitted_for != vae_info["weights_sha256"]:
            raise EbdError(f"the evaluator {cfg.evaluator} was fitted for another VAE (weights sha256 "
                           f"{fitted_for[:12]}...) than the generation run's ({vae_info['weights_sha256'][:12]}...): "
                           "fit one for this VAE with python -m jobs.fit_evaluator")
    if cfg.inception_weights:
        extractors["inception"] = InceptionFeatures(cfg.inception_weights)
    trained = load_model(model_dir)
    refs = reference_sets(cfg, trained.metadata, vae_info.get("weights_sha256"))
    return {"dir": gen_dir, "manifest": manifest, "model": trained, "extractors": extractors, "refs": refs,
            "vae": resolve_vae(vae_info["path"], vae_info.get("subfolder"))}


def read_rows(cfg: EvaluateConfig, run: dict) -> dict:
    """The sets to score, as latents: n generated, n held-out, the training pools, and the baselines' latents. Rows
    are chosen from the manifests' counts first, then only those rows are read (shard by shard): memory holds n
    generated images and latents, n held-out latents and the training pools, however large the sets."""
    manifest, refs = run["manifest"], run["refs"]
    n = min(cfg.num_samples, manifest["images"] // cfg.seeds, refs["held_out_count"], refs["train_count"])
    require(n >= 10, f"only {n} samples to compare: generate more images (seeds x 10 at least) or hold out more "
                     "shards")
    generator = torch.Generator().manual_seed(cfg.seed)

    def subset(count: int, size: int) -> torch.Tensor:
        return torch.randperm(count, generator=generator)[:size]

    order = torch.randperm(manifest["images"], generator=generator)  # its first n are the scored set
    gen_index, label_index = order[:n], order[n:max(n, min(cfg.label_samples, manifest["images"]))]
    held_index = subset(refs["held_out_count"], n)
    pool_index = subset(refs["train_count"], cfg.memorisation_pool)
    gauss_index = subset(refs["train_count"], cfg.max_train_latents)
    gen_latents, gen_images = read_generated(run["dir"], gen_index)
    draws = {name: read_generated(run["dir"], order[k * n:(k + 1) * n])  # --seeds: disjoint draws of n chains
             for k, name in enumerate(draw_names(cfg.seeds)) if k}
    held = read_latents(storage.canonical(cfg.reference), refs["held_out_files"], held_index)
    train_rows = torch.cat([pool_index, gauss_index]).unique()
    train = read_latents(refs["train_folder"], refs["train_files"], train_rows)
    slot = {int(r): i for i, r in enumerate(train_rows.tolist())}
    pool_latents = train["latents"][[slot[int(r)] for r in pool_index]]
    pool_groups = [train["groups"][slot[int(r)]] for r in pool_index]
    train = train["latents"]
    chains = gen_index.tolist()  # the very chains whose samples are scored: their starts, and untrained
    sets = {"generated": gen_latents, "train": pool_latents[:n],
            "gaussian": moment_matched_gaussian(train[[slot[int(r)] for r in gauss_index]], n, generator),
            "untrained": untrained_samples(run["model"], manifest["sampler"], chains, manifest["seed"]),
            "starts": chain_starts(run["model"], manifest["sampler"], chains, manifest["seed"])}
    sets |= {name: latents for name, (latents, _) in draws.items()}
    compared = compared_runs(cfg.compare, manifest["vae"], n, subset)
    for name, other in compared.items():
        sets |= {name: other["latents"], f"{name}: starts": other["starts"]}
    return {"n": n, "gen_index": gen_index, "gen_images": gen_images, "label_index": label_index,
            "held_out": held["latents"], "held_keys": held["keys"], "held_labels": held["labels"],
            "held_groups": held["groups"], "pool_latents": pool_latents, "pool_groups": pool_groups, "sets": sets,
            "compared": compared, "draw_images": {name: images for name, (_, images) in draws.items()}}


def decode_sets(cfg: EvaluateConfig, run: dict, rows: dict) -> dict:
    """Every set as images, decoded by the run's VAE as generation decodes (the generated set is read as written),
    plus the blurred and raw rows, the reference and the training pool."""
    n, sets = rows["n"], rows["sets"]
    vae = cached_vae(run["vae"], pick_device(True), "auto")
    pool = decode_images(vae, rows["pool_latents"])
    images = {"reference": decode_images(vae, rows["held_out"]), "pool": pool, "generated": rows["gen_images"],
              "train": pool[:n]}
    images |= {name: other["images"] for name, other in rows["compared"].items()} | rows["draw_images"]
    images |= {name: decode_images(vae, z) for name, z in sets.items() if name not in images}
    images["blurred"] = blurred(pool[:n])
    # the near-copier: training images the train row does not hold (when the pool has them), shifted, jittered, JPEG
    rows["near_copy_source"] = slice(n, 2 * n) if len(pool) >= 2 * n else slice(0, n)
    images["near_copies"] = near_copies(pool[rows["near_copy_source"]], torch.Generator().manual_seed(cfg.seed))
    raw = read_raw_images(run["refs"]["manifest"], rows["held_keys"]) if cfg.raw_images else None
    if raw is not None:
        images["raw"] = raw
    else:
        run["refs"]["notes"].append("the raw held-out images could not be read back from the latents' recorded input, "
                                    "so the VAE's own loss is not shown")
    return images


def score_pooled_spaces(cfg: EvaluateConfig, rows: dict, images: dict) -> dict:
    """Every set in pooled latents and in down-sampled pixels (spaces that cannot tell a ring from a disc, kept as
    a cross-check), with what the sampler added to its chain starts."""
    held_out, sets = rows["held_out"], rows["sets"]
    pooled = {
        "latents": {"description": f"scaled latents average-pooled to {held_out.shape[1]} x {cfg.pool} x {cfg.pool} "
                                   f"({held_out.shape[1] * cfg.pool ** 2} dims)",
                    "features": lambda z: quality.pool_latents(z, cfg.pool).flatten(1),
                    "real": held_out, "sets": sets},
        "images": {"description": f"decoded images average-pooled to {cfg.image_side} x {cfg.image_side} RGB "
                                  f"({3 * cfg.image_side ** 2} dims, [0, 1])",
                   "features": lambda x: quality.pool_latents(x.float() / 255.0, cfg.image_side).flatten(1),
                   "real": images["reference"], "sets": {k: images[k] for k in sets}},
    }
    spaces = {}
    for name, space in pooled.items():
        real = space["features"](space["real"])
        metrics = {k: {m: round(v, 4) for m, v in quality.all_metrics(real, space["features"](x)).items()}
                   for k, x in space["sets"].items()}
        # What the learned energy contributes: the sampler's effect on the chain starts it began from.
        energy_gain = {m: round(metrics["generated"][m] - metrics["starts"][m], 4) for m in POOLED_METRICS}
        spaces[name] = {"description": space["description"], "metrics": metrics, "energy_gain": energy_gain,
                        "checks": pooled_checks(metrics, cfg)}
    return spaces


def score_copies(images: dict, scored: dict) -> dict:
    """Each set's copy share on the images (copies.py): the share of it closer to a training image of the pool,
    relative to its next neighbours, than 95% of held-out real images are. The training row is the pool's first
    rows: the exact copier, read 1."""
    pool = copy_pool(images["pool"])  # prepared once for every set
    ref_ratios, _ = copy_ratios(images["reference"], pool)
    rows, nearest = {}, {}
    for key, set_images in scored.items():
        ratios, index = copy_ratios(set_images, pool)
        rows[key] = {"copy_share": round(quality.copy_share(ratios, ref_ratios), 4),
                     "median_copy_ratio": round(float(ratios.median()), 4)}
        nearest[key] = (ratios, index)
    return {"description": f"images at {COPY_SIDE} px against {len(images['pool'])} training images: a copy is closer "
                           "to its nearest, relative to the next ones, than 95% of held-out real images are",
            "reference_copy_share": round(quality.copy_share(ref_ratios, ref_ratios), 4), "rows": rows,
            "_nearest": nearest}


def score_realism(cfg: EvaluateConfig, images: dict, scored: dict, rows: dict) -> dict | None:
    """The realism test of every scored set (and of decoded training real, the control) against the reference, each
    against the same real images in the same folds, twins kept in one fold (None with realism_folds: 0)."""
    if not cfg.realism_folds:
        return None
    groups = {"train": rows["pool_groups"][:rows["n"]], "near_copies": rows["pool_groups"][rows["near_copy_source"]]}
    return realism_test(images["reference"], scored, folds=cfg.realism_folds, epochs=cfg.realism_epochs,
                        max_images=cfg.realism_images, seed=cfg.seed, real_groups=rows["held_groups"], groups=groups,
                        paired=("raw",))


def realism_checks(realism: dict, cfg: EvaluateConfig) -> dict[str, dict[str, bool]]:
    """Per set: taken for real at least min_realism_ratio x as often as real images are."""
    return {key: {f"realism: taken for real >= {cfg.min_realism_ratio} x real's": row["realism_ratio"] >=
                  cfg.min_realism_ratio} for key, row in realism.items()}


def score_run_conditions(run: dict, rows: dict, images: dict) -> dict | None:
    """A conditional run's per-condition attribute scores (None for an unconditional run, or without attribute
    classifiers, which a note then says)."""
    manifest = run["manifest"]
    if not manifest.get("conditions"):
        return None
    asked = read_conditions(run["dir"], rows["gen_index"])
    rows["conditions"] = asked
    rows["condition_order"] = [c["condition"] for c in manifest["conditions"] if c["condition"] in set(asked)]
    evaluator = run["extractors"].get("evaluator")
    if not (evaluator and evaluator.attributes):
        run["refs"]["notes"].append("a conditional run, but the evaluator has no attribute classifiers: the conditions "
                                    "are not scored (jobs.fit_evaluator with attribute_fields adds them)")
        return None
    return {"scores": condition_scores(evaluator, images["generated"], asked, rows["condition_order"]),
            "attribute_accuracy": {name: sub.config.get("held_out", {}).get("accuracy")
                                   for name, sub in evaluator.attributes.items()}}


def assemble_report(cfg: EvaluateConfig, run: dict, rows: dict, feature_spaces: dict, pooled_spaces: dict,
                    conditions: dict | None, realism: dict | None, seconds: float) -> dict:
    """report.json: every figure, every check, and the verdict on `check_space`."""
    manifest, refs = run["manifest"], run["refs"]
    main_space = next(iter(feature_spaces.values()), None)
    checks = {f"features ({name})": space["checks"]["generated"] for name, space in feature_spaces.items()}
    checks |= {name: space["checks"] for name, space in pooled_spaces.items()}
    verdict_key = f"features ({main_space['extractor']})" if cfg.check_space == "features" else cfg.check_space
    if conditions is not None:  # judged per condition too: what was asked for, in the verdict's space
        checks[verdict_key] = checks[verdict_key] | condition_checks(conditions["scores"], cfg)
    per_row = None if realism is None else realism_checks(realism, cfg)
    if per_row is not None:  # on pixels, whatever the verdict's space
        checks[verdict_key] = checks[verdict_key] | per_row["generated"]
    report = {"format": REPORT_FORMAT, "samples": rows["n"], "generated": run["dir"],
              "reference": storage.canonical(cfg.reference), "model": manifest["model"],
              "sampler": manifest["sampler"], "held_out_shards": refs["held_out_files"],
              "train_shards": len(refs["train_files"]), "notes": refs["notes"],
              "features": {name: {k: v for k, v in space.items() if not k.startswith("_")}
                           for name, space in feature_spaces.items()},
              "spaces": pooled_spaces, "conditions": conditions, "checks": checks, "check_space": verdict_key,
              "realism": None if realism is None else
              {"rows": {k: {m: v for m, v in row.items() if not m.startswith("_")} for k, row in realism.items()},
               "checks": per_row, "control": "train"},
              "passed": all(checks[verdict_key].values()), "config": asdict(cfg), "seconds": round(seconds, 1)}
    if cfg.seeds > 1:
        report["seeds"] = spread_over_draws(report, cfg)
    return report


def write_report(out: Path, report: dict, feature_spaces: dict, rows: dict, images: dict,
                 realism: dict | None, copies: dict) -> None:
    """report.json, report.md and the pictures, each written atomically (the report is written locally)."""
    out.mkdir(parents=True, exist_ok=True)
    if realism is not None:  # the generated images the realism test most and least often took for real
        order = realism["generated"]["_scores"].argsort(descending=True)
        save_png(out / "realism.png", labelled_rows(
            [("most often taken for real", images["generated"][order[:8]]), ("", images["generated"][order[8:16]]),
             ("least often taken for real", images["generated"][order.flip(0)[:8]]),
             ("", images["generated"][order.flip(0)[8:16]])]))
    save_png(out / "samples-vs-real.png", side_by_side(images["generated"][:64], images["reference"][:64]))
    main_space = next(iter(feature_spaces.values()), None)
    if main_space is not None and main_space["classes"]:
        save_png(out / "per-class.png", per_class_grid(main_space, images["reference"], images["generated"]))
    ratios, index = copies["_nearest"]["generated"]  # the 8 generated images most like a training image, beside it
    closest = ratios.argsort()[:8]
    save_png(out / "memorisation.png", labelled_rows(
        [("generated", images["generated"][closest]), ("nearest training", images["pool"][index[closest]])]))
    if "conditions" in rows:
        picture = []  # 16 samples per condition, in two rows of 8
        for text in rows["condition_order"]:
            picked = images["generated"][[i for i, c in enumerate(rows["conditions"]) if c == text][:16]]
            picture += [(text, picked[:8]), ("", picked[8:16])]
        save_png(out / "conditions.png", labelled_rows(picture))
    atomic_write_json(out / "report.json", report)
    text = render_markdown(report).encode()
    atomic_write(out / "report.md", lambda f: f.write(text))


# --------------------------------------------------------------------------------------------- pictures

def per_class_grid(space: dict, reference: torch.Tensor, generated: torch.Tensor):
    """Per class: a row of real reference images of that class (by label) and a row of generated images the
    evaluator assigns to it."""
    ref_pred, gen_pred = space["_predicted"]["reference"], space["_predicted"]["generated"]
    shares = space["metrics"]["generated"]["class_histogram"]
    rows = []
    for c, name in enumerate(space["classes"]):
        rows += [(f"{name}: real", reference[ref_pred == c]),
                 (f"{name}: generated ({shares[c]:.0%})", generated[gen_pred == c])]
    return labelled_rows(rows)


# What each check failing means, in words a user can act on (the keys start the check names of scoring.py).
_MEANING = {
    "FD": "the samples' feature distribution is far from the real images'",
    "density": "fewer samples sit where real images are dense: they are usually softer or less detailed than real "
               "decodes",
    "coverage": "parts of the real distribution have no samples near them (missing modes)",
    "recognisable": "fewer samples are confidently recognised as a class than real images are",
    "class TV": "the classes come in other proportions than in the real data",
    "copy share": "too many samples are near-copies of training images",
    "realism": "a small network tells the samples from real images more often than it can tell real from real",
}


def plain_summary(report: dict, output: str) -> list[str]:
    """The verdict in words: which checks pass, which fail and what that means, and where to look."""
    checks = report["checks"][report["check_space"]]
    failed = [name for name, ok in checks.items() if not ok]
    lines = [f"verdict in the {report['check_space']} space: {len(checks) - len(failed)} of {len(checks)} checks "
             f"pass" + (" - the samples pass every check" if not failed else "")]
    for name in failed:
        meaning = next((text for key, text in _MEANING.items() if name.startswith(key)),
                       "the images asked for this condition mostly do not show it" if ": meets" in name else "")
        lines.append(f"  failed: {name}" + (f" ({meaning})" if meaning else ""))
    if report.get("conditions"):
        lines.append("  a conditional run: judged per condition (class proportions against the reference do not "
                     "apply to a mix of conditions)")
    lines.append(f"  details: {output}/report.md")
    return lines
