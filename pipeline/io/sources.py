"""Image sources: a folder tree, webdataset/img2dataset tars, or parquet files with an image-bytes column.

Planning (`plan_items`) runs once in the driver and lists every input sample as an `Item` in a fixed order
(sorted files, tar members in tar order, parquet rows in order), so the split into output shards is
deterministic. Reading (`read_items`) runs in the workers and fetches only the bytes a shard needs: a file, a
byte range of a tar (offsets found while planning), or one row group's image column of a parquet file.

Everything taken from inputs (file names, tar keys, parquet keys and labels) is untrusted: output keys are
sanitised to `[A-Za-z0-9_-]` (no dots, no path separators), made unique while planning, and labels are only
ever stored as JSON strings, never used as paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import tarfile
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from webdataset.tariterators import base_plus_ext

from ..common.config import ConfigError
from . import storage

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
LABEL_MAX_CHARS = 200
KEY_MAX_CHARS = 80
OPEN_TARS = 16  # tars a reader keeps open at once
AUTO_IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "img", "image_bytes", "bytes")


@dataclass(frozen=True)
class Item:
    """One input sample as planned: where its bytes are and what it will be called."""
    source: str                  # human-readable origin: "cats/1.jpg", "shard.tar::000123", "a.parquet#17"
    key: str                     # output key, safe and unique within the run
    label: str | None            # known at planning for folders and parquet, read from .cls/.json for tars
    # ("file", path) | ("tar", path, ((ext, offset, size), ...)) | ("parquet", path, row_group, row, column)
    locator: tuple
    reject: str | None = None    # a reason known at planning time (e.g. an unsupported file type)
    fields: tuple[tuple[str, str], ...] = ()  # named labels known at planning (folder levels, parquet columns)


@dataclass
class Loaded:
    item: Item
    data: bytes | None
    label: str | None
    reject: tuple[str, str] | None = None  # (reason, detail)
    fields: dict[str, str] = field(default_factory=dict)  # every named label: {"shape": "ring", "background": ...}


# ----------------------------------------------------------------------------------------------- planning

def detect_format(path: str) -> str:
    """A folder holding images is a folder tree; otherwise its .tar files or .parquet files decide."""
    if storage.is_dir(path):
        suffixes = set()
        for p in storage.list_files(path):
            suffix = PurePosixPath(p).suffix.lower().lstrip(".")
            if suffix in IMAGE_EXTENSIONS:
                return "folder"
            suffixes.add(suffix)
        return "webdataset" if "tar" in suffixes else "parquet" if "parquet" in suffixes else "folder"
    if path.lower().endswith(".tar"):
        return "webdataset"
    if path.lower().endswith(".parquet"):
        return "parquet"
    raise ConfigError(f"cannot tell the input format of {path}: pass --input-format folder|webdataset|parquet")


def plan_items(path: str | Path, fmt: str = "auto", image_column: str | None = None,
               key_column: str | None = None, label_column: str | None = None,
               label_fields: list[str] | tuple[str, ...] = ()) -> tuple[str, list[Item]]:
    """Lists every sample under `path` (a local path or an object-store URI) in a deterministic order.
    Returns (format, items).

    `label_fields` names the labels each sample carries, for data labelled along several factors (shape and
    background, say): a folder tree's first levels (`ring/checker/1.png`), a webdataset sidecar's `KEY.json`
    keys, or parquet columns. Every field found is kept; the single `label` (.cls, the first folder, the label
    column) stays for tools that read one."""
    label_fields = tuple(label_fields or ())
    root = storage.canonical(path)
    if not storage.exists(root):
        raise ConfigError(f"input not found: {root}")
    fmt = detect_format(root) if fmt == "auto" else fmt
    keys = _KeyMaker()
    if fmt == "folder":
        if not storage.is_dir(root):
            raise ConfigError(f"input format 'folder' needs a directory, got {root}")
        return fmt, list(_plan_folder(root, keys, label_fields))
    files = _data_files(root, ".tar" if fmt == "webdataset" else ".parquet")
    if fmt == "webdataset":
        return fmt, [it for f in files for it in _plan_tar(f, root, keys, label_fields)]
    if fmt == "parquet":
        return fmt, [it for f in files for it in _plan_parquet(f, root, keys, image_column, key_column,
                                                               label_column, label_fields)]
    raise ConfigError(f"unknown input format {fmt!r}")


def _data_files(root: str, suffix: str) -> list[str]:
    files = [root] if storage.is_file(root) else storage.list_files(root, suffix)  # sorted, hidden names skipped
    for f in files:
        if f.endswith((".tar.gz", ".tgz")) or (suffix == ".tar" and not _is_tar(f)):
            raise ConfigError(f"{f} is not an uncompressed tar file (compressed tars are not supported)")
    if not files:
        raise ConfigError(f"no {suffix} files under {root}")
    return files


def _is_tar(path: str) -> bool:
    with _open(path) as f:
        return tarfile.is_tarfile(f)


def _open(path: str):
    """A seekable binary file for a local path or an object-store URI."""
    return storage.open_input(path) if storage.is_remote(path) else open(path, "rb")


def _relative(path: str, root: str) -> str:
    return storage.name(path) if path == root else posixpath.relpath(path, root)


def _plan_folder(root: str, keys: "_KeyMaker", label_fields: tuple[str, ...]) -> Iterator[Item]:
    if storage.is_remote(root):  # an object store has no directories to walk: its listing is already sorted
        for path in storage.list_files(root):
            yield _folder_item(posixpath.relpath(path, root), path, keys, label_fields)
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            yield _folder_item(path.relative_to(root).as_posix(), str(path), keys, label_fields)


def _folder_item(rel: str, path: str, keys: "_KeyMaker", label_fields: tuple[str, ...]) -> Item:
    """One file of a folder tree; its first folder under the root is its label, its first folders in order are
    the values of `label_fields`."""
    parts = PurePosixPath(rel)
    folders = parts.parts[:-1]
    label = folders[0] if folders else None
    ext = parts.suffix.lower().lstrip(".")
    reject = None if ext in IMAGE_EXTENSIONS else "unsupported_extension"
    fields = tuple((name, value) for name, value in zip(label_fields, map(_clean_label, folders)) if value)
    return Item(source=rel, key=keys.make(parts.with_suffix("").as_posix(), rel), label=label,
                locator=("file", path), reject=reject, fields=fields)


def _plan_tar(path: str, root: str, keys: "_KeyMaker", label_fields: tuple[str, ...]) -> Iterator[Item]:
    """Groups tar members into webdataset samples (`KEY.EXT`, split on the first dot of the basename)."""
    rel = _relative(path, root)
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    with _open(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base, ext = base_plus_ext(member.name)
            if base is None:
                continue
            samples.setdefault(base, {})[ext.lower()] = (member.offset_data, member.size)
    for base, members in samples.items():
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
        wanted = [e for e in (image_ext, "cls", "json") if e in members]
        source = f"{rel}::{base}"
        yield Item(source=source, key=keys.make(base, source), label=None,
                   locator=("tar", str(path), tuple((e, *members[e]) for e in wanted)),
                   reject=None if image_ext else "no_image_member")  # its named labels: in KEY.json, read with it


def _plan_parquet(path: str, root: str, keys: "_KeyMaker", image_column: str | None,
                  key_column: str | None, label_column: str | None,
                  label_fields: tuple[str, ...]) -> Iterator[Item]:
    try:
        f = _open(path)
    except OSError as e:
        raise ConfigError(f"cannot read parquet file {path}: {e}") from None
    with f:  # closed once its rows are planned
        yield from _plan_parquet_file(f, path, root, keys, image_column, key_column, label_column, label_fields)


def _plan_parquet_file(f, path: str, root: str, keys: "_KeyMaker", image_column: str | None,
                       key_column: str | None, label_column: str | None,
                       label_fields: tuple[str, ...]) -> Iterator[Item]:
    rel = _relative(path, root)
    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowInvalid, OSError) as e:
        raise ConfigError(f"cannot read parquet file {path}: {e}") from None
    schema = pf.schema_arrow
    column = image_column or _auto_image_column(schema, path)
    for name, what in ((column, "image_column"), (key_column, "key_column")):
        if name is not None and name not in schema.names:
            raise ConfigError(f"{what} {name!r} not in {path} (columns: {', '.join(schema.names)})")
    if not _is_image_column(schema.field(column).type):
        raise ConfigError(f"column {column!r} of {path} holds {schema.field(column).type}, "
                          "not image bytes (binary or struct<bytes, path>)")
    if label_column is not None and label_column not in schema.names:
        raise ConfigError(f"label_column {label_column!r} not in {path} (columns: {', '.join(schema.names)})")
    missing = [name for name in label_fields if name not in schema.names]
    if missing:
        raise ConfigError(f"label field {missing[0]!r} is not a column of {path} (columns: {', '.join(schema.names)})")
    label_column = label_column or ("label" if "label" in schema.names else None)
    side = list(dict.fromkeys(c for c in (key_column, label_column, *label_fields) if c))
    stem = _sanitize(PurePosixPath(rel).with_suffix("").as_posix())
    row_index = 0
    for rg in range(pf.num_row_groups):
        table = pf.read_row_group(rg, columns=side) if side else None
        for row in range(pf.metadata.row_group(rg).num_rows):
            source = f"{rel}#{row_index}"
            hint = str(table.column(key_column)[row].as_py()) if key_column else f"{stem}_{row_index:09d}"
            label = table.column(label_column)[row].as_py() if label_column else None
            values = ((name, _clean_label(table.column(name)[row].as_py())) for name in label_fields)
            yield Item(source=source, key=keys.make(hint, source), label=_clean_label(label),
                       locator=("parquet", path, rg, row, column), fields=tuple((n, v) for n, v in values if v))
            row_index += 1


def _auto_image_column(schema: pa.Schema, path: str) -> str:
    for name in AUTO_IMAGE_COLUMNS:
        if name in schema.names and _is_image_column(schema.field(name).type):
            return name
    for column in schema:
        if _is_image_column(column.type):
            return column.name
    raise ConfigError(f"no image-bytes column in {path}: set image_column (columns: {', '.join(schema.names)})")


def _is_image_column(t: pa.DataType) -> bool:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    return pa.types.is_struct(t) and "bytes" in [t.field(i).name for i in range(t.num_fields)]


class _KeyMaker:
    """Safe, unique, deterministic keys: the sanitised name, plus a short hash of the source on a clash."""

    def __init__(self):
        self.used: set[str] = set()

    def make(self, hint: str, source: str) -> str:
        key = _sanitize(hint)
        if key in self.used:
            key = f"{key[:KEY_MAX_CHARS - 9]}-{hashlib.sha256(source.encode()).hexdigest()[:8]}"
        while key in self.used:  # astronomically rare: a hash clash on top of a name clash
            key = f"{key}-{hashlib.sha256(key.encode()).hexdigest()[:4]}"
        self.used.add(key)
        return key


def _sanitize(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:KEY_MAX_CHARS] or "item"


def _clean_label(label) -> str | None:
    if label is None:
        return None
    text = str(label).strip()
    return text[:LABEL_MAX_CHARS] if text else None


# ------------------------------------------------------------------------------------------------ reading

def read_items(items: list[Item], max_file_bytes: int, label_fields: tuple[str, ...] = ()) -> Iterator[Loaded]:
    """Yields the raw bytes (or a rejection) of each item, in order, reading each parquet row group once and
    keeping the last few tars open (a shuffled shard draws from many; on S3 each open costs a request).
    `label_fields`: the named labels to take from a tar sample's KEY.json (others were found while planning)."""
    row_groups: dict[tuple[str, int, str], pa.Array] = {}
    tars: OrderedDict[str, object] = OrderedDict()
    try:
        for item in items:
            yield _read_item(item, max_file_bytes, label_fields, row_groups, tars)
    finally:
        for f in tars.values():
            f.close()


