"""Every key older configs and records used, and what it means today: one module, applied only where a config or a
saved record is loaded (`JobConfig.migrate`, `sampling.settings.sampler_settings`), so nothing past loading ever
sees an old key.

    generate_config    jobs.generate: langevin_* pipeline keys (the sampler stage ran only Langevin once), and
                       `format` (one word: parquet, webdataset or both) before `formats` was a list
    train_config       jobs.train: flat objective and sampler keys, from before the config had sections
    sampler_record     a model's saved sampler: a DDIM record of {name: ddim, steps, eta}
    sampler_overrides  a job's sampler overrides: DDIM's `steps` for its levels
    batch_sizes        a generation folder's run.json: the sampler stage's size recorded as `langevin`
    done_marker        a generated shard's done marker: the sampler stage's seconds recorded as `langevin_...`
    sampler_precision  a generation folder's run.json: the sampler's resolved precision kept among its batch sizes
"""

from __future__ import annotations

from .config import ConfigError

# ------------------------------------------------------------------------------------------------ generate

RENAMED = {"langevin_actors": "sampler_actors", "langevin_cpus": "sampler_cpus",
           "langevin_batch_size": "sampler_batch_size"}
SHORT_RUN = {"langevin_steps": "steps", "langevin_step_size": "step_size", "langevin_noise_scale": "noise_scale"}


def generate_config(values: dict) -> dict:
    """Keys of older configs: langevin_actors, langevin_cpus, langevin_batch_size, and langevin_steps / _step_size /
    _noise_scale (now keys of `sampler`)."""
    values = dict(values)
    for old, new in RENAMED.items():
        if old in values:
            values.setdefault(new, values.pop(old))
    if "format" in values:  # one word before formats was a list: parquet, webdataset or both
        old = values.pop("format")
        values.setdefault("formats", ["parquet", "webdataset"] if old == "both" else [old])
    short_run = {new: values.pop(old) for old, new in SHORT_RUN.items() if old in values}
    short_run = {k: v for k, v in short_run.items() if v is not None}
    if short_run:
        values["sampler"] = short_run | dict(values.get("sampler") or {})
    return values


def batch_sizes(sizes: dict | None) -> dict | None:
    """The batch sizes a folder's run.json records (folders written before the sampler stage had its name call its
    size langevin; older folders also kept the sampler's precision among them: `sampler_precision`)."""
    if sizes and "langevin" in sizes:
        sizes = {("sampler" if k == "langevin" else k): v for k, v in sizes.items()}
    return {k: v for k, v in sizes.items() if k != "sampler_precision"} if sizes else sizes


def done_marker(stats: dict) -> dict:
    """A generated shard's done marker (OUT/stats/images-NNNNNN.json): markers written before the sampler stage had
    its name timed it as `langevin_batch_seconds`."""
    if isinstance(stats, dict) and "langevin_batch_seconds" in stats and "sampler_batch_seconds" not in stats:
        stats = {("sampler_batch_seconds" if k == "langevin_batch_seconds" else k): v for k, v in stats.items()}
    return stats


def sampler_precision(run: dict) -> str | None:
    """The precision a generation folder's sampler resolved to: run.json's own key, or the batch sizes' one in
    folders written before it had a key (None in folders from before sampler_precision)."""
    return run.get("sampler_precision") or (run.get("batch_sizes") or {}).get("sampler_precision")


# ------------------------------------------------------------------------------------------------ train

