"""The pretrained VAE (diffusers' AutoencoderKL): loading from a local directory, encoding, decoding.

All latents in ebd are *scaled*: z = (x - shift_factor) * scaling_factor, the units Stable Diffusion's UNet and
diffusers' training scripts use (std ~1 instead of ~5.5 for raw SD 1.x latents). Decoding undoes exactly that.

Weights come only from local disk, in safetensors, through `from_pretrained`: either a Stable Diffusion
checkpoint folder (the VAE under `vae/`) or a VAE-only folder. A hub id is refused with a one-line error.

Generation can decode with a tiny decoder instead (diffusers' AutoencoderTiny, the TAESD layout: about 18x cheaper
than SD's decoder at the same size). It reads the same scaled latents, so it must be made for that VAE: its folder
declares the VAE it pairs with in `ebd_pairs_with.json` (`ebd pair-decoder` writes it after checking shapes).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..common.config import ConfigError, JobConfig, require
from ..io import storage

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class VaeSpec:
    """Where a VAE lives and what its config says, known without loading its weights."""
    path: str
    subfolder: str | None
    config: dict

    @property
    def directory(self) -> Path:
        """The local folder with config.json and the weights (a cached copy when `path` is an object-store URI:
        only the VAE's own subfolder is fetched, never a whole checkpoint)."""
        return storage.local_copy(storage.join(self.path, self.subfolder) if self.subfolder else self.path)

    @property
    def scaling_factor(self) -> float:
        return float(self.config.get("scaling_factor", 0.18215))

    @property
    def shift_factor(self) -> float | None:
        shift = self.config.get("shift_factor")
        return None if shift is None else float(shift)

    @property
    def class_name(self) -> str:
        return self.config.get("_class_name", "AutoencoderKL")

    @property
    def downscale_factor(self) -> int:
        if self.class_name == "AutoencoderTiny":  # one up-sampling between decoder blocks, by this factor
            steps = len(self.config.get("decoder_block_out_channels", self.config["block_out_channels"])) - 1
            return int(self.config.get("upsampling_scaling_factor", 2)) ** steps
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.config.get("latent_channels", 4))

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        side = resolution // self.downscale_factor
        return (self.latent_channels, side, side)

    def weights_sha256(self) -> str:
        """sha256 over the safetensors files of the VAE folder, in name order: the VAE's identity."""
        digest = hashlib.sha256()
        for f in sorted(self.directory.glob("*.safetensors")):
            digest.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()

    def identity(self) -> dict:
        return {"path": storage.canonical(self.path), "subfolder": self.subfolder,
                "weights_sha256": self.weights_sha256(), "scaling_factor": self.scaling_factor,
                "shift_factor": self.shift_factor, "downscale_factor": self.downscale_factor,
                "latent_channels": self.latent_channels}


def resolve_vae(path: str | Path, subfolder: str | None = "auto") -> VaeSpec:
    """Finds the VAE folder (`PATH/vae` for a Stable Diffusion checkpoint, else `PATH`) and reads its config.
    PATH may be an object-store URI: every node then reads a cached local copy of the VAE folder."""
    if storage.is_remote(path):
        if not storage.exists(path):
            raise ConfigError(f"VAE not found at {path}")
        if subfolder == "auto":
            subfolder = "vae" if storage.is_file(storage.join(path, "vae", "config.json")) else None
        folder = storage.local_copy(storage.join(path, subfolder) if subfolder else path)
        config = _read_weights_folder(folder, "AutoencoderKL", missing=f"no config.json in {path}")
        return VaeSpec(path=storage.canonical(path), subfolder=subfolder, config=config)
    root = Path(path)
    if not root.exists():
        hint = (" (looks like a hub id: ebd never downloads weights; fetch it once with "
                f"`hf download {path} vae/config.json vae/diffusion_pytorch_model.safetensors --local-dir DIR` "
                "and pass DIR)") if _looks_like_hub_id(str(path)) else ""
        raise ConfigError(f"VAE not found at {path}{hint}")
    if subfolder == "auto":
        subfolder = "vae" if (root / "vae" / "config.json").is_file() else None
    folder = root / subfolder if subfolder else root
    config = _read_weights_folder(folder, "AutoencoderKL", missing=(
        f"no config.json in {folder}: expected a diffusers AutoencoderKL folder or a Stable Diffusion checkpoint "
        "folder with vae/"))
    return VaeSpec(path=str(root), subfolder=subfolder, config=config)


