"""Capacity model: the images/s a cluster shape gives, and the CPUs per GPU that keep the decoders busy.

    .venv/bin/python bench/capacity.py [--models models/demo/ebm models/demo/ebm-cd] [--vae models/demo]
                                       [--images 384] [--no-validate]

1. Stage costs, measured here on one CPU thread per stage while every CPU of the machine runs the same
   measurement (one process each: a core's share of memory bandwidth and of a shared physical core is what an
   actor gets in a full cluster): the model's own sampler (seconds per image), the decoder (seconds per image on a
   CPU thread; on a GPU from its FLOPs per image, see 3), and the writer (PNG encoding and the shard's parquet and
   tar, seconds per image), all at the validation's batch size.
2. Prediction for a pipeline shape: every stage runs concurrently, so the throughput is the least of
   - what the CPUs give:       cpus / (sampler + writer [+ decoder, when it runs on CPUs] + framework) seconds per
                               image, where "framework" is Ray's own CPU time per shard (scheduling, moving the
                               shard between stages, the writer task's set-up, the nodes' daemons), calibrated once
                               on the cluster with a workload that is almost all framework: the CD model cut to one
                               Langevin step
   - each stage's own threads: sampler threads / sampler seconds, decoder threads / decoder seconds (or the GPUs'
     images/s), writer slots / writer seconds.
   The CPUs per GPU that keep a decoder busy: GPU images/s x (sampler + writer) CPU-seconds per image.
3. GPU rows use the capacity model `sampler_device: auto` weighs (placement.predicted_images_per_s): FLOPs per image
   (torch's FlopCounterMode) at an assumed GPU rate per precision (placement.ASSUMED_GPU_TFLOPS, or --gpu-tflops),
   never faster than a per-evaluation latency floor over the batch (--gpu-latency-ms, assumed), plus the writer's
   CPU time per image; the CPU rate is this machine's own, measured. Marked "predicted" in the table; nothing here
   measured a GPU (bench/gpu_check.py does, where one is lent). `--gpu-table-only` rewrites that table alone.
4. Validation: a two-node Ray cluster on this machine (head + worker, 1 CPU each, 127.0.0.1, as cluster/local.sh),
   jobs.generate's DAG with configs/generate.yaml's shape (sampler_actors: auto), steady-state images/s from the
   shards' finish times against the prediction for that shape, in the same run; the error is reported. The
   calibration run and the validated models are different workloads.

Writes bench/out/capacity.json and bench/capacity.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, write_result

# Stable Diffusion 1.x's VAE decoder (the architecture of bench/sd_scale.py) and TAESD's, for the table.
SD_LATENT = {256: (4, 32, 32), 512: (4, 64, 64)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=[str(REPO / "models/demo/ebm"), str(REPO / "models/demo/ebm-cd")])
    p.add_argument("--vae", default=str(REPO / "models/demo"))
    p.add_argument("--images", type=int, default=1024, help="images per validation run")
    p.add_argument("--images-per-shard", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32, help="both stages' batch, in costs and validation")
    p.add_argument("--gpu-tflops", type=float, default=None,
                   help="TFLOP/s a GPU reaches (default: placement.ASSUMED_GPU_TFLOPS at --precision)")
    p.add_argument("--precision", default="bfloat16", help="the GPU samplers' precision (auto on a bf16 GPU)")
    p.add_argument("--gpu-latency-ms", type=float, default=1.0, help="a GPU evaluation's floor per batch (assumed)")
    p.add_argument("--gpu-batch", type=int, default=256, help="chains per GPU evaluation (a shard's worth)")
    p.add_argument("--no-validate", action="store_true")
    p.add_argument("--gpu-table-only", action="store_true", help="rewrite only the GPU table of bench/capacity.md")
    p.add_argument("--output", default=str(REPO / "bench" / "out" / "capacity.json"))
    args = p.parse_args()

    from pipeline.generation.placement import ASSUMED_GPU_TFLOPS

    shape = pipeline_shape(cpus=2)
    tflops = args.gpu_tflops or ASSUMED_GPU_TFLOPS[args.precision]
    result = {"benchmark": "capacity", "gpu_assumption": {"tflops": tflops, "precision": args.precision,
                                                          "assumed": args.gpu_tflops is None,
                                                          "latency_ms": args.gpu_latency_ms, "batch": args.gpu_batch},
              "models": [], "table": gpu_table(args, tflops)}
    if args.gpu_table_only:  # the measured CPU section of the last full run stays as it is
        page = REPO / "bench" / "capacity.md"
        kept = page.read_text().split(GPU_HEADING)[0].rstrip("\n") + "\n"
        write_result(Path(args.output).with_name("capacity-gpu.json"), result)
        page.write_text(kept + gpu_markdown(result))
        return
    costs = {m: loaded_stage_costs(Path(m), args.vae, args.batch_size, os.cpu_count()) for m in args.models}
    if args.no_validate:
        result["models"] = [{"model": Path(m).name, "costs": c, "shape": shape,
                             "predicted_images_per_s": round(predict(c, shape), 2)} for m, c in costs.items()]
    else:
        with two_node_cluster() as address:
            calibration = calibrate(address, args, shape)
            result["calibration"] = calibration
            for model_dir, c in costs.items():
                c = c | {"framework_s": calibration["framework_s_per_image"]}
                entry = {"model": Path(model_dir).name, "costs": c, "shape": shape,
                         "predicted_images_per_s": round(predict(c, shape), 2)}
                entry["measured"] = validate(address, Path(model_dir), args)
                entry["error"] = round(entry["measured"]["steady_images_per_s"] / entry["predicted_images_per_s"]
                                       - 1, 3)
                result["models"].append(entry)
    write_result(args.output, result)
    (REPO / "bench" / "capacity.md").write_text(markdown(result))


# ------------------------------------------------------------------------------------------ stage costs

def loaded_stage_costs(model_dir: Path, vae_dir: str, batch: int, processes: int, sampler: dict | None = None) -> dict:
    """stage_costs measured in `processes` processes at once (every CPU busy), averaged."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        runs = pool.starmap(stage_costs, [(model_dir, vae_dir, None, batch, sampler)] * processes)
    return runs[0] | {k: round(sum(r[k] for r in runs) / len(runs), 5)
                      for k in ("sampler_s", "decode_cpu_s", "write_s")} | {"processes": processes}


