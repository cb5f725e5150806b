"""Output formats of a generation run: one class each, registered by name in FORMATS (the order they are written and
read back in). A format writes one shard's rows to one file in its own folder and reads them back; the config's
`formats`, the writer task, resume, the manifest and evaluation all go through this registry, so a format added
elsewhere (a plugin module calling `register_format`, imported by the job's `plugins`) is a full citizen.

    parquet      OUT/parquet/images-NNNNNN.parquet     Hugging Face datasets' Image struct, fixed-size float32 latents
    webdataset   OUT/webdataset/images-NNNNNN.tar      KEY.png, KEY.json, KEY.latent.npy (float16)

A format's `read(path, columns, count)` gives the shard's rows as tuples of the named columns, of: `image` (PNG
bytes), `latent` (an array or .npy bytes, None when not saved) and `condition` (None for an unconditional run).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from difflib import get_close_matches

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..common.config import ConfigError, EbdError
from . import storage
from .files import atomic_write, npy_array, npy_bytes
from .tars import read_tar_samples, write_tar

COLUMNS_READ = ("image", "latent", "condition")  # what a format's `read` can give back
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



@dataclass(frozen=True)
class ShardRows:
    """One shard's images as every format takes them: PNG bytes and what each row records."""
    keys: list[str]
    pngs: list[bytes]
    width: int
    height: int
    seeds: list[int]
    energies: np.ndarray
    model_id: str
    latents: np.ndarray | None = None
    conditions: list[str] | None = None


class ShardFormat:
    """One output format. A subclass sets `name` (what `formats:` lists), `folder` (its data folder: nothing else is
    in it), `suffix` (its files' extension) and `latent_dtype`, and writes and reads one shard file."""
    name: str
    folder: str
    suffix: str
    latent_dtype: str

    @property
    def file(self) -> str:
        """Shard j's file, relative to the run folder: `.format(j)`."""
        return f"{self.folder}/images-{{:06d}}{self.suffix}"

    def write(self, path: str, rows: ShardRows) -> dict:
        """Writes the shard atomically; returns {"sha256", "bytes"} of the file."""
        raise NotImplementedError

    def read(self, path: str, columns: tuple[str, ...], count: int | None) -> list[tuple]:
        """The shard's rows, each a tuple of `columns` (of COLUMNS_READ); EbdError when it holds other than `count`
        (None: any number)."""
        raise NotImplementedError

    def manifest_fields(self, out: str, num_shards: int, written: bool) -> dict:
        """Keys this format adds to manifest.json (e.g. a brace pattern its readers take)."""
        return {}


def _check_count(path: str, rows: int, count: int | None) -> None:
    if count is not None and rows != count:
        raise EbdError(f"{path} holds {rows} rows, its manifest {count}: the run changed after it was written")


class ParquetShards(ShardFormat):
    """OUT/parquet/images-NNNNNN.parquet: one row group, zstd; Hugging Face's Image struct for `image`."""
    name, folder, suffix, latent_dtype = "parquet", "parquet", ".parquet", "float32"

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

    def read(self, path: str, columns: tuple[str, ...], count: int | None) -> list[tuple]:
        with storage.open_input(path) as f:
            data = pq.ParquetFile(f)
            _check_count(path, data.metadata.num_rows, count)  # before the columns are read
            present = [c for c in columns if c in data.schema_arrow.names]
            table = data.read(columns=present)
        cells = [[png_of(v) for v in table.column(c).to_pylist()] if c == "image" else
                 table.column(c).to_pylist() if c in present else [None] * table.num_rows for c in columns]
        return list(zip(*cells))


class WebDatasetShards(ShardFormat):
    """OUT/webdataset/images-NNNNNN.tar: KEY.png, KEY.json[, KEY.latent.npy (float16)]."""
    name, folder, suffix, latent_dtype = "webdataset", "webdataset", ".tar", "float16"

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

    def read(self, path: str, columns: tuple[str, ...], count: int | None) -> list[tuple]:
        samples = list(read_tar_samples(path))
        _check_count(path, len(samples), count)
        cell = {"image": lambda s: s["png"], "latent": lambda s: s.get("latent.npy"),
                "condition": lambda s: json.loads(s["json"]).get("condition") if "json" in s else None}
        return [tuple(cell[c](s) for c in columns) for s in samples]

    def manifest_fields(self, out: str, num_shards: int, written: bool) -> dict:
        # webdataset.WebDataset(manifest["webdataset_urls"]) reads every tar, in order
        pattern = self.file.replace("{:06d}", "{%06d..%06d}") % (0, num_shards - 1)
        return {"webdataset_urls": storage.join(out, pattern) if written else None}


FORMATS: dict[str, ShardFormat] = {}


def register_format(fmt: ShardFormat) -> ShardFormat:
    """Adds an output format (after those already known); its name, folder and suffix must be new."""
    clash = [f.name for f in FORMATS.values() if fmt.folder == f.folder or fmt.suffix == f.suffix]
    if fmt.name in FORMATS or clash or fmt.name == "both":  # both: what run.json records for the first two
        raise ValueError(f"output format {fmt.name!r} clashes with {(clash or [fmt.name])[0]!r}")
    FORMATS[fmt.name] = fmt
    return fmt


register_format(ParquetShards())
register_format(WebDatasetShards())


def format_names(value: list) -> list:
    """A config's `formats`, checked against the registry (pure): each known and listed once, at least one."""
    if not isinstance(value, list) or not value:
        raise ConfigError("formats must list at least one output format")
    for name in value:
        if name not in FORMATS:
            close = get_close_matches(str(name), list(FORMATS), n=1)
            raise ConfigError(f"unknown output format {str(name)[:80]!r}" + (f": did you mean {close[0]!r}?" if close
                                                                         else "") + f" (known: {', '.join(FORMATS)})")
    if len(set(value)) != len(value):
        raise ConfigError(f"formats must name each output format once: got {value}")
    return list(value)


def output_formats(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """A run's formats in FORMATS' order (an older config's one-word `format` is a list once it loads:
    common/migrations.py)."""
    return tuple(n for n in FORMATS if n in format_names(list(names)))


def format_label(formats: tuple[str, ...]) -> str:
    """The one word run.json and manifest.json have always recorded: a format's name, or `both`."""
    return "both" if set(formats) == {"parquet", "webdataset"} else "+".join(formats)


def format_of_file(name: str) -> ShardFormat | None:
    """The format of a shard file a manifest or marker names, by its extension (runs before the data folders kept
    their shards beside run.json)."""
    return next((f for f in FORMATS.values() if name.endswith(f.suffix)), None)