# Keys of configs written before the sections: flat key -> (section, key in it). Objective keys move only into the
# objective that read them (the others would have been refused then too).
FLAT_KEYS = {
    "dsm": {"channels": "channels", "layers_per_block": "layers_per_block", "norm_groups": "norm_groups",
            "sigma_data": "sigma_data", "sigma_min": "sigma_min", "sigma_max": "sigma_max",
            "sigma_sampling": "sigma_sampling", "sigma_p_mean": "sigma_p_mean", "sigma_p_std": "sigma_p_std",
            "condition_on": "condition_on", "label_dropout": "label_dropout"},
    "cd": {"channels": "channels", "spectral_norm": "spectral_norm", "sigma0": "sigma0", "init_rank": "init_rank",
           "init_components": "init_components", "init_fit_samples": "init_fit_samples", "alpha": "alpha",
           "buffer_size": "buffer_size", "reinit_prob": "reinit_prob",
           "energy_bound_per_dim": "energy_bound_per_dim"},
    "ddpm": {"channels": "channels", "layers_per_block": "layers_per_block", "norm_groups": "norm_groups",
             "attention": "attention", "num_train_timesteps": "num_train_timesteps", "beta_schedule": "beta_schedule"},
}
FLAT_SAMPLER_KEYS = {
    "dsm": {"sampler": "name", "sampler_levels": "levels", "sampler_rho": "rho", "mala_levels": "mala_levels",
            "mala_steps": "mala_steps", "mala_step_scale": "mala_step_scale", "guidance": "guidance"},
    "cd": {"langevin_steps": "steps", "langevin_step_size": "step_size", "langevin_noise_scale": "noise_scale",
           "langevin_grad_clip": "grad_clip", "langevin_init_std": "init_std"},
    "ddpm": {"ddim_steps": "steps", "ddim_eta": "eta"},
}
ALL_FLAT = {k for table in (*FLAT_KEYS.values(), *FLAT_SAMPLER_KEYS.values()) for k in table}
# Their defaults then: a record or config written out in full holds every flat key, the other objectives' ones at
# these values, which mean "not set".
FLAT_DEFAULTS = {
    "channels": [64, 128, 256], "layers_per_block": 1, "norm_groups": 16, "sigma_data": None, "sigma_min": 0.002,
    "sigma_max": None, "sigma_sampling": "lognormal", "sigma_p_mean": -0.5, "sigma_p_std": 1.2, "condition_on": [],
    "label_dropout": 0.3, "sampler": "heun", "sampler_levels": 25, "sampler_rho": 7.0, "mala_levels": 0,
    "mala_steps": 1, "mala_step_scale": 0.25, "guidance": 1.0, "attention": False, "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear", "ddim_steps": 50, "ddim_eta": 0.0, "spectral_norm": False, "sigma0": 1.0,
    "init_rank": None, "init_components": 1, "init_fit_samples": 10_000, "alpha": 0.001, "buffer_size": 0,
    "reinit_prob": 0.05, "energy_bound_per_dim": 5.0, "langevin_steps": 40, "langevin_step_size": 0.1,
    "langevin_noise_scale": 0.1, "langevin_grad_clip": None, "langevin_init_std": 1.0}


def train_config(values: dict) -> dict:
    """A config in today's shape: flat objective and sampler keys of an older config moved into their sections (a
    flat key that belongs to another objective than the one named is one line, as it always was)."""
    flat = {k: v for k, v in values.items() if k in ALL_FLAT and not (k == "sampler" and isinstance(v, dict))}
    if not flat:
        return values
    out = {k: v for k, v in values.items() if k not in flat}
    objective = values.get("objective", "dsm")
    section = {"name": objective} if isinstance(objective, str) else dict(objective)
    name = section.get("name", "dsm")
    sampler = dict(out.get("sampler") or {})
    for key, value in flat.items():
        if key in FLAT_KEYS.get(name, {}):
            section.setdefault(FLAT_KEYS[name][key], value)
        elif key in FLAT_SAMPLER_KEYS.get(name, {}):
            sampler.setdefault(FLAT_SAMPLER_KEYS[name][key], value)
        elif value != FLAT_DEFAULTS[key]:
            owner = " or ".join(sorted(o for o in FLAT_KEYS if key in FLAT_KEYS[o] or key in FLAT_SAMPLER_KEYS[o]))
            raise ConfigError(f"config key {key!r} applies to objective {owner}, not {name} "
                              f"(set objective: {owner}, or drop the key)")
    out["objective"] = section
    if sampler:
        out["sampler"] = sampler
    return out


# ------------------------------------------------------------------------------------------------ sampler

def sampler_record(values: dict) -> dict:
    """A saved sampler: DDIM saved before it joined the noise-level family ({name: ddim, steps, eta}) meant the
    model's own timesteps, `steps` of them."""
    if values.get("name") == "ddim" and "steps" in values:
        values = {k: v for k, v in values.items() if k != "steps"} | {"levels": values["steps"], "schedule": "model"}
    return values


def sampler_overrides(overrides: dict, name: str) -> dict:
    """A job's changes to a sampler: DDIM's `steps` is its levels (the schedule stays what the model saved)."""
    if name == "ddim" and "steps" in overrides:
        overrides = {k: v for k, v in overrides.items() if k != "steps"} | {"levels": overrides["steps"]}
    return overrides