def _read_item(item: Item, max_file_bytes: int, label_fields: tuple[str, ...], row_groups: dict,
               tars: OrderedDict) -> Loaded:
    if item.reject:
        return Loaded(item, None, item.label, (item.reject, f"{item.source}: {item.reject.replace('_', ' ')}"),
                      dict(item.fields))
    try:
        kind = item.locator[0]
        if kind == "file":
            return _read_file(item, max_file_bytes)
        if kind == "tar":
            path = item.locator[1]
            if path not in tars:
                if len(tars) >= OPEN_TARS:
                    tars.popitem(last=False)[1].close()
                tars[path] = _open(path)
            tars.move_to_end(path)
            return _read_tar_sample(item, max_file_bytes, tars[path], label_fields)
        _, path, rg, row, column = item.locator
        if (path, rg, column) not in row_groups:
            row_groups.clear()  # keep one row group in memory at a time
            with _open(path) as f:
                table = pq.ParquetFile(f).read_row_group(rg, columns=[column])
            row_groups[(path, rg, column)] = table.column(column).combine_chunks()
        return _parquet_value(item, row_groups[(path, rg, column)][row].as_py(), max_file_bytes)
    except OSError as e:
        return Loaded(item, None, item.label, ("read_error", f"{type(e).__name__}: {e}"), dict(item.fields))


