"""What every model kind shares: a folder it saves to and loads from, its sampler settings, and what the sampling core
asks of it.

A model folder holds `config.json` (`_class_name`, `format`, the architecture under `model`, the sampler settings
under `sampler`, the latents it was trained on, training facts) and `model.safetensors` (`io.weights`). A kind is one
subclass with a `CONFIG` dataclass and these methods, registered in `models/__init__.py`:

    initial_latents(num, settings, generator, device)   where its chains start
    sampling_model(settings, conditions)                 itself wrapped for the samplers (`sampling.denoisers`)
    energy(z)                                            what generation records per image (NaN without an energy)
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..common.config import EbdError, from_dict, quote, require
from ..io.weights import check_tensors_fit, load_weights_folder, read_weights_config, save_weights_folder
from ..sampling.denoisers import EnergyGradient
from ..sampling.settings import SamplerSettings, sampler_settings, with_overrides


class PretrainedModel(nn.Module):
    """config.json + model.safetensors persistence (no pickle, no Ray), as a diffusers model carries its config."""

    CONFIG: type          # the architecture dataclass
    FORMAT: str           # config.json "format", checked on load
    EVALUATION_IS_GRADIENT = True   # its sampler takes input gradients: an evaluation is a forward and a backward
    HAS_ENERGY = True               # a scalar energy: Metropolis tests, composition by adding energies

    def __init__(self, config, metadata: dict | None = None):
        super().__init__()
        config.validate()
        self.config = config
        self.metadata = metadata or {}   # sampler, latents (scaling factor, VAE identity, manifest), training

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # -------------------------------------------------------------------------------------------- folders

    def save_pretrained(self, folder: str | Path, state_dict: dict | None = None) -> Path | str:
        """Writes model.safetensors (this model's weights, or `state_dict`, e.g. EMA weights), then config.json;
        `folder` may be an object-store URI."""
        config = {"_class_name": type(self).__name__, "format": self.FORMAT, "model": asdict(self.config),
                  **self.metadata}
        return save_weights_folder(folder, config, state_dict or self.state_dict())

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: torch.device | str = "cpu",
                        **_loader_options) -> "PretrainedModel":
        """`_loader_options`: what diffusers' pipeline loader passes every torch module (torch_dtype, ...); a model
        loads in float32, the precision its samplers need."""
        built = {}

        def build_and_check(data: dict, shapes: dict[str, tuple[int, ...]]) -> None:
            if data.get("format") != cls.FORMAT:
                raise EbdError(f"{Path(folder) / 'config.json'} has format {quote(data.get('format'))}, expected "
                               f"{cls.FORMAT!r}")
            if not isinstance(data.get("model"), dict):
                raise EbdError(f"{Path(folder) / 'config.json'}: 'model' must be a mapping of the architecture's "
                               f"settings, not {quote(data.get('model'))}")
            metadata = {k: v for k, v in data.items() if k not in ("_class_name", "format", "model")}
            config = from_dict(cls.CONFIG, cls.upgrade_config(data["model"]))
            try:
                with torch.device("meta"):  # names and shapes only: a config of huge widths allocates nothing here
                    meta = cls(config, metadata)
                    found = meta.upgrade_state_dict({n: torch.empty(s) for n, s in shapes.items()})
            except EbdError:
                raise
            except Exception as e:  # noqa: BLE001 - an untrusted config whose values no network can be built from
                raise EbdError(f"{Path(folder) / 'config.json'}: no {cls.__name__} builds from its 'model' "
                               f"({type(e).__name__}: {str(e)[:200]})") from None
            check_tensors_fit(Path(folder) / "model.safetensors", {n: tuple(t.shape) for n, t in found.items()},
                              {n: tuple(t.shape) for n, t in meta.state_dict().items()})
            built.update(config=config, metadata=metadata)

        _, tensors = load_weights_folder(folder, check=build_and_check)
        model = cls(built["config"], built["metadata"])
        model.load_state_dict(model.upgrade_state_dict(tensors))
        if not isinstance(model.metadata.get("sampler", {}), dict):
            raise EbdError(f"{Path(folder) / 'config.json'}: 'sampler' must be a mapping ({{name: heun, levels: 25}}), "
                           f"not {quote(model.metadata.get('sampler'))}")
        return model.to(device).eval()

    def upgrade_state_dict(self, tensors: dict) -> dict:
        """Tensors saved by an older version, in today's layout (a no-op unless a class needs it)."""
        return tensors

    @classmethod
    def upgrade_config(cls, model: dict) -> dict:
        """config.json's `model` as an older version saved it, in today's keys (a no-op unless a class needs it)."""
        return model

    # ------------------------------------------------------------------------------------------- sampling

    @property
    def sampler(self) -> SamplerSettings:
        """The sampler this model was trained for (its folder's `sampler`)."""
        return sampler_settings(self.metadata.get("sampler", {}))

    def resolve_sampler(self, overrides: dict | None = None) -> SamplerSettings:
        """This model's own sampler settings with `overrides` applied, validated (one line if not)."""
        settings = with_overrides(self.sampler, overrides, owner=f"a {type(self).__name__}")
        self.check_sampler(asdict(settings))
        return settings

    def initial_latents(self, num: int, settings, generator=None, device="cpu") -> torch.Tensor:
        """Where `num` chains start under `settings` (one generator, or one per chain)."""
        raise NotImplementedError

    def energy(self, z: torch.Tensor) -> torch.Tensor:
        """What generation records per image (B,): the energy, or NaN for a model without one."""
        raise NotImplementedError

    def check_sampler(self, settings: dict) -> None:
        """Refuses sampler settings this model cannot honour (one line; a no-op unless a class has limits)."""

    def sampling_model(self, settings, conditions: list[str] | None = None):
        """The model as samplers evaluate it (`sampling.denoisers`); only conditional models take `conditions`."""
        if conditions is not None:
            raise EbdError(f"a {type(self).__name__} takes no conditions")
        return EnergyGradient(self)

    @property
    def label_vocabulary(self) -> dict[str, list[str]]:
        """The label fields and values this model can be conditioned on ({} for an unconditional model)."""
        return {}

    def evaluation_forward(self, z: torch.Tensor) -> torch.Tensor:
        """The forward pass the sampler evaluates once per step (benchmarks count its FLOPs): the energy."""
        return self.energy(z)

    # ------------------------------------------------------------------------------------------ the rest

    def check_vae(self, spec, name: str) -> None:
        """Refuses a VAE (`spec`, a VaeSpec named `name` to the user) whose latents this model was not trained on."""
        channels = self.config.latent_shape[0]
        require(spec.latent_channels == channels,
                f"the VAE has {spec.latent_channels} latent channels, the model was trained on {channels}")
        trained_on = (self.metadata.get("latents", {}).get("vae") or {}).get("weights_sha256")
        if trained_on and trained_on != spec.weights_sha256():
            raise EbdError(f"the model was trained on latents of another VAE (weights sha256 {trained_on[:12]}...), "
                           f"not {name}: decoding would give garbage")

    def fresh_copy(self, seed: int) -> "PretrainedModel":
        """The same architecture and settings with fresh random weights (evaluation's 'untrained' baseline);
        fitted buffers (e.g. chain starts) are kept, so only what training learned differs."""
        torch.manual_seed(seed)
        model = type(self)(self.config, self.metadata).eval()
        parameters = {name for name, _ in self.named_parameters()}
        model.load_state_dict({k: v for k, v in self.state_dict().items() if k not in parameters}, strict=False)
        return model


def read_model_config(folder: str | Path) -> dict:
    """A model folder's config.json (one line if the folder is not a model folder)."""
    return read_weights_config(folder)
