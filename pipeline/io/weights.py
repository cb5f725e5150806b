"""Weights folders: `config.json` + `model.safetensors`, the way a diffusers model carries its config.

Every network ebd saves (the generative models, the evaluator) goes through these functions. A folder appears whole
or not at all: a new local folder is written beside its final name and renamed into place; otherwise (an object
store, or a folder exported again) the weights go first and the config last, each atomically, and the config records
the weights' sha256, which every load checks, so new weights never pass with an old config or the reverse. Weights
load through safetensors only (never pickle). A folder may be an object-store URI (read through a local cached copy).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from ..common.config import EbdError
from . import storage
from .files import atomic_write, atomic_write_json

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
WEIGHTS_SHA256 = "weights_sha256"  # config.json's record of the weights it was written with
MAX_CONFIG_JSON_BYTES = 16 << 20  # a model's config.json (the shipped ones: under 40 KiB, training record included)
MAX_HEADER_BYTES = 100 << 20  # safetensors' own cap on its JSON header
# safetensors' dtype names -> bytes per element (what a header may name; anything else is refused before loading)
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def save_weights_folder(folder: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> str | Path:
    """Writes `tensors` to FOLDER/model.safetensors and `config` (with the weights' sha256) to FOLDER/config.json;
    returns the folder."""
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    config = config | {WEIGHTS_SHA256: hashlib.sha256(data).hexdigest()}
    if not storage.is_remote(folder) and not Path(folder).exists():
        folder = Path(folder)
        staging = folder.parent / f".{folder.name}.partial"  # a killed export's is cleared here
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        (staging / WEIGHTS_FILE).write_bytes(data)
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        os.rename(staging, folder)  # one step: readers see no folder, then a whole one
        return folder
    atomic_write(storage.join(folder, WEIGHTS_FILE), lambda f: f.write(data))
    atomic_write_json(storage.join(folder, CONFIG_FILE), config)  # last: the config names the weights it goes with
    return folder if storage.is_remote(folder) else Path(folder)


def read_weights_config(folder: str | Path, what: str = "an ebd model folder", hint: str = "") -> dict:
    """FOLDER/config.json of a complete weights folder (one line if it is not one)."""
    local = storage.local_copy(folder)
    config_path, weights_path = local / CONFIG_FILE, local / WEIGHTS_FILE
    if not (config_path.is_file() and weights_path.is_file()):
        raise EbdError(f"{folder} is not {what} (needs {CONFIG_FILE} and {WEIGHTS_FILE}{hint})")
    if config_path.stat().st_size > MAX_CONFIG_JSON_BYTES:
        raise EbdError(f"{config_path} is {config_path.stat().st_size:,} bytes, more than a model config may have "
                       f"({MAX_CONFIG_JSON_BYTES:,})")
    try:
        config = json.loads(config_path.read_bytes())
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past the parser's recursion limit
        raise EbdError(f"{config_path} is not valid JSON") from None
    if not isinstance(config, dict):
        raise EbdError(f"{config_path} must hold a JSON object")
    return config


def load_weights_folder(folder: str | Path, what: str = "an ebd model folder", hint: str = "",
                        check=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a weights folder, from safetensors, after checking the weights are the ones its config
    was written with (folders from before the config recorded them load unchecked) and the file's header is sound.
    `check(config, {name: shape})`, when given, runs before any tensor is read (a model checks its config builds the
    names and shapes the file holds). The returned config leaves out the sha256 record."""
    config = read_weights_config(folder, what, hint)
    weights = storage.local_copy(folder) / WEIGHTS_FILE
    expected = config.pop(WEIGHTS_SHA256, None)
    if expected is not None and storage.file_sha256(str(weights)) != expected:
        raise EbdError(f"{storage.join(folder, WEIGHTS_FILE)} is not the file {storage.join(folder, CONFIG_FILE)} was "
                       "written with (an export cut short, or a file replaced by hand): export the folder again")
    header = read_safetensors_header(weights)
    if check is not None:
        check(config, {name: shape for name, (_, shape) in header.items()})
    try:
        return config, load_file(str(weights))
    except Exception as e:  # noqa: BLE001 - the header checked out, the file still does not load
        raise EbdError(f"{weights} does not load: {type(e).__name__}: {str(e)[:200]}") from None


def read_safetensors_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} of a safetensors file, from its header alone, after checking every tensor's
    bytes lie inside the file and match its dtype and shape (a file with offsets past its end, a lying dtype or an
    overflowing shape is one line here, before any tensor is built)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
            raise EbdError(f"{path} is not a safetensors file (header length {length} in a file of {size:,} bytes)")
        try:
            header = json.loads(f.read(length))
        except (ValueError, RecursionError):
            header = None
    if not isinstance(header, dict):
        raise EbdError(f"{path} is not a safetensors file (its header is not a JSON object)")
    tensors, data_bytes = {}, size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, offsets = (entry.get(k) for k in ("dtype", "shape", "data_offsets")) if isinstance(
            entry, dict) else (None, None, None)
        problem = None
        if dtype not in DTYPE_BYTES:
            problem = f"dtype {str(dtype)[:20]!r} is not one ebd loads"
        elif not (isinstance(shape, list) and len(shape) <= 8
                  and all(type(d) is int and 0 <= d < 2**40 for d in shape)):
            problem = "its shape is not a list of at most 8 sizes"
        elif not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                  and 0 <= offsets[0] <= offsets[1] <= data_bytes):
            problem = f"its bytes {str(offsets)[:60]} are not inside the file's {data_bytes:,} data bytes"
        elif offsets[1] - offsets[0] != DTYPE_BYTES[dtype] * _product(shape):
            problem = f"its {offsets[1] - offsets[0]:,} bytes do not hold a {dtype} tensor of shape {shape}"
        if problem:
            raise EbdError(f"{path}: tensor {str(name)[:80]!r}: {problem} (a damaged or forged file: export it again)")
        tensors[name] = (dtype, tuple(shape))
    return tensors


def check_tensors_fit(path: str | Path, found: dict[str, tuple[int, ...]],
                      expected: dict[str, tuple[int, ...]]) -> None:
    """One line when the tensors a safetensors file holds (names, shapes) are not the ones a model built from its
    config expects, before the model's own weights are allocated."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(n for n in set(expected) & set(found) if tuple(expected[n]) != tuple(found[n]))
    if missing or unexpected or wrong:
        parts = [f"{label} {', '.join(names[:3])}" + (f" and {len(names) - 3} more" if len(names) > 3 else "")
                 for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape:", wrong))
                 if names]
        raise EbdError(f"{path} does not fit its config.json ({'; '.join(parts)}): the config and the weights come "
                       "from different models")


def _product(shape: list[int]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out
