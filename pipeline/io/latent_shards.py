"""Latent shards: webdataset tars written atomically and byte-reproducibly, their done markers and manifest.

Layout of a latents folder (the contract later jobs rely on):

    OUT/latents-000000.tar      KEY.json, KEY.latent.npy (float16, C x h x w, scaled), KEY.moments.npy (optional)
    OUT/stats/latents-000000.json   done marker of that shard: counts, sha256, rejects (written after the tar)
    OUT/rejects.jsonl           every rejected input: source, key, reason, detail
    OUT/manifest.json           written last: VAE identity, latent shape, shards with sha256, totals, labels

Read the shards with `webdataset.WebDataset(shard_paths(OUT))` or
`ray.data.read_webdataset(shard_paths(OUT))` (or `read_webdataset(OUT, file_extensions=["tar"])`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from ..common.config import EbdError
from . import storage
from .files import atomic_write_json, atomic_write_lines, npy_array, npy_bytes, read_json
from .tars import read_tar_samples, write_tar

SHARD_NAME = "latents-{:06d}.tar"
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
STATS_DIR = "stats"
LATENTS_FORMAT = "ebd.latents/1"


def latent_sample(key: str, latent: np.ndarray, meta: dict, moments: np.ndarray | None = None) -> dict:
    sample = {"__key__": key, "json": json.dumps(meta, sort_keys=True).encode(),
              "latent.npy": npy_bytes(latent.astype(np.float16))}
    if moments is not None:
        sample["moments.npy"] = npy_bytes(moments.astype(np.float16))
    return sample


def shard_paths(folder: str | Path) -> list[str]:
    """The committed latent shards of a finished folder, in order: the manifest's list (written last, after every
    shard and its marker), so a shard object left by a killed run is never read."""
    return [storage.join(folder, s["file"]) for s in read_manifest(folder)["shards"]]


def count_samples(path: str) -> int:
    """The samples a latent shard holds, counted from the shard itself (its KEY.latent.npy members)."""
    return sum(1 for sample in read_tar_samples(path) if "latent.npy" in sample)


def iter_latents(paths: list[str]) -> Iterator[dict]:
    """Yields {"key", "latent" (float32 C x h x w), "moments" or None, "meta"} from latent shards, in order.

    Paths may be local or object-store URIs; each tar is streamed through webdataset's tar iterator."""
    # No node or worker splitting here: callers pass exactly the shards they own (training splits by rank).
    for path in paths:
        for sample in read_tar_samples(path):
            moments = sample.get("moments.npy")
            yield {"key": sample["__key__"], "latent": npy_array(sample["latent.npy"]).astype(np.float32),
                   "moments": None if moments is None else npy_array(moments).astype(np.float32),
                   "meta": json.loads(sample["json"])}


def labels_of(meta: dict) -> dict[str, str]:
    """A latent's labels by field: its named labels (`label_fields` in precompute) and its single `label`."""
    labels = dict(meta.get("labels") or {})
    if meta.get("label") is not None:
        labels.setdefault("label", meta["label"])
    return labels


def label_vocabulary(manifest: dict, fields: list[str], folder: str = "the latents") -> dict[str, list[str]]:
    """{field: its values, sorted} for `fields`, from the manifest's counts ("label" is the single label); a field
    the latents do not carry is one line."""
    counts = dict(manifest.get("label_fields") or {})
    if manifest.get("labels"):
        counts.setdefault("label", manifest["labels"])
    for name in fields:
        if name not in counts:
            known = ", ".join(counts) or "none: precompute with label_fields, or inputs with labels"
            raise EbdError(f"{folder} carry no label field {name!r} (fields: {known})")
    return {name: sorted(counts[name]) for name in fields}


# --------------------------------------------------------------------------------------------- manifest

