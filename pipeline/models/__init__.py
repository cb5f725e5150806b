"""Model kinds: one module each, and the registry that maps a folder's `_class_name` to its class.

    noise_energy       NoiseConditionalEnergy: E(z, sigma), trained by denoising score matching (`objective: dsm`)
    short_run_energy   EnergyModel: U(z), trained by contrastive divergence with short-run Langevin (`cd`)
    noise_score        NoiseConditionalScore: eps(z, sigma), the same network with a direct output (`dsm`, output
                       score): the fair score-network baseline of the energy
    noise_predictor    DiffusionUNet: eps(z, t), the latent-diffusion baseline (`ddpm`), not an energy
    unet               the diffusers UNet2DModel the noise-level models share
    base               PretrainedModel: what every kind carries and answers

`load_model(folder)` returns the right class; jobs never branch on a model's kind. A new kind is a module with a
PretrainedModel subclass, plus one line in `KINDS` (or `register(cls)` from a plugin module, docs/model-kinds.md).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..common.config import EbdError
from ..io import storage
from .base import PretrainedModel, read_model_config
from .noise_energy import NoiseConditionalEnergy
from .noise_predictor import DiffusionUNet
from .noise_score import NoiseConditionalScore
from .short_run_energy import EnergyModel

KINDS: dict[str, type[PretrainedModel]] = {cls.__name__: cls for cls in (
    NoiseConditionalEnergy,
    NoiseConditionalScore,
    EnergyModel,
    DiffusionUNet,
)}


def register(cls: type[PretrainedModel]) -> type[PretrainedModel]:
    """Adds a model kind (usable as a class decorator in a plugin module)."""
    KINDS[cls.__name__] = cls
    return cls


def load_model(folder: str | Path, device: torch.device | str = "cpu") -> PretrainedModel:
    """The model in `folder` (a local path or an object-store URI), whatever its kind (config.json's
    `_class_name`)."""
    folder = storage.local_copy(folder)
    name = read_model_config(folder).get("_class_name")
    if name not in KINDS:
        raise EbdError(f"{folder} holds a {name!r} model; ebd generates from {', '.join(KINDS)}")
    return KINDS[name].from_pretrained(folder, device)


__all__ = ["KINDS", "PretrainedModel", "load_model", "read_model_config", "register"]
