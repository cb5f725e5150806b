"""Reading planned inputs (`sources.plan_items`' Items) in the workers: each item's bytes, or its reject, under the
per-item budgets (`max_file_bytes` for a file, a tar member and a parquet cell, checked from metadata and again while
reading; sidecars of bounded size and depth). Tars are read by the byte ranges planning found, the last few kept
open; parquet rows in file order, each file's footer parsed once and each row group read once, in batches sized by
bytes (io/parquet_inputs.py).
"""

from __future__ import annotations

import json
import os
import stat
from collections import OrderedDict
from typing import Iterator

from . import storage
from .items import LABEL_MAX_CHARS, Item, Loaded, clean_label, open_input_file
from .parquet_inputs import CellRefused, ParquetCells, ParquetFiles

SIDECAR_MAX_BYTES = 64 * 1024    # a KEY.json sidecar: larger, or nested deeper, is a reject
SIDECAR_MAX_DEPTH = 32
OPEN_TARS = 16  # tars a reader keeps open at once


def reading_order(item: Item) -> tuple:
    """A sort key that puts parquet rows in file, row-group and row order and leaves every other item where it is
    (Python's sort is stable)."""
    return (item.locator[1], item.locator[2], item.locator[3]) if item.locator[0] == "parquet" else ("",)


def read_items(items: list[Item], max_file_bytes: int, label_fields: tuple[str, ...] = ()) -> Iterator[Loaded]:
    """Yields the raw bytes (or a rejection) of each item, in order, reading each parquet row group once and
    keeping the last few tars open (a shuffled shard draws from many; on S3 each open costs a request).
    `label_fields`: the named labels to take from a tar sample's KEY.json (others were found while planning)."""
    row_groups: dict[tuple[str, int, str], ParquetCells] = {}
    tars: OrderedDict[str, object] = OrderedDict()
    parquet = ParquetFiles()
    try:
        for item in items:
            yield _read_item(item, max_file_bytes, label_fields, row_groups, tars, parquet)
    finally:
        for f in tars.values():
            f.close()
        parquet.close()


def _read_item(item: Item, max_file_bytes: int, label_fields: tuple[str, ...], row_groups: dict,
               tars: OrderedDict, parquet: ParquetFiles) -> Loaded:
    if item.reject:
        return _reject(item, item.reject, item.detail or f"{item.source}: {item.reject.replace('_', ' ')}")
    try:
        kind = item.locator[0]
        if kind == "file":
            return _read_file(item, max_file_bytes)
        if kind == "tar":
            path = item.locator[1]
            if path not in tars:
                if len(tars) >= OPEN_TARS:
                    tars.popitem(last=False)[1].close()
                tars[path] = open_input_file(path)
            tars.move_to_end(path)
            return _read_tar_sample(item, max_file_bytes, tars[path], label_fields)
        _, path, rg, row, column = item.locator
        cells = row_groups.get((path, rg, column))
        if cells is None or (row < cells.next_row and row not in cells.cached):  # rows come in order: one pass
            row_groups.clear()
            cells = row_groups[(path, rg, column)] = ParquetCells(parquet.get(path), rg, column, max_file_bytes)
        return _parquet_value(item, cells.value(row), max_file_bytes)
    except Exception as e:  # noqa: BLE001 - whatever reading one item raises is that item's rejection
        return _reject(item, "read_error", f"{type(e).__name__}: {str(e)[:200]}", type(e).__name__)


def _reject(item: Item, reason: str, detail: str, exception: str | None = None) -> Loaded:
    return Loaded(item, None, item.label, (reason, detail, exception), dict(item.fields))


def _too_big(item: Item, size: int, limit: int) -> Loaded | None:
    if size > limit:
        return _reject(item, "file_too_large", f"{size} bytes > max_file_bytes={limit}")
    return None


def _read_file(item: Item, limit: int) -> Loaded:
    path = item.locator[1]
    if storage.is_remote(path):
        data = _too_big(item, storage.size(path), limit) or storage.read_bytes(path)
        return data if isinstance(data, Loaded) else Loaded(item, data, item.label, fields=dict(item.fields))
    # Opened without following a link and without blocking, then checked on the open descriptor: a file swapped
    # for a link, a FIFO or a device after planning is refused, never read (or waited on) forever.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            return _reject(item, "not_a_regular_file", f"{item.source}: not a regular file when read")
        if (big := _too_big(item, info.st_size, limit)) is not None:
            return big
        data = f.read(limit + 1)
    if len(data) > limit:  # it grew while being read
        return _reject(item, "file_too_large", f"more than max_file_bytes={limit} bytes")
    return Loaded(item, data, item.label, fields=dict(item.fields))


def _read_tar_sample(item: Item, limit: int, f, label_fields: tuple[str, ...]) -> Loaded:
    _, path, members = item.locator
    parts: dict[str, bytes] = {}
    for ext, offset, size in members:
        if (big := _too_big(item, size, limit)) is not None:
            return big
        f.seek(offset)
        parts[ext] = f.read(size)
        if len(parts[ext]) != size:
            return _reject(item, "truncated_container", f"{item.source}: {ext} member cut short")
    label, fields = None, {}
    if "json" in parts:
        meta, problem = _sidecar(parts["json"])
        if problem is not None:
            return _reject(item, "bad_sidecar", f"{item.source}.json: {problem}")
        if isinstance(meta, dict):
            fields = {name: v for name in label_fields if (v := clean_label(meta.get(name))) is not None}
            label = meta.get("label")
    if "cls" in parts:
        label = parts["cls"][:LABEL_MAX_CHARS * 4].decode("utf-8", "replace")
    image_ext = members[0][0]
    return Loaded(item, parts[image_ext], clean_label(label), fields=fields)


def _sidecar(data: bytes) -> tuple[object, str | None]:
    """A KEY.json sidecar parsed within its limits: (value, None), or (None, why not)."""
    if len(data) > SIDECAR_MAX_BYTES:
        return None, f"{len(data)} bytes > {SIDECAR_MAX_BYTES}"
    depth = deepest = 0
    quoted = escaped = False
    for byte in data:  # nesting counted before parsing: a deep document never reaches the recursive parser
        if quoted:
            escaped, quoted = (False, True) if escaped else (byte == 0x5C, byte != 0x22)
        elif byte == 0x22:
            quoted = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    if deepest > SIDECAR_MAX_DEPTH:
        return None, f"nested {deepest} deep > {SIDECAR_MAX_DEPTH}"
    try:
        return json.loads(data), None
    except ValueError as e:
        return None, f"not JSON ({e})"


def _parquet_value(item: Item, value, limit: int) -> Loaded:
    if isinstance(value, CellRefused):
        return _reject(item, value.reason, value.detail)
    if value is None:
        return _reject(item, "missing_bytes", "image cell holds no bytes")
    if not isinstance(value, (bytes, bytearray, memoryview)):
        return _reject(item, "wrong_type", f"image cell holds {type(value).__name__}, not bytes")
    return _too_big(item, len(value), limit) or Loaded(item, bytes(value), item.label, fields=dict(item.fields))


