"""Where data lives: a local path or an object-store URI (s3://bucket/prefix, gs://..., any pyarrow filesystem).

Every job reads and writes through these few functions, so `--input`, `--output`, `--latents`, `--reference` and
`--storage-path` take either. The filesystem layer is pyarrow.fs (the one Ray Train uses for its storage path);
the endpoint and credentials come from the usual environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION or ~/.aws), never from flags, so they stay out of logs and run records.

Commit rule (the exactly-once contract every writer keeps): a file is written whole and only then made visible,
and a shard counts only once its done marker (written last) exists.
- local: write a temporary file beside the target, fsync, rename over it (POSIX rename is atomic);
- object store: one PUT of the whole body (an S3 object appears complete or not at all; a PUT cut short by a
  kill leaves nothing). Readers still trust only shards with a marker, because an object store can list a
  shard from a run that died before its marker, and some stores (or a wrapped fsspec filesystem) are weaker.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import io
import json
import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import pyarrow.fs as pafs

from ..common.config import EbdError

CACHE_DIR = Path(os.environ.get("EBD_CACHE", Path.home() / ".cache" / "ebd"))
PROBE = ".ebd-write-probe-"  # check_writable's object; a folder holding only probes is still empty


def is_remote(location: str | os.PathLike) -> bool:
    """True for URIs with a scheme other than file:// (s3://, gs://, hdfs://, ...)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def canonical(location: str | os.PathLike) -> str:
    """An absolute local path, or the URI unchanged (minus a trailing slash): the form run records keep."""
    text = str(location)
    if is_remote(text):
        return text.rstrip("/")
    return str(Path(text.removeprefix("file://")).resolve())


