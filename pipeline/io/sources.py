"""Image sources: a folder tree, webdataset/img2dataset tars, or parquet files with an image-bytes column.

Planning (`plan_items`, here) runs once in the driver and lists every input sample as an `Item` in a fixed order
(sorted files, tar members in tar order, parquet rows in order), so the split into output shards is
deterministic. Reading (`reading.read_items`) runs in the workers and fetches only the bytes a shard needs: a file, a
byte range of a tar (offsets found while planning), or one row group's image column of a parquet file.

Everything taken from inputs (file names, tar keys, parquet keys and labels) is untrusted: output keys are
sanitised to `[A-Za-z0-9_-]` (no dots, no path separators), made unique while planning, and labels are only
ever stored as JSON strings, never used as paths. Nothing one input does stops the job: a bad item is an Item with
a `reject` reason (recorded in rejects.jsonl), and so is a container that cannot be read whole (a tar that is not a
tar or is cut short, a file that is not parquet): one reject line for it, and the job goes on with the rest.

    folder trees   regular files only: a symlink is followed only to a regular file inside the input root; links
                   out of it, devices, FIFOs and sockets are rejects (and a file is opened without following links
                   and checked again, so it cannot be swapped for one between planning and reading)
    tars           regular members only (links, directories and devices are rejects), no absolute or `..` names,
                   one member per KEY.EXT (a later duplicate is a reject), sidecars of bounded size and depth
    parquet        measured from the footer before a cell is read (io/parquet_inputs.py): per row, cells over budget,
                   of the wrong type or with a null key are rejects; per file: no image column, or not parquet
"""

from __future__ import annotations

import os
import posixpath
import stat
import tarfile
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import Iterator

from webdataset.tariterators import base_plus_ext

from ..common.config import ConfigError
from . import storage
from .items import (  # noqa: F401
    LABEL_MAX_CHARS,
    Item,
    KeyMaker,
    Loaded,
    clean_label,
    container_reject,
    open_input_file,
    printable,
    relative_source,
    sanitize_key,
)
from .parquet_inputs import plan_parquet
from .twins import files_joining_groups, name_group

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "tga", "jp2", "ico")


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
               label_fields: list[str] | tuple[str, ...] = (),
               group_column: str | None = None, max_cell_bytes: int | None = None) -> tuple[str, list[Item]]:
    """Lists every sample under `path` (a local path or an object-store URI) in a deterministic order.
    Returns (format, items).

    `label_fields` names the labels each sample carries, for data labelled along several factors (shape and
    background, say): a folder tree's first levels (`ring/checker/1.png`), a webdataset sidecar's `KEY.json`
    keys, or parquet columns. Every field found is kept; the single `label` (.cls, the first folder, the label
    column) stays for tools that read one. `group_column` (parquet; default `group`): each row's twins' group.
    `max_cell_bytes` (precompute's max_file_bytes): parquet row groups whose cells cannot be read within it are
    rejected from their footer (io/parquet_inputs.py)."""
    label_fields = tuple(label_fields or ())
    root = storage.canonical(path)
    if not storage.exists(root):
        raise ConfigError(f"input not found: {root}")
    fmt = detect_format(root) if fmt == "auto" else fmt
    keys = KeyMaker()
    if fmt == "folder":
        if not storage.is_dir(root):
            raise ConfigError(f"input format 'folder' needs a directory, got {root}")
        return fmt, _join_name_groups(list(_plan_folder(root, keys, label_fields)))
    files, rejects = _data_files(root, ".tar" if fmt == "webdataset" else ".parquet", keys)
    root = root if storage.is_remote(root) else os.path.realpath(root)  # the real paths _data_files returns
    if fmt == "webdataset":
        return fmt, _join_name_groups([it for f in files for it in _plan_tar(f, root, keys, label_fields)] + rejects)
    if fmt == "parquet":
        items = [it for f in files
                 for it in plan_parquet(f, root, keys, image_column=image_column, key_column=key_column,
                                        label_column=label_column, label_fields=label_fields,
                                        group_column=group_column, max_cell_bytes=max_cell_bytes)] + rejects
        columns = [it for it in items if it.reject == "missing_column"]
        if columns and len(columns) == len(items):  # a column the config names is in none of the files
            raise ConfigError(columns[0].detail)
        return fmt, items
    raise ConfigError(f"unknown input format {fmt!r}")


