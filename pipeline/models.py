"""Model folders: what every generator kind shares, and the one place that maps a folder to its class.

A model folder holds `config.json` (`_class_name`, `format`, the architecture under `model`, the sampler settings
under `sampler`, the latents it was trained on, training facts) and `model.safetensors`. `load_model(folder)` reads
`_class_name` and returns the right class; jobs never branch on a model's kind. Adding a kind means one class with
`initial_latents`, `energy` and a `CONFIG` dataclass, and one entry in `MODEL_CLASSES`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from . import storage
from .config import EbdError, from_dict, require

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


class PretrainedModel(nn.Module):
    """config.json + model.safetensors persistence (no pickle, no Ray), as a diffusers model carries its config."""

    CONFIG: type          # the architecture dataclass
    FORMAT: str           # config.json "format", checked on load
    EVALUATION_IS_GRADIENT = True   # its sampler takes input gradients: an evaluation is a forward and a backward

    def __init__(self, config, metadata: dict | None = None):
        super().__init__()
        config.validate()
        self.config = config
        self.metadata = metadata or {}   # sampler, latents (scaling factor, VAE identity, manifest), training

    @property
    def sampler(self):
        from .langevin import sampler_settings
        return sampler_settings(self.metadata.get("sampler", {}))

    def save_pretrained(self, folder: str | Path, state_dict: dict | None = None) -> Path | str:
        """Writes model.safetensors (this model's weights, or `state_dict`, e.g. EMA weights), then config.json;
        `folder` may be an object-store URI."""
        from .shards import atomic_write, atomic_write_json

        tensors = {k: v.detach().cpu().contiguous() for k, v in (state_dict or self.state_dict()).items()}
        atomic_write(storage.join(folder, WEIGHTS_FILE), lambda f: f.write(save(tensors)))
        # config.json last: a folder with a config is complete
        atomic_write_json(storage.join(folder, CONFIG_FILE), {"_class_name": type(self).__name__,
                                                              "format": self.FORMAT, "model": asdict(self.config),
                                                              **self.metadata})
        return folder if storage.is_remote(folder) else Path(folder)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: torch.device | str = "cpu") -> "PretrainedModel":
        data = read_model_config(folder)
        if data.get("format") != cls.FORMAT:
            raise EbdError(f"{Path(folder) / CONFIG_FILE} has format {data.get('format')!r}, expected {cls.FORMAT!r}")
        metadata = {k: v for k, v in data.items() if k not in ("_class_name", "format", "model")}
        model = cls(from_dict(cls.CONFIG, cls.upgrade_config(data["model"])), metadata)
        model.load_state_dict(model.upgrade_state_dict(load_file(Path(folder) / WEIGHTS_FILE)))
        return model.to(device).eval()

    def evaluation_forward(self, z: torch.Tensor) -> torch.Tensor:
        """The forward pass the sampler evaluates once per step (benchmarks count its FLOPs): the energy."""
        return self.energy(z)

    def resolve_sampler(self, overrides: dict | None = None):
        """This model's own sampler settings with `overrides` applied, validated (one line if not)."""
        from .langevin import sampler_settings
        settings = sampler_settings(asdict(self.sampler) | (overrides or {}))
        self.check_sampler(asdict(settings))
        return settings

    def check_vae(self, spec, name: str) -> None:
        """Refuses a VAE (`spec`, a VaeSpec named `name` to the user) whose latents this model was not trained on."""
        channels = self.config.latent_shape[0]
        require(spec.latent_channels == channels,
                f"the VAE has {spec.latent_channels} latent channels, the model was trained on {channels}")
        trained_on = (self.metadata.get("latents", {}).get("vae") or {}).get("weights_sha256")
        if trained_on and trained_on != spec.weights_sha256():
            raise EbdError(f"the model was trained on latents of another VAE (weights sha256 {trained_on[:12]}...), "
                           f"not {name}: decoding would give garbage")

    def check_sampler(self, settings: dict) -> None:
        """Refuses sampler settings this model cannot honour (a no-op unless a class has limits)."""

    def upgrade_state_dict(self, tensors: dict) -> dict:
        """Tensors saved by an older version, in today's layout (a no-op unless a class needs it)."""
        return tensors

    @classmethod
    def upgrade_config(cls, model: dict) -> dict:
        """config.json's `model` as an older version saved it, in today's keys (a no-op unless a class needs it)."""
        return model

    @property
    def label_vocabulary(self) -> dict[str, list[str]]:
        """The label fields and values this model can be conditioned on ({} for an unconditional model)."""
        return {}

    def conditioned(self, conditions: list[str], settings):
        """The energy the sampler runs for chains that each ask for a condition; only conditional models have
        one (generation checks `label_vocabulary` first, so users see the one-line refusal before any work)."""
        raise EbdError(f"a {type(self).__name__} takes no conditions")

    def fresh_copy(self, seed: int) -> "PretrainedModel":
        """The same architecture and settings with fresh random weights (evaluation's 'untrained' baseline);
        fitted buffers (e.g. chain starts) are kept, so only what training learned differs."""
        torch.manual_seed(seed)
        model = type(self)(self.config, self.metadata).eval()
        parameters = {name for name, _ in self.named_parameters()}
        model.load_state_dict({k: v for k, v in self.state_dict().items() if k not in parameters}, strict=False)
        return model


def read_model_config(folder: str | Path) -> dict:
    folder = storage.local_copy(folder)  # a model in an object store is read from a local cached copy
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not (config_path.is_file() and weights_path.is_file()):
        raise EbdError(f"{folder} is not an ebd model folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError:
        raise EbdError(f"{config_path} is not valid JSON") from None


def model_classes() -> dict[str, type[PretrainedModel]]:
    from .diffusion_ebm import NoiseConditionalEnergy
    from .diffusion_unet import DiffusionUNet
    from .ebm import EnergyModel
    return {cls.__name__: cls for cls in (NoiseConditionalEnergy, EnergyModel, DiffusionUNet)}


def load_model(folder: str | Path, device: torch.device | str = "cpu") -> PretrainedModel:
    """The model in `folder` (a local path or an object-store URI), whatever its kind (config.json's
    `_class_name`)."""
    folder = storage.local_copy(folder)
    name = read_model_config(folder).get("_class_name")
    classes = model_classes()
    if name not in classes:
        raise EbdError(f"{folder} holds a {name!r} model; ebd generates from {', '.join(classes)}")
    return classes[name].from_pretrained(folder, device)
