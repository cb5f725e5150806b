"""The network the noise-level models share: a diffusers UNet2DModel over latents (the baseline's noise predictor,
the energy's residual g), with the noise level as its timestep input."""

from __future__ import annotations

from ..common.config import require


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
