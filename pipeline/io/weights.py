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
    try:
        config = json.loads(config_path.read_text())
    except ValueError:
        raise EbdError(f"{config_path} is not valid JSON") from None
    if not isinstance(config, dict):
        raise EbdError(f"{config_path} must hold a JSON object")
    return config


def load_weights_folder(folder: str | Path, what: str = "an ebd model folder",
                        hint: str = "") -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a weights folder, from safetensors, after checking the weights are the ones its config
    was written with (folders from before the config recorded them load unchecked). The returned config leaves out
    that record."""
    config = read_weights_config(folder, what, hint)
    weights = storage.local_copy(folder) / WEIGHTS_FILE
    expected = config.pop(WEIGHTS_SHA256, None)
    if expected is not None and storage.file_sha256(str(weights)) != expected:
        raise EbdError(f"{storage.join(folder, WEIGHTS_FILE)} is not the file {storage.join(folder, CONFIG_FILE)} was "
                       "written with (an export cut short, or a file replaced by hand): export the folder again")
    return config, load_file(str(weights))