def _data_files(root: str, suffix: str, keys: "KeyMaker") -> tuple[list[str], list[Item]]:
    """The container files to read (sorted, hidden names skipped) and a reject for each one that must not be read: a
    link out of the input folder, something not a regular file, a folder too deep to walk."""
    if storage.is_remote(root):
        files, rejects = [root] if storage.is_file(root) else storage.list_files(root, suffix), []
    elif storage.is_file(root):  # the input named on the command line: a link to it is the user's own choice
        files, rejects = [os.path.realpath(root)], []
    else:
        real_root, files, rejects = os.path.realpath(root), [], []
        for path, walk_problem in storage.walk_local(root):
            if walk_problem is not None:
                reason, detail = _walk_reject(walk_problem)
                rejects.append(container_reject(path, root, keys, reason, f"{relative_source(path, root)}: {detail}"))
            elif path.endswith(suffix):
                target, problem = _regular_file(Path(path), real_root)
                if problem is None:
                    files.append(target)
                else:
                    rejects.append(container_reject(path, root, keys, problem[0],
                                                     f"{relative_source(path, root)}: {problem[1]}"))
        files.sort(key=lambda path: Path(path).relative_to(real_root).parts)
    if not files and not rejects:
        raise ConfigError(f"no {suffix} files under {root}")
    return files, rejects


def _plan_folder(root: str, keys: "KeyMaker", label_fields: tuple[str, ...]) -> Iterator[Item]:
    if storage.is_remote(root):  # an object store has no directories to walk: its listing is already sorted
        for path in storage.list_files(root):
            yield _folder_item(posixpath.relpath(path, root), path, keys, label_fields)
        return
    real_root = os.path.realpath(root)
    for path, walk_problem in storage.walk_local(root):  # symlinked folders are listed, never walked into
        rel = Path(path).relative_to(root).as_posix()
        if walk_problem is not None:  # a folder too deep to walk, or one that cannot be listed: one reject
            reason, detail = _walk_reject(walk_problem)
            yield _replace(_folder_item(rel, path, keys, ()), reject=reason, detail=f"{printable(rel)}: {detail}")
            continue
        target, problem = _regular_file(Path(path), real_root)
        item = _folder_item(rel, target or path, keys, label_fields)
        yield item if problem is None else _replace(item, reject=problem[0], detail=f"{item.source}: {problem[1]}")


def _folder_item(rel: str, path: str, keys: "KeyMaker", label_fields: tuple[str, ...]) -> Item:
    """One file of a folder tree; its first folder under the root is its label, its first folders in order are
    the values of `label_fields`."""
    parts = PurePosixPath(rel)
    folders = parts.parts[:-1]
    label = folders[0] if folders else None
    ext = parts.suffix.lower().lstrip(".")
    reject = None if ext in IMAGE_EXTENSIONS else "unsupported_extension"
    fields = tuple((name, value) for name, value in zip(label_fields, map(clean_label, folders)) if value)
    source = printable(rel)
    return Item(source=source, key=keys.make(parts.with_suffix("").as_posix(), source), label=clean_label(label),
                locator=("file", path), reject=reject, fields=fields, group=clean_label(name_group(parts.stem)))


def _join_name_groups(items: list[Item]) -> list[Item]:
    stems = [PurePosixPath(item.source.rsplit("::", 1)[-1]).stem for item in items]
    joined = files_joining_groups(stems, [item.group for item in items])
    return [item if group == item.group else _replace(item, group=group) for item, group in zip(items, joined)]


