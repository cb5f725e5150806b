"""Sample quality of a generation run, measured against real latents the EBM never trained on.

    python -m jobs.evaluate --generated GEN_DIR --reference LATENTS_DIR --output DIR [--check]

Sets (n samples each, n = min(num_samples, what is available)):
    generated  the run's own latents (saved beside its images) and its decoded images, read from its shards
    held-out   real latents from the reference shards the model never trained on: the shards its training run
               held out (model metadata `latents.held_out`), or every shard of LATENTS_DIR when it held none out
Baselines, each scored against held-out in the same run (REFERENCE section 3):
    train      real latents the model trained on: the floor, what a perfect model would score
    gaussian   N(mean, cov) of the training latents, sampled exactly without forming cov (mean + X_c^T w)
    untrained  the same sampler (and chain starts) on the same architecture with fresh random weights
    starts     the chains' starting points alone, before any Langevin step: what the energy adds is the distance
               from this row to the generated one
Spaces: `latents` (scaled latents average-pooled to C x pool x pool) and `images` (decoded images, the real and
baseline ones through the same VAE, average-pooled to image_side px). Metrics come from pipeline/quality.py.

Writes OUT/report.json, OUT/report.md and OUT/samples-vs-real.png (generated grid beside a real one).
The checks (density and coverage >= thresholds and above the Gaussian's) are reported for both spaces; `passed`
is the verdict in `check_space`, and `--check` turns a failed verdict into a non-zero exit. Density and coverage
alone reward collapsed samples (see the untrained row: contracted chains score high density); read them with
precision and recall.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from . import quality
from . import shards as sh
from .config import EbdError, require
from .shards import atomic_write, atomic_write_json

REPORT_FORMAT = "ebd.report/1"
BASELINES = ("train", "gaussian", "untrained", "starts")
METRICS = ("precision", "recall", "density", "coverage", "mmd")


@dataclass
class EvaluateConfig:
    generated: str | None = None                 # output folder of jobs.generate (needs save_latents: true)
    reference: str | None = None                 # latents folder (precompute output) with the held-out shards
    output: str | None = None
    train_latents: str | None = None             # where the training latents are, if not in `reference`
    model: str | None = None                     # the EBM folder, if it moved since generation
    num_samples: int = 1000
    pool: int = 4                                # latents are pooled to C x pool x pool
    image_side: int = 16                         # images are pooled to image_side x image_side
    seed: int = 0
    max_train_latents: int = 10_000              # fit the Gaussian on at most this many training latents
    min_density: float = 0.7
    min_coverage: float = 0.7
    check_space: Literal["latents", "images"] = "latents"
    threads: int = 0                             # torch threads; 0: all cores

    def validate(self) -> None:
        for name in ("generated", "reference", "output"):
            require(getattr(self, name) is not None, f"missing {name}: pass --{name} or set it in the config")
        require(self.num_samples >= 10, "num_samples must be >= 10 (k-NN metrics need neighbours)")
        require(self.pool >= 1 and self.image_side >= 1 and self.max_train_latents >= 2,
                "pool, image_side must be >= 1, max_train_latents >= 2")


# ------------------------------------------------------------------------------------------- read inputs

def read_generated(folder: Path) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(manifest, latents (N, C, h, w) float32, images (N, 3, H, W) uint8) of a finished generation run."""
    import pyarrow.parquet as pq
    import webdataset as wds
    from PIL import Image

    path = folder / "manifest.json"
    if not path.is_file():
        raise EbdError(f"{folder} has no manifest.json: not a finished generation run (re-run jobs.generate)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != "ebd.images/1":
        raise EbdError(f"{path} is not a generation manifest (format {manifest.get('format')!r})")
    if not manifest.get("latents", {}).get("saved"):
        raise EbdError(f"{folder} was generated without its latents: re-run jobs.generate with save_latents: true")
    latents, images = [], []
    for shard in manifest["shards"]:
        files = shard["files"]
        parquet = next((f for f in files if f.endswith(".parquet")), None)
        if parquet is not None:
            table = pq.read_table(folder / parquet, columns=["image", "latent"])
            rows = zip(table.column("image").to_pylist(), table.column("latent").to_pylist())
        else:
            tar = next(f for f in files if f.endswith(".tar"))
            rows = ((s["png"], s["latent.npy"]) for s in wds.WebDataset(
                str(folder / tar), shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False))
        for png, npy in rows:
            latents.append(np.load(io.BytesIO(npy), allow_pickle=False).astype(np.float32))
            images.append(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
    return (manifest, torch.from_numpy(np.stack(latents)),
            torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous())


def read_latents(folder: Path, files: list[str]) -> torch.Tensor:
    paths = [str(folder / f) for f in files]
    return torch.from_numpy(np.stack([r["latent"] for r in sh.iter_latents(paths)]))


def reference_sets(cfg: EvaluateConfig, model_metadata: dict, gen_vae_sha: str | None) -> dict:
    """The held-out and training latents, and notes on how they were chosen."""
    ref = Path(cfg.reference)
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
    else:
        held_files = sorted(listed)
        notes.append(f"the model records no held-out shards: every shard of {ref} is the reference, which is fair "
                     "only if the model never trained on this folder")
    train_folder = Path(cfg.train_latents) if cfg.train_latents else ref
    train_files = [s["file"] for s in trained_on if (train_folder / s["file"]).is_file()]
    if not train_files and cfg.train_latents:
        train_files = [Path(p).name for p in sh.shard_paths(train_folder)]
    train_files = [f for f in train_files if not (train_folder == ref and f in held_files)]
    if not train_files:
        raise EbdError(f"no training latents found (looked in {train_folder}): pass --train-latents DIR")
    return {"held_out": read_latents(ref, held_files), "train": read_latents(train_folder, train_files),
            "held_out_files": held_files, "train_files": train_files, "notes": notes}


# ------------------------------------------------------------------------------------------------ baselines

def moment_matched_gaussian(data: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n samples of N(mean, cov) of `data` (N, ...): mean + X_c^T w / sqrt(N - 1) with w ~ N(0, I_N) has exactly
    that mean and covariance, without forming the D x D covariance (16k x 16k for Stable Diffusion latents)."""
    flat = data.flatten(1).double()
    mean = flat.mean(0)
    weights = torch.randn(n, len(flat), generator=generator, dtype=torch.float64)
    return (mean + weights @ (flat - mean) / (len(flat) - 1) ** 0.5).float().reshape(n, *data.shape[1:])


def chain_starts(trained, sampler: dict, n: int, seed: int) -> torch.Tensor:
    """Where the run's chains start (the model's fitted Gaussian or N(0, init_std^2 I)), with no step taken."""
    generators = [torch.Generator().manual_seed(seed * 100_003 + i) for i in range(n)]
    return trained.initial_latents(n, sampler["init_std"], generators)


def untrained_samples(trained, sampler: dict, n: int, seed: int) -> torch.Tensor:
    """The run's sampler on the model's architecture with fresh random weights (seeded); chains start where the
    trained model's start (its fitted Gaussian, if it has one), so only the learned energy differs."""
    from .ebm import EnergyModel
    from .langevin import SamplerSettings, sample

    torch.manual_seed(seed)
    model = EnergyModel(trained.config, trained.metadata).eval()
    model.load_state_dict({k: v for k, v in trained.state_dict().items() if k.startswith("init_")}, strict=False)
    generators = [torch.Generator().manual_seed(seed * 100_003 + i) for i in range(n)]
    out = [sample(model, min(256, n - a), tuple(model.config.latent_shape), SamplerSettings(**sampler),
                  generators[a:a + 256]) for a in range(0, n, 256)]
    return torch.cat(out)


def decode_images(vae, latents: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Scaled latents -> uint8 images (N, 3, H, W), the way the generation job's decoder makes them."""
    from .vae import decode, to_uint8

    return torch.cat([to_uint8(decode(vae, latents[a:a + batch])).cpu() for a in range(0, len(latents), batch)])


# --------------------------------------------------------------------------------------------- the report

def run_evaluation(cfg: EvaluateConfig) -> dict:
    from .ebm import EnergyModel
    from .vae import cached_vae, pick_device, resolve_vae

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tick = time.monotonic()
    gen_dir, out = Path(cfg.generated), Path(cfg.output)
    manifest, gen_latents, gen_images = read_generated(gen_dir)
    model_dir = Path(cfg.model or manifest["model"]["path"])
    if not (model_dir / "config.json").is_file():
        raise EbdError(f"the generation run's model is not at {model_dir}: pass --model DIR")
    trained = EnergyModel.from_pretrained(model_dir)
    vae_info = manifest["vae"]
    spec = resolve_vae(vae_info["path"], vae_info.get("subfolder"))
    refs = reference_sets(cfg, trained.metadata, vae_info.get("weights_sha256"))

    n = min(cfg.num_samples, len(gen_latents), len(refs["held_out"]), len(refs["train"]))
    require(n >= 10, f"only {n} samples to compare: generate more images or hold out more shards")
    generator = torch.Generator().manual_seed(cfg.seed)

    def subset(count: int, size: int) -> torch.Tensor:
        return torch.randperm(count, generator=generator)[:size]

    gen_index = subset(len(gen_latents), n)
    held_out = refs["held_out"][subset(len(refs["held_out"]), n)]
    sets = {"generated": gen_latents[gen_index],
            "train": refs["train"][subset(len(refs["train"]), n)],
            "gaussian": moment_matched_gaussian(refs["train"][subset(len(refs["train"]), cfg.max_train_latents)],
                                                n, generator),
            "untrained": untrained_samples(trained, manifest["sampler"], n, cfg.seed),
            "starts": chain_starts(trained, manifest["sampler"], n, cfg.seed)}

    vae = cached_vae(spec, pick_device(True), "auto")
    images = {"held_out": decode_images(vae, held_out), "generated": gen_images[gen_index]}
    images |= {name: decode_images(vae, z) for name, z in sets.items() if name != "generated"}

    spaces = {
        "latents": {"description": f"scaled latents average-pooled to {held_out.shape[1]} x {cfg.pool} x {cfg.pool} "
                                   f"({held_out.shape[1] * cfg.pool ** 2} dims)",
                    "features": lambda z: quality.pool_latents(z, cfg.pool).flatten(1),
                    "real": held_out, "sets": sets},
        "images": {"description": f"decoded images average-pooled to {cfg.image_side} x {cfg.image_side} RGB "
                                  f"({3 * cfg.image_side ** 2} dims, [0, 1])",
                   "features": lambda x: quality.pool_latents(x.float() / 255.0, cfg.image_side).flatten(1),
                   "real": images["held_out"], "sets": {k: images[k] for k in sets}},
    }
    report_spaces = {}
    for name, space in spaces.items():
        real = space["features"](space["real"])
        metrics = {k: {m: round(v, 4) for m, v in quality.all_metrics(real, space["features"](x)).items()}
                   for k, x in space["sets"].items()}
        # What the learned energy contributes: the Langevin steps' effect on the chain starts they began from.
        energy_gain = {m: round(metrics["generated"][m] - metrics["starts"][m], 4) for m in METRICS}
        report_spaces[name] = {"description": space["description"], "metrics": metrics, "energy_gain": energy_gain}

    checks = {name: quality_checks(space["metrics"], cfg) for name, space in report_spaces.items()}
    report = {"format": REPORT_FORMAT, "samples": n, "generated": str(gen_dir.resolve()),
              "reference": str(Path(cfg.reference).resolve()), "model": manifest["model"],
              "sampler": manifest["sampler"], "held_out_shards": refs["held_out_files"],
              "train_shards": len(refs["train_files"]), "notes": refs["notes"], "spaces": report_spaces,
              "check_space": cfg.check_space, "checks": checks, "passed": all(checks[cfg.check_space].values()),
              "config": asdict(cfg), "seconds": round(time.monotonic() - tick, 1)}

    out.mkdir(parents=True, exist_ok=True)
    grid = side_by_side(images["generated"][:64], images["held_out"][:64])
    atomic_write(out / "samples-vs-real.png", lambda f: grid.save(f, format="PNG"))
    atomic_write_json(out / "report.json", report)
    text = render_markdown(report).encode()
    atomic_write(out / "report.md", lambda f: f.write(text))
    return report


def quality_checks(metrics: dict, cfg: EvaluateConfig) -> dict[str, bool]:
    gen, gauss = metrics["generated"], metrics["gaussian"]
    return {f"density >= {cfg.min_density}": gen["density"] >= cfg.min_density,
            f"coverage >= {cfg.min_coverage}": gen["coverage"] >= cfg.min_coverage,
            "density above the Gaussian baseline": gen["density"] > gauss["density"],
            "coverage above the Gaussian baseline": gen["coverage"] > gauss["coverage"]}


def side_by_side(generated: torch.Tensor, real: torch.Tensor):
    """Two 8-column grids, generated on the left and real on the right, with a white gap between."""
    from PIL import Image

    from .sinks import preview_grid

    left = preview_grid([x.permute(1, 2, 0).numpy() for x in generated])
    right = preview_grid([x.permute(1, 2, 0).numpy() for x in real])
    gap = max(4, left.width // 32)
    canvas = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + gap, 0))
    return canvas


def render_markdown(report: dict) -> str:
    rows = {"generated": "generated (this run)", "train": "training real (floor)",
            "gaussian": "moment-matched Gaussian", "untrained": "untrained EBM, same sampler",
            "starts": "chain starts, no Langevin step"}
    lines = [f"# Sample quality: {report['model']['id']}", "",
             f"{report['samples']} samples per set, each compared with {report['samples']} held-out real latents "
             f"({len(report['held_out_shards'])} shard(s) the model never trained on). Sampler: "
             + ", ".join(f"{k}={v}" for k, v in report["sampler"].items()) + ".", ""]
    for name, space in report["spaces"].items():
        lines += [f"## {name}: {space['description']}", "",
                  "| set | precision (k=3) | recall (k=3) | density (k=5) | coverage (k=5) | MMD² (RBF) |",
                  "|---|---|---|---|---|---|"]
        for key, label in rows.items():
            m = space["metrics"][key]
            lines.append(f"| {label} | " + " | ".join(f"{m[x]:.3f}" for x in METRICS) + " |")
        gain = space["energy_gain"]
        lines += ["", "What the learned energy adds (generated minus chain starts): "
                  + ", ".join(f"{x} {gain[x]:+.3f}" for x in ("precision", "recall", "density", "coverage")) + ".", ""]
    lines += ["## Checks", ""]
    for space, checks in report["checks"].items():
        lines += [f"- [{'x' if ok else ' '}] {space}: {name}" for name, ok in checks.items()]
    lines += ["", f"**{'PASSED' if report['passed'] else 'FAILED'}** (verdict on {report['check_space']})", "",
              "Generated samples (left) beside decoded held-out real latents (right):", "",
              "![generated vs real](samples-vs-real.png)", "", "Notes:", ""]
    lines += [f"- {note}" for note in report["notes"]]
    lines += ["- 'chain starts' are the sampler's starting points before any step: the gap between that row and "
              "the generated one is what the learned energy contributes.",
              "- Density rewards contraction: narrower samples sit in denser real regions (the untrained EBM's "
              "row shows it), so read density with recall and coverage.",
              "- Precision and recall read low in high dimensions even for a perfect model; density and coverage "
              "are calibrated (about 1 for two sets from one distribution). The floor row shows what real data "
              "scores here.", ""]
    return "\n".join(lines)
