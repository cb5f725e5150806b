"""Generated-image shards: parquet and/or webdataset tars, written atomically with a done marker last.

    OUT/images-000000.parquet   columns key, image ({bytes: PNG, path: KEY.png}: Hugging Face datasets' Image
                                struct, declared in the schema metadata, so `datasets` decodes it as images),
                                width, height, seed, energy, model[, latent][, condition]
    OUT/images-000000.tar       KEY.png, KEY.json (key, seed, energy, model, width, height[, condition])
                                [, KEY.latent.npy]
    OUT/stats/images-000000.json   done marker: counts, files, sha256, chosen batch sizes, stage seconds
    OUT/images-000000_stats.json   the same shard in img2dataset's stats shape (count, successes, duration, ...)

`latent` / KEY.latent.npy (when the run saves latents) is the image's scaled latent as float16 .npy bytes, the
encoding of the precompute job's latent shards: evaluation compares generated and real latents directly.
`condition` (a conditional run only) is what the image was asked for, e.g. "shape=ring AND background=checker".

Shard j holds images [j * images_per_shard, ...) in order, so a shard is defined by its index alone.
"""

from __future__ import annotations

import io
import json
import time
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from ..common.config import EbdError
from . import storage
from .files import atomic_write, atomic_write_json, npy_array, npy_bytes, read_json
from .latent_shards import STATS_DIR, pick_rows
from .tars import read_tar_samples, write_tar

PARQUET_NAME, TAR_NAME = "images-{:06d}.parquet", "images-{:06d}.tar"
IMG2DATASET_STATS = "images-{:06d}_stats.json"
STAGES = ("sampler", "decode", "write")
FORMATS = {"parquet": (PARQUET_NAME,), "webdataset": (TAR_NAME,), "both": (PARQUET_NAME, TAR_NAME)}
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # Hugging Face datasets' Image
COLUMNS = [("key", pa.string()), ("image", IMAGE_TYPE), ("width", pa.int32()), ("height", pa.int32()),
           ("seed", pa.int64()), ("energy", pa.float32()), ("model", pa.string()), ("latent", pa.binary()),
           ("condition", pa.string())]
HF_TYPES = {"key": "string", "width": "int32", "height": "int32", "seed": "int64", "energy": "float32",
            "model": "string", "latent": "binary", "condition": "string"}


def parquet_schema(with_latent: bool, with_condition: bool = False) -> pa.Schema:
    """The shard schema, with the `huggingface` metadata that makes `datasets` decode `image` as an Image."""
    columns = [c for c in COLUMNS if (with_latent or c[0] != "latent") and (with_condition or c[0] != "condition")]
    features = {name: {"_type": "Image"} if name == "image" else {"dtype": HF_TYPES[name], "_type": "Value"}
                for name, _ in columns}
    return pa.schema(columns, metadata={"huggingface": json.dumps({"info": {"features": features}})})


def png_of(value) -> bytes:
    """The PNG bytes of an `image` cell: the struct ebd writes, or plain bytes (runs written before it)."""
    return value["bytes"] if isinstance(value, dict) else value


def png_bytes(pixels: np.ndarray) -> bytes:
    """H x W x 3 uint8 -> PNG; fixed settings, so the same pixels always give the same bytes."""
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def stats_path(out: str, shard: int) -> str:
    return storage.join(out, STATS_DIR, f"images-{shard:06d}.json")


def shard_files(out: str, shard: int, fmt: str) -> list[str]:
    return [storage.join(out, name.format(shard)) for name in FORMATS[fmt]]


def write_image_shard(out: str, shard: int, fmt: str, keys: list[str], images: np.ndarray, seeds: list[int],
                      energies: np.ndarray, model_id: str, extra_stats: dict,
                      latents: np.ndarray | None = None, conditions: list[str] | None = None) -> dict:
    """Encodes PNGs, writes the shard's files atomically, then its done marker. Returns the marker's content."""
    tick = time.perf_counter()
    pngs = [png_bytes(img) for img in images]
    height, width = images.shape[1:3]
    npys = None if latents is None else [npy_bytes(z.astype(np.float16)) for z in latents]
    files, file_bytes = {}, {}
    if fmt in ("parquet", "both"):
        columns = {"key": keys, "image": [{"bytes": png, "path": f"{k}.png"} for k, png in zip(keys, pngs)],
                   "width": [width] * len(keys), "height": [height] * len(keys), "seed": seeds,
                   "energy": energies.astype(np.float32), "model": [model_id] * len(keys)}
        if npys is not None:
            columns["latent"] = npys
        if conditions is not None:
            columns["condition"] = conditions
        table = pa.table(columns, schema=parquet_schema(npys is not None, conditions is not None))
        def write_parquet(f):
            pq.write_table(table, f, compression="zstd", row_group_size=len(keys) or 1)
        written = atomic_write(storage.join(out, PARQUET_NAME.format(shard)), write_parquet)
        files[PARQUET_NAME.format(shard)] = written["sha256"]
        file_bytes[PARQUET_NAME.format(shard)] = written["bytes"]
    if fmt in ("webdataset", "both"):
        asked = conditions or [None] * len(keys)
        samples = [{"__key__": k, "png": png,
                    "json": json.dumps({"key": k, "seed": s, "energy": float(e), "model": model_id,
                                        "width": width, "height": height}
                                       | ({"condition": c} if c is not None else {}), sort_keys=True).encode()}
                   for k, png, s, e, c in zip(keys, pngs, seeds, energies, asked)]
        if npys is not None:
            for sample, npy in zip(samples, npys):
                sample["latent.npy"] = npy
        written = write_tar(storage.join(out, TAR_NAME.format(shard)), samples)
        files[TAR_NAME.format(shard)] = written["sha256"]
        file_bytes[TAR_NAME.format(shard)] = written["bytes"]
    stats = {"shard": shard, "count": len(keys), "files": files, "file_bytes": file_bytes,
             "bytes": sum(file_bytes.values()), **extra_stats,
             "write_batch_seconds": [time.perf_counter() - tick]}
    seconds = sum(sum(stage_seconds(stats, stage)) for stage in STAGES)
    atomic_write_json(storage.join(out, IMG2DATASET_STATS.format(shard)), {  # for tools that read img2dataset output
        "count": len(keys), "successes": len(keys), "failed_to_download": 0, "failed_to_resize": 0,
        "duration": round(seconds, 3), "status_dict": {"success": len(keys)}})
    atomic_write_json(stats_path(out, shard), stats)  # last: the done marker
    return stats