def _too_big(item: Item, size: int, limit: int) -> Loaded | None:
    if size > limit:
        return Loaded(item, None, item.label, ("file_too_large", f"{size} bytes > max_file_bytes={limit}"),
                      dict(item.fields))
    return None


def _read_file(item: Item, limit: int) -> Loaded:
    path = item.locator[1]
    if storage.is_remote(path):
        data = _too_big(item, storage.size(path), limit) or storage.read_bytes(path)
    else:
        data = _too_big(item, os.path.getsize(path), limit) or Path(path).read_bytes()
    return data if isinstance(data, Loaded) else Loaded(item, data, item.label, fields=dict(item.fields))


def _read_tar_sample(item: Item, limit: int, f, label_fields: tuple[str, ...]) -> Loaded:
    _, path, members = item.locator
    parts: dict[str, bytes] = {}
    for ext, offset, size in members:
        if (big := _too_big(item, size, limit)) is not None:
            return big
        f.seek(offset)
        parts[ext] = f.read(size)
    label, fields, meta = None, {}, None
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except ValueError:
            pass  # a broken sidecar costs the labels, not the image
    if isinstance(meta, dict):
        fields = {name: v for name in label_fields if (v := _clean_label(meta.get(name))) is not None}
        label = meta.get("label")
    if "cls" in parts:
        label = parts["cls"].decode("utf-8", "replace")
    image_ext = members[0][0]
    return Loaded(item, parts[image_ext], _clean_label(label), fields=fields)


def _parquet_value(item: Item, value, limit: int) -> Loaded:
    if isinstance(value, dict):
        value = value.get("bytes")
    if value is None:
        return Loaded(item, None, item.label, ("missing_bytes", "image cell holds no bytes"), dict(item.fields))
    return _too_big(item, len(value), limit) or Loaded(item, bytes(value), item.label, fields=dict(item.fields))


def count_by_field(fields: list[dict[str, str]]) -> dict[str, dict[str, int]]:
    """{field: {value: count}} over samples' named labels."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for sample in fields:
        for name, value in sample.items():
            counts[name][value] += 1
    return {name: dict(sorted(c.items())) for name, c in sorted(counts.items())}


def count_by_label(labels) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for label in labels:
        if label is not None:
            counts[label] += 1
    return dict(sorted(counts.items()))