def write_latent_dataset(folder: str | Path, latents: np.ndarray, *, shard_size: int = 1000,
                         labels: list[str | None] | None = None, scaling_factor: float = 1.0,
                         vae: dict | None = None, resolution: int | None = None, shuffled: bool = False,
                         label_fields: list[dict[str, str]] | None = None) -> dict:
    """Writes already-scaled latents (N x C x h x w) as a latents folder with the precompute job's layout and
    manifest: for latents made elsewhere, and for synthetic distributions in tests. `shuffled`: the rows are in a
    random order (e.g. i.i.d. draws), so any shard is a fair held-out sample (manifest `order`). `label_fields`:
    each latent's named labels ({field: value}), as precompute's `label_fields` keeps them."""
    shards, label_counts, field_counts = [], {}, {}
    for index, start in enumerate(range(0, len(latents), shard_size)):
        samples = []
        for i in range(start, min(start + shard_size, len(latents))):
            meta = {"source": f"array#{i}"}
            if labels is not None and labels[i] is not None:
                meta["label"] = labels[i]
                label_counts[labels[i]] = label_counts.get(labels[i], 0) + 1
            if label_fields is not None and label_fields[i]:
                meta["labels"] = dict(label_fields[i])
                for name, value in label_fields[i].items():
                    field_counts.setdefault(name, {})[value] = field_counts.setdefault(name, {}).get(value, 0) + 1
            samples.append(latent_sample(f"{i:09d}", latents[i], meta))
        written = write_tar(storage.join(folder, SHARD_NAME.format(index)), samples)
        shards.append({"file": SHARD_NAME.format(index), "count": len(samples), "seen": len(samples), "rejected": 0,
                       **written})
    manifest = {"format": LATENTS_FORMAT, "vae": vae or {"path": None, "weights_sha256": None},
                "scaling_factor": scaling_factor, "shift_factor": None, "resolution": resolution,
                "order": "shuffled" if shuffled else "input",
                "latent": {"shape": list(latents.shape[1:]), "dtype": "float16", "scaled": True, "moments": False},
                "shards": shards, "labels": dict(sorted(label_counts.items())),
                "totals": {"seen": len(latents), "encoded": len(latents), "rejected": 0, "shards": len(shards)}}
    if field_counts:
        manifest["label_fields"] = {name: dict(sorted(c.items())) for name, c in sorted(field_counts.items())}
    atomic_write_lines(storage.join(folder, REJECTS), [])
    atomic_write_json(storage.join(folder, MANIFEST), manifest)  # last: the folder's done marker
    return manifest


def read_manifest(folder: str | Path) -> dict:
    """Reads and checks OUT/manifest.json; a folder without one was never completed."""
    path = storage.join(folder, MANIFEST)
    if not storage.is_file(path):
        raise EbdError(f"{folder} has no {MANIFEST}: not a finished latents folder (re-run the precompute job)")
    manifest = read_json(path)
    if manifest.get("format") != LATENTS_FORMAT:
        raise EbdError(f"{path} has format {manifest.get('format')!r}, expected {LATENTS_FORMAT!r}")
    return manifest


def split_held_out(manifest: dict, holdout_shards: int | str) -> tuple[list[str], list[str]]:
    """(training files, held-out files) among a latents folder's non-empty shards. `auto`: the held-out shards its
    manifest lists (precompute's `holdout`), or the last shard of a folder written before precompute recorded a
    split; a number N: the last N shards."""
    files = [s["file"] for s in manifest["shards"] if s["count"] > 0]
    if holdout_shards == "auto":
        recorded = manifest.get("held_out")
        held = [f for f in recorded["files"] if f in files] if recorded is not None else files[-1:]
    else:
        if holdout_shards >= len(files):
            raise EbdError(f"holdout_shards={holdout_shards} leaves no shard to train on ({len(files)} non-empty "
                           "shards)")
        held = files[len(files) - holdout_shards:] if holdout_shards else []
    return [f for f in files if f not in held], held


def pick_rows(rows, index) -> list:
    """Streams `rows` and keeps those at the positions `index` (positions, a list or tensor) names, in `index`'s
    order (all rows if None): memory holds the picked rows only, however large the run or the shard folder."""
    if index is None:
        return list(rows)
    wanted = {int(i): slot for slot, i in enumerate(index)}
    picked = [None] * len(wanted)
    for position, row in enumerate(rows):
        if position in wanted:
            picked[wanted[position]] = row
    if any(r is None for r in picked):
        raise EbdError("a shard holds fewer rows than its manifest counts: the folder changed after it was written")
    return picked