def _read_weights_folder(folder: Path, class_name: str, missing: str, hint: str = "") -> dict:
    """config.json of a diffusers model folder that must hold `class_name` (a config without _class_name counts as
    AutoencoderKL) in safetensors; each way it can fail is one line (`missing`: no config.json; `hint` follows a
    wrong class)."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError(missing)
    try:
        config = json.loads(config_file.read_text())
    except ValueError:
        raise ConfigError(f"{config_file} is not valid JSON") from None
    found = config.get("_class_name", "AutoencoderKL")
    if found != class_name:
        raise ConfigError(f"{folder} holds a {found}, not an {class_name}{hint}")
    if not any(folder.glob("*.safetensors")):
        raise ConfigError(f"no .safetensors weights in {folder} (ebd loads safetensors only, never pickle)")
    return config


PAIRING_FILE = "ebd_pairs_with.json"


def resolve_decoder(path: str | Path | None, vae: VaeSpec) -> VaeSpec:
    """The decoder generation runs: the VAE itself (`path` None) or a tiny decoder (AutoencoderTiny folder) that
    declares in ebd_pairs_with.json that it was made for this VAE's latents."""
    if path is None:
        return vae
    spec = _tiny_decoder_spec(path)
    pairing_file = Path(path) / PAIRING_FILE
    if not pairing_file.is_file():
        raise ConfigError(f"{path} does not say which VAE it decodes for (no {PAIRING_FILE}): check and declare it "
                          f"with `ebd pair-decoder --decoder {path} --vae VAE_DIR`")
    pairs_with = json.loads(pairing_file.read_text()).get("vae_weights_sha256", [])
    if vae.weights_sha256() not in pairs_with:
        raise ConfigError(f"the decoder {path} was made for another VAE's latents (pairs with "
                          f"{', '.join(h[:12] + '...' for h in pairs_with) or 'none'}), not {vae.path}")
    _check_decoder_shapes(spec, vae)
    return spec


@dataclass(frozen=True)
class PairDecoderConfig(JobConfig):
    decoder: str | None = None                   # AutoencoderTiny folder (config.json + safetensors)
    vae: str | None = None                       # the VAE whose latents it decodes (SD checkpoint or VAE folder)

    def validate(self) -> None:
        for name in ("decoder", "vae"):
            require(getattr(self, name) is not None, f"missing {name}: pass --{name} or set it in the config")


def pair_decoder(decoder_dir: str | Path, vae: VaeSpec) -> Path:
    """Declares that the tiny decoder in `decoder_dir` decodes `vae`'s scaled latents (after checking their
    shapes agree): adds the VAE's weights sha256 to the folder's ebd_pairs_with.json."""
    from ..io.files import atomic_write_json

    spec = _tiny_decoder_spec(decoder_dir)
    _check_decoder_shapes(spec, vae)
    pairing_file = Path(decoder_dir) / PAIRING_FILE
    pairing = json.loads(pairing_file.read_text()) if pairing_file.is_file() else {"vae_weights_sha256": []}
    if vae.weights_sha256() not in pairing["vae_weights_sha256"]:
        pairing["vae_weights_sha256"].append(vae.weights_sha256())
    atomic_write_json(pairing_file, pairing)
    return pairing_file


