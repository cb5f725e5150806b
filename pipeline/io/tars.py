"""Webdataset tars: written atomically and byte-reproducibly, read back sample by sample (local or object store).

Member names are `KEY.EXT`; a sample is the members sharing a KEY (split on the first dot of the basename)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import webdataset as wds
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from . import storage


def write_tar(path: str | Path, samples: list[dict[str, bytes | str]]) -> dict:
    """Writes webdataset samples ({"__key__": KEY, EXT: bytes, ...}) atomically with fixed mtime, owner and order,
    so the same samples always give the same bytes. Returns {"bytes", "sha256"} of the tar."""
    def write(f):
        with wds.TarWriter(f, encoder=False, mtime=0, user="ebd", group="ebd", mode=0o644) as tar:
            for sample in samples:
                tar.write(sample)
    return storage.atomic_write(path, write)


def read_tar_samples(path: str) -> Iterator[dict]:
    """The webdataset samples {"__key__": KEY, EXT: bytes} of one tar (local or object store), in order."""
    with storage.open_stream(path) as stream:
        yield from _group_by_key(tar_file_iterator(stream))


def _group_by_key(members) -> Iterator[dict]:
    sample: dict = {}
    for member in members:
        key, ext = base_plus_ext(member["fname"])
        if key is None:
            continue
        if sample and sample["__key__"] != key:
            yield sample
            sample = {}
        sample.update({"__key__": key, ext: member["data"]})
    if sample:
        yield sample