def stage_costs(model_dir: Path, vae_dir: str, decoder_dir: str | None = None, batch: int = 32,
                sampler: dict | None = None) -> dict:
    """Seconds per image of each stage on one CPU thread in this process (after a warm-up of each), with the
    model's sampler (keys changed by `sampler`)."""
    import numpy as np
    import torch

    torch.set_num_threads(1)  # costs per CPU thread: a sampler or decoder actor runs int(num_cpus) threads
    from pipeline.io import image_shards as sinks
    from pipeline.models import load_model
    from pipeline.sampling.core import sample
    from pipeline.sampling.noise import chain_seed, image_key
    from pipeline.vae.autoencoder import decode, load_vae, resolve_decoder, resolve_vae, to_uint8

    model = load_model(model_dir)
    settings = model.resolve_sampler(sampler or {})
    decoder = load_vae(resolve_decoder(decoder_dir, resolve_vae(vae_dir)), torch.device("cpu"), torch.float32)
    sample(model, 2, settings)  # warm-up
    seeds = [chain_seed(0, i) for i in range(batch)]
    tick = time.perf_counter()
    z = sample(model, batch, settings, [torch.Generator().manual_seed(s) for s in seeds])
    with torch.no_grad():
        energy = model.energy(z).numpy()
    sampler_s = (time.perf_counter() - tick) / batch
    decode(decoder, z[:2])
    tick = time.perf_counter()
    pixels = to_uint8(decode(decoder, z)).permute(0, 2, 3, 1).numpy()
    decode_s = (time.perf_counter() - tick) / batch
    keys, latents = [image_key(0, i) for i in range(batch)], z.numpy().astype(np.float32)
    with tempfile.TemporaryDirectory() as work:
        sinks.write_image_shard(Path(work), 0, "both", keys, pixels, seeds, energy, "bench", extra_stats={},
                                latents=latents)
        tick = time.perf_counter()  # warm: the first shard of a process pays imports and set-up
        sinks.write_image_shard(Path(work), 1, "both", keys, pixels, seeds, energy, "bench", extra_stats={},
                                latents=latents)
        write_s = (time.perf_counter() - tick) / batch
    return {"sampler_s": round(sampler_s, 5), "decode_cpu_s": round(decode_s, 5), "write_s": round(write_s, 5),
            "sampler": settings.name, "latent_shape": list(model.config.latent_shape)}


