"""Sampler settings: one small dataclass per family of samplers, validated when built, saved with the model.

A model folder's config.json names its sampler (`"sampler": {"name": "dpmpp_2m", "levels": 10, ...}`); a job
changes keys of it (`--set sampler='{levels: 13}'`). `sampler_settings(values)` turns such a dict into the
dataclass its `name` selects; an unknown name or key, or a value out of range, is one line.

    LangevinSettings     langevin: short-run Langevin on a clean-data energy U(z) (the contrastive-divergence models)
    NoiseLevelSettings   heun, euler, ancestral, ddim, dpmpp_2m, dpmpp_3m, ipndm: from noise to data along levels, on
                         any noise-level model (an energy, a score network, a noise predictor)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from difflib import get_close_matches
from typing import Literal

from ..common import migrations
from ..common.config import ConfigError, EbdError, from_dict, quote, require

# The one list of the noise-level samplers' names (each a function in samplers.SAMPLERS).
NOISE_LEVEL_SAMPLERS = ("heun", "euler", "ancestral", "ddim", "dpmpp_2m", "dpmpp_3m", "ipndm")
# Network evaluations per chain at n levels: Heun takes two per level but the last (its final step is a
# denoising Euler step), every other noise-level sampler one.
_TWO_PER_LEVEL = {"heun"}
# Upper limits on a chain's length: a model folder or a --set is untrusted, and a chain of 10^12 levels would build
# its schedule (and hang) before any progress line. ebd's samplers take 12-49 levels; DDPM's own chain 1,000.
MAX_LEVELS = 10_000
MAX_LANGEVIN_STEPS = 100_000


@dataclass(frozen=True)
class LangevinSettings:
    """Short-run Langevin on a clean-data energy U(z) (the contrastive-divergence models)."""
    name: Literal["langevin"] = "langevin"
    steps: int = 40                  # K, Langevin steps per chain
    step_size: float = 0.1           # eta
    noise_scale: float = 0.1         # tau: 1 is true Langevin on exp(-U); < 1 is the "cold" short-run variant
    grad_clip: float | None = None   # clamp each element of grad U to [-c, c] (IGEBM); None: no clipping
    init_std: float = 1.0            # chains start from N(0, init_std^2 I) (or the model's fitted starts)
    start: Literal["model", "noise"] = "model"   # noise: N(0, init_std^2 I) even where the model fitted starts

    def validate(self) -> None:
        require(1 <= self.steps <= MAX_LANGEVIN_STEPS, f"sampler steps must be in [1, {MAX_LANGEVIN_STEPS:,}], got "
                f"{self.steps} (set the sampler section's steps, e.g. --set sampler.steps=40)")
        require(self.step_size > 0 and self.noise_scale >= 0 and self.init_std > 0,
                "sampler step_size and init_std must be > 0, noise_scale >= 0")
        require(self.grad_clip is None or self.grad_clip > 0, "sampler grad_clip must be > 0 or null")

    def gradient_evaluations(self) -> int:
        return self.steps

    def probe(self) -> "LangevinSettings":
        """The shortest run with the same memory per step (what batch-size probes run)."""
        return replace(self, steps=2)


@dataclass(frozen=True)
class NoiseLevelSettings:
    """From N(0, (s^2 + sigma_max^2) I) down a schedule of noise levels to the data, on a noise-level model."""
    name: Literal[NOISE_LEVEL_SAMPLERS] = "heun"
    levels: int = 25                 # noise levels of the schedule; network evaluations: levels (heun: 2 levels - 1)
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0                 # Karras et al. 2022: rho = 7 spends the levels where detail forms
    # karras: levels on the Karras schedule over [sigma_min, sigma_max]; model: the network's own trained timesteps
    # (a DDPM noise predictor's, spaced as DDIM spaces them; sigma_min/sigma_max are then unused); tuned: the levels
    # in `sigmas`, top to bottom, as `ebd tune-sampler` fitted them to this model (sampling/tuning.py).
    schedule: Literal["karras", "model", "tuned"] = "karras"
    sigmas: list[float] | None = None
    eta: float = 0.0                 # ddim: 0 is deterministic DDIM, 1 DDPM-like ancestral noise
    # Metropolis-adjusted Langevin corrector (uses E itself for the accept/reject test, so energies only):
    # `mala_steps` steps at each of the last `mala_levels` levels, step size mala_step_scale * sigma^2.
    mala_levels: int = 0
    mala_steps: int = 1
    mala_step_scale: float = 0.25
    # Conditional models: each condition term's weight w in E_none + w (E_c - E_none) (conditions.py); 1 is plain
    # conditioning, more sharpens it (classifier-free guidance, Ho & Salimans 2022).
    guidance: float = 1.0

    def validate(self) -> None:
        require(2 <= self.levels <= MAX_LEVELS, f"sampler levels must be in [2, {MAX_LEVELS:,}], got {self.levels} "
                "(set the sampler section's levels, e.g. --set sampler.levels=12)")
        require(self.guidance >= 0, f"sampler guidance must be >= 0, got {self.guidance}")
        require(0 < self.sigma_min < self.sigma_max, "sampler needs 0 < sigma_min < sigma_max")
        require(self.rho > 0 and self.mala_step_scale > 0, "sampler rho and mala_step_scale must be > 0")
        require(0 <= self.eta <= 1, "sampler eta must be in [0, 1]")
        if self.schedule == "tuned":
            levels = self.sigmas or []
            require(len(levels) == self.levels and all(a > b > 0 for a, b in zip(levels, levels[1:]))
                    and all(0 < x <= 1e6 for x in levels),
                    f"a tuned schedule's sigmas must be {self.levels} decreasing positive levels (one per level), got "
                    f"{quote(self.sigmas)}: for another count of levels set schedule: karras, or tune again")
        else:
            require(self.sigmas is None, "sampler sigmas are the levels of schedule: tuned only")
        require(0 <= self.mala_levels < self.levels and 1 <= self.mala_steps <= MAX_LANGEVIN_STEPS,
                "sampler mala_levels must be in [0, levels - 1] (no corrector at the top level), mala_steps >= 1")

    def gradient_evaluations(self) -> int:
        """Per chain; each MALA level adds 1 to start plus 1 per step."""
        base = 2 * self.levels - 1 if self.name in _TWO_PER_LEVEL else self.levels
        return base + self.mala_levels * (1 + self.mala_steps)

    def probe(self) -> "NoiseLevelSettings":
        return replace(self, levels=2, mala_levels=0)


SETTINGS = {"langevin": LangevinSettings, **{name: NoiseLevelSettings for name in NOISE_LEVEL_SAMPLERS}}
SamplerSettings = LangevinSettings | NoiseLevelSettings


def sampler_settings(values: dict) -> SamplerSettings:
    """The settings dataclass a saved `sampler` dict names (no name: short-run Langevin, the original). A DDIM dict
    saved before DDIM joined the noise-level family ({name: ddim, steps, eta}) means the model's own timesteps."""
    if not isinstance(values, dict):
        raise EbdError(f"a sampler is a mapping of its settings ({{name: heun, levels: 25}}), not {quote(values)}")
    values = dict(values)
    name = values.get("name", "langevin")
    if not isinstance(name, str) or name not in SETTINGS:
        raise EbdError(f"unknown sampler {quote(name)} (known: {', '.join(SETTINGS)})")
    return from_dict(SETTINGS[name], migrations.sampler_record(values) | {"name": name})


