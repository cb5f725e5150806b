"""Generated-image shards: parquet and/or webdataset tars in sibling folders, written atomically, done marker last.

    OUT/parquet/images-000000.parquet   columns key, image ({bytes: PNG, path: KEY.png}: Hugging Face datasets'
                                        Image struct, declared in the schema metadata, so `datasets` decodes it),
                                        width, height, seed, energy, model[, latent][, condition]
    OUT/webdataset/images-000000.tar    KEY.png, KEY.json (key, seed, energy, model, width, height[, condition])
                                        [, KEY.latent.npy]
    OUT/stats/images-000000.json        done marker: counts, files, sizes, sha256, batch sizes, stage seconds
    OUT/stats/img2dataset/images-000000_stats.json   the shard in img2dataset's stats shape
    OUT/run.json, manifest.json, summary.json, preview.png

Each data folder holds its shards and nothing else, so every reader opens it by its path:
`pandas.read_parquet(OUT/parquet)`, `pyarrow.dataset.dataset(OUT/parquet)`, `duckdb.read_parquet(...)`,
`ray.data.read_parquet`, `datasets.load_dataset("parquet", data_dir=...)`, `ray.data.read_webdataset(OUT/webdataset)`
(webdataset itself takes the manifest's brace pattern, `webdataset_urls`).

`latent` (when the run saves latents) is the image's scaled latent as a fixed-size float32 array of C*H*W values in
(C, H, W) order (the schema metadata `ebd.latent_shape` and the manifest hold the shape), which every reader turns
into numpy without a decoder: `np.stack(df["latent"]).reshape(-1, C, H, W)`. KEY.latent.npy in the tars (float16
.npy, webdataset's convention) holds the same latent.
`condition` (a conditional run only) is what the image was asked for, e.g. "shape=ring AND background=checker".

Shard j holds images [j * images_per_shard, ...) in order, so a shard is defined by its index alone. Each output
format is one writer class in `WRITERS` (write a shard's rows to one file, read its PNGs back); a run's `formats`
lists which of them it writes.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
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

PARQUET_DIR, TAR_DIR = "parquet", "webdataset"
PARQUET_NAME, TAR_NAME = f"{PARQUET_DIR}/images-{{:06d}}.parquet", f"{TAR_DIR}/images-{{:06d}}.tar"
IMG2DATASET_STATS = f"{STATS_DIR}/img2dataset/images-{{:06d}}_stats.json"
LAYOUT = 2  # 1: shards beside run.json (before the sibling folders); run.json records it
STAGES = ("sampler", "decode", "write")
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # Hugging Face datasets' Image
COLUMNS = [("key", pa.string()), ("image", IMAGE_TYPE), ("width", pa.int32()), ("height", pa.int32()),
           ("seed", pa.int64()), ("energy", pa.float32()), ("model", pa.string()), ("latent", None),
           ("condition", pa.string())]
HF_TYPES = {"key": "string", "width": "int32", "height": "int32", "seed": "int64", "energy": "float32",
            "model": "string", "condition": "string"}


def parquet_schema(latent_shape: list[int] | None, with_condition: bool = False) -> pa.Schema:
    """The shard schema, with the `huggingface` metadata that makes `datasets` decode `image` as an Image and read
    `latent` as a fixed-length float32 sequence."""
    size = int(np.prod(latent_shape)) if latent_shape else 0
    columns = [(name, pa.list_(pa.float32(), size) if name == "latent" else t) for name, t in COLUMNS
               if (latent_shape or name != "latent") and (with_condition or name != "condition")]
    features = {name: ({"_type": "Image"} if name == "image" else
                       {"_type": "Sequence", "feature": {"dtype": "float32", "_type": "Value"}, "length": size}
                       if name == "latent" else {"dtype": HF_TYPES[name], "_type": "Value"})
                for name, _ in columns}
    metadata = {"huggingface": json.dumps({"info": {"features": features}})}
    if latent_shape:
        metadata["ebd.latent_shape"] = json.dumps(list(latent_shape))
    return pa.schema(columns, metadata=metadata)


def latent_of(value, shape: list[int] | tuple[int, ...]) -> np.ndarray:
    """A row's latent as float32 (C, H, W): a fixed-size array cell, or the .npy bytes runs before LAYOUT 2 wrote."""
    if isinstance(value, (bytes, bytearray)):
        return npy_array(value).astype(np.float32)
    return np.asarray(value, dtype=np.float32).reshape(shape)


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


