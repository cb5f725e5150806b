"""Weights folders: `config.json` + `model.safetensors`, the way a diffusers model carries its config.

Every network ebd saves (the generative models, the evaluator) goes through these two functions: the weights are
written first and the config last, each atomically, so a folder with a config is complete; weights load through
safetensors only (never pickle). A folder may be an object-store URI (read through a local cached copy).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from ..common.config import EbdError
from . import storage
from .files import atomic_write, atomic_write_json

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def save_weights_folder(folder: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> str | Path:
    """Writes `tensors` to FOLDER/model.safetensors, then `config` to FOLDER/config.json; returns the folder."""
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    atomic_write(storage.join(folder, WEIGHTS_FILE), lambda f: f.write(data))
    atomic_write_json(storage.join(folder, CONFIG_FILE), config)  # last: a folder with a config is complete
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
    """(config, tensors) of a weights folder, from safetensors."""
    config = read_weights_config(folder, what, hint)
    return config, load_file(str(storage.local_copy(folder) / WEIGHTS_FILE))
