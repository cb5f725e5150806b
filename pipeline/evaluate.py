"""Sample quality of a generation run, measured where a person would look: in the features of an image network that
reads the decoder's images, against held-out real latents decoded by the same decoder.

    python -m jobs.evaluate --generated GEN_DIR --reference LATENTS_DIR --evaluator EVALUATOR_DIR --output DIR [--check]

Sets (n samples each, n = min(num_samples, what is available)):
    reference  real latents the model never trained on (the shards its training run held out, model metadata
               `latents.held_out`, or every shard of LATENTS_DIR when it held none out), decoded by the VAE: the VAE's
               blur is then on both sides of every comparison
    generated  the run's own decoded images (and, for the pooled-latent tables, its saved latents)
Rows scored against the reference in the same run (REFERENCE sections 3 and 8):
    raw        the same held-out images as they were before the VAE: what the VAE itself loses
    train      training latents, decoded: the floor, what a perfect model scores; also the copier (they are in the
               memorisation pool, so their copy share is 1)
    blurred    training images blurred to 1/8 of their side (the latent grid) and back: a degraded real set whose
               FD must sit clearly above the floor's
    gaussian   N(mean, cov) of the training latents, sampled exactly without forming cov (mean + X_c^T w)
    untrained  the same sampler (and chain starts) on the same architecture with fresh random weights
    starts     the chains' starting points alone: what the energy adds is the distance from this row to generated
    compare    (`--compare GEN_DIR`, repeatable) other generation runs from the same VAE, e.g. another kind of
               model, each with its own chain starts: one table, one reference, one run
Spaces:
    features   (first) the evaluator's penultimate layer (pipeline/features.py; `--evaluator DIR`, fitted by
               jobs.fit_evaluator for this VAE) and/or FID's Inception (`--inception-weights FILE`): Frechet
               distance, KID, precision/recall, density/coverage, and for a classifier the recognisable share
               (softmax >= its confidence) and the class histogram's total-variation distance; memorisation as
               each sample's nearest training image (copy share, 8 closest pairs in memorisation.png)
    latents    scaled latents average-pooled to C x pool x pool
    images     decoded images average-pooled to image_side px

The verdict (`check_space`, default the feature space) needs, for the generated set: FD <= max_fd_ratio x the
Gaussian's, recognisable >= min_recognisable_ratio x the reference's, class TV <= max_class_tv, copy share <=
max_copy_share, density and coverage >= min_density / min_coverage. Every row gets the same checks, so the report
shows that held-out real images pass and the Gaussian and blurred rows fail. `--check` turns a failed verdict into
exit code 1.

A conditional run (`--condition` / `--conditions` in jobs.generate) is also scored per condition: for each term
("shape=ring", "NOT background=stripes") the share of its samples the evaluator's attribute classifier for that
field agrees with (`attribute_fields` in jobs.fit_evaluator), and the share meeting every term; OUT/conditions.png
shows a row of samples per condition.

Writes OUT/report.json, OUT/report.md, OUT/samples-vs-real.png, OUT/per-class.png (a row of real and a row of
generated images per class), OUT/memorisation.png and, for a conditional run, OUT/conditions.png.
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch

from . import quality
from . import shards as sh
from . import sinks, storage
from .config import EbdError, JobConfig, require
from .pictures import labelled_rows, save_png, side_by_side
from .shards import atomic_write, atomic_write_json
from .vae import decode_images

REPORT_FORMAT = "ebd.report/2"
BASELINES = ("raw", "train", "blurred", "gaussian", "untrained", "starts")
POOLED_METRICS = ("precision", "recall", "density", "coverage", "mmd")
ROW_LABELS = {"generated": "generated (this run)", "raw": "held-out real, raw (before the VAE)",
              "train": "training real, decoded (floor; copier)", "blurred": "training real, blurred to 1/8 side",
              "gaussian": "moment-matched Gaussian", "untrained": "untrained model, same sampler",
              "starts": "chain starts, no step"}


@dataclass
class EvaluateConfig(JobConfig):
    generated: str | None = None                 # output folder of jobs.generate (needs save_latents: true)
    reference: str | None = None                 # latents folder (precompute output) with the held-out shards
    output: str | None = None
    evaluator: str | None = None                 # ImageEvaluator folder (jobs.fit_evaluator) for this VAE
    inception_weights: str | None = None         # local FID Inception weights file (never downloaded)
    train_latents: str | None = None             # where the training latents are, if not in `reference`
    model: str | None = None                     # the model folder, if it moved since generation
    compare: list[str] = field(default_factory=list)  # other generation runs (same VAE) scored as extra rows
    num_samples: int = 1000
    memorisation_pool: int = 5000                # training latents decoded for the nearest-neighbour search
    raw_images: bool = True                      # also score the raw held-out images (read from the inputs)
    pool: int = 4                                # latents are pooled to C x pool x pool
    image_side: int = 16                         # images are pooled to image_side x image_side
    seed: int = 0
    max_train_latents: int = 10_000              # fit the Gaussian on at most this many training latents
    # the verdict in the feature space, chosen so held-out real images pass with margin and the Gaussian fails
    max_fd_ratio: float = 0.5                    # FD at most this share of the moment-matched Gaussian's
    min_recognisable_ratio: float = 0.8          # recognisable share at least this share of the reference's
    max_class_tv: float = 0.1                    # class histogram total-variation distance to the reference's
    max_copy_share: float = 0.1                  # held-out real images score 0.05 by construction
    min_density: float = 0.7                     # density and coverage thresholds (feature and pooled spaces)
    min_coverage: float = 0.7
    check_space: Literal["features", "latents", "images"] = "features"
    threads: int = 0                             # torch threads; 0: all cores

    def validate(self) -> None:
        for name in ("generated", "reference", "output"):
            require(getattr(self, name) is not None, f"missing {name}: pass --{name} or set it in the config")
        require(self.num_samples >= 10, "num_samples must be >= 10 (k-NN metrics need neighbours)")
        require(self.pool >= 1 and self.image_side >= 1 and self.max_train_latents >= 2,
                "pool, image_side must be >= 1, max_train_latents >= 2")
        require(self.memorisation_pool >= self.num_samples,
                "memorisation_pool must be >= num_samples (the floor row is drawn from it)")
        require(self.check_space != "features" or self.evaluator or self.inception_weights,
                "the verdict is in the feature space: pass --evaluator DIR (python -m jobs.fit_evaluator makes one) "
                "or --inception-weights FILE, or set check_space: latents")
        require(self.max_fd_ratio > 0 and 0 <= self.max_class_tv <= 1 and 0 <= self.max_copy_share <= 1
                and self.min_recognisable_ratio >= 0, "max_fd_ratio > 0; max_class_tv, max_copy_share in [0, 1]")


# ------------------------------------------------------------------------------------------- read inputs

def generated_manifest(folder: str) -> dict:
    """The manifest of a finished generation run (a folder or a bucket's URI) that saved its latents (one line if
    not)."""
    path = storage.join(folder, "manifest.json")
    if not storage.is_file(path):
        raise EbdError(f"{folder} has no manifest.json: not a finished generation run (re-run jobs.generate)")
    manifest = sh.read_json(path)
    if manifest.get("format") != "ebd.images/1":
        raise EbdError(f"{path} is not a generation manifest (format {manifest.get('format')!r})")
    if not manifest.get("latents", {}).get("saved"):
        raise EbdError(f"{folder} was generated without its latents: re-run jobs.generate with save_latents: true")
    return manifest


def _pick(rows, index: torch.Tensor | None) -> list:
    """Streams `rows` and keeps those at the positions `index` names, in `index`'s order (all rows if None): memory
    holds the picked rows only, however large the run or the shard folder."""
    if index is None:
        return list(rows)
    wanted = {int(i): slot for slot, i in enumerate(index.tolist())}
    picked = [None] * len(wanted)
    for position, row in enumerate(rows):
        if position in wanted:
            picked[wanted[position]] = row
    if any(r is None for r in picked):
        raise EbdError("a shard holds fewer rows than its manifest counts: the folder changed after it was written")
    return picked


def _generated_rows(folder: str, manifest: dict, columns: list[str], from_tar) -> Iterator[tuple]:
    """Every row of a finished generation run, in order: the named parquet `columns` (None for one a shard lacks),
    or `from_tar(sample)` per sample of a run that wrote tars only."""
    import pyarrow.parquet as pq

    for shard in manifest["shards"]:
        parquet = next((f for f in shard["files"] if f.endswith(".parquet")), None)
        if parquet is None:
            tar = next(f for f in shard["files"] if f.endswith(".tar"))
            yield from map(from_tar, sh.read_tar_samples(storage.join(folder, tar)))
            continue
        with storage.open_input(storage.join(folder, parquet)) as f:
            data = pq.ParquetFile(f)
            present = [c for c in columns if c in data.schema_arrow.names]
            table = data.read(columns=present)
        yield from zip(*(table.column(c).to_pylist() if c in present else [None] * table.num_rows for c in columns))


def read_generated(folder: str, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents (N, C, h, w) float32, images (N, 3, H, W) uint8) of the rows `index` names (all if None), in that
    order, of a finished generation run (a folder or a bucket's URI)."""
    from PIL import Image

    rows = _generated_rows(folder, generated_manifest(folder), ["image", "latent"],
                           lambda s: (s["png"], s["latent.npy"]))
    picked = _pick(rows, index)
    latents = [np.load(io.BytesIO(npy), allow_pickle=False).astype(np.float32) for _, npy in picked]
    images = [np.asarray(Image.open(io.BytesIO(sinks.png_of(png))).convert("RGB")) for png, _ in picked]
    return (torch.from_numpy(np.stack(latents)),
            torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous())