@dataclass(frozen=True)
class ShardRows:
    """One shard's images as every writer takes them: PNG bytes and what each row records."""
    keys: list[str]
    pngs: list[bytes]
    width: int
    height: int
    seeds: list[int]
    energies: np.ndarray
    model_id: str
    latents: np.ndarray | None = None
    conditions: list[str] | None = None


class ParquetShards:
    """OUT/parquet/images-NNNNNN.parquet: one row group, zstd; Hugging Face's Image struct for `image`."""
    name, file = "parquet", PARQUET_NAME

    def write(self, path: str, rows: ShardRows) -> dict:
        n = len(rows.keys)
        columns = {"key": rows.keys,
                   "image": [{"bytes": png, "path": f"{k}.png"} for k, png in zip(rows.keys, rows.pngs)],
                   "width": [rows.width] * n, "height": [rows.height] * n, "seed": rows.seeds,
                   "energy": rows.energies.astype(np.float32), "model": [rows.model_id] * n}
        schema = parquet_schema(None if rows.latents is None else list(rows.latents.shape[1:]),
                                rows.conditions is not None)
        if rows.latents is not None:
            flat = np.ascontiguousarray(rows.latents, dtype=np.float32).reshape(n, -1)
            columns["latent"] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
        if rows.conditions is not None:
            columns["condition"] = rows.conditions
        table = pa.table(columns, schema=schema)
        return atomic_write(path, lambda f: pq.write_table(table, f, compression="zstd", row_group_size=n or 1))

    def pngs(self, path: str) -> list[bytes]:
        with storage.open_input(path) as f:
            column = pq.read_table(f, columns=["image"]).column("image")
        return [png_of(v.as_py()) for v in column]


class WebDatasetShards:
    """OUT/webdataset/images-NNNNNN.tar: KEY.png, KEY.json[, KEY.latent.npy (float16)]."""
    name, file = "webdataset", TAR_NAME

    def write(self, path: str, rows: ShardRows) -> dict:
        asked = rows.conditions or [None] * len(rows.keys)
        samples = [{"__key__": k, "png": png,
                    "json": json.dumps({"key": k, "seed": s, "energy": float(e), "model": rows.model_id,
                                        "width": rows.width, "height": rows.height}
                                       | ({"condition": c} if c is not None else {}), sort_keys=True).encode()}
                   for k, png, s, e, c in zip(rows.keys, rows.pngs, rows.seeds, rows.energies, asked)]
        if rows.latents is not None:
            for sample, z in zip(samples, rows.latents):
                sample["latent.npy"] = npy_bytes(z.astype(np.float16))
        return write_tar(path, samples)

    def pngs(self, path: str) -> list[bytes]:
        return [x["png"] for x in read_tar_samples(path)]


# Output formats by name, in the order they are written and read back; a new format is one class here.
WRITERS = {w.name: w for w in (ParquetShards(), WebDatasetShards())}


