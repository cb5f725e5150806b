"""The energy-based model over scaled VAE latents: U(z) = E_theta(z) + ||z||^2 / (2 sigma0^2).

Energy convention: low energy = data-like; p(z) ~ exp(-U(z)). (The original project's "score" is minus this
energy.) E_theta is a small convolutional network (SiLU, optional spectral norm, no batch norm, so a sample's
energy never depends on its batch) over C x h x w latents of any size; the Gaussian base term keeps Langevin
chains bounded where the network has not learned anything yet.

Like a diffusers model, it carries its config: `save_pretrained(dir)` writes `config.json` (architecture, latent
shape, scaling factor, sampler settings, VAE identity, latents manifest hash) and `model.safetensors`;
`EnergyModel.from_pretrained(dir)` needs neither Ray nor pickle.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from .config import EbdError, from_dict, require
from .langevin import SamplerSettings, initial_noise

MODEL_FORMAT = "ebd.ebm/1"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


@dataclass
class EnergyModelConfig:
    latent_shape: list[int] = field(default_factory=lambda: [4, 64, 64])  # C, h, w of the scaled latents
    channels: list[int] = field(default_factory=lambda: [64, 128, 256])  # one residual stage per entry
    spectral_norm: bool = False
    sigma0: float = 1.0              # std of the Gaussian base density, in scaled-latent units
    # Where Langevin chains start. None: N(0, init_std^2 I). r: a Gaussian fitted to the training latents (mean +
    # top-r principal directions + isotropic rest), so chains start with the data's mean and correlations and the
    # network only has to refine them (an initialiser, as VAEBM or cooperative learning use a generator for one).
    init_rank: int | None = None

    def validate(self) -> None:
        require(len(self.latent_shape) == 3 and min(self.latent_shape) >= 1, "latent_shape must be [C, h, w]")
        require(len(self.channels) >= 1 and min(self.channels) >= 1, "channels must be a non-empty list of ints")
        require(self.sigma0 > 0, "sigma0 must be > 0")
        require(self.init_rank is None or 1 <= self.init_rank <= math.prod(self.latent_shape),
                "init_rank must be null or in [1, latent dims]")


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, wrap):
        super().__init__()
        self.conv1 = wrap(nn.Conv2d(c_in, c_out, 3, padding=1))
        self.conv2 = wrap(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = wrap(nn.Conv2d(c_in, c_out, 1)) if c_in != c_out else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x):
        return self.skip(x) + self.conv2(self.act(self.conv1(self.act(x))))


class EnergyModel(nn.Module):
    def __init__(self, config: EnergyModelConfig, metadata: dict | None = None):
        super().__init__()
        config.validate()
        self.config = config
        self.metadata = metadata or {}   # sampler, latents (scaling factor, VAE identity, manifest), training
        wrap = _spectral_norm if config.spectral_norm else (lambda m: m)
        c_latent, h, _ = config.latent_shape
        self.stem = wrap(nn.Conv2d(c_latent, config.channels[0], 3, padding=1))
        blocks, c_prev, side = [], config.channels[0], h
        for c in config.channels:
            blocks.append(_ResBlock(c_prev, c, wrap))
            if side >= 8:  # downsample while there is room: large latents get cheap deep features
                blocks.append(nn.AvgPool2d(2))
                side //= 2
            c_prev = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), wrap(nn.Linear(c_prev, 1)))
        if config.init_rank:  # filled by fit_initializer before training; saved with the weights
            dims = math.prod(config.latent_shape)
            self.register_buffer("init_mean", torch.zeros(config.latent_shape))
            self.register_buffer("init_factor", torch.zeros(dims, config.init_rank))
            self.register_buffer("init_residual_std", torch.zeros(()))

    def network_energy(self, z: torch.Tensor) -> torch.Tensor:
        """E_theta(z), shape (B,)."""
        return self.head(self.blocks(self.stem(z))).squeeze(1)

    def base_energy(self, z: torch.Tensor) -> torch.Tensor:
        return z.flatten(1).pow(2).sum(1) / (2 * self.config.sigma0 ** 2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """U(z) = E_theta(z) + ||z||^2 / (2 sigma0^2), shape (B,)."""
        return self.network_energy(z) + self.base_energy(z)

    def initial_latents(self, num: int, init_std: float, generator=None, device="cpu") -> torch.Tensor:
        """Chain starts: N(0, init_std^2 I), or the fitted Gaussian mean + init_std (F w + r eps) when init_rank is
        set (init_std < 1 narrows it around the mean, a truncation). With one generator per chain, chain i's start
        depends only on its own generator."""
        shape = tuple(self.config.latent_shape)
        if not self.config.init_rank:
            return initial_noise((num, *shape), init_std, generator, device)
        w = initial_noise((num, self.config.init_rank), 1.0, generator, device)
        rest = initial_noise((num, *shape), 1.0, generator, device)
        spread = (w @ self.init_factor.T).reshape(num, *shape) + self.init_residual_std * rest
        return self.init_mean + init_std * spread

    def fit_initializer(self, latents: torch.Tensor) -> None:
        """Sets the chain-start Gaussian from training latents (N, C, h, w): mean, top init_rank principal
        directions scaled by their standard deviations, and the remaining variance spread evenly."""
        rank = self.config.init_rank
        flat = latents.flatten(1).double()
        require(len(flat) >= 2, "fitting the chain-start Gaussian needs at least 2 latents")
        mean = flat.mean(0)
        centred = (flat - mean) / (len(flat) - 1) ** 0.5
        if rank >= min(centred.shape) // 2:
            _, s, vh = torch.linalg.svd(centred, full_matrices=False)
            v = vh.T
        else:  # Stable Diffusion-sized latents: a randomized low-rank SVD instead of a full one
            _, s, v = torch.svd_lowrank(centred, q=rank, niter=4)
        s, v = s[:rank], v[:, :rank]
        factor = torch.zeros(flat.shape[1], rank, dtype=torch.float64)
        factor[:, : len(s)] = v * s
        rest = (centred.pow(2).sum() - s.pow(2).sum()).clamp(min=0) / flat.shape[1]
        self.init_mean.copy_(mean.reshape(self.init_mean.shape))
        self.init_factor.copy_(factor)
        self.init_residual_std.copy_(rest.sqrt())

    # ---------------------------------------------------------------------------------------- persistence

    @property
    def sampler(self) -> SamplerSettings:
        return from_dict(SamplerSettings, self.metadata.get("sampler", {}))

    def save_pretrained(self, folder: str | Path, state_dict: dict | None = None) -> Path:
        """Writes config.json and model.safetensors (this model's weights, or `state_dict`, e.g. EMA weights)."""
        from .shards import atomic_write, atomic_write_json

        folder = Path(folder)
        tensors = {k: v.detach().cpu().contiguous() for k, v in (state_dict or self.state_dict()).items()}
        atomic_write(folder / WEIGHTS_FILE, lambda f: f.write(save(tensors)))
        atomic_write_json(folder / CONFIG_FILE, {"_class_name": "EnergyModel", "format": MODEL_FORMAT,
                                                 "model": asdict(self.config), **self.metadata})
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: torch.device | str = "cpu") -> "EnergyModel":
        folder = Path(folder)
        config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        if not (config_path.is_file() and weights_path.is_file()):
            raise EbdError(f"{folder} is not an ebd model folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        data = json.loads(config_path.read_text())
        if data.get("format") != MODEL_FORMAT:
            raise EbdError(f"{config_path} has format {data.get('format')!r}, expected {MODEL_FORMAT!r}")
        metadata = {k: v for k, v in data.items() if k not in ("_class_name", "format", "model")}
        model = cls(from_dict(EnergyModelConfig, data["model"]), metadata)
        model.load_state_dict(load_file(weights_path))
        return model.to(device).eval()

