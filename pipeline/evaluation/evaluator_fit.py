"""Fits the evaluator (evaluation/features.py) that reads the generator's images: a small CNN trained in the decoder's
domain, on real training latents decoded by the same VAE decoder that generated images go through.

    python -m jobs.fit_evaluator --latents build/demo/latents --output models/demo/evaluator

Why the decoder's domain: a CNN trained on raw demo images recognises only 14% of decoded real latents (REFERENCE
section 9); a yardstick must read the images it will be shown. Data: every latent of the training shards (the last
`holdout_shards` are kept out, as jobs.train keeps them out, so generated images are never compared in a space fitted
to their reference), decoded once; labels are what precompute recorded (folder name, `.cls`/`.json`, label column).

- `kind: classifier` (labelled data): cross-entropy on random translations (and flips) of the decoded images.
- `kind: contrastive` (no labels, or fewer than two): SimCLR's NT-Xent between two augmentations of each image.
- `kind: auto`: classifier when at least two labels are present.
- `attribute_fields: [background, ...]`: one more small classifier per named label field (precompute's
  `label_fields`), fitted after the feature network and stored inside the evaluator (`attributes`), so
  conditional generation is scored on every attribute it asks for. `attributes_only: true` adds them to the
  evaluator already in OUTPUT without touching its feature network (the report's distances stay comparable).

Writes OUTPUT/config.json + OUTPUT/model.safetensors (`ImageEvaluator.from_pretrained`), recording the VAE it reads
(weights sha256), the held-out shards and, for a classifier, its accuracy and recognised share (softmax >= 0.9) on
decoded *held-out* latents and its confusion matrix: the report prints them beside every generated figure.
Deterministic for a seed and thread count.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
from torch.nn import functional as F

from ..common.config import EbdError, JobConfig, require, require_at_least
from ..common.logs import Progress
from ..common.optim import adam, learning_rate, set_learning_rate
from ..io import latent_shards as sh
from ..io import storage
from .features import ImageEvaluator, to_network_input
from .non_images import NONE_CLASS, latent_non_images, pixel_non_images


@dataclass(frozen=True)
class FitEvaluatorConfig(JobConfig):
    latents: str | None = None                   # precompute output: latents and their labels
    output: str | None = None                    # evaluator folder (config.json + model.safetensors)
    vae: str | None = None                       # default: the VAE the latents' manifest records
    kind: Literal["auto", "classifier", "contrastive"] = "auto"
    holdout_shards: int | Literal["auto"] = "auto"  # as jobs.train: the shards precompute set apart, or the last N
    max_images: int = 50_000                     # decoded training images kept in memory (uint8)
    resolution: int = 64                         # the network's input side; images are resized to it
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    feature_dim: int = 128                       # the feature space (penultimate layer)
    projection_dim: int = 64                     # contrastive head
    steps: int = 3000                            # optimisation steps
    batch_size: int = 64
    lr: float = 2e-3                             # AdamW peak; linear warm-up, cosine decay
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    shift: int = 4                               # random translation, pixels at `resolution`
    flip: bool = True                            # random horizontal flips
    temperature: float = 0.2                     # NT-Xent
    confidence: float = 0.9                      # "recognised": softmax >= confidence
    # A classifier's extra class, "(none of these)", learnt from synthetic non-images (evaluation/non_images.py:
    # decoded noise, latent and pixel mixes, blurs, shuffled patches) in `none_share` of every batch, so that
    # recognisable counts only what the evaluator can name; false: the classes alone, as before
    none_class: bool = True
    none_share: float = 0.25
    none_bank: int = 2000                        # decoded non-images (noise, latent mixes) drawn from in training
    # classifiers of named label fields (attributes), each its own small network
    attribute_fields: list[str] = field(default_factory=list)
    attribute_widths: list[int] = field(default_factory=lambda: [16, 32, 64])
    attribute_resolution: int = 32
    attribute_steps: int = 1500
    attributes_only: bool = False                # keep OUTPUT's feature network; (re)fit only the attributes
    seed: int = 0
    threads: int = 0
    log_every: int = 100

    def validate(self) -> None:
        for name in ("latents", "output"):
            require(getattr(self, name) is not None, f"missing {name}: pass --{name} or set it in the config")
        require_at_least(self, 1, "projection_dim", "log_every")
        require_at_least(self, 0, "weight_decay", "warmup_steps", "seed", "threads")
        require(self.holdout_shards == "auto" or self.holdout_shards >= 1,
                "holdout_shards must be auto or >= 1: the evaluator's accuracy is measured there")
        require(self.steps >= 1 and self.batch_size >= 2 and self.lr > 0 and self.max_images >= 2,
                "steps >= 1, batch_size >= 2, lr > 0, max_images >= 2")
        require(len(self.widths) >= 1 and min(self.widths) >= 1 and self.feature_dim >= 1,
                "widths must be positive ints and feature_dim >= 1")
        require(self.resolution >= 8 and self.shift >= 0 and 0 < self.confidence < 1 and self.temperature > 0,
                "resolution >= 8, shift >= 0, 0 < confidence < 1, temperature > 0")
        require(self.attribute_resolution >= 8 and self.attribute_steps >= 1 and len(self.attribute_widths) >= 1,
                "attribute_resolution >= 8, attribute_steps >= 1, attribute_widths non-empty")
        require(not self.attributes_only or self.attribute_fields, "attributes_only needs attribute_fields")
        require(0 < self.none_share < 1 and self.none_bank >= 2, "none_share must be in (0, 1), none_bank >= 2")


def decoded_split(cfg: FitEvaluatorConfig) -> dict:
    """Training and held-out latents decoded to uint8 images, with labels (None where a latent has none)."""
    from ..vae.autoencoder import cached_vae, decode_images, pick_device, resolve_vae

    manifest = sh.read_manifest(cfg.latents)
    train_files, held = sh.split_held_out(manifest, cfg.holdout_shards)
    require(bool(held), f"{cfg.latents} has no held-out shards (precompute ran with holdout: 0): the evaluator's "
            "accuracy is measured there; set holdout_shards: N, or precompute with holdout > 0")
    require(manifest.get("order") == "shuffled", f"{cfg.latents} was written in input order (older precompute or "
            "shuffle: false): its last shards are not a random sample; re-run precompute into a new folder")
    recorded_vae = manifest.get("vae") or {}
    vae_path = cfg.vae or recorded_vae.get("path")
    require(vae_path is not None, "the latents' manifest names no VAE: pass --vae DIR")
    spec = resolve_vae(vae_path, "auto" if cfg.vae else recorded_vae.get("subfolder", "auto"))
    identity = spec.identity()
    recorded = recorded_vae.get("weights_sha256")
    if recorded and recorded != identity["weights_sha256"]:
        raise EbdError(f"{vae_path} is not the VAE that encoded {cfg.latents} (weights sha256 "
                       f"{identity['weights_sha256'][:12]}... vs {recorded[:12]}...)")
    vae = cached_vae(spec, pick_device(True), "float32")
    out = {"vae": identity, "held_out_files": held, "train_files": train_files}
    generator = torch.Generator().manual_seed(cfg.seed)
    for name, subset in (("train", out["train_files"]), ("held_out", held)):
        rows = list(sh.iter_latents([storage.join(cfg.latents, f) for f in subset]))
        if name == "train" and len(rows) > cfg.max_images:
            keep = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.max_images]
            rows = [rows[i] for i in sorted(keep.tolist())]
        latents = torch.from_numpy(np.stack([r["latent"] for r in rows]))
        out[name] = decode_images(vae, latents)
        if cfg.none_class:  # the decoded kinds of non-image, from this side's own latents
            count = cfg.none_bank if name == "train" else max(2, min(cfg.none_bank, len(latents)))
            out[f"{name}_non_images"] = decode_images(vae, latent_non_images(latents, count, generator))
        out[f"{name}_labels"] = [r["meta"].get("label") for r in rows]
        out[f"{name}_fields"] = [sh.labels_of(r["meta"]) for r in rows]
    return out


def augment(x: torch.Tensor, shift: int, flip: bool, generator: torch.Generator, colour: bool = False) -> torch.Tensor:
    """Random translations by up to `shift` px (reflect padding), horizontal flips and, for the contrastive views,
    per-image brightness/contrast changes. x: network input in [-1, 1]."""
    n, _, h, w = x.shape
    if shift:
        padded = F.pad(x, (shift, shift, shift, shift), mode="reflect")
        dy, dx = torch.randint(0, 2 * shift + 1, (2, n), generator=generator).tolist()
        x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if flip:
        mirror = torch.rand(n, generator=generator) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
    if colour:
        scale = 1 + 0.4 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5)
        offset = 0.4 * (torch.rand(n, 3, 1, 1, generator=generator) - 0.5)
        x = ((x - x.mean(dim=(1, 2, 3), keepdim=True)) * scale + x.mean(dim=(1, 2, 3), keepdim=True)
             + offset).clamp(-1, 1)
    return x


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised temperature-scaled cross entropy: each view must find its partner among 2N - 1."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    n = len(a)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(logits, target)


def fit_evaluator(cfg: FitEvaluatorConfig) -> dict:
    """Trains and saves the evaluator (and its attribute classifiers); returns its config (with the held-out
    measurements)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tick = time.monotonic()
    if cfg.attributes_only:
        model = ImageEvaluator.from_pretrained(cfg.output)  # one line if OUTPUT holds no evaluator
    data = decoded_split(cfg)
    if cfg.attributes_only:
        require(model.vae_sha256 in (None, data["vae"]["weights_sha256"]),
                f"the evaluator in {cfg.output} reads another VAE's images than {cfg.latents} decode to")
    else:
        model = fit_feature_network(cfg, data, tick)
    for name in cfg.attribute_fields:
        model.add_attribute(name, fit_attribute(cfg, data, name))
    model.save_pretrained(cfg.output)
    return model.config