def stage_seconds(stats: dict, stage: str) -> list[float]:
    """A done marker's per-batch seconds of one stage (markers written before the sampler stage had its name call it
    langevin)."""
    return stats.get(f"{stage}_batch_seconds", stats.get("langevin_batch_seconds", []) if stage == "sampler" else [])


def shard_pngs(out: str, shard: int, fmt: str) -> list[bytes]:
    """The PNG bytes of one written shard's images, in order (from its parquet file, else its tar)."""
    if fmt in ("parquet", "both"):
        with storage.open_input(storage.join(out, PARQUET_NAME.format(shard))) as f:
            column = pq.read_table(f, columns=["image"]).column("image")
        return [png_of(v.as_py()) for v in column]
    return [x["png"] for x in read_tar_samples(storage.join(out, TAR_NAME.format(shard)))]


def completed_shard(out: str, shard: int, fmt: str) -> dict | None:
    """The done marker of a shard whose files all match the sizes and sha256 the marker records, else None (the
    shard must be (re)generated): files without a marker (a run killed between the two) and files cut short or
    changed after their marker are written again, never trusted."""
    marker = stats_path(out, shard)
    if not storage.is_file(marker):
        return None
    try:
        stats = read_json(marker)
    except ValueError:
        return None
    expected = {storage.name(p) for p in shard_files(out, shard, fmt)}
    if set(stats.get("files", {})) != expected:
        return None
    for name, sha256 in stats["files"].items():
        path = storage.join(out, name)
        if not storage.is_file(path):
            return None
        size = (stats.get("file_bytes") or {}).get(name)
        if size is not None and storage.size(path) != size:
            return None
        if storage.file_sha256(path) != sha256:
            return None
    return stats


# ------------------------------------------------------------------------------------------------ reading

def generated_manifest(folder: str) -> dict:
    """The manifest of a finished generation run (a folder or a bucket's URI) that saved its latents (one line if
    not)."""
    path = storage.join(folder, "manifest.json")
    if not storage.is_file(path):
        raise EbdError(f"{folder} has no manifest.json: not a finished generation run (re-run jobs.generate)")
    manifest = read_json(path)
    if manifest.get("format") != "ebd.images/1":
        raise EbdError(f"{path} is not a generation manifest (format {manifest.get('format')!r})")
    if not manifest.get("latents", {}).get("saved"):
        raise EbdError(f"{folder} was generated without its latents: re-run jobs.generate with save_latents: true")
    return manifest


def _generated_rows(folder: str, manifest: dict, columns: list[str], from_tar) -> Iterator[tuple]:
    """Every row of a finished generation run, in order: the named parquet `columns` (None for one a shard lacks),
    or `from_tar(sample)` per sample of a run that wrote tars only."""
    import pyarrow.parquet as pq

    for shard in manifest["shards"]:
        parquet = next((f for f in shard["files"] if f.endswith(".parquet")), None)
        if parquet is None:
            tar = next(f for f in shard["files"] if f.endswith(".tar"))
            yield from map(from_tar, read_tar_samples(storage.join(folder, tar)))
            continue
        with storage.open_input(storage.join(folder, parquet)) as f:
            data = pq.ParquetFile(f)
            present = [c for c in columns if c in data.schema_arrow.names]
            table = data.read(columns=present)
        yield from zip(*(table.column(c).to_pylist() if c in present else [None] * table.num_rows for c in columns))


def read_generated(folder: str, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents (N, C, h, w) float32, images (N, 3, H, W) uint8) of the rows `index` names (all if None), in that
    order, of a finished generation run (a folder or a bucket's URI)."""
    rows = _generated_rows(folder, generated_manifest(folder), ["image", "latent"],
                           lambda s: (s["png"], s["latent.npy"]))
    picked = pick_rows(rows, index)
    latents = [npy_array(npy).astype(np.float32) for _, npy in picked]
    images = [np.asarray(Image.open(io.BytesIO(png_of(png))).convert("RGB")) for png, _ in picked]
    return (torch.from_numpy(np.stack(latents)),
            torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous())


def read_conditions(folder: str, index: torch.Tensor | None = None) -> list[str | None]:
    """What each of the rows `index` names asked for (None for an unconditional run's rows), in that order."""
    rows = _generated_rows(folder, generated_manifest(folder), ["condition"],
                           lambda s: (json.loads(s["json"]).get("condition"),))
    return [condition for (condition,) in pick_rows(rows, index)]