def _tiny_decoder_spec(path: str | Path) -> VaeSpec:
    folder = Path(path)
    config = _read_weights_folder(folder, "AutoencoderTiny", hint=" (the VAE's own decoder needs no --decoder)",
                                  missing=f"decoder not found: no config.json in {folder} (expected an "
                                          "AutoencoderTiny folder)")
    return VaeSpec(path=str(folder), subfolder=None, config=config)


def _check_decoder_shapes(decoder: VaeSpec, vae: VaeSpec) -> None:
    if decoder.latent_channels != vae.latent_channels or decoder.downscale_factor != vae.downscale_factor:
        raise ConfigError(f"the decoder {decoder.path} reads {decoder.latent_channels}-channel latents up-sampled "
                          f"{decoder.downscale_factor}x; the VAE's are {vae.latent_channels}-channel, "
                          f"{vae.downscale_factor}x")


def _looks_like_hub_id(text: str) -> bool:
    return not os.path.isabs(text) and text.count("/") == 1 and not text.startswith(".")


def pick_device(want_gpu: bool) -> torch.device:
    """CUDA when asked for and present, else CPU: a GPU actor on a machine without CUDA still works."""
    return torch.device("cuda") if want_gpu and torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(name: str, device: torch.device, spec: "VaeSpec | None" = None) -> torch.dtype:
    """`auto`: float16 on CUDA, unless the VAE's config.json says `force_upcast: true` (SDXL's VAE overflows in
    float16 and decodes NaNs), and float32 on CPU."""
    if name == "auto":
        upcast = bool(spec is not None and spec.config.get("force_upcast"))
        return torch.float16 if device.type == "cuda" and not upcast else torch.float32
    return DTYPES[name]


def load_vae(spec: VaeSpec, device: torch.device, dtype: torch.dtype):
    """The AutoencoderKL (or, for a tiny decoder's spec, the AutoencoderTiny) from its folder, for inference."""
    import diffusers  # heavy import, only where a VAE is really loaded

    cls = {"AutoencoderKL": diffusers.AutoencoderKL, "AutoencoderTiny": diffusers.AutoencoderTiny}[spec.class_name]
    vae = cls.from_pretrained(spec.directory, torch_dtype=dtype, local_files_only=True,  # local (or cached) folder
                              use_safetensors=True, low_cpu_mem_usage=False)  # no `accelerate` needed
    return vae.to(device).eval().requires_grad_(False)


def cached_vae(spec: VaeSpec, device: torch.device, dtype_name: str):
    """One load per worker process: Ray reuses worker processes across tasks, and this cache lives in them."""
    return _cached_vae(*_cache_key(spec, device, dtype_name))


def vae_loads_in_this_process(spec: VaeSpec, device: torch.device, dtype_name: str) -> int:
    """How often this process loaded this VAE (1 when the cache works; a reused worker may hold others too)."""
    return _LOADS.get(_cache_key(spec, device, dtype_name), 0)


def _cache_key(spec: VaeSpec, device: torch.device, dtype_name: str) -> tuple:
    return spec.path, spec.subfolder, device.type, dtype_name


_LOADS: dict[tuple, int] = {}  # _cache_key -> loads in this process


@functools.lru_cache(maxsize=2)
def _cached_vae(path: str, subfolder: str | None, device_type: str, dtype_name: str):
    key = (path, subfolder, device_type, dtype_name)  # _cache_key's order: the cache's own arguments
    _LOADS[key] = _LOADS.get(key, 0) + 1
    device, spec = torch.device(device_type), resolve_vae(path, subfolder)
    return load_vae(spec, device, resolve_dtype(dtype_name, device, spec))


def image_seed(run_seed: int, key: str) -> int:
    """The seed of one image's noise, from (run seed, key) only: independent of batching and sharding."""
    return int.from_bytes(hashlib.sha256(f"{run_seed}:{key}".encode()).digest()[:8], "little") & (2**63 - 1)