def fit_feature_network(cfg: FitEvaluatorConfig, data: dict, tick: float) -> ImageEvaluator:
    """The feature network and its class head (or contrastive projection), with its held-out measurements."""
    labelled = sorted({label for label in data["train_labels"] if label is not None})
    kind = cfg.kind if cfg.kind != "auto" else ("classifier" if len(labelled) >= 2 else "contrastive")
    if kind == "classifier":
        require(len(labelled) >= 2, f"kind: classifier needs at least two labels in {cfg.latents}, found "
                f"{len(labelled)}: use kind: contrastive")
        require(NONE_CLASS not in labelled, f"a label is named {NONE_CLASS!r}, the evaluator's own class for "
                "non-images: rename it, or set none_class: false")
        keep = [i for i, label in enumerate(data["train_labels"]) if label is not None]
        train = data["train"][keep]
        targets = torch.tensor([labelled.index(data["train_labels"][i]) for i in keep])
    else:
        train, targets = data["train"], None
    none = kind == "classifier" and cfg.none_class
    classes = labelled + [NONE_CLASS] if none else labelled

    torch.manual_seed(cfg.seed)
    config = {"kind": kind, "classes": classes if kind == "classifier" else [], "resolution": cfg.resolution,
              "widths": list(cfg.widths), "feature_dim": cfg.feature_dim, "projection_dim": cfg.projection_dim,
              "vae": data["vae"], "confidence": cfg.confidence, "none_class": none}
    model = ImageEvaluator(config)
    log = Progress("fit_evaluator", total=cfg.steps, unit="steps", interval_s=30)
    log.log(f"{kind}: {len(train)} decoded training images, {len(data['held_out'])} held out "
            f"({len(data['held_out_files'])} shard(s)); {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
            f"parameters; {cfg.steps} steps of {cfg.batch_size}")
    _optimise(model, cfg, train, targets, cfg.steps, cfg.resolution, log, data.get("train_non_images") if none
              else None)
    measured = held_out_measurements(model, data["held_out"], data["held_out_labels"], labelled,
                                     data.get("held_out_non_images") if none else None) \
        if kind == "classifier" else {}
    model.config |= {"held_out": {"files": data["held_out_files"], "images": len(data["held_out"]), **measured},
                     "training": {"images": len(train), "files": len(data["train_files"]), "steps": cfg.steps,
                                  "seconds": round(time.monotonic() - tick, 1), "torch_threads":
                                  torch.get_num_threads(), "config": asdict(cfg)}}
    if measured:
        log.log(f"held-out decoded latents: accuracy {measured['accuracy']:.3f}, recognised "
                f"{measured['recognised']:.3f}; evaluator in {cfg.output}")
    return model