def read_conditions(folder: str, index: torch.Tensor | None = None) -> list[str | None]:
    """What each of the rows `index` names asked for (None for an unconditional run's rows), in that order."""
    import json

    rows = _generated_rows(folder, generated_manifest(folder), ["condition"],
                           lambda s: (json.loads(s["json"]).get("condition"),))
    return [condition for (condition,) in _pick(rows, index)]


def condition_scores(extractor, images: torch.Tensor, conditions: list[str], order: list[str] | None = None) -> dict:
    """Per condition, in `order` (default: first seen): its sample count, each term's share that the evaluator's attribute
    classifier for the term's field agrees with (None: no classifier for that field), and the share meeting every
    term (None unless every term was measured)."""
    from .conditions import parse_condition

    predicted = {name: [values[i] for i in probs.argmax(1).tolist()]
                 for name, (values, probs) in extractor.attribute_probabilities(images).items()}
    scores = {}
    for text in dict.fromkeys(order or conditions):
        rows = [i for i, c in enumerate(conditions) if c == text]
        terms, met, measured = {}, np.ones(len(rows), dtype=bool), True
        for term in parse_condition(text):
            if term.field not in predicted:
                terms[str(term)], measured = None, False
                continue
            hit = np.array([(predicted[term.field][i] == term.value) != term.negated for i in rows])
            terms[str(term)] = round(float(hit.mean()), 4)
            met &= hit
        scores[text] = {"images": len(rows), "terms": terms,
                        "all_terms": round(float(met.mean()), 4) if measured else None}
    return scores


