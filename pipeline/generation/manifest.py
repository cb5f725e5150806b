"""What a run leaves beside its shards: run.json (what the folder is being filled with; a resume must agree),
summary.json (how this run went), manifest.json (written last: the run is complete) and preview.png."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from ..common.config import EbdError
from ..io import image_shards, storage
from ..io.files import atomic_write, atomic_write_json, claim_run_folder, read_json
from ..io.output_formats import FORMATS, format_label
from ..io.pictures import preview_grid
from ..sampling.settings import SamplerSettings
from .config import GenerateConfig

RUN_FILE = "run.json"

# Config keys that change the images: a resumed run must agree with the folder on all of them.
# (And the formats, recorded as the one word run.json has always held, so folders of every version resume.)
CONTENT_KEYS = ("num_images", "seed", "images_per_shard", "vae_dtype", "save_latents", "sampler_precision")


def claim_output(out: str, cfg: GenerateConfig, settings: SamplerSettings, model_id: str, vae_identity: dict,
                 decoder, plan: list | None = None) -> dict:
    sampler = asdict(settings)
    # A tiny decoder makes other pixels. None for the VAE's own decoder, which a folder from before the key
    # existed also reads as (absent), so old runs still resume.
    tiny_decoder = decoder.weights_sha256() if decoder.class_name != "AutoencoderKL" else None
    if plan is None:  # guidance changes nothing without a condition (and folders from before it lack the key)
        sampler = {k: v for k, v in sampler.items() if k != "guidance"}
    if sampler.get("sigmas", 0) is None:  # no tuned levels (and folders from before them lack the key)
        del sampler["sigmas"]
    config = {k: getattr(cfg, k) for k in CONTENT_KEYS} | {"format": format_label(tuple(cfg.formats))}
    run = {"config": config, "sampler": sampler, "model": model_id,
           "vae_weights_sha256": vae_identity["weights_sha256"], "decoder_weights_sha256": tiny_decoder,
           "conditions": plan,  # None (absent in older folders) for an unconditional run
           "layout": image_shards.LAYOUT}
    recorded = storage.join(out, RUN_FILE)
    if storage.is_file(recorded) and read_json(recorded).get("layout") != image_shards.LAYOUT:
        raise EbdError(f"{out} holds a run written before ebd put shards in parquet/ and webdataset/ folders: it "
                       "stays readable (evaluate, inspect), but resume it with the ebd that wrote it or generate "
                       "into a new --output")
    return claim_run_folder(out, run, RUN_FILE)


def finish(out: str, cfg: GenerateConfig, done: dict, num_shards: int, *, settings: SamplerSettings, model_id: str,
           vae_identity: dict, decoder, latent_shape: list[int], plan: list | None = None, placement,
           batch_sizes: dict, precision: str, seconds: float, made: int) -> dict:
    """Checks that the `done` shards hold every image, then writes preview.png, summary.json (this run: `made`
    images in `seconds`) and, last, manifest.json; returns the summary. The keywords say what the images were made
    with (`settings`, `model_id`, `vae_identity`, `decoder`, `latent_shape`, `plan`) and how (`placement`,
    `batch_sizes`, `precision`)."""
    sampler = asdict(settings)
    shards = [done[j] for j in range(num_shards)]
    images = sum(s["count"] for s in shards)
    if images != cfg.num_images:
        raise EbdError(f"expected {cfg.num_images} images, found {images}: re-run the same command to complete")
    preview = _preview(out, cfg, shards)
    atomic_write(storage.join(out, "preview.png"), lambda f: preview.save(f, format="PNG"))
    busy = {stage: round(sum(sum(image_shards.stage_seconds(s, stage)) for s in shards), 3)
            for stage in ("sampler", "decode", "write")}
    proposed = sum(s.get("mala_proposed", 0) for s in shards)
    summary = {"images": images, "images_this_run": made, "seconds": round(seconds, 3),
               "sampler": sampler["name"],
               "gradient_evaluations_per_image": max((s.get("gradient_evaluations", 0) / s["count"] for s in shards),
                                                     default=0),
               "mala_acceptance": sum(s.get("mala_accepted", 0) for s in shards) / proposed if proposed else None,
               "images_per_second": made / seconds if seconds > 0 else 0.0, "stage_busy_seconds": busy,
               "batch_sizes": {k: v for k, v in batch_sizes.items() if k != "probes"},
               "batch_probes": batch_sizes.get("probes", {}), "sampler_precision": precision,
               "decoder": decoder.class_name,
               "sampler_actors": placement.sampler_actors,
               "decoder_gpus_per_actor": placement.sampler_gpus if placement.fused else placement.decoder_gpus,
               "placement": placement.to_dict(),
               "sampler_devices": sorted({s.get("sampler_device", "cpu") for s in shards}),
               "oom_shrinks": sum(len(s.get("decode_oom_shrinks", [])) for s in shards)}
    atomic_write_json(storage.join(out, "summary.json"), summary)
    written = set(cfg.formats)
    manifest = {"format": "ebd.images/1", "layout": image_shards.LAYOUT, "images": images, "num_shards": num_shards,
                "output_format": format_label(tuple(cfg.formats)), "formats": list(cfg.formats),
                "folders": {name: fmt.folder if name in written else None for name, fmt in FORMATS.items()},
                "seed": cfg.seed, "model": {"id": model_id, "path": storage.canonical(cfg.model)},
                "latents": {"saved": cfg.save_latents, "shape": latent_shape, "scaled": True,
                            "dtype": {name: fmt.latent_dtype for name, fmt in FORMATS.items()}},
                "vae": vae_identity, "sampler": sampler, "images_per_shard": cfg.images_per_shard,
                "decoder": {"class": decoder.class_name, "path": storage.canonical(decoder.path),
                            "weights_sha256": decoder.weights_sha256()},
                "shards": [{"shard": s["shard"], "count": s["count"], "files": s["files"]} for s in shards]}
    for name, fmt in FORMATS.items():  # e.g. webdataset_urls, the brace pattern webdataset.WebDataset takes
        manifest |= fmt.manifest_fields(out, num_shards, name in written)
    if plan:  # which images asked for what, in order (each row and sidecar also carries its condition)
        manifest["conditions"] = [{"condition": text, "count": n} for text, n in plan]
    atomic_write_json(storage.join(out, "manifest.json"), manifest)  # last: its presence means the run is complete
    return summary


def _preview(out: str, cfg: GenerateConfig, shards: list[dict]):
    """A grid of the first 64 images, read back from the written shards."""
    import io

    from PIL import Image

    images: list[np.ndarray] = []
    for s in shards:
        if len(images) >= 64:
            break
        pngs = image_shards.shard_pngs(out, s["shard"], tuple(cfg.formats))
        images += [np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in pngs[: 64 - len(images)]]
    return preview_grid(images)