def fit_attribute(cfg: FitEvaluatorConfig, data: dict, name: str) -> ImageEvaluator:
    """A classifier of one named label field on the same decoded images, with its held-out measurements."""
    tick = time.monotonic()
    train_values = [f.get(name) for f in data["train_fields"]]
    values = sorted({v for v in train_values if v is not None})
    require(len(values) >= 2, f"attribute {name!r}: the training latents carry {len(values)} value(s) of it (need "
            "2 or more; precompute with label_fields naming it)")
    keep = [i for i, v in enumerate(train_values) if v is not None]
    targets = torch.tensor([values.index(train_values[i]) for i in keep])
    torch.manual_seed(cfg.seed)
    model = ImageEvaluator({"kind": "classifier", "classes": values, "resolution": cfg.attribute_resolution,
                            "widths": list(cfg.attribute_widths), "feature_dim": cfg.attribute_widths[-1],
                            "confidence": cfg.confidence, "field": name})
    log = Progress(f"fit_evaluator {name}", total=cfg.attribute_steps, unit="steps", interval_s=30)
    _optimise(model, cfg, data["train"][keep], targets, cfg.attribute_steps, cfg.attribute_resolution, log)
    measured = held_out_measurements(model, data["held_out"], [f.get(name) for f in data["held_out_fields"]],
                                     values)
    model.config |= {"held_out": measured, "training": {"images": len(keep), "steps": cfg.attribute_steps,
                                                        "seconds": round(time.monotonic() - tick, 1)}}
    log.log(f"attribute {name}: held-out accuracy {measured['accuracy']:.3f}")
    return model


