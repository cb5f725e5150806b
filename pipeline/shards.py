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
    dataset = wds.WebDataset(paths, shardshuffle=False, empty_check=False).decode()
    for sample in dataset:
        moments = sample.get("moments.npy")
        yield {"key": sample["__key__"], "latent": sample["latent.npy"].astype(np.float32),
               "moments": None if moments is None else moments.astype(np.float32), "meta": sample["json"]}


# --------------------------------------------------------------------------------------------- manifest

def read_manifest(folder: str | Path) -> dict:
    """Reads and checks OUT/manifest.json; a folder without one was never completed."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise EbdError(f"{folder} has no {MANIFEST}: not a finished latents folder (re-run the precompute job)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != LATENTS_FORMAT:
        raise EbdError(f"{path} has format {manifest.get('format')!r}, expected {LATENTS_FORMAT!r}")
    return manifest