def read_latents(folder: str, files: list[str], index: torch.Tensor | None = None) -> dict:
    """{"latents": (N, C, h, w), "keys": [...], "labels": [...]} of the rows `index` names (all if None), in that
    order, of the given shards read in order."""
    rows = _pick(sh.iter_latents([storage.join(folder, f) for f in files]), index)
    return {"latents": torch.from_numpy(np.stack([np.asarray(r["latent"], dtype=np.float32) for r in rows])),
            "keys": [r["key"] for r in rows], "labels": [r["meta"].get("label") for r in rows]}


def shard_counts(folder: str) -> dict[str, int]:
    return {s["file"]: s["count"] for s in sh.read_manifest(folder)["shards"]}


def reference_sets(cfg: EvaluateConfig, model_metadata: dict, gen_vae_sha: str | None) -> dict:
    """Which shards are the held-out reference and which the training latents (files and row counts; nothing is
    read yet), and notes on how they were chosen."""
    ref = storage.canonical(cfg.reference)  # a local folder or an object-store URI
    manifest = sh.read_manifest(ref)
    ref_sha = (manifest.get("vae") or {}).get("weights_sha256")
    if ref_sha and gen_vae_sha and ref_sha != gen_vae_sha:
        raise EbdError(f"{ref} holds latents of another VAE (weights sha256 {ref_sha[:12]}...) than the generation "
                       f"run ({gen_vae_sha[:12]}...): the comparison would be meaningless")
    listed = {s["file"]: s for s in manifest["shards"] if s["count"] > 0}
    latents_meta = model_metadata.get("latents", {})
    held_out, trained_on = latents_meta.get("held_out") or [], latents_meta.get("trained_on") or []
    notes = []
    if held_out:
        missing = [s["file"] for s in held_out if s["file"] not in listed]
        if missing:
            raise EbdError(f"{ref} lacks {len(missing)} shard(s) the model held out, e.g. {missing[0]}: pass the "
                           "latents folder the model was trained from")
        changed = [s["file"] for s in held_out if listed[s["file"]]["sha256"] != s["sha256"]]
        if changed:
            notes.append(f"{len(changed)} held-out shard(s) differ in content from those the model held out (e.g. "
                         f"re-encoded on other hardware): the reference is still data it never trained on only if "
                         "these shards hold the same images")
        held_files = [s["file"] for s in held_out]
        notes.append(f"held-out reference: {len(held_files)} shard(s) the training run never read")
        if manifest.get("order") != "shuffled":
            notes.append(f"{ref} was written in input order: its held-out shards may not be a random sample of the "
                         "data (re-run precompute with shuffle: true)")
    else:
        held_files = sorted(listed)
        notes.append(f"the model records no held-out shards: every shard of {ref} is the reference, which is fair "
                     "only if the model never trained on this folder")
    train_folder = storage.canonical(cfg.train_latents) if cfg.train_latents else ref
    train_files = [s["file"] for s in trained_on if storage.is_file(storage.join(train_folder, s["file"]))]
    if not train_files and cfg.train_latents:
        train_files = [storage.name(p) for p in sh.shard_paths(train_folder)]
    train_files = [f for f in train_files if not (train_folder == ref and f in held_files)]
    if not train_files:
        raise EbdError(f"no training latents found (looked in {train_folder}): pass --train-latents DIR")
    train_counts = shard_counts(train_folder) if train_folder != ref else {f: listed[f]["count"] for f in listed}
    return {"held_out_files": held_files, "held_out_count": sum(listed[f]["count"] for f in held_files),
            "train_folder": train_folder, "train_files": train_files,
            "train_count": sum(train_counts.get(f, 0) for f in train_files), "notes": notes, "manifest": manifest}