def output_formats(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """A run's formats in WRITERS' order, from a list or an older config's one value (`both`: every format)."""
    names = [value] if isinstance(value, str) else list(value)
    if "both" in names:
        names = list(WRITERS)
    unknown = [n for n in names if n not in WRITERS]
    if unknown or not names:
        raise EbdError(f"unknown output format {unknown[0]!r} (known: {', '.join(WRITERS)})" if unknown
                       else "formats must name at least one output format")
    return tuple(n for n in WRITERS if n in names)


def format_label(formats: tuple[str, ...]) -> str:
    """The one word run.json and manifest.json have always recorded: a format's name, or `both`."""
    return "both" if set(formats) == {"parquet", "webdataset"} else "+".join(formats)


def write_image_shard(out: str, shard: int, formats: str | tuple[str, ...], keys: list[str], images: np.ndarray,
                      seeds: list[int], energies: np.ndarray, model_id: str, extra_stats: dict,
                      latents: np.ndarray | None = None, conditions: list[str] | None = None) -> dict:
    """Encodes PNGs, writes the shard's files (one per format) atomically, then its done marker. Returns the
    marker's content."""
    tick = time.perf_counter()
    height, width = images.shape[1:3]
    rows = ShardRows(keys, [png_bytes(img) for img in images], width, height, seeds, energies, model_id, latents,
                     conditions)
    files, file_bytes = {}, {}
    for name in output_formats(formats):
        writer = WRITERS[name]
        file = writer.file.format(shard)
        written = writer.write(storage.join(out, file), rows)
        files[file], file_bytes[file] = written["sha256"], written["bytes"]
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


def shard_pngs(out: str, shard: int, formats: tuple[str, ...]) -> list[bytes]:
    """The PNG bytes of one written shard's images, in order (from its first format's file)."""
    writer = WRITERS[output_formats(formats)[0]]
    return writer.pngs(storage.join(out, writer.file.format(shard)))


def completed_shard(out: str, shard: int, formats: tuple[str, ...]) -> dict | None:
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
    if set(stats.get("files", {})) != {WRITERS[name].file.format(shard) for name in output_formats(formats)}:
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


def recorded_chunks(out: str, shard: int) -> dict[str, list[int]] | None:
    """The chunk sizes a shard's done marker says it was sampled and decoded in ({"sampler": [...], "decode":
    [...]}), even when its files no longer match: remade in the same chunks, it comes out byte-identical. None
    without a readable marker; a list of the wrong shape is left out (the stage's batch size then applies)."""
    marker = stats_path(out, shard)
    try:
        stats = read_json(marker) if storage.is_file(marker) else None
    except ValueError:
        return None
    if not isinstance(stats, dict):
        return None
    chunks = {stage: sizes for stage in ("sampler", "decode")
              if isinstance(sizes := stats.get(f"{stage}_chunks"), list) and sizes
              and all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 1 << 20 for n in sizes)
              and sum(sizes) == stats.get("count")}
    return chunks or None


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
    manifest = generated_manifest(folder)
    rows = _generated_rows(folder, manifest, ["image", "latent"], lambda s: (s["png"], s["latent.npy"]))
    picked = pick_rows(rows, index)
    latents = [latent_of(value, manifest["latents"]["shape"]) for _, value in picked]
    return torch.from_numpy(np.stack(latents)), _decoded([png for png, _ in picked])


def _decoded(pngs: list) -> torch.Tensor:
    """uint8 (N, 3, H, W) images from stored PNG values."""
    images = [np.asarray(Image.open(io.BytesIO(png_of(png))).convert("RGB")) for png in pngs]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def iter_generated_images(folder: str, index: torch.Tensor, batch_size: int = 256) -> Iterator[torch.Tensor]:
    """The images (uint8 (n, 3, H, W)) of the rows `index` names, in batches of `batch_size`, in row order (not
    `index`'s): one pass over the run, memory one batch and one shard's image column, however many rows are named."""
    wanted, batch, position = set(index.tolist()), [], -1
    last = max(wanted, default=-1)
    rows = _generated_rows(folder, generated_manifest(folder), ["image"], lambda s: (s["png"],))
    for position, (png,) in zip(range(last + 1), rows):  # stops after the last wanted row: no shard read past it
        if position in wanted:
            batch.append(png)
        if len(batch) == batch_size or (batch and position == last):
            yield _decoded(batch)
            batch = []
    if position < last:
        raise EbdError("a shard holds fewer rows than its manifest counts: the folder changed after it was written")


def read_conditions(folder: str, index: torch.Tensor | None = None) -> list[str | None]:
    """What each of the rows `index` names asked for (None for an unconditional run's rows), in that order."""
    rows = _generated_rows(folder, generated_manifest(folder), ["condition"],
                           lambda s: (json.loads(s["json"]).get("condition"),))
    return [condition for (condition,) in pick_rows(rows, index)]