# --------------------------------------------------------------------------------------------- the model

def pipeline_shape(cpus: float, gpus: int = 0, config: str | Path = REPO / "configs" / "generate.yaml") -> dict:
    """The DAG jobs.generate builds from `config` (sampler_actors: auto) on `cpus` CPUs and `gpus` decoder GPUs:
    its thread counts per stage."""
    from pipeline.common.config import load_config
    from pipeline.generation import GenerateConfig
    from pipeline.generation.placement import plan_placement

    cfg = load_config(GenerateConfig, config, model="m", vae="v", output="o")
    decoders = max(cfg.decoder_actors, gpus)
    cfg.decoder_actors = decoders
    samplers = plan_placement(cfg, cpus, gpus, shards=10**6).sampler_actors
    leftover = cpus - samplers * cfg.sampler_cpus - decoders * cfg.decoder_cpus
    return {"cpus": cpus, "gpus": gpus, "sampler_actors": samplers,
            "sampler_threads": samplers * max(1, int(cfg.sampler_cpus)),
            "decoder_threads": 0 if gpus else decoders * max(1, int(cfg.decoder_cpus)),
            "writer_slots": max(1, int(leftover / cfg.writer_cpus + 1e-9))}


def predict(costs: dict, shape: dict, gpu_images_per_s: float | None = None) -> float:
    """Images/s: the least of what the CPUs give and what each stage's threads (or GPUs) give."""
    on_gpu = shape["gpus"] > 0
    cpu_seconds = (costs["sampler_s"] + costs["write_s"] + costs.get("framework_s", 0.0)
                   + (0 if on_gpu else costs["decode_cpu_s"]))
    limits = [min(shape["cpus"], shape["sampler_threads"] + shape["writer_slots"] + shape["decoder_threads"])
              / cpu_seconds,
              shape["sampler_threads"] / costs["sampler_s"], shape["writer_slots"] / costs["write_s"],
              shape["gpus"] * gpu_images_per_s if on_gpu else shape["decoder_threads"] / costs["decode_cpu_s"]]
    return min(limits)


def cpus_per_gpu(costs: dict, gpu_images_per_s: float) -> float:
    """CPUs that feed one GPU decoder at its full rate."""
    return gpu_images_per_s * (costs["sampler_s"] + costs["write_s"])


