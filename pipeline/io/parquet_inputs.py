"""Parquet inputs: a file's rows planned (the driver) and its image cells read (the workers), each measured from the
footer before a cell is read.

A parquet file is untrusted, and a few kilobytes of it can decompress to gigabytes. What bounds the work is read from
its footer and checked first:
- the footer: at most MAX_FOOTER_BYTES and MAX_ROW_GROUPS row groups, and no more rows than the file could hold
  (ROWS_PER_BYTE); otherwise the file is one reject;
- the image column's type, from the schema: binary, or a struct whose `bytes` field is binary;
- each row group's image column: its uncompressed size over its rows is its mean cell. A group whose mean is over
  `max_file_bytes`, or whose image bytes decompress more than MAX_IMAGE_EXPANSION times (encoded images do not
  compress; zeros do), is refused row by row without reading a cell: `file_too_large` for a one-row group (its size
  is then known exactly), `row_group_too_large` otherwise;
- each row group's side columns (keys, labels, groups): over SIDE_BYTES_PER_ROW a row on average, and past a floor,
  its rows are `labels_too_large` rejects (a label is cut to 200 characters anyway);
- reads are sized by bytes: as many rows at once as READ_BATCH_BYTES of mean cells (1 to PARQUET_BATCH_ROWS).
A worker opens each file and parses its footer once (`ParquetFiles`), not once per row group.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .items import (
    LABEL_MAX_CHARS,
    Item,
    KeyMaker,
    clean_label,
    container_reject,
    open_input_file,
    relative_source,
    sanitize_key,
)

ROWS_PER_BYTE = 8  # a parquet footer may claim at most this many rows per byte of its file (one bit per row)
PARQUET_BATCH_ROWS = 64  # the most rows decoded at once
READ_BATCH_BYTES = 64 << 20  # ... and the uncompressed image bytes a batch of mean cells may hold
MAX_FOOTER_BYTES = 64 << 20
MAX_ROW_GROUPS = 100_000
MAX_IMAGE_EXPANSION = 16  # encoded images compress by a few percent; a column that expands more is not images
EXPANSION_FLOOR = 4 << 20  # ... checked above this many uncompressed bytes (headers and tiny images compress)
SIDE_BYTES_PER_ROW, SIDE_BYTES_FLOOR = 16 << 10, 16 << 20  # keys and labels of a row group, on average and in all
AUTO_IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "img", "image_bytes", "bytes")
OPEN_FILES = 4  # parquet files a reader keeps open (with their parsed footers)


def plan_parquet(path: str, root: str, keys: KeyMaker, *, image_column: str | None, key_column: str | None,
                 label_column: str | None, label_fields: tuple[str, ...], group_column: str | None = None,
                 max_cell_bytes: int | None = None) -> Iterator[Item]:
    """Every row of the parquet file `path` as an Item (or a reject), in file order; one reject for the whole file
    when it cannot be planned. `max_cell_bytes` (precompute's max_file_bytes): row groups whose cells cannot be read
    within it are rejected row by row here, before any cell is read."""
    try:
        f = open_input_file(path)
    except OSError as e:
        yield container_reject(path, root, keys, "read_error", f"{type(e).__name__}: {e}")
        return
    with f:  # closed once its rows are planned
        yield from _plan_file(f, path, root, keys, image_column=image_column, key_column=key_column,
                              label_column=label_column, label_fields=label_fields, group_column=group_column,
                              max_cell_bytes=max_cell_bytes)


def open_footer(f) -> tuple[pq.ParquetFile | None, tuple[str, str] | None]:
    """(the parsed file, None), or (None, (reason, detail)) when its footer is not one ebd reads: the footer's length
    and row-group count are checked from its last bytes and its metadata before any row is."""
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - 8))
    tail = f.read(8)
    if size < 12 or tail[4:] != b"PAR1":
        return None, ("not_parquet", f"no parquet footer in its last bytes ({size} bytes)")
    if (length := int.from_bytes(tail[:4], "little")) > min(MAX_FOOTER_BYTES, size - 12):
        return None, ("implausible_footer", f"a footer of {length} bytes in a file of {size} (at most "
                                            f"{MAX_FOOTER_BYTES} are read)")
    f.seek(0)
    try:
        pf = pq.ParquetFile(f)
    except Exception as e:  # noqa: BLE001 - whatever pyarrow says about a file that is not parquet
        return None, ("not_parquet", f"{type(e).__name__}: {str(e)[:200]}")
    meta = pf.metadata
    if meta.num_row_groups > MAX_ROW_GROUPS:
        return None, ("too_many_row_groups", f"{meta.num_row_groups} row groups > {MAX_ROW_GROUPS}: write it again "
                                             "with larger row groups")
    claimed = [meta.row_group(rg).num_rows for rg in range(meta.num_row_groups)]
    if sum(claimed) != meta.num_rows or sum(claimed) > ROWS_PER_BYTE * size or min(claimed, default=0) < 0:
        return None, ("implausible_row_count", f"its footer claims {meta.num_rows} rows ({sum(claimed)} in its row "
                                               f"groups) in {size} bytes: not read")
    return pf, None


def _plan_file(f, path: str, root: str, keys: KeyMaker, *, image_column: str | None, key_column: str | None,
               label_column: str | None, label_fields: tuple[str, ...], group_column: str | None,
               max_cell_bytes: int | None) -> Iterator[Item]:
    rel = relative_source(path, root)
    pf, problem = open_footer(f)
    if problem is not None:
        yield container_reject(path, root, keys, problem[0], f"{rel}: {problem[1]}")
        return
    schema = pf.schema_arrow
    column = image_column or _auto_image_column(schema)
    named = [("image_column", column), ("key_column", key_column), ("label_column", label_column),
             ("group_column", group_column), *(("label field", n) for n in label_fields)]
    absent = [(what, name) for what, name in named if name is not None and name not in schema.names]
    if column is None or absent:
        what, name = absent[0] if absent else ("image_column", None)
        detail = (f"{what} {name!r} is not a column of {path} (columns: {', '.join(schema.names)})" if name else
                  f"no image-bytes column in {path}: set image_column (columns: {', '.join(schema.names)})")
        yield container_reject(path, root, keys, "missing_column", detail)
        return
    if not _is_image_column(schema.field(column).type):
        yield container_reject(path, root, keys, "missing_column",
                               f"column {column!r} of {path} holds {schema.field(column).type}, not image bytes "
                               "(binary or struct<bytes: binary, path>)")
        return
    label_column = label_column or ("label" if "label" in schema.names else None)
    group_column = group_column or ("group" if "group" in schema.names else None)
    side = list(dict.fromkeys(c for c in (key_column, label_column, group_column, *label_fields) if c))
    stem = sanitize_key(PurePosixPath(rel).with_suffix("").as_posix())
    row_index = 0
    try:
        for rg in range(pf.num_row_groups):
            rows = pf.metadata.row_group(rg).num_rows
            refused = row_group_problem(pf.metadata, rg, column, max_cell_bytes, side)
            if refused is not None:  # measured from the footer: not a cell of this group is read
                for _ in range(rows):
                    source = f"{rel}#{row_index}"
                    yield Item(source=source, key=keys.make(f"{stem}_{row_index:09d}", source), label=None,
                               locator=("none",), reject=refused[0], detail=f"{source}: {refused[1]}")
                    row_index += 1
                continue
            # Side columns (keys, labels) are streamed a few rows at a time, each value cut as it is read.
            for row, values in enumerate(_side_rows(pf, rg, side) if side else ({} for _ in range(rows))):
                source = f"{rel}#{row_index}"
                row_index += 1
                if key_column and values[key_column] is None:
                    yield Item(source=source, key=keys.make(f"{stem}_{row_index - 1:09d}", source), label=None,
                               locator=("none",), reject="missing_key",
                               detail=f"{source}: key_column {key_column!r} is null in this row")
                    continue
                hint = values[key_column] if key_column else f"{stem}_{row_index - 1:09d}"
                label = values.get(label_column) if label_column else None
                fields = ((name, clean_label(values[name])) for name in label_fields)
                yield Item(source=source, key=keys.make(hint, source), label=clean_label(label),
                           locator=("parquet", path, rg, row, column), fields=tuple((n, v) for n, v in fields if v),
                           group=clean_label(values[group_column]) if group_column else None)
    except Exception as e:  # noqa: BLE001 - a row group that cannot be read: the rest of the file is lost
        yield container_reject(path, root, keys, "truncated_container",
                               f"{rel}: after {row_index} rows, {type(e).__name__}: {str(e)[:200]}")


def row_group_problem(meta: pq.FileMetaData, rg: int, column: str, max_cell_bytes: int | None,
                      side: list[str] = ()) -> tuple[str, str] | None:
    """(reason, detail) when row group `rg` cannot be read within the budgets, from its footer entry alone."""
    group = meta.row_group(rg)
    rows = group.num_rows
    if rows <= 0:
        return None
    raw, packed = _chunk_bytes(meta, group, (column,))
    if max_cell_bytes is not None and raw > rows * max_cell_bytes:
        if rows == 1:
            return "file_too_large", f"{raw} bytes > max_file_bytes={max_cell_bytes} (from the file's footer)"
        return "row_group_too_large", (f"row group {rg}'s {rows} image cells hold {raw} bytes uncompressed, more than "
                                       f"max_file_bytes={max_cell_bytes} a cell: not read (write the file with "
                                       "smaller row groups to keep its good rows)")
    if raw > EXPANSION_FLOOR and raw > MAX_IMAGE_EXPANSION * max(packed, 1):
        return "row_group_too_large", (f"row group {rg}'s image cells decompress from {packed} to {raw} bytes: "
                                       "encoded images do not compress that well, not read")
    side_raw, _ = _chunk_bytes(meta, group, tuple(side))
    if side and side_raw > rows * SIDE_BYTES_PER_ROW + SIDE_BYTES_FLOOR:
        return "labels_too_large", (f"row group {rg}'s key and label columns hold {side_raw} bytes uncompressed for "
                                    f"{rows} rows: not read")
    return None


def _chunk_bytes(meta: pq.FileMetaData, group, columns: tuple[str, ...]) -> tuple[int, int]:
    """(uncompressed, compressed) bytes of the column chunks of `columns` (every leaf under each) in one row group."""
    raw = packed = 0
    for i in range(group.num_columns):
        chunk = group.column(i)
        path = chunk.path_in_schema
        if any(path == c or path.startswith(c + ".") for c in columns):
            raw, packed = raw + chunk.total_uncompressed_size, packed + chunk.total_compressed_size
    return raw, packed


def _side_rows(pf: pq.ParquetFile, rg: int, columns: list[str]) -> Iterator[dict]:
    """{column: its value as text, cut to LABEL_MAX_CHARS} for each row of row group `rg`, a batch at a time."""
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[rg], columns=columns):
        texts = {c: [None if v is None else str(v)[:LABEL_MAX_CHARS * 4] for v in batch.column(c).to_pylist()]
                 for c in columns}
        for i in range(batch.num_rows):
            yield {c: texts[c][i] for c in columns}


def _auto_image_column(schema: pa.Schema) -> str | None:
    for name in AUTO_IMAGE_COLUMNS:
        if name in schema.names and _is_image_column(schema.field(name).type):
            return name
    for column in schema:
        if _is_image_column(column.type):
            return column.name
    return None


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_image_column(t: pa.DataType) -> bool:
    if _is_binary(t):
        return True
    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and _is_binary(t.field("bytes").type)


# ----------------------------------------------------------------------------------------------- reading

class ParquetFiles:
    """The parquet files a worker reads, each opened and its footer parsed once (the last OPEN_FILES kept)."""

    def __init__(self):
        self.open: OrderedDict[str, tuple[object, pq.ParquetFile]] = OrderedDict()

    def get(self, path: str) -> pq.ParquetFile:
        if path not in self.open:
            if len(self.open) >= OPEN_FILES:
                self.open.popitem(last=False)[1][0].close()
            f = open_input_file(path)
            pf, problem = open_footer(f)
            if problem is not None:
                f.close()
                raise OSError(f"{problem[0]}: {problem[1]}")  # the file changed since it was planned
            self.open[path] = (f, pf)
        self.open.move_to_end(path)
        return self.open[path][1]

    def close(self) -> None:
        for f, _ in self.open.values():
            f.close()
        self.open.clear()


@dataclass(frozen=True)
class CellRefused:
    """A cell not read: (reason, detail) of its reject."""
    reason: str
    detail: str


class ParquetCells:
    """One row group's image column, read forward in batches sized by bytes; a cell over `limit` bytes is dropped as
    soon as its batch is decoded (its row becomes a file_too_large reject), so memory holds one batch."""

    def __init__(self, pf: pq.ParquetFile, rg: int, column: str, limit: int):
        group = pf.metadata.row_group(rg)
        self.refused = row_group_problem(pf.metadata, rg, column, limit)  # checked again: the file may have changed
        mean = _chunk_bytes(pf.metadata, group, (column,))[0] / max(group.num_rows, 1)
        batch = int(min(PARQUET_BATCH_ROWS, max(1, READ_BATCH_BYTES // max(mean, 1))))
        self.batches = None if self.refused else pf.iter_batches(batch_size=batch, row_groups=[rg], columns=[column])
        self.limit, self.next_row, self.cached = limit, 0, {}

    def value(self, row: int):
        if self.refused is not None:
            return CellRefused(*self.refused)
        while row not in self.cached:
            batch = next(self.batches, None)
            if batch is None:
                raise EOFError(f"row {row} is not in its row group: the file holds fewer rows than it claims")
            self.cached = {self.next_row + i: v for i, v in enumerate(_bounded_cells(batch.column(0), self.limit))}
            self.next_row += batch.num_rows
        return self.cached.pop(row)


def _bounded_cells(cells: pa.Array, limit: int) -> list:
    """The cells as Python values, each larger than `limit` bytes replaced by its refusal (never copied out)."""
    if pa.types.is_struct(cells.type):
        cells = cells.field("bytes")
    if not _is_binary(cells.type):  # planning checked the schema; a file changed since is refused, not converted
        return [CellRefused("wrong_type", f"image cell holds {cells.type}, not bytes")] * len(cells)
    import pyarrow.compute as pc

    sizes = pc.binary_length(cells).to_pylist()
    return [CellRefused("file_too_large", f"{n} bytes > max_file_bytes={limit}") if n is not None and n > limit
            else cells[i].as_py() for i, n in enumerate(sizes)]
