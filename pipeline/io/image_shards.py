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
format is one class registered in `output_formats.FORMATS` (write a shard's rows to one file, read them back); a
run's `formats` lists which of them it writes.
"""

from __future__ import annotations

import io
import os
import re
import time
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from ..common import migrations
from ..common.config import EbdError
from . import storage
from .files import atomic_write_json, read_json
from .latent_shards import STATS_DIR, pick_rows
from .output_formats import FORMATS, ShardRows, format_of_file, latent_of, output_formats

IMG2DATASET_STATS = f"{STATS_DIR}/img2dataset/images-{{:06d}}_stats.json"
LAYOUT = 2  # 1: shards beside run.json (before the sibling folders); run.json records it
STAGES = ("sampler", "decode", "write")
def png_bytes(pixels: np.ndarray) -> bytes:
    """H x W x 3 uint8 -> PNG; fixed settings, so the same pixels always give the same bytes."""
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def stats_path(out: str, shard: int) -> str:
    return storage.join(out, STATS_DIR, f"images-{shard:06d}.json")


def write_image_shard(out: str, shard: int, formats: tuple[str, ...], keys: list[str], images: np.ndarray,
                      seeds: list[int], energies: np.ndarray, model_id: str, *, extra_stats: dict,
                      latents: np.ndarray | None = None, conditions: list[str] | None = None) -> dict:
    """Encodes PNGs, writes the shard's files (one per format) atomically, then its done marker. Returns the
    marker's content."""
    tick = time.perf_counter()
    height, width = images.shape[1:3]
    rows = ShardRows(keys, [png_bytes(img) for img in images], width, height, seeds, energies, model_id, latents,
                     conditions)
    files, file_bytes = {}, {}
    for name in output_formats(formats):
        writer = FORMATS[name]
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
    """A done marker's per-batch seconds of one stage (a marker as `read_marker` gives it)."""
    return stats.get(f"{stage}_batch_seconds", [])


def read_marker(path: str) -> dict | None:
    """A shard's done marker in today's keys (common/migrations.py), or None when it is not readable JSON."""
    try:
        return migrations.done_marker(read_json(path))
    except ValueError:
        return None


def shard_pngs(out: str, shard: int, formats: tuple[str, ...]) -> list[bytes]:
    """The PNG bytes of one written shard's images, in order (from its first format's file)."""
    fmt = FORMATS[output_formats(formats)[0]]
    return [png for (png,) in fmt.read(storage.join(out, fmt.file.format(shard)), ("image",), None)]


def completed_shard(out: str, shard: int, formats: tuple[str, ...]) -> dict | None:
    """The done marker of a shard whose files all match the sizes and sha256 the marker records, else None (the
    shard must be (re)generated): files without a marker (a run killed between the two) and files cut short or
    changed after their marker are written again, never trusted."""
    marker = stats_path(out, shard)
    stats = read_marker(marker) if storage.is_file(marker) else None
    if not isinstance(stats, dict):
        return None
    if set(stats.get("files", {})) != {FORMATS[name].file.format(shard) for name in output_formats(formats)}:
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
    stats = read_marker(marker) if storage.is_file(marker) else None
    if not isinstance(stats, dict):
        return None
    chunks = {stage: sizes for stage in ("sampler", "decode")
              if isinstance(sizes := stats.get(f"{stage}_chunks"), list) and sizes
              and all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 1 << 20 for n in sizes)
              and sum(sizes) == stats.get("count")}
    return chunks or None


# ------------------------------------------------------------------------------------------------ reading