def _optimise(model: ImageEvaluator, cfg: FitEvaluatorConfig, train: torch.Tensor, targets: torch.Tensor | None,
              steps: int, resolution: int, log: Progress, non_images: torch.Tensor | None = None) -> None:
    """AdamW with warm-up and cosine decay: cross-entropy on augmented images, or NT-Xent without targets. With
    `non_images` (the none class's decoded bank), the last `none_share` of every batch are non-images, half from
    the bank and half made from the batch's own images, all labelled as the last class."""
    optimizer = adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    none = 0 if non_images is None else max(2, round(cfg.none_share * cfg.batch_size))
    model.train()
    for step in range(steps):
        index = torch.randint(len(train), (cfg.batch_size,), generator=generator)
        images, y = train[index], None if targets is None else targets[index]
        if none:
            banked = non_images[torch.randint(len(non_images), (none - none // 2,), generator=generator)]
            made = pixel_non_images(images[:none // 2 + 2], generator)[:none // 2]
            images = torch.cat([images[:len(images) - none], banked, made])
            y = torch.cat([y[:len(y) - none], torch.full((none,), len(model.classes) - 1)])
        x = to_network_input(images, resolution)
        if targets is not None:
            loss = F.cross_entropy(model(augment(x, cfg.shift * resolution // cfg.resolution, cfg.flip, generator)), y)
        else:
            views = [model(augment(x, cfg.shift, cfg.flip, generator, colour=True)) for _ in range(2)]
            loss = nt_xent(*views, cfg.temperature)
        set_learning_rate(optimizer, learning_rate(step, cfg.lr, cfg.warmup_steps, steps))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if not math.isfinite(loss.item()):
            raise EbdError(f"the evaluator's loss became {loss.item()} at step {step}: lower lr")
        if (step + 1) % cfg.log_every == 0:
            log.update(cfg.log_every, extra=f"loss {loss.item():.4f}", force=True)
    model.eval()


def held_out_measurements(model: ImageEvaluator, images: torch.Tensor, labels: list, classes: list[str],
                          non_images: torch.Tensor | None = None) -> dict:
    """Accuracy, recognised share and confusion matrix on decoded held-out latents (labelled ones only); with the
    none class, the share of them it calls none and the share of held-out non-images (`non_images`, decoded from
    held-out latents, and as many made from held-out images) it calls none and recognises."""
    keep = [i for i, label in enumerate(labels) if label in classes]
    require(len(keep) > 0, "no held-out latent carries a label the evaluator knows: cannot measure its accuracy")
    probs = model.probabilities(images[keep])
    truth = torch.tensor([classes.index(labels[i]) for i in keep])
    predicted = probs.argmax(1)
    confusion = torch.zeros(len(model.classes), len(model.classes), dtype=torch.long)
    confusion.index_put_((truth, predicted), torch.ones_like(truth), accumulate=True)
    out = {"accuracy": round((predicted == truth).double().mean().item(), 4),
           "recognised": round(model.recognisable_share(probs), 4),
           "labelled": len(keep), "confusion": confusion.tolist()}
    if non_images is not None:
        made = pixel_non_images(images, torch.Generator().manual_seed(1))[:len(non_images)]
        fake = model.probabilities(torch.cat([non_images, made]))
        out |= {"none_on_real": round(model.none_share(probs), 4),
                "non_images": len(fake), "none_on_non_images": round(model.none_share(fake), 4),
                "recognised_non_images": round(model.recognisable_share(fake), 4)}
    return out