def _walk_reject(problem: str) -> tuple[str, str]:
    """(reason, detail) of a folder `storage.walk_local` did not walk: too deep, or unreadable."""
    if problem == "too_deep":
        return "too_deep", f"a folder more than {storage.FOLDER_MAX_DEPTH} levels deep: not read"
    return "read_error", problem


def _regular_file(path: Path, real_root: str) -> tuple[str | None, tuple[str, str] | None]:
    """(the real path to read, None) for a regular file inside the input root (through symlinks that stay inside),
    else (None, (reason, detail))."""
    try:
        real = os.path.realpath(path)
        info = os.stat(real)
    except OSError as e:
        return None, ("read_error", f"{type(e).__name__}: {e.strerror or e}")
    if os.path.commonpath([real, real_root]) != real_root:
        return None, ("outside_input", "a symlink to a file outside the input folder")
    if not stat.S_ISREG(info.st_mode):
        kind = ("a directory" if stat.S_ISDIR(info.st_mode) else "a FIFO" if stat.S_ISFIFO(info.st_mode)
                else "a socket" if stat.S_ISSOCK(info.st_mode) else "a device")
        return None, ("not_a_regular_file", f"{kind}, not a regular file")
    return real, None


def _replace(item: Item, **changes) -> Item:
    from dataclasses import replace
    return replace(item, **changes)


def _plan_tar(path: str, root: str, keys: "KeyMaker", label_fields: tuple[str, ...]) -> Iterator[Item]:
    """Groups tar members into webdataset samples (`KEY.EXT`, split on the first dot of the basename); members that
    cannot be samples are rejects, and a tar that is not one, or is cut short, is one reject line (the samples read
    before the cut are kept)."""
    rel = relative_source(path, root)
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    rejects: list[Item] = []
    problem = None
    if path.endswith((".tar.gz", ".tgz")):
        yield container_reject(path, root, keys, "not_a_tar", "a compressed tar (only uncompressed tars are read)")
        return
    try:
        with open_input_file(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                reason = _member_problem(member, samples)
                if reason is not None:
                    source = printable(f"{rel}::{member.name}")
                    rejects.append(Item(source=source, key=keys.make(f"member_{member.name}", source), label=None,
                                        locator=("none",), reject=reason[0], detail=f"{source}: {reason[1]}"))
                    continue
                base, ext = base_plus_ext(member.name)
                samples.setdefault(base, {})[ext.lower()] = (member.offset_data, member.size)
    except (tarfile.ReadError, EOFError) as e:
        problem = ("not_a_tar" if not samples and not rejects else "truncated_container", f"{type(e).__name__}: {e}")
    except OSError as e:
        problem = ("read_error", f"{type(e).__name__}: {e}")
    for base, members in samples.items():
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
        wanted = [e for e in (image_ext, "cls", "json") if e in members]
        source = printable(f"{rel}::{base}")
        yield Item(source=source, key=keys.make(base, source), label=None,
                   locator=("tar", str(path), tuple((e, *members[e]) for e in wanted)),
                   reject=None if image_ext else "no_image_member",  # its named labels: in KEY.json, read with it
                   group=clean_label(name_group(PurePosixPath(base).name)))
    yield from rejects
    if problem is not None:
        yield container_reject(path, root, keys, problem[0], f"{rel}: {problem[1]}")


def _member_problem(member: tarfile.TarInfo, samples: dict) -> tuple[str, str] | None:
    """Why a tar member cannot be part of a sample (None when it can)."""
    if not member.isfile():
        kind = ("a directory" if member.isdir() else "a link" if member.issym() or member.islnk() else
                "a device or FIFO")
        return "not_a_regular_file", f"{kind}, not a file"
    name = member.name
    if name.startswith("/") or ".." in PurePosixPath(name).parts:
        return "unsafe_member_name", "an absolute name or one with '..'"
    base, ext = base_plus_ext(name)
    if base is None:
        return "not_a_sample", "a name without KEY.EXT"
    if ext.lower() in samples.get(base, {}):
        return "duplicate_member", f"a second {ext.lower()} for key {base!r} (the first is kept)"
    return None


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