def gpu_table(args, tflops: float) -> list[dict]:
    """Predicted rows, per GPU: the shipped demo energy with the demo VAE's decoder, and configs/train-sd.yaml's
    energy (random weights: its cost, not its quality) at 256 and 512 px with SD 1.x's VAE decoder and TAESD. For
    each: the sampler on CPU threads feeding a GPU decoder (the CPUs that keep one GPU busy), the sampler on the GPU
    fused with its decoder (placement.predicted_images_per_s, the rate `sampler_device: auto` weighs), and what auto
    picks on a node of 64 CPUs and 8 GPUs."""
    from dataclasses import asdict

    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny

    from pipeline.common.config import load_config
    from pipeline.generation.placement import WRITE_CPU_S_PER_PIXEL, predicted_images_per_s
    from pipeline.models import load_model
    from pipeline.sampling.cost import sampling_flops
    from pipeline.training.config import TrainConfig
    from pipeline.training.objectives import OBJECTIVES
    from pipeline.vae.autoencoder import decode_flops, load_vae, resolve_vae

    sys.path.insert(0, str(REPO / "bench"))
    from sd_scale import sd_vae_config

    torch.set_num_threads(1)  # a sampler actor's thread
    latency = args.gpu_latency_ms / 1e3
    cfg = load_config(TrainConfig, REPO / "configs" / "train-sd.yaml", latents="x", output="y")
    objective, prepared = OBJECTIVES[cfg.objective.name], {"sigma_data": 1.0, "sigma_max": 80.0}
    metadata = {"sampler": asdict(objective.sampler_settings(cfg.objective, cfg.sampler, prepared))}
    sd_decoders = {"SD 1.x VAE": AutoencoderKL(**sd_vae_config()).eval(), "TAESD": AutoencoderTiny().eval()}
    cases = [("demo energy (models/demo/ebm)", 64, load_model(REPO / "models" / "demo" / "ebm"),
              {"demo VAE": load_vae(resolve_vae(REPO / "models" / "demo"), torch.device("cpu"), torch.float32)})]
    cases += [("configs/train-sd.yaml energy", px,
               objective.build_model(cfg.objective, list(shape), prepared, metadata).eval(), sd_decoders)
              for px, shape in SD_LATENT.items()]
    rows = []
    for name, px, energy, decoders in cases:
        latent_shape = list(energy.config.latent_shape)
        sampler_s, evaluations = _sampler_seconds_per_image(energy, batch=2)
        sampler_gflop = sampling_flops(energy) / 1e9  # an energy's gradient: a forward and a backward, counted
        write_s = px * px * WRITE_CPU_S_PER_PIXEL  # PNG + shard write scales with pixels
        model_args = dict(evaluations=evaluations, gpu_latency_s=latency, gpu_batch=args.gpu_batch,
                          write_cpu_s=write_s)
        for decoder_name, decoder in decoders.items():
            decoder_gflop = decode_flops(decoder, latent_shape) / 1e9
            gpu_decode = tflops * 1e3 / decoder_gflop
            costs = {"sampler_s": sampler_s, "write_s": write_s, "decode_cpu_s": float("nan")}
            rates = {d: predicted_images_per_s(d, 64, 8, sampler_gflop, decoder_gflop, sampler_gflop / sampler_s,
                                               tflops, **model_args) for d in ("cpu", "gpu")}
            rows.append({"model": name, "resolution": px, "decoder": decoder_name, "sampler": energy.sampler.name,
                         "evaluations": evaluations, "sampler_gflop_per_image": round(sampler_gflop, 2),
                         "decoder_gflop_per_image": round(decoder_gflop, 2),
                         "sampler_cpu_s_per_image": round(sampler_s, 3),
                         "gpu_decode_images_per_s": round(gpu_decode, 1),
                         "cpus_to_keep_one_gpu_busy": round(cpus_per_gpu(costs, gpu_decode)),
                         "images_per_s_per_gpu_sampler_on_gpu": round(
                             predicted_images_per_s("gpu", 8, 1, sampler_gflop, decoder_gflop, 1, tflops,
                                                    **model_args), 1),
                         "node_64_cpus_8_gpus": {d: round(r, 1) for d, r in rates.items()},
                         "auto_picks": "gpu" if rates["gpu"] > rates["cpu"] else "cpu"})
    return rows


def _sampler_seconds_per_image(model, batch: int) -> tuple[float, int]:
    """The full sampler's seconds per image, from a run cut to 2 levels (3 gradients): the time per gradient
    evaluation does not depend on how many there are, and the full count is the sampler's own."""
    from dataclasses import replace

    import torch

    from pipeline.sampling.core import SamplerStats, sample

    full, short = SamplerStats(), SamplerStats()
    sample(model, 1, model.sampler, callback=full)  # counts the full sampler's evaluations (and warms up)
    cut = replace(model.sampler, levels=2, mala_levels=0)
    tick = time.perf_counter()
    sample(model, batch, cut, torch.Generator().manual_seed(0), callback=short)
    return (time.perf_counter() - tick) / batch / short.evaluations * full.evaluations, full.evaluations


# ---------------------------------------------------------------------------------------------- validation

