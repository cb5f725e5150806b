"""Fits a small AutoencoderKL to an image set: the demo's stand-in for Stable Diffusion's VAE, which can't be
downloaded here. The result is an ordinary diffusers checkpoint that precompute and generate load with
`from_pretrained`, exactly like a real Stable Diffusion VAE.

    python -m jobs.fit_vae --config configs/fit-vae-demo.yaml --input build/demo/images --output models/demo

Loss per image: mse_weight * mean squared error + l1_weight * mean absolute error + edge_weight * mean absolute
error of the images' finite differences (horizontal and vertical), all of the reconstruction from a posterior
sample, + kl_weight * KL(q(z|x) || N(0, I)) summed over latent dimensions: the β-VAE form of Stable Diffusion's
first stage without its perceptual and GAN terms. Plain MSE is minimised by the blurred average of the images a
latent could mean, so thin rings and cross arms fade; the L1 and edge terms pay for sharp, well-placed edges
(the demo VAE's held-out class accuracy through the decoder is what they buy, see models/demo/README.md). After
training, `scaling_factor` = 1 / std of the posterior samples over the training images (how Stable
Diffusion's 0.18215 was chosen), so scaled latents have unit variance, which the EBM's sigma0 = 1 assumes.

Writes OUTPUT/vae/ (config.json + diffusion_pytorch_model.safetensors), OUTPUT/model_index.json (the Stable
Diffusion layout), OUTPUT/fit_vae.json (settings, steps, wall time, held-out PSNR) and OUTPUT/reconstructions.png
(held-out originals above their reconstructions). `eval_images` inputs, a seeded random sample whatever the
inputs' order (a folder tree sorted by label included), are never trained on.

Reproducible: the same inputs, config and thread count give the same weights (seeded init and batch order;
CPU kernels are deterministic). Resumable: OUTPUT/checkpoint/ (safetensors + JSON, no pickle) every
`checkpoint_every` steps; re-running the same command continues from it.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..common.config import EbdError, JobConfig, require, require_at_least
from ..common.logs import Progress, log_line
from ..common.optim import adam, learning_rate, set_learning_rate
from ..io.checkpoints import has_training_state, load_training_state, save_training_state
from ..io.files import atomic_write, atomic_write_json, file_sha256
from ..io.images import Rejected, decode_image
from ..io.pictures import preview_grid
from ..io.reading import read_items
from ..io.sources import plan_items
from .autoencoder import autoencoder_config, save_sd_checkpoint, to_uint8

CHECKPOINT_DIR = "checkpoint"
RECORD_FILE = "fit_vae.json"


@dataclass(frozen=True)
class FitVaeConfig(JobConfig):
    input: str | None = None                     # any image source precompute reads (folder, tars, parquet)
    output: str | None = None                    # checkpoint folder (gets vae/ and model_index.json)
    resolution: int = 64
    # AutoencoderKL architecture: 2 ** (len(block_out_channels) - 1) is the down-sampling factor (8, as in SD)
    block_out_channels: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_num_groups: int = 8
    # optimisation
    steps: int = 3000                            # optimisation steps
    batch_size: int = 32
    lr: float = 2e-3                             # peak; linear warm-up, then cosine decay to lr / 20
    warmup_steps: int = 100
    kl_weight: float = 1e-6
    mse_weight: float = 1.0
    l1_weight: float = 0.0
    edge_weight: float = 0.0                     # L1 on horizontal and vertical pixel differences
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 0                             # torch threads; 0: all cores
    max_images: int | None = None                # use only the first N inputs
    eval_images: int = 256                       # held out for PSNR and the reconstruction grid
    # bookkeeping
    log_every: int = 100
    checkpoint_every: int = 500
    min_side: int = 32

    def validate(self) -> None:
        for name in ("input", "output"):
            require(getattr(self, name) is not None, f"missing {name}: pass --{name} or set it in the config")
        require_at_least(self, 1, "resolution", "latent_channels", "layers_per_block", "norm_num_groups", "max_images",
                         "min_side")
        require_at_least(self, 0, "warmup_steps", "seed", "threads")
        require_at_least(self, 0, "grad_clip", strictly=True)
        factor = 2 ** (len(self.block_out_channels) - 1)
        require(len(self.block_out_channels) >= 1 and min(self.block_out_channels) >= 1,
                "block_out_channels must be a non-empty list of positive ints")
        require(all(c % self.norm_num_groups == 0 for c in self.block_out_channels),
                f"every block_out_channels entry must be divisible by norm_num_groups={self.norm_num_groups}")
        require(self.resolution % factor == 0, f"resolution {self.resolution} is not a multiple of the VAE's "
                f"down-sampling factor {factor}")
        require(self.steps >= 0 and self.batch_size >= 1 and self.lr > 0 and self.kl_weight >= 0,
                "steps >= 0, batch_size >= 1, lr > 0, kl_weight >= 0")
        require(min(self.mse_weight, self.l1_weight, self.edge_weight) >= 0
                and self.mse_weight + self.l1_weight + self.edge_weight > 0,
                "mse_weight, l1_weight and edge_weight must be >= 0 and not all 0")
        require(self.eval_images >= 1 and self.log_every >= 1 and self.checkpoint_every >= 1,
                "eval_images, log_every and checkpoint_every must be >= 1")

    def vae_config(self) -> dict:
        return autoencoder_config(self.block_out_channels, self.latent_channels, self.norm_num_groups,
                                  self.layers_per_block, self.resolution)


# ------------------------------------------------------------------------------------------------- data

def load_images(cfg: FitVaeConfig) -> tuple[torch.Tensor, list[str], dict[str, int]]:
    """Every usable input as uint8 (N, 3, H, W) in the source's order, its keys, and the rejects by reason."""
    _, items = plan_items(cfg.input)
    if cfg.max_images is not None:
        items = items[: cfg.max_images]
    pixels, keys, rejects = [], [], {}
    for loaded in read_items(items, max_file_bytes=64 * 1024 * 1024):
        try:
            if loaded.reject:
                raise Rejected(*loaded.reject)
            array, _ = decode_image(loaded.data, cfg.resolution, max_pixels=50_000_000, min_side=cfg.min_side)
        except Rejected as e:
            rejects[e.reason] = rejects.get(e.reason, 0) + 1
            continue
        pixels.append(array)
        keys.append(loaded.item.key)
    require(len(pixels) > cfg.eval_images, f"{len(pixels)} usable images under {cfg.input}: need more than "
            f"eval_images={cfg.eval_images}")
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous(), keys, rejects


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1.0


