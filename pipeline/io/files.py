"""Files every job writes: atomically (storage's commit rule), as JSON or JSON lines, and the run record that keeps
a resumed job from mixing into a folder another run started."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from ..common.config import EbdError
from . import storage

atomic_write, file_sha256 = storage.atomic_write, storage.file_sha256


def atomic_write_json(path: str | Path, obj) -> dict:
    return storage.write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_lines(path: str | Path, records: list[dict]) -> dict:
    return storage.write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())


def read_json(path: str | Path):
    return json.loads(storage.read_bytes(path))


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def claim_run_folder(out: str | Path, run: dict, run_file: str = "run.json") -> dict:
    """Records in OUT/run.json what a job fills the folder with, or checks a resumed run against it.

    Returns the recorded dict (which may hold more than `run`, e.g. batch sizes a job added). Raises EbdError when
    any key of `run` differs, or when the folder is non-empty and was not started by such a job: runs never mix.
    """
    path = storage.join(out, run_file)
    if not storage.is_remote(out) and os.path.isdir(out):  # markers and shards land in the folder, nowhere else
        linked = sorted(e.name for e in os.scandir(out) if e.is_symlink())
        if linked:
            raise EbdError(f"{out} holds links ({', '.join(linked[:3])}): outputs are written only into the folder "
                           "itself; remove them or choose a new --output")
    try:
        previous = read_json(path) if storage.is_file(path) else None
    except ValueError:
        previous = ""
    if previous is not None and not isinstance(previous, dict):  # never trusted, never a traceback
        raise EbdError(f"{path} is damaged (not a run record): delete the folder or choose a new --output")
    if previous is not None:
        changed = sorted(k for k in run if previous.get(k) != run[k])
        if changed:
            raise EbdError(f"{out} holds a run started with a different {', '.join(changed)}: "
                           "use a new --output (or delete the folder) instead of mixing runs")
        return previous
    if not storage.is_empty(out):
        raise EbdError(f"{out} is not empty and was not written by this job: choose a new --output")
    atomic_write_json(path, run)
    return run