def read_raw_images(manifest: dict, keys: list[str]) -> torch.Tensor | None:
    """The original images behind `keys`, preprocessed as precompute did (uint8, N x 3 x H x W), read from the
    latents' recorded input; None when the input is gone or any key cannot be read back."""
    from .images import Rejected, decode_image
    from .sources import plan_items, read_items

    source = manifest.get("input") or {}
    conf = manifest.get("config") or {}
    if not source.get("path") or not storage.exists(source["path"]) or not manifest.get("resolution"):
        return None
    try:
        _, items = plan_items(source["path"], source.get("format", "auto"), conf.get("image_column"),
                              conf.get("key_column"), conf.get("label_column"))
    except EbdError:
        return None
    wanted = set(keys)
    found = {}
    for loaded in read_items([it for it in items if it.key in wanted], conf.get("max_file_bytes", 1 << 28)):
        try:
            if loaded.reject:
                raise Rejected(*loaded.reject)
            pixels, _ = decode_image(loaded.data, manifest["resolution"], conf.get("max_pixels", 89_478_485), 1)
        except Rejected:
            return None
        found[loaded.item.key] = pixels
    if len(found) != len(wanted):
        return None
    return torch.from_numpy(np.stack([found[k] for k in keys])).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------------------ baselines

def moment_matched_gaussian(data: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n samples of N(mean, cov) of `data` (N, ...): mean + X_c^T w / sqrt(N - 1) with w ~ N(0, I_N) has exactly
    that mean and covariance, without forming the D x D covariance (16k x 16k for Stable Diffusion latents)."""
    flat = data.flatten(1).double()
    mean = flat.mean(0)
    weights = torch.randn(n, len(flat), generator=generator, dtype=torch.float64)
    return (mean + weights @ (flat - mean) / (len(flat) - 1) ** 0.5).float().reshape(n, *data.shape[1:])


def extra_rows(sets: dict) -> list[str]:
    return [k for k in sets if k not in ("generated", *BASELINES)]


def compared_runs(folders: list[str], vae_info: dict, n: int, seed: int, subset) -> dict:
    """Other generation runs of the same VAE, as {"folder (sampler)": latents, decoded images, chain starts}."""
    from .langevin import sampler_settings
    from .models import load_model

    runs = {}
    for folder in folders:
        folder = storage.canonical(folder)
        manifest = generated_manifest(folder)
        if manifest["vae"].get("weights_sha256") != vae_info.get("weights_sha256"):
            raise EbdError(f"--compare {folder} was decoded by another VAE than the evaluated run: its images are "
                           "not comparable")
        name = f"{storage.name(folder)} ({sampler_settings(manifest['sampler']).name})"
        require(name not in runs, f"--compare names two runs {name}: give them folders of different names")
        model = load_model(manifest["model"]["path"])
        latents, images = read_generated(folder, subset(manifest["images"], min(n, manifest["images"])))
        runs[name] = {"latents": latents, "images": images,
                      "starts": chain_starts(model, manifest["sampler"], len(latents), seed)}
    return runs


def chain_starts(trained, sampler: dict, n: int, seed: int) -> torch.Tensor:
    """Where the run's chains start (a fitted Gaussian mixture, or plain noise), with no step taken."""
    from .langevin import sampler_settings

    generators = [torch.Generator().manual_seed(seed * 100_003 + i) for i in range(n)]
    return trained.initial_latents(n, sampler_settings(sampler), generators)


def untrained_samples(trained, sampler: dict, n: int, seed: int) -> torch.Tensor:
    """The run's sampler on the model's architecture with fresh random weights (seeded); chains start where the
    trained model's start (its fitted Gaussian, if it has one), so only the learned energy differs."""
    from .langevin import sample, sampler_settings

    model, settings = trained.fresh_copy(seed), sampler_settings(sampler)
    generators = [torch.Generator().manual_seed(seed * 100_003 + i) for i in range(n)]
    out = [sample(model, min(256, n - a), settings, generators[a:a + 256]) for a in range(0, n, 256)]
    return torch.cat(out)


def blurred(images: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """Images down-sampled to 1/factor of their side and back (bilinear): real content with the detail removed."""
    from torch.nn import functional as F

    x = images.float()
    small = F.interpolate(x, scale_factor=1 / factor, mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False).round().clamp(0, 255).to(
        torch.uint8)


# --------------------------------------------------------------------------------------- the feature space

def score_feature_space(extractor, name: str, reference: torch.Tensor, reference_labels: list, sets: dict,
                        pool: torch.Tensor, cfg: EvaluateConfig) -> dict:
    """Every set's metrics against the reference in one extractor's feature space, with label metrics when the
    extractor is a classifier, memorisation against `pool` (decoded training images), and the per-set checks."""
    ref_features = extractor.features(reference)
    pool_features = extractor.features(pool)
    ref_to_train, _ = quality.nearest_distances(ref_features, pool_features)
    classes = list(extractor.classes)
    ref_probs = extractor.classify(ref_features) if classes else None
    ref_histogram = quality.class_histogram(ref_probs) if classes else None
    metrics, nearest, predicted = {}, {}, {}
    for key, images in sets.items():
        features = extractor.features(images)
        m = quality.feature_metrics(ref_features, features)
        distances, index = quality.nearest_distances(features, pool_features)
        m["copy_share"] = quality.copy_share(distances, ref_to_train)
        if classes:
            probs = extractor.classify(features)
            histogram = quality.class_histogram(probs)
            m["recognisable"] = quality.recognisable_share(probs, extractor.confidence)
            m["class_tv"] = quality.total_variation(histogram, ref_histogram)
            m["class_histogram"] = [round(v, 4) for v in histogram.tolist()]
            predicted[key] = probs.argmax(1)
        metrics[key] = {k: (float(f"{v:.5g}") if isinstance(v, float) else v) for k, v in m.items()}
        nearest[key] = (distances, index)
    reference_row = {"copy_share": round(quality.copy_share(ref_to_train, ref_to_train), 4)}
    if classes:
        reference_row |= {"recognisable": round(quality.recognisable_share(ref_probs, extractor.confidence), 5),
                          "class_histogram": [round(v, 4) for v in ref_histogram.tolist()]}
        truth = [classes.index(label) if label in classes else -1 for label in reference_labels]
        known = [i for i, t in enumerate(truth) if t >= 0]
        if known:
            reference_row["accuracy"] = round((ref_probs[known].argmax(1) == torch.tensor(truth)[known])
                                              .double().mean().item(), 5)
    checks = {key: feature_checks(m, metrics.get("gaussian"), reference_row, cfg) for key, m in metrics.items()}
    return {"extractor": name, "description": describe_extractor(extractor, name), "classes": classes,
            "reference": reference_row, "metrics": metrics, "checks": checks, "_nearest": nearest,
            "_predicted": predicted | ({"reference": _labels_or_predictions(reference_labels, classes, ref_probs)}
                                       if classes else {})}


def _labels_or_predictions(labels: list, classes: list[str], probs: torch.Tensor) -> torch.Tensor:
    """The reference's true class where its label is one the evaluator knows, else the evaluator's prediction."""
    predicted = probs.argmax(1)
    return torch.tensor([classes.index(label) if label in classes else int(predicted[i])
                         for i, label in enumerate(labels)])


def feature_checks(m: dict, gaussian: dict | None, reference: dict, cfg: EvaluateConfig) -> dict[str, bool]:
    checks = {}
    if gaussian is not None:
        checks[f"FD <= {cfg.max_fd_ratio} x the Gaussian's"] = m["fd"] <= cfg.max_fd_ratio * gaussian["fd"]
    checks[f"density >= {cfg.min_density}"] = m["density"] >= cfg.min_density
    checks[f"coverage >= {cfg.min_coverage}"] = m["coverage"] >= cfg.min_coverage
    if "recognisable" in m:
        checks[f"recognisable >= {cfg.min_recognisable_ratio} x real's"] = (
            m["recognisable"] >= cfg.min_recognisable_ratio * reference["recognisable"])
        checks[f"class TV <= {cfg.max_class_tv}"] = m["class_tv"] <= cfg.max_class_tv
    checks[f"copy share <= {cfg.max_copy_share}"] = m["copy_share"] <= cfg.max_copy_share
    return checks


def describe_extractor(extractor, name: str) -> str:
    config = getattr(extractor, "config", None)
    if config is None:
        return "FID Inception v3 pool features (2048 dims), from the local weights file"
    held = config.get("held_out", {})
    text = (f"the {config['kind']} evaluator's penultimate layer ({config['feature_dim']} dims), fitted to this VAE's "
            f"decoded training latents")
    if "accuracy" in held:
        text += (f"; on {held['images']} decoded held-out latents it is {held['accuracy']:.3f} accurate and "
                 f"recognises {held['recognised']:.3f} (softmax >= {config['confidence']})")
    return text


# --------------------------------------------------------------------------------------------- the report

def run_evaluation(cfg: EvaluateConfig) -> dict:
    from .features import ImageEvaluator, InceptionFeatures
    from .models import load_model
    from .vae import cached_vae, pick_device, resolve_vae

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tick = time.monotonic()
    gen_dir, out = storage.canonical(cfg.generated), Path(cfg.output)  # the report is written locally
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
    spec = resolve_vae(vae_info["path"], vae_info.get("subfolder"))
    refs = reference_sets(cfg, trained.metadata, vae_info.get("weights_sha256"))

    n = min(cfg.num_samples, manifest["images"], refs["held_out_count"], refs["train_count"])
    require(n >= 10, f"only {n} samples to compare: generate more images or hold out more shards")
    generator = torch.Generator().manual_seed(cfg.seed)

    def subset(count: int, size: int) -> torch.Tensor:
        return torch.randperm(count, generator=generator)[:size]

    # Rows are chosen from the manifests' counts first, then only those rows are read (shard by shard): memory holds
    # n generated images and latents, n held-out latents and the training pools, however large the sets.
    gen_index, held_index = subset(manifest["images"], n), subset(refs["held_out_count"], n)
    pool_index = subset(refs["train_count"], cfg.memorisation_pool)
    gauss_index = subset(refs["train_count"], cfg.max_train_latents)
    gen_latents, gen_images = read_generated(gen_dir, gen_index)
    held = read_latents(storage.canonical(cfg.reference), refs["held_out_files"], held_index)
    held_out, held_keys, held_labels = held["latents"], held["keys"], held["labels"]
    train_rows = torch.cat([pool_index, gauss_index]).unique()
    train = read_latents(refs["train_folder"], refs["train_files"], train_rows)["latents"]
    slot = {int(r): i for i, r in enumerate(train_rows.tolist())}
    pool_latents = train[[slot[int(r)] for r in pool_index]]
    sets = {"generated": gen_latents, "train": pool_latents[:n],
            "gaussian": moment_matched_gaussian(train[[slot[int(r)] for r in gauss_index]], n, generator),
            "untrained": untrained_samples(trained, manifest["sampler"], n, cfg.seed),
            "starts": chain_starts(trained, manifest["sampler"], n, cfg.seed)}
    compared = compared_runs(cfg.compare, vae_info, n, cfg.seed, subset)
    for name, run in compared.items():
        sets |= {name: run["latents"], f"{name}: starts": run["starts"]}

    vae = cached_vae(spec, pick_device(True), "auto")
    reference_images = decode_images(vae, held_out)
    pool_images = decode_images(vae, pool_latents)
    images = {"generated": gen_images, "train": pool_images[:n]}
    images |= {name: run["images"] for name, run in compared.items()}
    images |= {name: decode_images(vae, z) for name, z in sets.items() if name not in images}
    images["blurred"] = blurred(pool_images[:n])
    raw = read_raw_images(refs["manifest"], held_keys) if cfg.raw_images else None
    if raw is not None:
        images["raw"] = raw
    else:
        refs["notes"].append("the raw held-out images could not be read back from the latents' recorded input, so "
                             "the VAE's own loss is not shown")

    feature_spaces = {name: score_feature_space(extractor, name, reference_images, held_labels,
                                                {k: images[k] for k in ("generated", *BASELINES, *extra_rows(sets))
                                                 if k in images},
                                                pool_images, cfg)
                      for name, extractor in extractors.items()}
    if "evaluator" in extractors:
        evaluator_held = set(extractors["evaluator"].config.get("held_out", {}).get("files", []))
        if evaluator_held and not set(refs["held_out_files"]) <= evaluator_held:
            refs["notes"].append("the evaluator trained on some of the reference shards: its feature space has seen "
                                 "the reference data")

    pooled = {
        "latents": {"description": f"scaled latents average-pooled to {held_out.shape[1]} x {cfg.pool} x {cfg.pool} "
                                   f"({held_out.shape[1] * cfg.pool ** 2} dims)",
                    "features": lambda z: quality.pool_latents(z, cfg.pool).flatten(1),
                    "real": held_out, "sets": sets},
        "images": {"description": f"decoded images average-pooled to {cfg.image_side} x {cfg.image_side} RGB "
                                  f"({3 * cfg.image_side ** 2} dims, [0, 1])",
                   "features": lambda x: quality.pool_latents(x.float() / 255.0, cfg.image_side).flatten(1),
                   "real": reference_images, "sets": {k: images[k] for k in sets}},
    }
    conditions = None
    if manifest.get("conditions"):
        asked = read_conditions(gen_dir, gen_index)
        order = [c["condition"] for c in manifest["conditions"] if c["condition"] in set(asked)]  # the plan's
        if "evaluator" in extractors:
            attributes = extractors["evaluator"].attributes
            conditions = {"scores": condition_scores(extractors["evaluator"], images["generated"], asked, order),
                          "attribute_accuracy": {name: sub.config.get("held_out", {}).get("accuracy")
                                                 for name, sub in attributes.items()}}
        if not (extractors.get("evaluator") and extractors["evaluator"].attributes):
            refs["notes"].append("a conditional run, but the evaluator has no attribute classifiers: the conditions "
                                 "are not scored (jobs.fit_evaluator with attribute_fields adds them)")
    pooled_spaces = {}
    for name, space in pooled.items():
        real = space["features"](space["real"])
        metrics = {k: {m: round(v, 4) for m, v in quality.all_metrics(real, space["features"](x)).items()}
                   for k, x in space["sets"].items()}
        # What the learned energy contributes: the sampler's effect on the chain starts it began from.
        energy_gain = {m: round(metrics["generated"][m] - metrics["starts"][m], 4) for m in POOLED_METRICS}
        pooled_spaces[name] = {"description": space["description"], "metrics": metrics, "energy_gain": energy_gain,
                               "checks": pooled_checks(metrics, cfg)}

    main_space = next(iter(feature_spaces.values()), None)
    checks = {f"features ({name})": space["checks"]["generated"] for name, space in feature_spaces.items()}
    checks |= {name: space["checks"] for name, space in pooled_spaces.items()}
    verdict_key = f"features ({main_space['extractor']})" if cfg.check_space == "features" else cfg.check_space
    report = {"format": REPORT_FORMAT, "samples": n, "generated": gen_dir,
              "reference": storage.canonical(cfg.reference), "model": manifest["model"],
              "sampler": manifest["sampler"], "held_out_shards": refs["held_out_files"],
              "train_shards": len(refs["train_files"]), "notes": refs["notes"],
              "features": {name: {k: v for k, v in space.items() if not k.startswith("_")}
                           for name, space in feature_spaces.items()},
              "spaces": pooled_spaces, "conditions": conditions, "checks": checks, "check_space": verdict_key,
              "passed": all(checks[verdict_key].values()), "config": asdict(cfg),
              "seconds": round(time.monotonic() - tick, 1)}

    out.mkdir(parents=True, exist_ok=True)
    save_png(out / "samples-vs-real.png", side_by_side(images["generated"][:64], reference_images[:64]))
    if main_space is not None:
        if main_space["classes"]:
            save_png(out / "per-class.png", per_class_grid(main_space, reference_images, images["generated"]))
        distances, index = main_space["_nearest"]["generated"]
        closest = distances.argsort()[:8]
        save_png(out / "memorisation.png", labelled_rows(
            [("generated", images["generated"][closest]), ("nearest training", pool_images[index[closest]])]))
    if manifest.get("conditions"):
        rows = []  # 16 samples per condition, in two rows of 8
        for text in order:
            picked = images["generated"][[i for i, c in enumerate(asked) if c == text][:16]]
            rows += [(text, picked[:8]), ("", picked[8:16])]
        save_png(out / "conditions.png", labelled_rows(rows))
    atomic_write_json(out / "report.json", report)
    text = render_markdown(report).encode()
    atomic_write(out / "report.md", lambda f: f.write(text))
    return report


def pooled_checks(metrics: dict, cfg: EvaluateConfig) -> dict[str, bool]:
    gen, gauss = metrics["generated"], metrics["gaussian"]
    return {f"density >= {cfg.min_density}": gen["density"] >= cfg.min_density,
            f"coverage >= {cfg.min_coverage}": gen["coverage"] >= cfg.min_coverage,
            "density above the Gaussian baseline": gen["density"] > gauss["density"],
            "coverage above the Gaussian baseline": gen["coverage"] > gauss["coverage"]}


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


def render_markdown(report: dict) -> str:
    lines = [f"# Sample quality: {report['model']['id']}", "",
             f"**{'PASSED' if report['passed'] else 'FAILED'}** (verdict on {report['check_space']}). "
             f"{report['samples']} samples per set, each compared with {report['samples']} held-out real latents "
             f"decoded by the same VAE ({len(report['held_out_shards'])} shard(s) the model never trained on). "
             "Sampler: " + ", ".join(f"{k}={v}" for k, v in report["sampler"].items()) + ".", ""]
    for name, space in report["features"].items():
        ref = space["reference"]
        labelled = bool(space["classes"])
        lines += [f"## Feature space ({name}): {space['description']}", ""]
        if labelled:
            lines += [f"Decoded held-out real images: recognisable {ref['recognisable']:.3f}"
                      + (f", evaluator accuracy {ref['accuracy']:.3f}" if "accuracy" in ref else "")
                      + " (the yardstick can read the decoder's images only as well as this).", ""]
        header = ["set", "FD", "KID x 1e3", "precision", "recall", "density", "coverage"]
        header += ["recognisable", "class TV"] if labelled else []
        header += ["copy share", "checks"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for key, m in space["metrics"].items():
            cells = [ROW_LABELS.get(key, key), f"{m['fd']:.3g}", f"{1e3 * m['kid']:.2f} ± {1e3 * m['kid_std']:.2f}"]
            cells += [f"{m[x]:.3f}" for x in ("precision", "recall", "density", "coverage")]
            cells += [f"{m['recognisable']:.3f}", f"{m['class_tv']:.3f}"] if labelled else []
            passed = space["checks"][key]
            cells += [f"{m['copy_share']:.3f}", f"{sum(passed.values())}/{len(passed)}"]
            lines.append("| " + " | ".join(cells) + " |")
        if not labelled:
            lines += ["", "This evaluator knows no labels: recognisable and class TV need a classifier and are "
                      "skipped."]
        lines += ["", "Copy share: samples closer to a training image than 95% of held-out real images are "
                  "(held-out real scores 0.05 by construction; the training row is the copier). The 8 closest "
                  "generated/training pairs: memorisation.png.", ""]
        if labelled:
            lines += ["Per class, a row of real and a row of generated images (by the evaluator's label):", "",
                      "![per class](per-class.png)", ""]
    if report.get("conditions"):
        accuracy = ", ".join(f"{name} {v:.3f}" for name, v in report["conditions"]["attribute_accuracy"].items()
                             if v is not None)
        lines += ["## Conditions", "", "Per condition, the share of its samples whose attribute the evaluator's "
                  "classifier for that field reads as asked (a NOT term: as anything else), and the share meeting "
                  "every term" + (f" (the classifiers are this accurate on decoded held-out latents: {accuracy})"
                                  if accuracy else "") + ":", "",
                  "| condition | samples | terms | all terms |", "|---|---|---|---|"]
        for text, c in report["conditions"]["scores"].items():
            terms = ", ".join(f"{t} {'n/a' if v is None else f'{v:.3f}'}" for t, v in c["terms"].items())
            every = "n/a" if c["all_terms"] is None else f"{c['all_terms']:.3f}"
            lines.append(f"| {text} | {c['images']} | {terms} | {every} |")
        lines += ["", "16 samples per condition:", "", "![conditions](conditions.png)", ""]
    lines += ["Generated samples (left) beside decoded held-out real latents (right):", "",
              "![generated vs real](samples-vs-real.png)", ""]
    for name, space in report["spaces"].items():
        lines += [f"## Pooled {name}: {space['description']}", "",
                  "| set | precision (k=3) | recall (k=3) | density (k=5) | coverage (k=5) | MMD² (RBF) |",
                  "|---|---|---|---|---|---|"]
        for key in ("generated", "train", "gaussian", "untrained", "starts", *extra_rows(space["metrics"])):
            m = space["metrics"][key]
            lines.append(f"| {ROW_LABELS.get(key, key)} | " + " | ".join(f"{m[x]:.3f}" for x in POOLED_METRICS) + " |")
        gain = space["energy_gain"]
        lines += ["", "What the sampler adds to its chain starts (generated minus starts): "
                  + ", ".join(f"{x} {gain[x]:+.3f}" for x in ("precision", "recall", "density", "coverage")) + ".", ""]
    lines += ["## Checks", ""]
    for space, checks in report["checks"].items():
        lines += [f"- [{'x' if ok else ' '}] {space}: {name}" for name, ok in checks.items()]
    lines += ["", "Notes:", ""]
    lines += [f"- {note}" for note in report["notes"]]
    lines += ["- Pooled spaces cannot tell a ring from a disc; the feature space is the verdict. Density rewards "
              "contraction (narrow samples sit in dense real regions), so read it with recall and coverage.",
              "- Precision and recall read low in high dimensions even for a perfect model; density and coverage "
              "are calibrated (about 1 for two sets from one distribution). The floor row shows what real data "
              "scores here.", ""]
    return "\n".join(lines)
