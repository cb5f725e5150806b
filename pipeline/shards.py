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

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import webdataset as wds

from .config import EbdError

SHARD_NAME = "latents-{:06d}.tar"
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
STATS_DIR = "stats"
LATENTS_FORMAT = "ebd.latents/1"


# ------------------------------------------------------------------------------------------- atomic files

def atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Writes through `write(fileobj)` to a temporary file beside `path`, fsyncs, then renames over `path`.

    A reader (or a resumed run) sees either no file or the complete file, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))


def atomic_write_lines(path: str | Path, records: list[dict]) -> None:
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
    atomic_write(path, lambda f: f.write(data))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- shards

def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def write_tar(path: str | Path, samples: list[dict[str, bytes | str]]) -> None:
    """Writes webdataset samples ({"__key__": KEY, EXT: bytes, ...}) atomically with fixed mtime, owner and order,
    so the same samples always give the same bytes."""
    def write(f):
        with wds.TarWriter(f, encoder=False, mtime=0, user="ebd", group="ebd", mode=0o644) as tar:
            for sample in samples:
                tar.write(sample)
    atomic_write(path, write)


def latent_sample(key: str, latent: np.ndarray, meta: dict, moments: np.ndarray | None = None) -> dict:
    sample = {"__key__": key, "json": json.dumps(meta, sort_keys=True).encode(),
              "latent.npy": npy_bytes(latent.astype(np.float16))}
    if moments is not None:
        sample["moments.npy"] = npy_bytes(moments.astype(np.float16))
    return sample


def shard_paths(folder: str | Path) -> list[str]:
    """The complete latent shards of a folder, in order (temporary files are never listed)."""
    return [str(p) for p in sorted(Path(folder).glob("latents-[0-9]*.tar"))]


def iter_latents(paths: list[str]) -> Iterator[dict]:
    """Yields {"key", "latent" (float32 C x h x w), "moments" or None, "meta"} from latent shards, in order."""
    # No node or worker splitting here: callers pass exactly the shards they own (training splits by rank).
    dataset = wds.WebDataset(paths, shardshuffle=False, empty_check=False, nodesplitter=None,
                             workersplitter=None).decode()
    for sample in dataset:
        moments = sample.get("moments.npy")
        yield {"key": sample["__key__"], "latent": sample["latent.npy"].astype(np.float32),
               "moments": None if moments is None else moments.astype(np.float32), "meta": sample["json"]}


def claim_run_folder(out: str | Path, run: dict, run_file: str = "run.json") -> dict:
    """Records in OUT/run.json what a job fills the folder with, or checks a resumed run against it.

    Returns the recorded dict (which may hold more than `run`, e.g. batch sizes a job added). Raises EbdError when
    any key of `run` differs, or when the folder is non-empty and was not started by such a job: runs never mix.
    """
    out = Path(out)
    path = out / run_file
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = sorted(k for k in run if previous.get(k) != run[k])
        if changed:
            raise EbdError(f"{out} holds a run started with a different {', '.join(changed)}: "
                           "use a new --output (or delete the folder) instead of mixing runs")
        return previous
    if out.exists() and any(out.iterdir()):
        raise EbdError(f"{out} is not empty and was not written by this job: choose a new --output")
    atomic_write_json(path, run)
    return run


# --------------------------------------------------------------------------------------------- manifest

def write_latent_dataset(folder: str | Path, latents: np.ndarray, shard_size: int = 1000,
                         labels: list[str | None] | None = None, scaling_factor: float = 1.0,
                         vae: dict | None = None, resolution: int | None = None, shuffled: bool = False) -> dict:
    """Writes already-scaled latents (N x C x h x w) as a latents folder with the precompute job's layout and
    manifest: for latents made elsewhere, and for synthetic distributions in tests. `shuffled`: the rows are in a
    random order (e.g. i.i.d. draws), so any shard is a fair held-out sample (manifest `order`)."""
    folder = Path(folder)
    shards, label_counts = [], {}
    for index, start in enumerate(range(0, len(latents), shard_size)):
        samples = []
        for i in range(start, min(start + shard_size, len(latents))):
            meta = {"source": f"array#{i}"}
            if labels is not None and labels[i] is not None:
                meta["label"] = labels[i]
                label_counts[labels[i]] = label_counts.get(labels[i], 0) + 1
            samples.append(latent_sample(f"{i:09d}", latents[i], meta))
        path = folder / SHARD_NAME.format(index)
        write_tar(path, samples)
        shards.append({"file": path.name, "count": len(samples), "seen": len(samples), "rejected": 0,
                       "bytes": path.stat().st_size, "sha256": file_sha256(path)})
    manifest = {"format": LATENTS_FORMAT, "vae": vae or {"path": None, "weights_sha256": None},
                "scaling_factor": scaling_factor, "shift_factor": None, "resolution": resolution,
                "order": "shuffled" if shuffled else "input",
                "latent": {"shape": list(latents.shape[1:]), "dtype": "float16", "scaled": True, "moments": False},
                "shards": shards, "labels": dict(sorted(label_counts.items())),
                "totals": {"seen": len(latents), "encoded": len(latents), "rejected": 0, "shards": len(shards)}}
    atomic_write_json(folder / MANIFEST, manifest)
    atomic_write_lines(folder / REJECTS, [])
    return manifest


def read_manifest(folder: str | Path) -> dict:
    """Reads and checks OUT/manifest.json; a folder without one was never completed."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise EbdError(f"{folder} has no {MANIFEST}: not a finished latents folder (re-run the precompute job)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != LATENTS_FORMAT:
        raise EbdError(f"{path} has format {manifest.get('format')!r}, expected {LATENTS_FORMAT!r}")
    return manifest