def _resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it). Only `scheme://bucket` is parsed as a URI: the key after it is taken as it is,
    so object names with spaces, `%`, `#` or `?` (real image sets have them) name themselves."""
    text = str(location)
    if not is_remote(text):
        return pafs.LocalFileSystem(), str(Path(text.removeprefix("file://")).resolve())
    scheme, rest = text.split("://", 1)
    bucket, _, key = rest.partition("/")
    fs, base = _filesystem(f"{scheme}://{bucket}")
    key = key.rstrip("/")
    return fs, (f"{base.rstrip('/')}/{key}" if key else base)


@functools.lru_cache(maxsize=64)
def _filesystem(root_uri: str) -> tuple[pafs.FileSystem, str]:
    """One client per bucket and process (making one may cost a region lookup)."""
    try:
        return pafs.FileSystem.from_uri(root_uri)
    except (OSError, ValueError, TypeError) as e:  # unknown scheme, malformed URI
        raise EbdError(f"cannot open {root_uri}: {_first_line(e)}") from None


def join(location: str | os.PathLike, *names: str) -> str:
    text = str(location)
    if is_remote(text):
        return posixpath.join(text.rstrip("/"), *names)
    return str(Path(text.removeprefix("file://")).joinpath(*names))


def name(location: str | os.PathLike) -> str:
    return posixpath.basename(str(location).rstrip("/"))


def _info(location) -> pafs.FileInfo:
    fs, path = _resolve(location)
    try:
        return fs.get_file_info(path)
    except OSError as e:  # no such bucket, no permission, endpoint down
        raise EbdError(f"cannot read {location}: {_first_line(e)}") from None


def is_file(location) -> bool:
    return _info(location).type == pafs.FileType.File


def is_dir(location) -> bool:
    return _info(location).type == pafs.FileType.Directory


def exists(location) -> bool:
    return _info(location).type != pafs.FileType.NotFound


def size(location) -> int:
    return _info(location).size


def _remote_files(location, allow_not_found: bool = True,
                  failure: str = "cannot list") -> tuple[pafs.FileSystem, str, list[pafs.FileInfo]]:
    """(filesystem, root, the files under root, recursively) of a remote folder; `failure` and the cause in one
    line when it cannot be listed (or, unless `allow_not_found`, does not exist)."""
    fs, root = _resolve(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=allow_not_found))
    except OSError as e:  # FileNotFoundError included
        raise EbdError(f"{failure} {location}: {_first_line(e)}") from None
    return fs, root, [i for i in infos if i.type == pafs.FileType.File]


def list_files(location, suffix: str = "") -> list[str]:
    """Files under a folder whose names end in `suffix`, recursively, skipping hidden names and temporaries, sorted
    by path components (`a/b` before `a-x/c`), as locations of the same kind."""
    if not is_remote(location):
        root = str(location).removeprefix("file://")
        found = [path for path, problem in walk_local(root) if problem is None and path.endswith(suffix)
                 and os.path.isfile(path)]
        return sorted(found, key=lambda path: Path(path).relative_to(root).parts)
    _, root, infos = _remote_files(location)
    found = [rel for rel in (posixpath.relpath(i.path, root) for i in infos)
             if rel.endswith(suffix) and not any(p.startswith(".") for p in rel.split("/"))]
    return [join(location, rel) for rel in sorted(found, key=lambda rel: rel.split("/"))]


FOLDER_MAX_DEPTH = 64  # folders deeper under a root than this are not walked into (a reject where inputs are read)


def walk_local(root: str, max_depth: int = FOLDER_MAX_DEPTH):
    """(path, None) for every non-hidden entry that is not a folder under local `root` (links included, never
    followed into), in a fixed order: a folder's files sorted by name, then its links to folders, then its
    sub-folders in name order, each walked the same way; (folder, "too_deep") for a folder below `max_depth` and
    (folder, "unreadable: why") for one that cannot be listed, instead of their contents. Iterative: any depth of
    nesting costs a list, never Python's recursion limit."""
    stack = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = [e for e in listing if not e.name.startswith(".")]
        except OSError as e:
            yield folder, f"unreadable: {type(e).__name__}: {e.strerror or e}"
            continue
        folders = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
        linked = sorted(e.name for e in entries if e.is_symlink() and e.is_dir())
        others = sorted(e.name for e in entries if not e.is_dir(follow_symlinks=False) and e.name not in linked)
        for name in others + linked:
            yield os.path.join(folder, name), None
        if depth + 1 > max_depth:
            yield from ((os.path.join(folder, name), "too_deep") for name in folders)
        else:
            stack.extend((os.path.join(folder, name), depth + 1) for name in reversed(folders))


def is_empty(location) -> bool:
    """No such folder, or one holding nothing but write probes (hidden files count otherwise: a local folder is
    really empty)."""
    if not is_remote(location):
        folder = Path(str(location).removeprefix("file://"))
        return not folder.exists() or folder.is_dir() and all(p.name.startswith(PROBE) for p in folder.iterdir())
    _, _, infos = _remote_files(location)
    return all(posixpath.basename(i.path).startswith(PROBE) for i in infos)


