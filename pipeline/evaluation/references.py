"""What a report compares generated images with: the held-out reference shards (real latents the model never
trained on), the training latents, and the raw images behind the reference, read back from the latents' input."""

from __future__ import annotations

import numpy as np
import torch

from ..common.config import EbdError
from ..io import latent_shards as sh
from ..io import storage


def read_latents(folder: str, files: list[str], index: torch.Tensor | None = None) -> dict:
    """{"latents": (N, C, h, w), "keys": [...], "labels": [...], "groups": [...]} of the rows `index` names (all if
    None), in that order, of the given shards read in order (a group: the latent's twins' group, None for none)."""
    rows = sh.pick_rows(sh.iter_latents([storage.join(folder, f) for f in files]), index)
    return {"latents": torch.from_numpy(np.stack([np.asarray(r["latent"], dtype=np.float32) for r in rows])),
            "keys": [r["key"] for r in rows], "labels": [r["meta"].get("label") for r in rows],
            "groups": [r["meta"].get("group") for r in rows]}


def shard_counts(folder: str) -> dict[str, int]:
    return {s["file"]: s["count"] for s in sh.read_manifest(folder)["shards"]}


def reference_sets(cfg, model_metadata: dict, gen_vae_sha: str | None) -> dict:
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
    from ..io.images import Rejected, decode_image
    from ..io.reading import read_items
    from ..io.sources import plan_items

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
