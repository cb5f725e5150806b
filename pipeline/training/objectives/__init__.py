"""Training objectives: what the training loop optimises, one module per `objective: {name: ...}` config value.

    dsm   denoising score matching on a noise-conditional energy E(z, sigma)    (`dsm.py`, the default)
    cd    contrastive divergence with short-run Langevin negatives on U(z)      (`cd.py`)
    ddpm  the noise-prediction baseline, not an energy                          (`ddpm.py`)

An objective class owns its settings (`Settings`, a dataclass that validates itself: the `objective:` section of a
training config), builds its model, turns a batch of latents into (loss, metrics, healthy), carries any state of its
own across checkpoints, and names the sampler generation will run (`sampler_settings`: its default, with the
config's `sampler:` keys changed). The loop (`training/loop.py`) knows nothing else about it. A new objective is a
module with such a class and one line in `OBJECTIVES` (or `register(cls)` from a plugin module).
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass

from ...common.config import ConfigError, from_dict
from .cd import ContrastiveDivergence
from .ddpm import NoisePrediction
from .dsm import DenoisingScoreMatching

OBJECTIVES: dict[str, type] = {cls.NAME: cls for cls in (
    DenoisingScoreMatching,
    ContrastiveDivergence,
    NoisePrediction,
)}


def register(cls: type) -> type:
    """Adds an objective (usable as a class decorator in a plugin module)."""
    OBJECTIVES[cls.NAME] = cls
    return cls


def objective_settings(value):
    """The settings dataclass of an `objective:` section: a name ("dsm"), a mapping ({name: dsm, sigma_max: 30}) or
    settings already built; unknown names and keys are one line."""
    if is_dataclass(value):
        value = asdict(value)
    values = {"name": value} if isinstance(value, str) else dict(value or {})
    name = values.setdefault("name", "dsm")
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r} (known: {', '.join(OBJECTIVES)})")
    return from_dict(OBJECTIVES[name].Settings, values)