def validate(address: str, model_dir: Path, args, sampler: dict | None = None) -> dict:
    """jobs.generate's DAG on the cluster at `address`: steady-state images/s from the shards' finish times."""
    import ray

    from pipeline.common.config import load_config
    from pipeline.generation import GenerateConfig, run_generation

    with tempfile.TemporaryDirectory() as work:
        ray.init(address=address, log_to_driver=False)
        try:
            cfg = load_config(GenerateConfig, REPO / "configs" / "generate.yaml", model=str(model_dir),
                              vae=args.vae, output=str(Path(work) / "out"), num_images=args.images,
                              images_per_shard=args.images_per_shard, format="both", progress_interval_s=1e9,
                              batch_size=args.batch_size, **({"langevin_steps": sampler["steps"]} if sampler else {}))
            tick = time.perf_counter()
            summary = run_generation(cfg)
            seconds = time.perf_counter() - tick
            finished = sorted(f.stat().st_mtime for f in (Path(work) / "out" / "parquet").glob("images-*.parquet"))
        finally:
            ray.shutdown()
    steady = (len(finished) - 1) * args.images_per_shard / (finished[-1] - finished[0])
    return {"images": args.images, "seconds": round(seconds, 1), "steady_images_per_s": round(steady, 2),
            "startup_s": round(seconds - (args.images - args.images_per_shard) / steady, 1),
            "batch_sizes": summary["batch_sizes"]}


def calibrate(address: str, args, shape: dict) -> dict:
    """Ray's CPU time per image beyond the stages' own, from a run that is almost all framework (the CD model cut to
    one Langevin step): what the CPUs gave minus what the stages used."""
    model, sampler = REPO / "models" / "demo" / "ebm-cd", {"steps": 1}
    costs = loaded_stage_costs(model, args.vae, args.batch_size, os.cpu_count(), sampler)
    measured = validate(address, model, args, sampler)
    stages = costs["sampler_s"] + costs["decode_cpu_s"] + costs["write_s"]
    framework = max(0.0, shape["cpus"] / measured["steady_images_per_s"] - stages)
    return {"workload": "ebm-cd, 1 Langevin step", "costs": costs, "measured": measured,
            "framework_s_per_image": round(framework, 5),
            "framework_cpu_s_per_shard": round(framework * args.images_per_shard, 3)}


class two_node_cluster:
    """A head and a worker node (1 CPU each) on 127.0.0.1 with their own temp dir and free ports."""

    def __enter__(self) -> str:
        self.temp = Path(tempfile.mkdtemp(prefix="ebdcap", dir="/tmp"))  # short: socket paths have a length limit
        ray = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--num-cpus=1",
               "--node-ip-address=127.0.0.1", "--disable-usage-stats", f"--dashboard-agent-listen-port={_port()}"]
        gcs = _port()
        self.env = dict(os.environ, RAY_AUTH_MODE="disabled")  # a private cluster on the loopback only
        self.nodes = [subprocess.Popen(ray + ["--head", f"--temp-dir={self.temp}", f"--port={gcs}",
                                              "--include-dashboard=false", f"--ray-client-server-port={_port()}"],
                                       env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       start_new_session=True)]
        _wait_for_port(gcs)
        self.nodes.append(subprocess.Popen(ray + [f"--address=127.0.0.1:{gcs}"], env=self.env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                           start_new_session=True))
        os.environ["RAY_AUTH_MODE"] = "disabled"
        import ray as ray_module

        ray_module.init(address=f"127.0.0.1:{gcs}", log_to_driver=False)
        deadline = time.monotonic() + 120
        while ray_module.cluster_resources().get("CPU", 0) < 2:
            assert time.monotonic() < deadline, "the worker node did not join within 120 s"
            time.sleep(0.5)
        ray_module.shutdown()
        return f"127.0.0.1:{gcs}"

    def __exit__(self, *exc) -> None:
        for node in reversed(self.nodes):
            os.killpg(node.pid, signal.SIGINT)
            try:
                node.wait(10)  # the whole process group is killed if it does not stop by itself
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
        shutil.rmtree(self.temp, ignore_errors=True)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


# ------------------------------------------------------------------------------------------------ report