def read_bytes(location) -> bytes:
    fs, path = _resolve(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise EbdError(f"cannot read {location}: {_first_line(e)}") from None


def open_input(location):
    """A seekable binary file (tarfile, parquet and PIL read it like a local file)."""
    fs, path = _resolve(location)
    return fs.open_input_file(path)


def open_stream(location, buffer_bytes: int = 8 << 20):
    """A buffered sequential reader: a tar streamed from a bucket in a few large ranged GETs, not one per 10 KiB
    block its reader asks for."""
    fs, path = _resolve(location)
    return fs.open_input_stream(path, buffer_size=buffer_bytes if is_remote(location) else None)


def atomic_write(location, write: Callable[[io.BufferedIOBase], None]) -> dict:
    """Writes through `write(fileobj)` so that readers see no file or the whole file (module docstring).

    Returns {"bytes": size, "sha256": hex digest} of what was written, so callers never read it back.
    """
    if is_remote(location):
        buffer = io.BytesIO()
        write(buffer)
        data = buffer.getvalue()
        fs, path = _resolve(location)
        try:
            with fs.open_output_stream(path) as f:
                f.write(data)
        except OSError as e:
            raise EbdError(f"cannot write {location}: {_first_line(e)}") from None
        return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    path = Path(str(location).removeprefix("file://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        digest = file_sha256(tmp)
        written = os.path.getsize(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"bytes": written, "sha256": digest}


def write_bytes(location, data: bytes) -> dict:
    return atomic_write(location, lambda f: f.write(data))


def file_sha256(location) -> str:
    """Streamed in 1 MiB blocks, local or remote: a large object is never held whole in memory."""
    digest = hashlib.sha256()
    fs, path = _resolve(location)
    with fs.open_input_stream(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def delete(location) -> None:
    fs, path = _resolve(location)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def check_writable(location) -> None:
    """Fails in one line, before any work, when `location` cannot be written (no such bucket, no permission,
    no endpoint): writes and deletes a small probe object."""
    probe = join(location, f"{PROBE}{os.getpid()}")
    try:
        if is_remote(probe):  # the bare PUT, so its own error (no such bucket, access denied) is the message
            fs, path = _resolve(probe)
            with fs.open_output_stream(path):
                pass
        else:
            write_bytes(probe, b"")
        delete(probe)
    except OSError as e:
        raise EbdError(f"cannot write to {location}: {_first_line(e)}") from None


def local_copy(location) -> Path:
    """A local folder holding `location`'s files: the folder itself when local, else a cached download (keyed by
    the URI and every file's size and modification time, so a changed object is fetched again). Model folders go
    through here because from_pretrained and safetensors read local files. A cached copy is used only when every
    file still has the size and sha256 recorded when it was downloaded; an object key that would land outside the
    cache folder (`..`, an absolute name) is refused in one line."""
    if not is_remote(location):
        return Path(str(location).removeprefix("file://"))
    fs, root, infos = _remote_files(location, allow_not_found=False, failure="cannot read")
    if not infos:
        raise EbdError(f"{location} holds no files")
    files = {_cache_name(location, i.path[len(root.rstrip("/")) + 1:]): i for i in infos}  # as named, not normalised
    key = hashlib.sha256("\n".join([str(location)] + [f"{i.path}\t{i.size}\t{i.mtime_ns}" for i in infos]).encode())
    name = key.hexdigest()[:24]
    target = CACHE_DIR / "objects" / name
    if _verified(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{name}.lock", "wb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per node: the other actors wait for it, then share it
        if _verified(target):
            return target
        staging = target.parent / f"{name}.partial"  # a download killed midway is thrown away here
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        record = {}
        for rel, info in files.items():
            local = staging / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
            if local.stat().st_size != info.size:
                shutil.rmtree(staging, ignore_errors=True)
                raise EbdError(f"{location} changed while it was being copied: run again once it is complete")
            record[rel] = {"bytes": info.size, "sha256": file_sha256(local)}
        (staging / COMPLETE).write_text(json.dumps({"location": str(location), "files": record}, sort_keys=True))
        os.replace(staging, target)
    return target


COMPLETE = ".complete"  # a cached copy's record: its location and every file's size and sha256


def _cache_name(location, rel: str) -> str:
    """An object's path inside the cache folder, refused (one line) when it would leave it."""
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise EbdError(f"{location} holds an object named {rel!r}, which would land outside the local cache: "
                       "refused (object names must not hold '..' or empty parts)")
    return rel


_VERIFIED: set[Path] = set()  # cached copies this process checked (hashing a model once per process is enough)


def _verified(target: Path) -> bool:
    """Whether a cached copy is whole: its record is there and every file has the recorded size and sha256."""
    if target in _VERIFIED:
        return True
    try:
        record = json.loads((target / COMPLETE).read_text())
        whole = all((target / rel).is_file() and (target / rel).stat().st_size == f["bytes"]
                    and file_sha256(target / rel) == f["sha256"] for rel, f in record["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if whole:
        _VERIFIED.add(target)
    return whole


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
