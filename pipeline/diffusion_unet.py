"""The baseline: a latent diffusion model as the seeds trained it, a diffusers UNet2DModel predicting the noise.

    training   t ~ U{0, ..., T - 1}, z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps (DDPMScheduler.add_noise),
               loss = mean (eps_theta(z_t, t) - eps)^2 (Ho et al. 2020)
    sampling   DDIM (Song et al. 2021) from N(0, I) in `steps` network evaluations (`langevin.ddim`)

It is not an energy model: it has no scalar energy, so no Metropolis test and no composition; generation records
NaN in the energy column. It exists so that the energy models are compared with a working peer on the same latents,
decoder and machine (`bench/compare.py`). The noise schedule is Stable Diffusion's (scaled linear betas 0.00085 to
0.012 over 1000 steps), which suits unit-variance latents.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import require
from .langevin import initial_noise
from .models import PretrainedModel


@dataclass
class DiffusionUNetConfig:
    latent_shape: list[int] = field(default_factory=lambda: [4, 64, 64])
    channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    layers_per_block: int = 1
    norm_groups: int = 16
    attention: bool = False              # a self-attention block in the UNet's middle (forward only: no limit here)
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"

    def validate(self) -> None:
        validate_latent_unet(self.latent_shape, self.channels, self.layers_per_block, self.norm_groups)
        require(self.num_train_timesteps >= 2 and 0 < self.beta_start < self.beta_end < 1,
                "need num_train_timesteps >= 2 and 0 < beta_start < beta_end < 1")
        require(self.beta_schedule in ("linear", "scaled_linear", "squaredcos_cap_v2"),
                "beta_schedule must be linear, scaled_linear or squaredcos_cap_v2")


class DiffusionUNet(PretrainedModel):
    CONFIG, FORMAT = DiffusionUNetConfig, "ebd.unet/1"
    EVALUATION_IS_GRADIENT = False  # DDIM runs the network forward only

    def __init__(self, config: DiffusionUNetConfig, metadata: dict | None = None):
        super().__init__(config, metadata)
        self.net = latent_unet(config.latent_shape, config.channels, config.layers_per_block, config.norm_groups,
                               attention=config.attention)

    def scheduler_config(self) -> dict:
        c = self.config
        return {"num_train_timesteps": c.num_train_timesteps, "beta_start": c.beta_start, "beta_end": c.beta_end,
                "beta_schedule": c.beta_schedule, "clip_sample": False, "prediction_type": "epsilon"}

    def training_scheduler(self):
        from diffusers import DDPMScheduler
        return DDPMScheduler(**self.scheduler_config())

    def sampling_scheduler(self):
        """DDIM as Stable Diffusion runs it: the last step lands on the data (set_alpha_to_one false, offset 1)."""
        from diffusers import DDIMScheduler
        return DDIMScheduler(**self.scheduler_config(), set_alpha_to_one=False, steps_offset=1)

    def forward(self, z: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """eps_theta(z_t, t), the predicted noise."""
        return self.net(z, t).sample

    def energy(self, z: torch.Tensor) -> torch.Tensor:
        """A noise predictor has no energy: NaN per sample (the energy column stays, empty)."""
        return torch.full((len(z),), float("nan"))

    def evaluation_forward(self, z: torch.Tensor) -> torch.Tensor:
        return self(z, torch.zeros(len(z), dtype=torch.long))

    def initial_latents(self, num: int, settings, generator=None, device="cpu") -> torch.Tensor:
        return initial_noise((num, *self.config.latent_shape), 1.0, generator, device)


def validate_latent_unet(latent_shape: list[int], channels: list[int], layers_per_block: int,
                         norm_groups: int) -> None:
    """The shape rules of `latent_unet`, as one-line config errors."""
    require(len(latent_shape) == 3 and min(latent_shape) >= 1, "latent_shape must be [C, h, w]")
    require(len(channels) >= 1 and all(c >= 1 and c % norm_groups == 0 for c in channels),
            f"channels must be a non-empty list of multiples of norm_groups ({norm_groups})")
    require(all(side % 2 ** (len(channels) - 1) == 0 for side in latent_shape[1:]),
            f"latent sides {latent_shape[1:]} must be divisible by 2^(stages - 1) = "
            f"{2 ** (len(channels) - 1)}: use fewer channels entries")
    require(layers_per_block >= 1, "layers_per_block must be >= 1")


def latent_unet(latent_shape: list[int], channels: list[int], layers_per_block: int, norm_groups: int,
                attention: bool = False, context: bool = False):
    """The diffusers UNet2DModel both latent models use (the baseline's noise predictor, the energy's g): one
    down/up stage per `channels` entry, latent channels in and out, the noise level as its timestep input.

    `context`: the net takes a context embedding (`class_labels`, shape (B, 4 x channels[0])) that is added to the
    noise-level embedding, and every res-block turns that sum into a per-channel scale and shift of its normalised
    features (FiLM, ADM's "scale_shift"): the context is multiplied into the features, not only added."""
    from diffusers import UNet2DModel

    stages = len(channels)
    return UNet2DModel(
        sample_size=latent_shape[1], in_channels=latent_shape[0], out_channels=latent_shape[0],
        block_out_channels=tuple(channels), layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D",) * stages, up_block_types=("UpBlock2D",) * stages,
        norm_num_groups=norm_groups, add_attention=attention,
        **({"class_embed_type": "identity", "resnet_time_scale_shift": "scale_shift"} if context else {}))


def context_dim(channels: list[int]) -> int:
    """The width of `latent_unet`'s noise-level (and context) embedding: diffusers' 4 x the first stage."""
    return 4 * channels[0]


def noise_prediction_loss(model: DiffusionUNet, scheduler, z: torch.Tensor, t: torch.Tensor,
                          eps: torch.Tensor) -> torch.Tensor:
    """Per-sample mean (eps_theta(z_t, t) - eps)^2 (Ho et al. 2020's simple loss)."""
    noisy = scheduler.add_noise(z, eps, t)
    return (model(noisy, t) - eps).flatten(1).pow(2).mean(1)
