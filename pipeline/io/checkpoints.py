"""Training-state checkpoints (the model training loop and the VAE fit share them), never pickle.

    FOLDER/state-00001000.safetensors   the tensors: weights, EMA, optimizer state, the objective's own
    FOLDER/state.json                   written last: step and counters, the optimizer's param groups, the name of
                                        the tensor file it goes with

A checkpoint is whole or absent: the tensors go to a new file first, and only the JSON written after it (atomically)
makes them current; the previous tensor file is removed after that. A crash between the two leaves the previous
checkpoint as it was, never new weights paired with old counters. Optimizer state is stored as per-parameter
tensors under `optimizer.{param index}.{name}`, its param groups (plain numbers) in the JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from .files import atomic_write, atomic_write_json

STATE_JSON = "state.json"
LEGACY_TENSORS = "state.safetensors"   # the single tensor file of checkpoints written before the JSON named it
OPTIMIZER = "optimizer."


def save_training_state(folder: str | Path, step: int, tensors: dict[str, torch.Tensor], meta: dict,
                        optimizer: torch.optim.Optimizer | None = None) -> None:
    """Writes `tensors` (and the optimizer's state) and then `meta` as FOLDER's current checkpoint at `step`."""
    folder = Path(folder)
    tensors = dict(tensors) | (optimizer_tensors(optimizer) if optimizer is not None else {})
    name = f"state-{int(step):08d}.safetensors"
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    atomic_write(folder / name, lambda f: f.write(data))
    groups = [{k: v for k, v in g.items()} for g in optimizer.state_dict()["param_groups"]] if optimizer else None
    atomic_write_json(folder / STATE_JSON, {"meta": meta, "tensors_file": name, "optimizer_param_groups": groups})
    for old in folder.glob("state*.safetensors"):  # superseded: the JSON names the current one
        if old.name != name:
            old.unlink(missing_ok=True)


def has_training_state(folder: str | Path) -> bool:
    return (Path(folder) / STATE_JSON).is_file()


def load_training_state(folder: str | Path, optimizer: torch.optim.Optimizer | None = None,
                        device: torch.device | str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of FOLDER's checkpoint; restores `optimizer` from it when given."""
    folder = Path(folder)
    record = json.loads((folder / STATE_JSON).read_text())
    tensors = load_file(str(folder / record.get("tensors_file", LEGACY_TENSORS)))
    meta = record["meta"] if "meta" in record else {k: v for k, v in record.items()
                                                    if k != "optimizer_param_groups"}  # older layout: flat
    if optimizer is not None:
        groups = record.get("optimizer_param_groups") or optimizer.state_dict()["param_groups"]
        load_optimizer_tensors(optimizer, tensors, groups, device)
    return {k: v for k, v in tensors.items() if not k.startswith(OPTIMIZER)}, meta


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state (Adam: step, exp_avg, exp_avg_sq) as named tensors."""
    return {f"{OPTIMIZER}{index}.{name}": torch.as_tensor(value)
            for index, values in optimizer.state_dict()["state"].items() for name, value in values.items()}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], param_groups: list,
                           device: torch.device | str | None = None) -> None:
    """Restores what `optimizer_tensors` saved (other keys of `tensors` are ignored) with the given param groups."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(OPTIMIZER):
            index, name = key[len(OPTIMIZER):].split(".", 1)
            state.setdefault(int(index), {})[name] = value if device is None else value.to(device)
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