# A generation run's folder is read as untrusted input (it may come from anywhere): its manifest is size-capped and
# checked field by field, its shard files must be plain names inside the folder with the size of rows and the sha256
# the manifest records, and its PNG cells are decoded only as PNG and only up to MAX_IMAGE_PIXELS.
MAX_MANIFEST_BYTES = 64 << 20
MAX_LATENT_ELEMENTS = 1 << 20  # C x h x w of one latent (Stable Diffusion at 1024 px: 4 x 128 x 128 = 65,536)
MAX_SHARD_ROWS = 1 << 24
MAX_IMAGE_PIXELS = 4096 * 4096
_FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def generated_manifest(folder: str) -> dict:
    """The manifest of a finished generation run (a folder or a bucket's URI) that saved its latents, checked before
    use (one line if it is not one, or does not hold together)."""
    path = storage.join(folder, "manifest.json")
    if not storage.is_file(path):
        raise EbdError(f"{folder} has no manifest.json: not a finished generation run (re-run jobs.generate)")
    if storage.size(path) > MAX_MANIFEST_BYTES:
        raise EbdError(f"{path} is {storage.size(path):,} bytes, more than a generation manifest may have")
    try:
        manifest = read_json(path)
    except (ValueError, RecursionError):
        raise EbdError(f"{path} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "ebd.images/1":
        raise EbdError(f"{path} is not a generation manifest (format "
                       f"{manifest.get('format') if isinstance(manifest, dict) else type(manifest).__name__!r})")
    if not all(isinstance(manifest.get(k), dict) and isinstance(manifest[k].get("path"), str)
               for k in ("model", "vae")):
        raise EbdError(f"{path}: model and vae must each be a record with its path")
    latents = manifest.get("latents")
    if not isinstance(latents, dict) or not latents.get("saved"):
        raise EbdError(f"{folder} was generated without its latents: re-run jobs.generate with save_latents: true")
    shape = latents.get("shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(type(d) is int and d >= 1 for d in shape)
            and shape[0] * shape[1] * shape[2] <= MAX_LATENT_ELEMENTS):
        raise EbdError(f"{path}: latents.shape must be [C, h, w] of at most {MAX_LATENT_ELEMENTS:,} values, got "
                       f"{str(shape)[:80]}")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(
            isinstance(sh, dict) and type(sh.get("count")) is int and 0 <= sh["count"] <= MAX_SHARD_ROWS
            and isinstance(sh.get("files"), dict) and sh["files"] for sh in shards):
        raise EbdError(f"{path}: shards must be a list of {{count, files}} records")
    held = sum(sh["count"] for sh in shards)
    if type(manifest.get("images", held)) is not int or manifest.get("images", held) != held:
        raise EbdError(f"{path} counts {str(manifest.get('images'))[:40]} images but its shards hold {held}")
    for shard in shards:
        for name, sha in shard["files"].items():
            _check_shard_file(folder, name, sha)
    return manifest


def _check_shard_file(folder: str, name, sha) -> None:
    """A shard file the manifest names: a relative path of plain names, inside the folder, present, with a sha256."""
    parts = name.split("/") if isinstance(name, str) else []
    if not (1 <= len(parts) <= 3 and all(_FILE_NAME.fullmatch(p) for p in parts) and isinstance(sha, str)
            and re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise EbdError(f"{folder}/manifest.json names a shard file {str(name)[:100]!r}: not a plain file name inside "
                       "the run (with its sha256)")
    path = storage.join(folder, name)
    if not storage.is_file(path):
        raise EbdError(f"{path} is missing: the run folder is incomplete (re-run jobs.generate to finish it)")
    if not storage.is_remote(folder):
        real, root = os.path.realpath(path), os.path.realpath(folder)
        if os.path.commonpath([real, root]) != root:
            raise EbdError(f"{path} leads outside its run folder: not read")


def _generated_rows(folder: str, manifest: dict, columns: tuple[str, ...]) -> Iterator[tuple]:
    """Every row of a finished generation run, in order, as tuples of `columns` (output_formats.COLUMNS_READ), read
    from each shard's file in the first format the registry knows. Each file is checked against the sha256 the
    manifest records, and its rows against the shard's count, before a row is yielded."""
    for shard in manifest["shards"]:
        found = [(fmt, name) for fmt in FORMATS.values() for name in shard["files"] if format_of_file(name) is fmt]
        if not found:
            raise EbdError(f"{folder}: shard {shard.get('shard')} has no file in a known output format "
                           f"({', '.join(FORMATS)})")
        fmt, name = found[0]
        path = storage.join(folder, name)
        if storage.file_sha256(path) != shard["files"][name]:
            raise EbdError(f"{path} is not the file its manifest records (sha256 differs): the run changed after it "
                           "was written")
        try:
            rows = fmt.read(path, columns, shard["count"])
        except EbdError:
            raise
        except (OSError, ValueError, KeyError, pa.ArrowException) as e:
            raise EbdError(f"{path} does not read: {type(e).__name__}: {str(e)[:200]}") from None
        yield from rows


def read_generated(folder: str, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents (N, C, h, w) float32, images (N, 3, H, W) uint8) of the rows `index` names (all if None), in that
    order, of a finished generation run (a folder or a bucket's URI)."""
    manifest = generated_manifest(folder)
    rows = _generated_rows(folder, manifest, ("image", "latent"))
    picked = pick_rows(rows, index)
    try:
        latents = [latent_of(value, manifest["latents"]["shape"]) for _, value in picked]
    except (ValueError, TypeError) as e:
        raise EbdError(f"{folder}: a latent is not of the manifest's shape {manifest['latents']['shape']} "
                       f"({str(e)[:120]})") from None
    return torch.from_numpy(np.stack(latents)), _decoded([png for png, _ in picked])


def _decoded(pngs: list) -> torch.Tensor:
    """uint8 (N, 3, H, W) images from PNG bytes (as every output format reads them back): PNG only, at most
    MAX_IMAGE_PIXELS each, all one size."""
    images = []
    for png in pngs:
        try:
            img = Image.open(io.BytesIO(png), formats=["PNG"])  # each format's read gives PNG bytes
            if img.size[0] * img.size[1] > MAX_IMAGE_PIXELS:
                raise EbdError(f"a generated image of {img.size[0]}x{img.size[1]} pixels: more than a run writes")
            images.append(np.asarray(img.convert("RGB")))
        except EbdError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever Pillow raises on a cell that is not a sound PNG
            raise EbdError(f"a generated image is not a PNG ebd can read ({type(e).__name__}: {str(e)[:120]})") \
                from None
    if len({im.shape for im in images}) > 1:
        raise EbdError(f"the generated images are not all one size ({sorted({im.shape for im in images})[:2]})")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def iter_generated_images(folder: str, index: torch.Tensor, batch_size: int = 256) -> Iterator[torch.Tensor]:
    """The images (uint8 (n, 3, H, W)) of the rows `index` names, in batches of `batch_size`, in row order (not
    `index`'s): one pass over the run, memory one batch and one shard's image column, however many rows are named."""
    wanted, batch, position = set(index.tolist()), [], -1
    last = max(wanted, default=-1)
    rows = _generated_rows(folder, generated_manifest(folder), ("image",))
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
    rows = _generated_rows(folder, generated_manifest(folder), ("condition",))
    return [condition for (condition,) in pick_rows(rows, index)]
