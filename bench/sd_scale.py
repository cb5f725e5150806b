"""Benchmark: the Stable Diffusion path at 256 px (4 x 32 x 32 latents) on this machine, end to end.

    .venv/bin/python bench/sd_scale.py [--images 64] [--train-steps 6] [--generate 8]

No model hub is reachable here, so the VAE is Stable Diffusion 1.x's AutoencoderKL *configuration* (blocks
128/256/512/512, two layers each, 83.7M parameters) with random weights, saved in SD layout and loaded through the
same `from_pretrained` path as real weights: the times, memory and batch sizes are the real architecture's, the
images are noise. The energy is configs/train-sd.yaml's model (shrunk to one CPU worker). Measures, in one run:
- precompute: images/s of the Ray job (256 px demo renders -> 4 x 32 x 32 latents);
- training: seconds per step at batch 8 and the process's peak memory for one step, in this process;
- generation through the DAG: the probed batch sizes, sampler and decoder seconds per image, images/s;
- decoding alone, in this process: SD's decoder against TAESD's (diffusers' AutoencoderTiny with its default, TAESD
  architecture, random weights, paired with the VAE as `ebd pair-decoder` does), images/s and FLOPs per image.
Writes bench/out/sd_scale.json.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from common import REPO, write_result


def sd_vae_config() -> dict:
    """Stable Diffusion 1.x's VAE (vae/config.json of stable-diffusion-v1-5)."""
    blocks = [128, 256, 512, 512]
    return dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=blocks, layers_per_block=2,
                norm_num_groups=32, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, sample_size=512, scaling_factor=0.18215)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=6)
    p.add_argument("--generate", type=int, default=8)
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    args = p.parse_args()

    import numpy as np
    import ray
    import torch
    from diffusers import AutoencoderKL

    from pipeline.common.config import from_dict, load_config
    from pipeline.demo import render_shape_image
    from pipeline.generation import GenerateConfig, run_generation
    from pipeline.models import load_model
    from pipeline.training.config import TrainConfig
    from pipeline.training.job import run_training
    from pipeline.training.objectives.dsm import denoising_score_matching
    from pipeline.vae.autoencoder import save_sd_checkpoint
    from pipeline.vae.precompute import PrecomputeConfig, run_precompute

    torch.set_num_threads(args.cpus)
    work = Path(tempfile.mkdtemp(prefix="ebd-bench-sd-"))
    result = {"benchmark": "sd_scale", "cpus": args.cpus, "resolution": 256, "latent_shape": [4, 32, 32]}
    try:
        torch.manual_seed(0)
        vae = AutoencoderKL(**sd_vae_config())
        result["vae_parameters"] = sum(p.numel() for p in vae.parameters())
        save_sd_checkpoint(vae, work / "sd")
        del vae
        for i in range(args.images):
            image, label = render_shape_image(i, 256, seed=0)
            (work / "images" / label).mkdir(parents=True, exist_ok=True)
            image.save(work / "images" / label / f"{i:05d}.png")

        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        tick = time.perf_counter()
        run_precompute(from_dict(PrecomputeConfig, dict(
            input=str(work / "images"), vae=str(work / "sd"), output=str(work / "latents"), resolution=256,
            shard_size=args.images // 2, batch_size=8, num_cpus_per_task=args.cpus)))
        seconds = time.perf_counter() - tick
        result["precompute"] = {"images": args.images, "seconds": round(seconds, 1),
                                "images_per_s": round(args.images / seconds, 2)}

        cfg = load_config(TrainConfig, REPO / "configs" / "train-sd.yaml", latents=str(work / "latents"),
                          output=str(work / "ebm"), num_workers=1, use_gpu=False, cpus_per_worker=args.cpus,
                          batch_size=8, max_steps=args.train_steps, log_every=args.train_steps,
                          checkpoint_every=args.train_steps, warmup_steps=0, max_failures=0)
        tick = time.perf_counter()
        run_training(cfg)
        result["train_job_seconds"] = round(time.perf_counter() - tick, 1)
        model = load_model(work / "ebm" / "model")
        result["energy_parameters"] = sum(p.numel() for p in model.parameters())
        # One training step in this process: time and peak memory (ru_maxrss is the process's high-water mark).
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        z = torch.randn(8, 4, 32, 32)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        times = []
        for _ in range(3):
            tick = time.perf_counter()
            sigma = torch.exp(torch.randn(8) * 1.2 - 0.5)
            loss = denoising_score_matching(model, z, sigma, torch.randn_like(z)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - tick)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result["train_step"] = {"batch_size": 8, "seconds": round(float(np.median(times)), 2),
                                "samples_per_s": round(8 / float(np.median(times)), 2),
                                "peak_rss_gb": round(peak / 1024**2, 2),
                                "rss_growth_gb": round((peak - before) / 1024**2, 2)}
        model.eval()

        tick = time.perf_counter()
        summary = run_generation(from_dict(GenerateConfig, dict(
            model=str(work / "ebm" / "model"), vae=str(work / "sd"), output=str(work / "gen"),
            num_images=args.generate, images_per_shard=args.generate, format="parquet",
            progress_interval_s=1e9)))
        seconds = time.perf_counter() - tick
        ray.shutdown()
        busy = summary.get("stage_busy_seconds", {})
        result["generate"] = {"images": args.generate, "seconds": round(seconds, 1),
                              "images_per_s": round(args.generate / seconds, 3),
                              "batch_sizes": summary.get("batch_sizes"),
                              "gradient_evaluations_per_image": summary.get("gradient_evaluations_per_image"),
                              "sampler_seconds_per_image": round(busy.get("langevin", 0) / args.generate, 2),
                              "decode_seconds_per_image": round(busy.get("decode", 0) / args.generate, 2)}
        result["decoders"] = decoder_speeds(work / "sd", work / "taesd")
        write_result(REPO / "bench" / "out" / "sd_scale.json", result)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def decoder_speeds(sd: Path, taesd: Path, batch: int = 4) -> dict:
    """SD's decoder and TAESD's on the same 4 x 32 x 32 latents in this process: images/s, GFLOP per image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.demo import write_tiny_decoder
    from pipeline.vae.autoencoder import decode, load_vae, resolve_decoder, resolve_vae

    write_tiny_decoder(taesd, sd, seed=0)
    spec = resolve_vae(sd)
    z = torch.randn(batch, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    speeds = {}
    for name, decoder in (("sd_vae", spec), ("taesd", resolve_decoder(taesd, spec))):
        vae = load_vae(decoder, torch.device("cpu"), torch.float32)
        with FlopCounterMode(display=False) as counter:
            decode(vae, z[:1])
        tick = time.perf_counter()
        images = decode(vae, z)
        seconds = time.perf_counter() - tick
        speeds[name] = {"images_per_s": round(batch / seconds, 3), "gflop_per_image": round(
            counter.get_total_flops() / 1e9, 1), "image_side": images.shape[-1]}
    speeds["taesd_over_sd_speed"] = round(speeds["taesd"]["images_per_s"] / speeds["sd_vae"]["images_per_s"], 1)
    return speeds


if __name__ == "__main__":
    main()