def markdown(result: dict) -> str:
    lines = ["# Capacity model (`bench/capacity.py`)", "",
             "Stage costs measured on this machine (one CPU thread each), the prediction for the pipeline "
             "`sampler_actors: auto` builds, and the measurement on a local two-node cluster (1 CPU each) in the "
             "same run.", ""]
    if (cal := result.get("calibration")) is not None:
        lines += [f"Framework time, calibrated on {cal['workload']} (stages {cal['costs']['sampler_s']} + "
                  f"{cal['costs']['decode_cpu_s']} + {cal['costs']['write_s']} s/image, measured "
                  f"{cal['measured']['steady_images_per_s']} images/s on {result['models'][0]['shape']['cpus']:g} "
                  f"CPUs): {cal['framework_s_per_image']} CPU-s per image, {cal['framework_cpu_s_per_shard']} per "
                  "shard, added to every prediction.", ""]
    lines += ["| model | sampler s/image | decode s/image (CPU) | write s/image | shape (sampler threads, decoder "
              "threads, writer slots) | predicted images/s | measured steady images/s | error | start-up s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for m in result["models"]:
        c, s, v = m["costs"], m["shape"], m.get("measured", {})
        error = f"{m['error']:+.1%}" if "error" in m else "-"
        lines.append(f"| {m['model']} ({c['sampler']}) | {c['sampler_s']} | {c['decode_cpu_s']} | {c['write_s']} | "
                     f"{s['sampler_threads']}, {s['decoder_threads']}, {s['writer_slots']} on {s['cpus']:g} CPUs | "
                     f"{m['predicted_images_per_s']} | {v.get('steady_images_per_s', '-')} | "
                     f"{error} | "
                     f"{v.get('startup_s', '-')} |")
    return "\n".join(lines) + "\n" + gpu_markdown(result)


GPU_HEADING = "\n## Predicted, not measured"


def gpu_markdown(result: dict) -> str:
    g = result["gpu_assumption"]
    lines = [GPU_HEADING.strip("\n") + f": the sampler on GPUs ({g['tflops']:g} TFLOP/s per GPU at "
             f"{g['precision']}{', assumed' if g['assumed'] else ''}; {g['latency_ms']:g} ms per evaluation of a "
             f"batch of {g['batch']}, assumed)", "",
             "No GPU has run these. Assumed: the GPU rate (placement.ASSUMED_GPU_TFLOPS: about a third of an H100's "
             "fp32 peak, an eighth of its dense bf16 peak, for an autograd UNet with GroupNorm) and the "
             "per-evaluation latency floor (kernel launches), which caps tiny latents such as the demo's. Measured "
             "here: FLOPs per image (torch's count), the CPU rates (one thread) and the writer's CPU time per pixel. "
              "`sampler_device: auto` weighs the same model on the cluster it runs on; bench/gpu_check.py measures "
              "the assumed figures on a GPU. Rows scale linearly with GPUs up to the writer's CPU cap (8 CPUs per "
              "GPU here). The SD energy is configs/train-sd.yaml's network with random weights (its cost, not its "
              "quality).", "",
              "| model | px | decoder | sampler (evaluations) | sampler GFLOP/image | decoder GFLOP/image | sampler "
              "CPU-s/image | GPU decode images/s | CPUs to keep one GPU decoder busy | images/s per GPU, sampler on "
              "the GPU (fused) | 64 CPUs + 8 GPUs: sampler on CPUs / on GPUs | auto picks |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["table"]:
        node = r["node_64_cpus_8_gpus"]
        lines.append(f"| {r['model']} | {r['resolution']} | {r['decoder']} | {r['sampler']} ({r['evaluations']}) | "
                     f"{r['sampler_gflop_per_image']} | {r['decoder_gflop_per_image']} | "
                     f"{r['sampler_cpu_s_per_image']} | {r['gpu_decode_images_per_s']} | "
                     f"{r['cpus_to_keep_one_gpu_busy']} | {r['images_per_s_per_gpu_sampler_on_gpu']} | "
                     f"{node['cpu']} / {node['gpu']} | {r['auto_picks']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
