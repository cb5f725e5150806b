"""What planning hands to reading: an input sample as planned (`Item`), its bytes or reject as read (`Loaded`), and
the helpers every kind of source shares to turn untrusted names into safe keys, printable sources and short labels.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import stat
from dataclasses import dataclass, field

from . import storage

LABEL_MAX_CHARS = 200
KEY_MAX_CHARS = 80
SOURCE_MAX_CHARS = 300  # a file, member or column name as logs and reject lines show it


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
    detail: str | None = None    # what the planning reject saw
    group: str | None = None     # its twins' group (io/twins.py): GROUP~... names, a group column; never a path


@dataclass
class Loaded:
    item: Item
    data: bytes | None
    label: str | None
    reject: tuple[str, str, str | None] | None = None  # (reason, detail, the exception's type if one was raised)
    fields: dict[str, str] = field(default_factory=dict)  # every named label: {"shape": "ring", "background": ...}


class KeyMaker:
    """Safe, unique, deterministic keys: the sanitised name, plus a short hash of the source on a clash."""

    def __init__(self):
        self.used: set[str] = set()

    def make(self, hint: str, source: str) -> str:
        key = sanitize_key(hint)
        if key in self.used:
            key = f"{key[:KEY_MAX_CHARS - 9]}-{hashlib.sha256(source.encode()).hexdigest()[:8]}"
        while key in self.used:  # astronomically rare: a hash clash on top of a name clash
            key = f"{key}-{hashlib.sha256(key.encode()).hexdigest()[:4]}"
        self.used.add(key)
        return key


def sanitize_key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:KEY_MAX_CHARS] or "item"


def clean_label(label) -> str | None:
    if label is None:
        return None
    text = printable(str(label).strip(), LABEL_MAX_CHARS)
    return text if text else None


def container_reject(path: str, root: str, keys: "KeyMaker", reason: str, detail: str) -> Item:
    """One reject line for a whole input file that cannot be read (the job goes on with the others)."""
    source = relative_source(path, root)
    return Item(source=source, key=keys.make(f"container_{source}", source), label=None, locator=("none",),
                reject=reason, detail=printable(detail))


def open_input_file(path: str):
    """A seekable binary file for a local path or an object-store URI. A local one is opened without following a
    link and without blocking, and must be a regular file when open: a container swapped for a link, a FIFO or a
    device after planning is refused, never followed or waited on."""
    if storage.is_remote(path):
        return storage.open_input(path)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{printable(path)} is not a regular file")
    return os.fdopen(fd, "rb")


def relative_source(path: str, root: str) -> str:
    return printable(storage.name(path) if path == root else posixpath.relpath(path, root))


def printable(text: str, limit: int = SOURCE_MAX_CHARS) -> str:
    """Text taken from an input (a file, member or column name) as logs and reject lines may show it: bytes that are
    not UTF-8 (file systems and tars carry any) and control characters escaped (\\xff, \\n), at most `limit`
    characters, so it can neither break a line nor fail to encode."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def inputs_fingerprint(items) -> str:
    """sha256 of what `items` are now: each one's source, key and place with its file's size and modification time
    (a container's, for tar members and parquet rows). An input edited in place under the same name changes it, so
    the shard holding it is encoded again on resume (names alone would pass it as done)."""
    states: dict[str, str] = {}
    digest = hashlib.sha256()
    for item in items:
        path = item.locator[1] if item.locator[0] in ("file", "tar", "parquet") else None
        if path is not None and path not in states:
            states[path] = _file_state(path)
        digest.update(f"{item.source}\t{item.key}\t{item.locator[2:]}\t{states.get(path, '')}\n".encode(
            "utf-8", "surrogateescape"))
    return digest.hexdigest()


def _file_state(path: str) -> str:
    if storage.is_remote(path):
        return str(storage.size(path))
    try:
        info = os.stat(path)
    except OSError:
        return "missing"
    return f"{info.st_size}:{info.st_mtime_ns}"
