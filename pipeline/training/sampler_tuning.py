"""The sampler's levels fitted to a trained model (`ebd tune-sampler`): `sampling.tuning.fit_levels` run on a model
folder, and the result written into the folder's config.json, so `generate` samples with the fitted levels and no
flag. What it did is recorded beside the sampler (`sampler_tuning`): the method, the grid, the chains, and the summed
local error of the fitted levels against the Karras schedule's with as many levels."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import torch

from ..common.config import EbdError, JobConfig, require
from ..io import storage
from ..io.files import atomic_write_json, read_json
from ..sampling.settings import NoiseLevelSettings
from ..sampling.tuning import GRID, fit_levels


@dataclass(frozen=True)
class TuneSamplerConfig(JobConfig):
    model: str | None = None       # the model folder whose sampler is tuned (its config.json is rewritten in place)
    levels: int = 6                # levels of the fitted schedule: gradient evaluations per image (one per level)
    chains: int = 64               # chains the teacher trajectory is solved for
    grid: int = GRID               # fine levels of the teacher (2 x grid - 1 gradients per chain)
    seed: int = 0                  # the chains' seed (the fitted levels depend on it only through those chains)
    threads: int = 0               # torch threads (0: torch's default)

    def validate(self) -> None:
        require(self.model is not None, "missing model: pass --model or set it in the config")
        require(2 <= self.levels < self.grid <= 1000, "levels must be in [2, grid - 1] and grid at most 1,000")
        require(1 <= self.chains <= 4096 and self.seed >= 0 and self.threads >= 0,
                "chains must be in [1, 4096], seed and threads >= 0")


def tune_sampler(cfg: TuneSamplerConfig) -> dict:
    """Fits the levels, rewrites MODEL/config.json's `sampler` (schedule: tuned) and `sampler_tuning`; returns the
    record."""
    from ..models import load_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = load_model(cfg.model)
    settings = model.sampler
    if not isinstance(settings, NoiseLevelSettings) or settings.schedule == "model":
        raise EbdError(f"{cfg.model} samples with {settings.name}"
                       f"{' on its own timesteps' if isinstance(settings, NoiseLevelSettings) else ''}: only a "
                       "noise-level sampler on a continuous schedule (karras or tuned) has levels to fit")
    tick = time.perf_counter()
    base = replace(settings, schedule="karras", sigmas=None)  # the grid spans the model's own noise range
    sigmas, record = fit_levels(model, base, cfg.levels, chains=cfg.chains, seed=cfg.seed, grid=cfg.grid)
    tuned = replace(base, levels=cfg.levels, schedule="tuned", sigmas=sigmas)
    record |= {"seconds": round(time.perf_counter() - tick, 1), "sampler": tuned.name, "replaced": asdict(settings)}
    path = storage.join(storage.canonical(cfg.model), "config.json")
    config = read_json(path)
    config |= {"sampler": asdict(tuned), "sampler_tuning": record}
    atomic_write_json(path, config)
    return record