def sampler_overrides(values: dict) -> dict:
    """A job's `sampler` section (keys of the model's saved sampler to change), checked before any model is read: every
    key must be one some sampler family has and a `name` must be known; a misspelt key is one line with did-you-mean.
    Which family's keys apply, and their values, are checked once the model names its sampler (`with_overrides`)."""
    if not isinstance(values, dict):
        raise ConfigError(f"the sampler section is a mapping of keys to change ({{levels: 10}}), not {quote(values)}")
    known = {f.name for cls in set(SETTINGS.values()) for f in fields(cls)}  # DDIM's old `steps` is Langevin's key
    for key in values:
        if key not in known:
            close = get_close_matches(str(key), sorted(known), n=1)
            hint = f": did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown sampler key {quote(key, 80)}{hint} (sampler keys: {', '.join(sorted(known))})")
    name = values.get("name")
    if name is not None and (not isinstance(name, str) or name not in SETTINGS):
        raise ConfigError(f"unknown sampler {quote(name)} (known: {', '.join(SETTINGS)})")
    return dict(values)


def with_overrides(settings: SamplerSettings, overrides: dict | None, owner: str | None = None) -> SamplerSettings:
    """`settings` with some keys changed. Another `name` switches family (keys it does not know are refused), unless
    `owner` (e.g. "objective cd") says the family is fixed: then a sampler of another family is one line."""
    overrides = dict(overrides or {})
    name = overrides.get("name", settings.name)
    if owner is not None and SETTINGS.get(name) is not type(settings):
        family = [n for n, cls in SETTINGS.items() if cls is type(settings)]
        raise ConfigError(f"{owner} samples with {' or '.join(family)}, not {quote(name)}: set the sampler section's "
                          "name to one of those, or leave it out")
    # another family starts from its own defaults: the model's keys of the old one (eta, levels) mean nothing there
    base = asdict(settings) if SETTINGS.get(name) is type(settings) else {}
    if overrides.get("schedule", "tuned") != "tuned":  # leaving a tuned schedule leaves its levels behind
        base.pop("sigmas", None)
    return sampler_settings(base | migrations.sampler_overrides(overrides, name))