@torch.inference_mode()
def encode(vae, pixels: torch.Tensor, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pixels (B, 3, H, W) in [-1, 1] -> (sampled latent, posterior mean, posterior log-variance), all scaled.

    The sample is `latent_dist.sample(generator)` with one CPU generator per image, so image i's latent depends
    only on its own seed (and is the same on CPU and GPU up to float precision).
    """
    param = next(vae.parameters())
    dist = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    sample = dist.sample(generator=generators)
    scale = vae.config.scaling_factor
    shift = vae.config.get("shift_factor") or 0.0
    logvar = dist.logvar + 2.0 * math.log(scale)  # Var[(x - shift) * s] = s^2 Var[x]
    return (sample - shift) * scale, (dist.mean - shift) * scale, logvar


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Decoded images in [-1, 1] -> uint8 pixels (same layout), rounded: the pixels every job writes or scores."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.inference_mode()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1]: `vae.decode(z / scaling_factor + shift)`.
    A tiny decoder (AutoencoderTiny, scaling_factor 1) reads the scaled latents as they are, as diffusers' pipelines
    feed it."""
    from ..common.memory import cache_sized_chunk

    param = next(vae.parameters())
    shift = vae.config.get("shift_factor") or 0.0
    z = latents.to(param.device, param.dtype) / vae.config.scaling_factor + shift
    chunk = cache_sized_chunk(param.device, len(z), z.shape[-2] * z.shape[-1] * 64)  # an 8x VAE's pixels per image
    parts = [vae.decode(part).sample.clamp(-1, 1) for part in z.split(chunk)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)  # a GPU's whole batch is not copied again


def decode_flops(vae, latent_shape) -> float:
    """FLOPs of decoding one latent of `latent_shape` (torch's FlopCounterMode: direct convolution)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        decode(vae, torch.zeros(1, *latent_shape))
    return float(counter.get_total_flops())


def decode_images(vae, latents: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Scaled latents -> uint8 images (N, 3, H, W) on the CPU, in batches, as the generation job's decoder makes
    them (evaluation and the evaluator's training decode real latents exactly so)."""
    return torch.cat([to_uint8(decode(vae, latents[a:a + batch])).cpu() for a in range(0, len(latents), batch)])


# ----------------------------------------------------------------------- making VAEs (demo, fit_vae, tests)

def autoencoder_config(block_out_channels, latent_channels: int = 4, norm_num_groups: int = 4,
                       layers_per_block: int = 1, sample_size: int = 64) -> dict:
    """AutoencoderKL keyword arguments for a small VAE: one encoder and decoder block per entry of
    `block_out_channels`, so the down-sampling factor is 2 ** (len(block_out_channels) - 1)."""
    n = len(block_out_channels)
    return dict(in_channels=3, out_channels=3, latent_channels=latent_channels,
                block_out_channels=list(block_out_channels), layers_per_block=layers_per_block,
                norm_num_groups=norm_num_groups, down_block_types=["DownEncoderBlock2D"] * n,
                up_block_types=["UpDecoderBlock2D"] * n, sample_size=sample_size)


def save_sd_checkpoint(vae, folder: str | Path) -> Path:
    """Saves `vae` as FOLDER/vae/ (safetensors) of a Stable Diffusion-layout checkpoint plus FOLDER/model_index.json,
    the layout `resolve_vae` reads. The folder is staged and renamed, so a reader never sees half of it."""
    import shutil

    from ..io.pipeline_folder import write_pipeline_index

    folder = Path(folder)
    export, staging = folder / "vae", folder / ".vae.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    vae.save_pretrained(staging, safe_serialization=True)
    shutil.rmtree(export, ignore_errors=True)
    staging.replace(export)
    # An ebd pipeline folder (pipeline.api.EBDPipeline), not a StableDiffusionPipeline: it has no UNet or text
    # encoder. Components already listed (e.g. the model in ebm/) are kept.
    write_pipeline_index(folder, vae=["diffusers", "AutoencoderKL"])
    return export
