"""Optimizer state as safetensors tensors, never pickle: the per-parameter tensors under flat names
`optimizer.{param index}.{name}`, with the param groups (plain numbers) kept by the caller in JSON.

Both training loops store Adam's state this way: train (the EBM, inside Ray Train checkpoints) and vae_fit (the demo
VAE's resumable checkpoint).
"""

from __future__ import annotations

import torch

PREFIX = "optimizer."


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state (Adam: step, exp_avg, exp_avg_sq) as named tensors."""
    return {f"{PREFIX}{index}.{name}": torch.as_tensor(value)
            for index, values in optimizer.state_dict()["state"].items() for name, value in values.items()}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], param_groups: list,
                           device: torch.device | str | None = None) -> None:
    """Restores what `optimizer_tensors` saved (other keys of `tensors` are ignored) with the given param groups."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(PREFIX):
            index, name = key[len(PREFIX):].split(".", 1)
            state.setdefault(int(index), {})[name] = value if device is None else value.to(device)
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