# --------------------------------------------------------------------------------------------- training

def fit_vae(cfg: FitVaeConfig) -> dict:
    """Trains (or resumes), exports the SD-layout checkpoint and returns the record written to fit_vae.json."""
    from diffusers import AutoencoderKL

    out = Path(cfg.output)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    pixels, keys, rejects = load_images(cfg)
    # A seeded random sample is held out, not the last inputs: sources list folder trees sorted by label.
    order = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(cfg.seed))
    train, held_out = pixels[order[cfg.eval_images:].sort().values], pixels[order[:cfg.eval_images].sort().values]
    data_digest = _digest(keys)
    record_path = out / RECORD_FILE
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("config") == asdict(cfg) and record.get("inputs_sha256") == data_digest:
            log_line("fit_vae", f"{out} already holds this fit ({record['steps']} steps): nothing to do")
            return record

    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(**cfg.vae_config())
    optimizer = adam(vae.parameters(), lr=cfg.lr)
    state = {"step": 0, "seconds": 0.0, "data": data_digest, "config": asdict(cfg) | {"output": None}}
    ckpt = out / CHECKPOINT_DIR
    if has_training_state(ckpt):
        _load_checkpoint(ckpt, vae, optimizer, state, data_digest, cfg)
        log_line("fit_vae", f"resumed from checkpoint at step {state['step']}")
    elif out.exists() and any(out.iterdir()) and not (out / RECORD_FILE).is_file():
        raise EbdError(f"{out} is not empty and was not written by fit_vae: choose a new --output")

    log = Progress("fit_vae", total=cfg.steps, unit="steps", interval_s=30, done=state["step"])
    log.log(f"{len(train)} training images, {len(held_out)} held out, {len(rejects)} reject reasons {rejects}; "
            f"{sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters; {cfg.steps} steps of {cfg.batch_size}")
    vae.train()
    tick = time.monotonic()
    while state["step"] < cfg.steps:
        step = state["step"]
        # The batch depends on (seed, step) only, so a resumed run draws what an uninterrupted one would.
        order = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        index = torch.randint(len(train), (cfg.batch_size,), generator=order)
        x = to_unit_range(train[index])
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=order)).sample
        mse = (reconstruction - x).pow(2).mean()
        kl = posterior.kl().mean()
        loss = cfg.mse_weight * mse + reconstruction_terms(reconstruction, x, cfg) + cfg.kl_weight * kl
        set_learning_rate(optimizer, _learning_rate(cfg, step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        optimizer.step()
        state["step"] = step + 1
        if not math.isfinite(loss.item()):
            raise EbdError(f"the loss became {loss.item()} at step {step}: lower lr or raise grad_clip's guard")
        if state["step"] % cfg.log_every == 0 or state["step"] == cfg.steps:
            log.update(cfg.log_every if state["step"] % cfg.log_every == 0 else state["step"] % cfg.log_every,
                       extra=f"mse {mse.item():.4f} kl {kl.item():.1f} lr {_learning_rate(cfg, step):.2e}",
                       force=True)
        if state["step"] % cfg.checkpoint_every == 0 and state["step"] < cfg.steps:
            state["seconds"] += time.monotonic() - tick
            tick = time.monotonic()
            _save_checkpoint(ckpt, vae, optimizer, state)
    state["seconds"] += time.monotonic() - tick

    vae.eval()
    scaling_factor = _latent_scaling_factor(vae, train, cfg.seed)
    vae.register_to_config(scaling_factor=scaling_factor)
    psnr, reconstructions = _evaluate(vae, held_out)
    export = save_sd_checkpoint(vae, out)
    grid = _reconstruction_grid(held_out[:16], reconstructions[:16])
    atomic_write(out / "reconstructions.png", lambda f: grid.save(f, format="PNG"))
    record = {"format": "ebd.fit_vae/1", "config": asdict(cfg), "steps": state["step"],
              "train_seconds": round(state["seconds"], 1), "train_images": len(train),
              "held_out_images": len(held_out), "rejects": rejects, "inputs_sha256": data_digest,
              "scaling_factor": scaling_factor, "held_out_psnr_db": round(psnr, 2),
              "latent_shape": [cfg.latent_channels] + [cfg.resolution // 2 ** (len(cfg.block_out_channels) - 1)] * 2,
              "weights_sha256": file_sha256(export / "diffusion_pytorch_model.safetensors"),
              "torch_threads": torch.get_num_threads()}
    atomic_write_json(out / RECORD_FILE, record)
    shutil.rmtree(ckpt, ignore_errors=True)  # the export supersedes it
    log.log(f"held-out PSNR {psnr:.2f} dB, scaling_factor {scaling_factor:.5f}; VAE in {export}")
    return record


def reconstruction_terms(reconstruction: torch.Tensor, x: torch.Tensor, cfg: FitVaeConfig) -> torch.Tensor:
    """The L1 and edge terms of the loss (MSE is logged separately, so it is added by the caller)."""
    loss = reconstruction.new_zeros(())
    if cfg.l1_weight:
        loss = loss + cfg.l1_weight * (reconstruction - x).abs().mean()
    if cfg.edge_weight:
        difference = reconstruction - x
        loss = loss + cfg.edge_weight * 0.5 * ((difference[..., 1:, :] - difference[..., :-1, :]).abs().mean()
                                               + (difference[..., :, 1:] - difference[..., :, :-1]).abs().mean())
    return loss


def _learning_rate(cfg: FitVaeConfig, step: int) -> float:
    return learning_rate(step, cfg.lr, cfg.warmup_steps, cfg.steps, final_lr=cfg.lr / 20)


@torch.no_grad()
def _latent_scaling_factor(vae, train: torch.Tensor, seed: int, count: int = 2048) -> float:
    """1 / std of posterior samples over (a fixed subset of) the training images, rounded for a readable config."""
    generator = torch.Generator().manual_seed(seed)
    subset = train[torch.randperm(len(train), generator=generator)[:count]]
    z = torch.cat([vae.encode(to_unit_range(subset[i:i + 256])).latent_dist.sample(generator=generator)
                   for i in range(0, len(subset), 256)])
    return float(f"{1.0 / z.std().item():.5g}")


@torch.no_grad()
def _evaluate(vae, held_out: torch.Tensor) -> tuple[float, torch.Tensor]:
    """PSNR in dB (peak 255) of posterior-mean reconstructions of the held-out images, and those images."""
    out = torch.cat([vae.decode(vae.encode(to_unit_range(held_out[i:i + 256])).latent_dist.mode()).sample
                     for i in range(0, len(held_out), 256)])
    out = to_uint8(out)
    mse = (out.float() - held_out.float()).pow(2).mean().item()
    return 10 * math.log10(255 ** 2 / max(mse, 1e-12)), out


def _reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor):
    rows = []
    for start in range(0, len(originals), 8):
        rows += [o.permute(1, 2, 0).numpy() for o in originals[start:start + 8]]
        rows += [r.permute(1, 2, 0).numpy() for r in reconstructions[start:start + 8]]
    return preview_grid(rows, columns=8)


# ------------------------------------------------------------------------------- checkpoints (no pickle)

def _save_checkpoint(folder: Path, vae, optimizer, state: dict) -> None:
    save_training_state(folder, state["step"], {f"model.{k}": v for k, v in vae.state_dict().items()}, state,
                        optimizer)


def _load_checkpoint(folder: Path, vae, optimizer, state: dict, data_digest: str, cfg: FitVaeConfig) -> None:
    tensors, saved = load_training_state(folder, optimizer)
    if saved["data"] != data_digest or saved["config"] != state["config"]:
        raise EbdError(f"{folder} holds a checkpoint of a run with other inputs or settings: use a new --output")
    vae.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state.update(saved)


def _digest(keys: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(keys).encode()).hexdigest()
