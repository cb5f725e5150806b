"""Bulk generation: a streaming Ray Data DAG of sampler actors -> decoder actors -> shard writers.

    shards to make --> SamplerStage  (CPU actors, or GPU shares)  the model's own sampler (sampling.core): latents
                   --> DecodeStage   (GPU actors when the cluster has GPUs, else CPU)  uint8 images
                   --> write_shard   (tasks)  PNG -> parquet and/or tar, atomically, then a done marker

With the sampler on GPUs (`sampler_device`, placement.py) the first two stages may be one: SampleDecodeStage
samples a shard and decodes it on the same GPU.

One row is one output shard (images [j * S, (j + 1) * S)). Ray Data's streaming executor runs the stages
concurrently with backpressure, so no stage holds more than a few shards. Image i's key and noise seed derive
from (run seed, i) and every chain uses its own generator, so any shard regenerated alone is byte-identical.
Each stage's batch size is probed once per run against its memory budget and recorded in OUT/run.json; a resumed
run reuses it. Re-running the same command skips complete shards and ends with exactly N images.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from ..common.config import EbdError, JobConfig, require
from ..common.logs import Progress, log_line
from ..common.plugins import import_plugins
from ..io import image_shards, storage
from ..io.files import atomic_write, atomic_write_json, claim_run_folder, file_sha256, read_json
from ..io.pictures import preview_grid
from ..sampling.conditions import check_condition, conditions_for, load_plan, parse_condition
from ..sampling.noise import image_key
from .cluster import connect

RUN_FILE = "run.json"


@dataclass
class GenerateConfig(JobConfig):
    model: str | None = None                     # a trained model folder (config.json + model.safetensors), any kind
    vae: str | None = None                       # local SD checkpoint folder or AutoencoderKL folder
    # A tiny decoder (AutoencoderTiny folder paired with the VAE, see `ebd pair-decoder`) to decode with instead of
    # the VAE's own decoder: about 18x fewer FLOPs at Stable Diffusion's sizes, softer images.
    decoder: str | None = None
    output: str | None = None
    num_images: int | None = None                # null: 1000, or the conditions' total
    # Conditional models (conditions.py): one condition for every image ("shape=ring AND background=checker"), or a
    # mix, condition -> count (a mapping, or the path of a YAML/JSON file of one; read once, when the config loads).
    condition: str | None = None
    conditions: dict[str, int] | str | None = None
    seed: int = 0
    format: Literal["parquet", "webdataset", "both"] = "both"
    images_per_shard: int = 256
    save_latents: bool = True                    # each latent too (parquet: float32 array, tar: float16 .npy)
    # Sampler: the model's saved settings, with these keys changed (e.g. {levels: 10} or {mala_levels: 3}; a
    # short-run (cd) model is only valid under its training settings, so change those knowingly).
    sampler: dict[str, Any] = field(default_factory=dict)
    # Pipeline shape. Defaults fit a 2-CPU machine without deadlock: 1 + 0.5 + 0.25 CPUs. `sampler_actors: auto`
    # starts as many sampler actors as the cluster's CPUs hold beside the decoders and one writer (at most one per
    # shard); each runs int(sampler_cpus) torch threads, at least one.
    sampler_actors: int | Literal["auto"] = 1
    sampler_cpus: float = 1.0
    decoder_actors: int = 1
    decoder_cpus: float = 0.5
    decoder_gpus: float | Literal["auto"] = "auto"  # auto: 1 per decoder actor when the cluster has GPUs
    writer_cpus: float = 0.25
    # Where the sampler runs (placement.py): cpu (actors of sampler_cpus feed the decoders), gpu (actors of
    # sampler_gpus, a share of a GPU; gpu_stage fused: each also decodes its shards, separate: decoder actors of
    # their own), or auto (whichever the predicted images/s favours, from the model's FLOPs per image and the two
    # assumed rates below; the summary records the choice and why). Samples are reproducible within a device type.
    sampler_device: Literal["auto", "cpu", "gpu"] = "cpu"
    sampler_gpus: float = 1.0
    gpu_stage: Literal["fused", "separate"] = "fused"
    # The sampler's arithmetic (common/precision.py): auto (bfloat16 where the device has it natively: a CUDA GPU
    # with bf16, a CPU with AVX512-BF16 or AMX; else float32), float32 (exact on CUDA too: no TF32), tf32 (CUDA),
    # bfloat16, or float16 (CUDA; float32 on a CPU). The run records what auto chose, so a resume keeps it.
    sampler_precision: Literal["auto", "float32", "tf32", "bfloat16", "float16"] = "auto"
    # The capacity model `auto` weighs (placement.py): null measures a CPU thread on the driver with the model's own
    # evaluation, and takes the GPU rate for the run's precision from placement.ASSUMED_GPU_TFLOPS (an assumption
    # until bench/gpu_check.py measures a GPU: set the figure bench/gpu.md gives).
    cpu_gflops: float | None = None
    gpu_tflops: float | None = None
    gpu_latency_ms: float = 1.0                  # a GPU evaluation's floor (kernel launches), whatever the batch
    # Batch sizes: null probes each stage's memory once per run (no timing: the same command picks the same size on
    # the same machine under any load); --batch-size sets both.
    batch_size: int | None = None
    sampler_batch_size: int | None = None
    decode_batch_size: int | None = None
    ram_budget_gb: float = 2.0                   # per CPU actor
    # Of each actor's GPU share (sampler_gpus, decoder_gpus) of the GPU's total memory, enforced in the actor; a fused
    # actor splits it evenly between sampling and decoding.
    gpu_memory_fraction: float = 0.8
    max_batch_size: int = 512                    # the largest probed batch on a GPU
    cpu_max_batch_size: int = 64                 # ... on a CPU, where bigger ones stop paying (bench/sampler_speed.md)
    vae_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # Metrics
    plugins: list[str] = field(default_factory=list)  # modules to import first: they register model kinds
    metrics_port: int | None = None              # serve ebd_* metrics on this port (0: any free port)
    metrics_host: str = "127.0.0.1"
    pushgateway: str | None = None               # push final values here when the job ends
    metrics_linger_s: float = 0.0                # keep the endpoint up this long after the end (one scrape)
    progress_interval_s: float = 5.0
    simulate_oom_above: int | None = None        # testing: the decoder runs out of memory above this batch (0: always)
    simulate_gpu_memory_gb: float | None = None  # testing: a GPU stage on a CPU sizes against this much "GPU memory"

    @classmethod
    def migrate(cls, values: dict) -> dict:
        """Keys of older configs: langevin_actors, langevin_cpus, langevin_batch_size (the sampler stage ran only
        Langevin once), and langevin_steps / _step_size / _noise_scale (now keys of `sampler`)."""
        values = dict(values)
        for old, new in RENAMED.items():
            if old in values:
                values.setdefault(new, values.pop(old))
        short_run = {new: values.pop(old) for old, new in SHORT_RUN.items() if old in values}
        short_run = {k: v for k, v in short_run.items() if v is not None}
        if short_run:
            values["sampler"] = short_run | dict(values.get("sampler") or {})
        return values

    def validate(self) -> None:
        for name in ("model", "vae", "output"):
            require(getattr(self, name) is not None, f"missing {name}: pass --{name} or set it in the config")
        import_plugins(self.plugins)  # they may register the model kind the model folder names
        plan = load_plan(self.condition, self.conditions)
        if plan is not None and self.condition is None:  # a mix: its counts are the images
            self.conditions = dict(plan)
            total = sum(n for _, n in plan)
            require(self.num_images in (None, total), f"num_images ({self.num_images}) disagrees with the conditions' "
                    f"total ({total}): drop num_images, or change the counts")
            self.num_images = total
        self.num_images = 1000 if self.num_images is None else self.num_images
        require(self.num_images >= 1 and self.images_per_shard >= 1, "num_images and images_per_shard must be >= 1")
        require((self.sampler_actors == "auto" or self.sampler_actors >= 1) and self.decoder_actors >= 1,
                "actor counts must be >= 1 (sampler_actors may be auto)")
        require(self.sampler_cpus > 0 and self.decoder_cpus > 0 and self.writer_cpus > 0, "CPU shares must be > 0")
        require(self.decoder_gpus == "auto" or self.decoder_gpus >= 0, "decoder_gpus must be >= 0 or auto")
        require(self.sampler_gpus > 0 and (self.cpu_gflops or 1) > 0 and (self.gpu_tflops or 1) > 0
                and self.gpu_latency_ms >= 0, "sampler_gpus, cpu_gflops and gpu_tflops must be > 0 (or null), "
                "gpu_latency_ms >= 0")
        for name in ("batch_size", "sampler_batch_size", "decode_batch_size"):
            require(getattr(self, name) is None or getattr(self, name) >= 1, f"{name} must be >= 1 or null")
        require(self.simulate_oom_above is None or self.simulate_oom_above >= 0, "simulate_oom_above must be >= 0")
        require(self.ram_budget_gb > 0 and 0 < self.gpu_memory_fraction <= 1 and self.max_batch_size >= 1
                and self.cpu_max_batch_size >= 1, "ram_budget_gb > 0, gpu_memory_fraction in (0, 1], max_batch_size "
                "and cpu_max_batch_size >= 1")
        require(self.simulate_gpu_memory_gb is None or self.simulate_gpu_memory_gb > 0,
                "simulate_gpu_memory_gb must be > 0")
        require(self.metrics_port is None or 0 <= self.metrics_port < 65536, "metrics_port must be a port number")


RENAMED = {"langevin_actors": "sampler_actors", "langevin_cpus": "sampler_cpus",
           "langevin_batch_size": "sampler_batch_size"}
SHORT_RUN = {"langevin_steps": "steps", "langevin_step_size": "step_size", "langevin_noise_scale": "noise_scale"}


# ------------------------------------------------------------------------------------------------ stages

def _threads(cpus: float) -> int:
    return max(1, int(cpus))


class SamplerStage:
    """Sampler actor: one shard's latents through the one sampling core (`sampling.core.sample_latents`), on CUDA
    when the actor got a GPU share and CUDA exists, else on CPU tensors (one log line says so)."""

    def __init__(self, model_dir: str, sampler: dict, seed: int, images_per_shard: int, num_images: int,
                 batch_size: int, threads: int, plan: list | None = None, plugins: list[str] | None = None,
                 use_gpu: bool = False, precision: str = "float32", progress=None, gpu_share: float = 0.0,
                 gpu_fraction: float = 0.8, shard_chunks: dict | None = None):
        import ray
        import torch

        from ..common.memory import limit_gpu_memory
        from ..common.metrics import StageMetrics
        from ..common.precision import resolve_precision
        from ..models import load_model
        from ..sampling.settings import sampler_settings
        from ..vae.autoencoder import pick_device

        torch.set_num_threads(threads)
        import_plugins(plugins or [])
        self.device = pick_device(use_gpu)
        limit_gpu_memory(self.device, gpu_share, gpu_fraction)  # Ray's GPU shares do not limit memory: this does
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        if use_gpu and self.device.type == "cpu":
            log_line("generate", f"sampler actor on GPU {','.join(self.gpu_ids) or '?'}: torch sees no CUDA here, "
                                 "so it samples on CPU tensors")
        self.precision = resolve_precision(self.device, precision)  # what the shard's stats record
        self.shard_chunks = shard_chunks or {}  # shard -> the chunk sizes it was made with (a remade shard's)
        self.model = load_model(model_dir, self.device)
        self.progress = progress  # the run's ProgressCounter actor (None outside jobs.generate)
        self.sampler = sampler_settings(sampler)
        self.seed, self.per_shard, self.num_images, self.batch_size = seed, images_per_shard, num_images, batch_size
        self.plan = plan  # [[condition, count], ...] of a conditional run, else None
        self.metrics = StageMetrics("sampler")

    def __call__(self, batch: dict) -> dict:
        from ..sampling.core import sample_latents

        rows = {"shard": [], "latents": [], "info": []}
        for shard in batch["shard"]:
            start = int(shard) * self.per_shard
            count = min(self.per_shard, self.num_images - start)
            conditions = conditions_for(self.plan, start, count) if self.plan else None
            self.metrics.busy(1)
            shrinks: list[int] = []
            samples = sample_latents(self.model, range(start, start + count), self.seed, self.sampler, conditions,
                                     self.batch_size, device=self.device, on_chunk=self._sampled,
                                     precision=self.precision,
                                     chunks=self.shard_chunks.get(str(int(shard)), {}).get("sampler"),
                                     on_oom=shrinks.append)
            self.batch_size = min([self.batch_size, *shrinks])  # out of memory once: the smaller size from now on
            self.metrics.busy(0)
            z = samples.latents.cpu().numpy()
            rows["shard"].append(int(shard))
            rows["latents"].append(z.tobytes())
            rows["info"].append(json.dumps({
                "count": count, "latent_shape": list(z.shape[1:]), "seeds": samples.seeds,
                "energy": samples.energies.cpu().tolist(), "sampler_batch_seconds": samples.chunk_seconds,
                "sampler_chunks": samples.chunk_sizes, "sampler_batch_size": self.batch_size,
                "sampler_oom_shrinks": shrinks,
                "gradient_evaluations": samples.evaluations, "sampler_device": self.device.type,
                "sampler_gpu_ids": self.gpu_ids, "sampler_precision": self.precision,
                "mala_accepted": samples.accepted, "mala_proposed": samples.proposed}
                | ({"conditions": conditions} if conditions else {})))
        return {"shard": np.array(rows["shard"]), "latents": np.array(rows["latents"], dtype=object),
                "info": np.array(rows["info"], dtype=object)}


    def _sampled(self, size: int, seconds: float) -> None:
        self.metrics.batch(size, seconds)
        if self.progress is not None:
            self.progress.add.remote("sampled", size)


class DecodeStage:
    """Decoder actor: `vae.decode(z / scaling_factor)` on CUDA when the actor got a GPU and CUDA exists, else CPU.
    `decoder` is the VAE's spec, or a tiny decoder's (resolve_decoder checked it on the driver)."""

    def __init__(self, decoder, dtype: str, use_gpu: bool, batch_size: int, threads: int,
                 simulate_oom_above: int | None, progress=None, gpu_share: float = 0.0, gpu_fraction: float = 0.8,
                 shard_chunks: dict | None = None):
        import ray
        import torch

        from ..common.memory import limit_gpu_memory
        from ..common.metrics import StageMetrics
        from ..vae.autoencoder import load_vae, pick_device, resolve_dtype

        torch.set_num_threads(threads)
        self.device = pick_device(use_gpu)
        if gpu_share:  # a fused actor's sampler set the same process-wide cap already
            limit_gpu_memory(self.device, gpu_share, gpu_fraction)
        self.shard_chunks = shard_chunks or {}
        self.vae = load_vae(decoder, self.device, resolve_dtype(dtype, self.device, decoder))
        self.batch_size, self.simulate_oom_above = batch_size, simulate_oom_above
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        self.metrics = StageMetrics("decode")
        self.progress = progress  # the run's ProgressCounter actor (None outside jobs.generate)

    def __call__(self, batch: dict) -> dict:
        import torch

        from ..common.memory import SimulatedOutOfMemory, run_in_chunks
        from ..common.precision import exact_float32
        from ..vae.autoencoder import decode, to_uint8

        infos, images = [], []
        for shard, latents, info_text in zip(batch["shard"], batch["latents"], batch["info"]):
            info = json.loads(info_text)
            z = torch.from_numpy(np.frombuffer(latents, dtype=np.float32).copy()).reshape(info["count"],
                                                                                         *info["latent_shape"])
            seconds: list[float] = []
            shrinks: list[int] = []

            def work(a: int, b: int):
                if self.simulate_oom_above is not None and b - a > self.simulate_oom_above:
                    raise SimulatedOutOfMemory(b - a, self.simulate_oom_above)
                tick = time.perf_counter()
                with exact_float32(self.device, "float32"):  # a float32 VAE decodes in float32, not TF32
                    out = to_uint8(decode(self.vae, z[a:b])).permute(0, 2, 3, 1).cpu().numpy()
                seconds.append(time.perf_counter() - tick)
                self.metrics.batch(b - a, seconds[-1])
                if self.progress is not None:
                    self.progress.add.remote("decoded", b - a)  # fire and forget: progress moves per batch
                return out

            self.metrics.busy(1)
            chunks, sizes = run_in_chunks(info["count"], self.batch_size, work, on_oom=shrinks.append,
                                          chunks=self.shard_chunks.get(str(int(shard)), {}).get("decode"))
            self.batch_size = min([self.batch_size, *shrinks])  # out of memory once: the smaller size from now on
            self.metrics.busy(0)
            pixels = np.concatenate(chunks)
            info |= {"image_shape": list(pixels.shape[1:]), "decode_batch_seconds": seconds, "decode_chunks": sizes,
                     "decode_batch_size": self.batch_size, "decode_oom_shrinks": shrinks,
                     "decode_device": self.device.type, "decode_gpu_ids": self.gpu_ids}
            infos.append(json.dumps(info))
            images.append(pixels.tobytes())
        # The latents ride along to the writer, which stores them beside the images when save_latents is on.
        return {"shard": batch["shard"], "images": np.array(images, dtype=object),
                "latents": batch["latents"], "info": np.array(infos, dtype=object)}


class ProgressCounter:
    """Ray actor (no CPU): images sampled and decoded so far in this run, added to per batch by the stages, read by
    the driver every second, so progress lines and ebd_images_generated_total move per batch, not per written shard
    (a shard of 256 images can take minutes)."""

    def __init__(self):
        self.counts = {"sampled": 0, "decoded": 0}

    def add(self, stage: str, n: int) -> None:
        self.counts[stage] += n

    def totals(self) -> dict:
        return dict(self.counts)


class SampleDecodeStage:
    """GPU actor (`gpu_stage: fused`): samples a shard and decodes it on the same GPU, so its latents never leave
    the process."""

    def __init__(self, sampler: dict, decoder: dict):
        self.sample, self.decode = SamplerStage(**sampler), DecodeStage(**decoder)

    def __call__(self, batch: dict) -> dict:
        return self.decode(self.sample(batch))


def write_shard(batch: dict, output: str, fmt: str, seed: int, images_per_shard: int, model_id: str,
                save_latents: bool) -> dict:
    """Writer task: PNG-encodes one shard's images and writes its files, then its done marker."""
    stats = []
    for shard, images, latents, info_text in zip(batch["shard"], batch["images"], batch["latents"], batch["info"]):
        info = json.loads(info_text)
        pixels = np.frombuffer(images, dtype=np.uint8).reshape(info["count"], *info["image_shape"])
        z = np.frombuffer(latents, dtype=np.float32).reshape(info["count"], *info["latent_shape"]) \
            if save_latents else None
        start = int(shard) * images_per_shard
        keys = [image_key(seed, i) for i in range(start, start + info["count"])]
        extra = {k: v for k, v in info.items()
                 if k not in ("seeds", "energy", "latent_shape", "image_shape", "conditions")}
        result = image_shards.write_image_shard(output, int(shard), fmt, keys, pixels, info["seeds"],
                                         np.asarray(info["energy"]), model_id, extra, latents=z,
                                         conditions=info.get("conditions"))
        stats.append(json.dumps(result))
    return {"stats": np.array(stats, dtype=object)}


# ------------------------------------------------------------------------------------------ batch probes

def probe_sampler_batch(model_dir: str, sampler: dict, budget_bytes: int, max_batch: int, threads: int,
                        condition: str | None = None, plugins: list[str] | None = None, use_gpu: bool = False,
                        gpu_share: float = 0.0, gpu_fraction: float = 0.8, stages: int = 1,
                        precision: str = "float32", simulated_gpu_bytes: int | None = None) -> dict:
    """Ray task (the sampler actors' resources): the largest chain batch that fits the stage's budget (RAM on a CPU,
    its share of the GPU on CUDA), under the run's widest condition (each term is one more forward per gradient),
    and the precision `precision` resolves to on that device."""
    import torch

    from ..common.precision import resolve_precision
    from ..models import load_model
    from ..sampling.core import sample_latents
    from ..sampling.settings import sampler_settings
    from ..vae.autoencoder import pick_device

    torch.set_num_threads(threads)
    import_plugins(plugins or [])
    device = pick_device(use_gpu)
    model = load_model(model_dir, device)
    probe = sampler_settings(sampler).probe()  # memory per step does not grow with the number of steps or levels
    resolved = resolve_precision(device, precision)
    found = _probe(lambda n: sample_latents(model, range(n), 0, probe, None if condition is None else [condition] * n,
                                            device=device, precision=resolved),
                   device, budget_bytes, max_batch, gpu_share, gpu_fraction, stages, simulated_gpu_bytes)
    return found | {"precision": resolved}


def probe_decode_batch(decoder, dtype: str, use_gpu: bool, latent_shape: list, budget_bytes: int, max_batch: int,
                       threads: int, simulate_oom_above: int | None, gpu_share: float = 0.0,
                       gpu_fraction: float = 0.8, stages: int = 1, simulated_gpu_bytes: int | None = None) -> dict:
    """Ray task (a decoder actor's resources): the largest decode batch that fits the stage's budget."""
    import torch

    from ..common.memory import SimulatedOutOfMemory
    from ..vae.autoencoder import decode, load_vae, pick_device, resolve_dtype

    torch.set_num_threads(threads)
    device = pick_device(use_gpu)
    vae = load_vae(decoder, device, resolve_dtype(dtype, device, decoder))

    def work(n: int):
        if simulate_oom_above is not None and n > simulate_oom_above:
            raise SimulatedOutOfMemory(n, simulate_oom_above)
        decode(vae, torch.randn(n, *latent_shape, device=device))

    return _probe(work, device, budget_bytes, max_batch, gpu_share, gpu_fraction, stages, simulated_gpu_bytes)


def _probe(work, device, budget_bytes: int, max_batch: int, gpu_share: float, gpu_fraction: float, stages: int,
           simulated_gpu_bytes: int | None) -> dict:
    """`probe_batch_size` against the stage's budget: its share of the GPU's total memory (of `simulated_gpu_bytes`
    in tests) x the fraction, split among the actor's stages, or `budget_bytes` of RAM; {"out_of_memory": why}
    when one item does not fit."""
    import torch

    from ..common.memory import ProbeOutOfMemory, gpu_budget_bytes, limit_gpu_memory, probe_batch_size

    if gpu_share and (device.type == "cuda" or simulated_gpu_bytes):
        total = simulated_gpu_bytes or torch.cuda.mem_get_info(device)[1]
        budget_bytes = gpu_budget_bytes(total, gpu_share, gpu_fraction, stages)
        limit_gpu_memory(device, gpu_share, gpu_fraction)  # as the actor will run
    try:
        return probe_batch_size(work, device, budget_bytes, max_batch=max_batch)
    except ProbeOutOfMemory as e:
        return {"out_of_memory": str(e), "budget_bytes": int(budget_bytes)}


# ------------------------------------------------------------------------------------------------ driver

def run_generation(cfg: GenerateConfig, address: str | None = None, dashboard: bool = False) -> dict:
    """Runs (or resumes) generation; returns the summary."""

    from ..common.metrics import DriverMetrics
    from ..models import load_model
    from ..vae.autoencoder import resolve_decoder, resolve_vae

    import_plugins(cfg.plugins)

    model = load_model(cfg.model)
    spec = resolve_vae(cfg.vae)
    model.check_vae(spec, cfg.vae)
    decoder = resolve_decoder(cfg.decoder, spec)  # the VAE itself, or a tiny decoder made for its latents
    latent_shape = list(model.config.latent_shape)
    vae_identity = spec.identity()
    sampler = asdict(model.resolve_sampler(cfg.sampler))  # validated: one line if not
    plan = run_plan(cfg, model)  # conditions checked against the model's labels: one line, before any work
    model_dir = storage.canonical(cfg.model)
    weights = storage.local_copy(model_dir) / "model.safetensors"  # load_model's cached copy: not fetched twice
    model_id = f"{storage.name(model_dir)}-{file_sha256(weights)[:12]}"
    out = storage.canonical(cfg.output)
    storage.check_writable(out)  # one line before any work: no such bucket, no permission
    num_shards = math.ceil(cfg.num_images / cfg.images_per_shard)

    run = _claim_output(out, cfg, sampler, model_id, vae_identity, decoder, plan)  # refusals before Ray starts
    connect(address, dashboard=dashboard)
    done = {j: s for j in range(num_shards) if (s := image_shards.completed_shard(out, j, cfg.format)) is not None}
    pending = [j for j in range(num_shards) if j not in done]
    placement = place_stages(cfg, model, decoder, max(1, len(pending)), run.get("sampler_device"))
    batch_sizes = _recorded_batch_sizes(run) or _choose_batch_sizes(cfg, sampler, decoder, latent_shape, placement,
                                                                    plan)
    if "batch_sizes" not in run:
        atomic_write_json(storage.join(out, RUN_FILE), run | {"batch_sizes": batch_sizes,
                                                             "sampler_device": placement.sampler_device})
    # A shard remade (cut short or changed after its marker) is cut into the chunks it was first made with.
    shard_chunks = {str(j): c for j in pending if (c := image_shards.recorded_chunks(out, j)) is not None}
    asked = cfg.batch_size or cfg.sampler_batch_size or cfg.decode_batch_size
    if "batch_sizes" in run and asked and asked not in (batch_sizes["sampler"], batch_sizes["decode"]):
        log_line("generate", f"resuming with this folder's batch sizes {batch_sizes['sampler']}/"
                 f"{batch_sizes['decode']}, not {asked}: shards stay byte-identical that way")

    metrics = DriverMetrics()
    port = metrics.serve(cfg.metrics_port, cfg.metrics_host) if cfg.metrics_port is not None else None
    log = Progress("generate", total=cfg.num_images, unit="images", interval_s=cfg.progress_interval_s,
                   done=sum(s["count"] for s in done.values()))
    log.log(f"{cfg.num_images} images in {num_shards} shards -> {out}; {len(done)} complete, {len(pending)} to make; "
            f"batch sizes sampler={batch_sizes['sampler']} decode={batch_sizes['decode']}; {placement.describe()} "
            f"({placement.reason})"
            + (f"; metrics on http://{cfg.metrics_host}:{port}/metrics" if port is not None else ""))
    start = time.monotonic()
    watcher = None
    try:
        if pending:
            import ray

            counter = ray.remote(num_cpus=0)(ProgressCounter).remote()
            watcher = _ProgressWatcher(counter, metrics, log, lambda: f"shards {len(done)}/{num_shards}",
                                       cfg.num_images - sum(s["count"] for s in done.values()))
            dataset = _build_dag(cfg, pending, sampler, decoder, placement, batch_sizes, model_id, plan, counter,
                                 shard_chunks)
            in_flight = len(pending)
            metrics.set_in_flight(in_flight)
            try:
                for batch in dataset.iter_batches(batch_size=1, batch_format="numpy"):
                    for text in batch["stats"]:
                        stats = json.loads(text)
                        done[stats["shard"]] = stats
                        metrics.record_shard(stats)
                        in_flight -= 1
                        metrics.set_in_flight(in_flight)
            except Exception as e:  # a stage's own EbdError (e.g. non-finite chains) as its one line
                raise _stage_error(e) or e
            watcher.finish(made=sum(done[j]["count"] for j in pending))
        seconds = time.monotonic() - start
        finished = storage.join(out, "summary.json")
        if not pending and storage.is_file(finished) and storage.is_file(storage.join(out, "manifest.json")):
            log.log("every shard is complete: nothing to do (summary.json keeps the run that made them)")
            return read_json(finished) | {"images_this_run": 0}
        summary = _finish(out, cfg, done, num_shards, sampler, model_id, vae_identity, batch_sizes, placement,
                          seconds, made=sum(done[j]["count"] for j in pending), latent_shape=latent_shape,
                          decoder=decoder, plan=plan)
        log.log(f"done: {summary['images']} images in {len(done)} shards; {summary['images_per_second']:.2f} images/s "
                f"this run; preview {storage.join(out, 'preview.png')}")
        if cfg.pushgateway:
            try:
                metrics.push(cfg.pushgateway)
            except Exception as e:  # noqa: BLE001 - the images are safe: a monitoring fault does not fail the job
                log.log(f"warning: the final metrics were not pushed to {cfg.pushgateway} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}); the images are written and complete")
        if port is not None and cfg.metrics_linger_s > 0:
            time.sleep(cfg.metrics_linger_s)  # lets a scraper read the final values before the endpoint closes
        return summary
    finally:
        if watcher is not None:
            watcher.stop()
        metrics.shutdown()


class _ProgressWatcher:
    """A driver thread that reads the ProgressCounter every second into the progress lines and the metrics."""

    def __init__(self, counter, metrics, log: Progress, extra, to_make: int):
        import threading

        self.counter, self.metrics, self.log, self.extra, self.seen = counter, metrics, log, extra, 0
        self.to_make, self.sampled = to_make, 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ebd-progress", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.wait(1.0):
            self._poll()

    def _poll(self, floor: int = 0, force: bool = False) -> None:
        import ray

        totals = ray.get(self.counter.totals.remote())
        total = max(int(totals["decoded"]), floor)
        if total > self.seen or totals["sampled"] > self.sampled or force:
            self.sampled = totals["sampled"]
            self.metrics.record_decoded(total - self.seen)
            sampling = f"sampled {self.sampled}/{self.to_make}; " if total < self.to_make else ""
            self.log.update(total - self.seen, extra=sampling + self.extra(), force=force)
            self.seen = total

    def finish(self, made: int) -> None:
        """The last reading, at least the images written this run (an increment still in flight counts too)."""
        self.stop()
        self._poll(floor=made, force=True)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)


def _recorded_batch_sizes(run: dict) -> dict | None:
    """The batch sizes a folder's run.json records (folders written before the sampler stage had its name call its
    size langevin)."""
    sizes = run.get("batch_sizes")
    if sizes and "langevin" in sizes:
        sizes = {("sampler" if k == "langevin" else k): v for k, v in sizes.items()}
    return sizes


def run_plan(cfg: GenerateConfig, model) -> list[list] | None:
    """[[condition, count], ...] in image order for a conditional run (None otherwise), each condition checked
    against the labels `model` was trained on."""
    plan = load_plan(cfg.condition, cfg.conditions)
    if plan is None:
        return None
    if cfg.condition is not None:
        plan[0][1] = cfg.num_images
    for text, _ in plan:
        check_condition(parse_condition(text), model.label_vocabulary, storage.name(storage.canonical(cfg.model)))
    return plan


def place_stages(cfg: GenerateConfig, model, decoder, shards: int, recorded: str | None = None):
    """The DAG's shape on the connected cluster (placement.plan_placement); `auto` on a cluster with GPUs weighs the
    model's and the decoder's FLOPs per image, counted here once."""
    import ray

    from .placement import plan_placement

    def costs() -> dict:
        import torch

        from ..sampling.cost import cpu_gflops, evaluation_flops
        from ..vae.autoencoder import decode_flops, load_vae
        from .placement import WRITE_CPU_S_PER_PIXEL

        vae = load_vae(decoder, torch.device("cpu"), torch.float32)
        settings = model.resolve_sampler(cfg.sampler)
        evaluations = settings.gradient_evaluations()
        pixels = math.prod(model.config.latent_shape[1:]) * decoder.downscale_factor ** 2
        return {"sampler_gflop": evaluation_flops(model, settings) * evaluations / 1e9, "evaluations": evaluations,
                "decoder_gflop": decode_flops(vae, model.config.latent_shape) / 1e9,
                "cpu_gflops": cfg.cpu_gflops or cpu_gflops(model, settings),
                "write_cpu_s": pixels * WRITE_CPU_S_PER_PIXEL}

    resources = ray.cluster_resources()
    return plan_placement(cfg, resources.get("CPU", 0), resources.get("GPU", 0), shards, costs, recorded)


def decoded_shards(cfg: GenerateConfig, shards: list[int], sampler: dict, decoder, placement, batch_sizes: dict,
                   plan: list | None = None, progress=None, shard_chunks: dict | None = None):
    """The DAG's first two stages as a Ray Dataset: one row per shard {shard, latents, images, info}. `decoder`: the
    VaeSpec to decode with (the VAE, or a tiny decoder paired with it); `placement`: where they run (placement.py);
    `plan`: a conditional run's conditions."""
    import ray
    from ray.data import ActorPoolStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the job prints its own progress (a bar on a terminal, else lines) ...
    ctx.raise_original_map_exception = True  # a stage's own EbdError reaches the driver as itself (one line)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # ... so Ray's "bars disabled" is noise
    items = ray.data.from_items([{"shard": j} for j in shards], override_num_blocks=len(shards))
    on_gpu = placement.sampler_device == "gpu"
    sampling = dict(model_dir=storage.canonical(cfg.model), sampler=sampler, seed=cfg.seed,
                    images_per_shard=cfg.images_per_shard, num_images=cfg.num_images,
                    batch_size=batch_sizes["sampler"], threads=_threads(cfg.sampler_cpus), plan=plan,
                    plugins=cfg.plugins, use_gpu=on_gpu, progress=progress, gpu_share=placement.sampler_gpus,
                    precision=batch_sizes.get("sampler_precision", cfg.sampler_precision),
                    gpu_fraction=cfg.gpu_memory_fraction, shard_chunks=shard_chunks)
    decoding = dict(decoder=_absolute(decoder), dtype=cfg.vae_dtype, batch_size=batch_sizes["decode"],
                    simulate_oom_above=cfg.simulate_oom_above, progress=progress, gpu_fraction=cfg.gpu_memory_fraction,
                    shard_chunks=shard_chunks)
    samplers = ActorPoolStrategy(size=placement.sampler_actors)
    if placement.fused:
        return items.map_batches(
            SampleDecodeStage, batch_size=1, compute=samplers, num_cpus=cfg.sampler_cpus,
            num_gpus=placement.sampler_gpus,
            fn_constructor_kwargs=dict(sampler=sampling, decoder=decoding | dict(use_gpu=True,
                                                                                threads=_threads(cfg.sampler_cpus))))
    decoding["gpu_share"] = placement.decoder_gpus
    latents = items.map_batches(SamplerStage, batch_size=1, compute=samplers, num_cpus=cfg.sampler_cpus,
                                num_gpus=placement.sampler_gpus if on_gpu else None,
                                fn_constructor_kwargs=sampling)
    return latents.map_batches(
        DecodeStage, batch_size=1, compute=ActorPoolStrategy(size=placement.decoder_actors),
        num_cpus=cfg.decoder_cpus, num_gpus=placement.decoder_gpus,
        fn_constructor_kwargs=decoding | dict(use_gpu=placement.decoder_gpus > 0,
                                              threads=_threads(cfg.decoder_cpus)))


def _absolute(spec):
    """The spec with an absolute path (or its URI): Ray workers may run in another working directory."""
    from dataclasses import replace
    return replace(spec, path=storage.canonical(spec.path))


def _build_dag(cfg: GenerateConfig, pending: list[int], sampler: dict, decoder, placement, batch_sizes: dict,
               model_id: str, plan: list | None, progress=None, shard_chunks: dict | None = None):
    return decoded_shards(cfg, pending, sampler, decoder, placement, batch_sizes, plan, progress,
                          shard_chunks).map_batches(
        write_shard, batch_size=1, num_cpus=cfg.writer_cpus,
        fn_kwargs=dict(output=storage.canonical(cfg.output), fmt=cfg.format, seed=cfg.seed,
                       images_per_shard=cfg.images_per_shard, model_id=model_id, save_latents=cfg.save_latents))


def _choose_batch_sizes(cfg: GenerateConfig, sampler: dict, decoder, latent_shape: list, placement,
                        plan: list | None = None) -> dict:
    """Configured sizes, or one probe per stage run with that stage's own resources, against its own budget (a
    fused GPU actor's two stages split its share), one after another where they share a GPU; and the precision
    `sampler_precision` resolves to where the samplers run. Probes on GPUs run in workers that exit afterwards
    (max_calls=1), so no idle process keeps GPU memory while the actors run."""
    import ray

    sampler_size = cfg.sampler_batch_size or cfg.batch_size
    decode = cfg.decode_batch_size or cfg.batch_size
    budget = int(cfg.ram_budget_gb * 1024**3)
    simulated = int(cfg.simulate_gpu_memory_gb * 1024**3) if cfg.simulate_gpu_memory_gb else None
    on_gpu = placement.sampler_device == "gpu"
    sampler_gpus = placement.sampler_gpus if on_gpu else 0.0
    decode_gpus = placement.sampler_gpus if placement.fused else placement.decoder_gpus
    stages = 2 if placement.fused else 1
    found = {}

    def cap(gpus: float) -> int:
        return cfg.max_batch_size if gpus else min(cfg.max_batch_size, cfg.cpu_max_batch_size)

    def run(fn, cpus: float, gpus: float, *args):  # max_calls goes in the decorator: Ray refuses it in .options()
        task = ray.remote(max_calls=1)(fn) if gpus else ray.remote(fn)
        try:
            return ray.get(task.options(num_cpus=cpus, num_gpus=gpus or None).remote(*args))
        except Exception as e:  # the probe's own EbdError (e.g. non-finite chains) as its one line
            raise _stage_error(e) or e

    if sampler_size is None or cfg.sampler_precision == "auto":
        found["sampler"] = run(
            probe_sampler_batch, cfg.sampler_cpus, sampler_gpus, storage.canonical(cfg.model), sampler, budget,
            cap(sampler_gpus) if sampler_size is None else 1, _threads(cfg.sampler_cpus),
            max((text for text, _ in plan), key=lambda t: len(parse_condition(t))) if plan else None, cfg.plugins,
            on_gpu, sampler_gpus, cfg.gpu_memory_fraction, stages, cfg.sampler_precision, simulated)
    if decode is None:  # after the sampler's probe: on a shared GPU each probe sees only its own memory
        found["decode"] = run(
            probe_decode_batch, cfg.sampler_cpus if placement.fused else cfg.decoder_cpus, decode_gpus,
            _absolute(decoder), cfg.vae_dtype, decode_gpus > 0, latent_shape, budget, cap(decode_gpus),
            _threads(cfg.decoder_cpus), cfg.simulate_oom_above, decode_gpus, cfg.gpu_memory_fraction, stages, simulated)
    for stage, probe in found.items():
        if "out_of_memory" in probe:
            raise EbdError(f"the {stage} stage cannot fit one item in its memory budget "
                           f"({probe['budget_bytes'] / 2**20:.0f} MiB): {probe['out_of_memory']}; give it a larger "
                           "share (sampler_gpus / decoder_gpus, gpu_memory_fraction, ram_budget_gb), a smaller "
                           "resolution or vae_dtype float16")
    return {"sampler": sampler_size or found["sampler"]["batch_size"],
            "decode": decode or found["decode"]["batch_size"],
            "sampler_precision": found["sampler"]["precision"] if "sampler" in found else cfg.sampler_precision,
            "probes": found}


def _stage_error(error: BaseException) -> EbdError | None:
    """The EbdError a stage or probe raised, from the exception Ray ends the run with (None if there is none): its
    own one line, not the Ray traceback around it."""
    for _ in range(10):
        if error is None:
            return None
        cause = getattr(error, "cause", None)  # a RayTaskError's original exception
        if isinstance(error, EbdError) and not isinstance(cause, BaseException):  # Ray appends retry advice
            return EbdError(str(error).splitlines()[0] if str(error) else type(error).__name__)
        error = cause if isinstance(cause, BaseException) else (error.__cause__ or error.__context__)
    return None


# Config keys that change the images: a resumed run must agree with the folder on all of them.
_CONTENT_KEYS = ("num_images", "seed", "format", "images_per_shard", "vae_dtype", "save_latents",
                 "sampler_precision")


def _claim_output(out: str, cfg: GenerateConfig, sampler: dict, model_id: str, vae_identity: dict,
                  decoder, plan: list | None = None) -> dict:
    # A tiny decoder makes other pixels. None for the VAE's own decoder, which a folder from before the key
    # existed also reads as (absent), so old runs still resume.
    tiny_decoder = decoder.weights_sha256() if decoder.class_name != "AutoencoderKL" else None
    if plan is None:  # guidance changes nothing without a condition (and folders from before it lack the key)
        sampler = {k: v for k, v in sampler.items() if k != "guidance"}
    run = {"config": {k: getattr(cfg, k) for k in _CONTENT_KEYS}, "sampler": sampler, "model": model_id,
           "vae_weights_sha256": vae_identity["weights_sha256"], "decoder_weights_sha256": tiny_decoder,
           "conditions": plan,  # None (absent in older folders) for an unconditional run
           "layout": image_shards.LAYOUT}
    recorded = storage.join(out, RUN_FILE)
    if storage.is_file(recorded) and read_json(recorded).get("layout") != image_shards.LAYOUT:
        raise EbdError(f"{out} holds a run written before ebd put shards in parquet/ and webdataset/ folders: it "
                       "stays readable (evaluate, inspect), but resume it with the ebd that wrote it or generate "
                       "into a new --output")
    return claim_run_folder(out, run, RUN_FILE)


def _finish(out: str, cfg: GenerateConfig, done: dict, num_shards: int, sampler: dict, model_id: str,
            vae_identity: dict, batch_sizes: dict, placement, seconds: float, made: int,
            latent_shape: list[int], decoder, plan: list | None = None) -> dict:
    shards = [done[j] for j in range(num_shards)]
    images = sum(s["count"] for s in shards)
    if images != cfg.num_images:
        raise EbdError(f"expected {cfg.num_images} images, found {images}: re-run the same command to complete")
    preview = _preview(out, cfg, shards)
    atomic_write(storage.join(out, "preview.png"), lambda f: preview.save(f, format="PNG"))
    busy = {stage: round(sum(sum(image_shards.stage_seconds(s, stage)) for s in shards), 3)
            for stage in ("sampler", "decode", "write")}
    proposed = sum(s.get("mala_proposed", 0) for s in shards)
    summary = {"images": images, "images_this_run": made, "seconds": round(seconds, 3),
               "sampler": sampler["name"],
               "gradient_evaluations_per_image": max((s.get("gradient_evaluations", 0) / s["count"] for s in shards),
                                                     default=0),
               "mala_acceptance": sum(s.get("mala_accepted", 0) for s in shards) / proposed if proposed else None,
               "images_per_second": made / seconds if seconds > 0 else 0.0, "stage_busy_seconds": busy,
               "batch_sizes": {k: v for k, v in batch_sizes.items() if k != "probes"},
               "batch_probes": batch_sizes.get("probes", {}), "decoder": decoder.class_name,
               "sampler_actors": placement.sampler_actors,
               "decoder_gpus_per_actor": placement.sampler_gpus if placement.fused else placement.decoder_gpus,
               "placement": placement.to_dict(),
               "sampler_devices": sorted({s.get("sampler_device", "cpu") for s in shards}),
               "oom_shrinks": sum(len(s.get("decode_oom_shrinks", [])) for s in shards)}
    atomic_write_json(storage.join(out, "summary.json"), summary)
    folders = {"parquet": image_shards.PARQUET_DIR if cfg.format in ("parquet", "both") else None,
               "webdataset": image_shards.TAR_DIR if cfg.format in ("webdataset", "both") else None}
    manifest = {"format": "ebd.images/1", "layout": image_shards.LAYOUT, "images": images, "num_shards": num_shards,
                "output_format": cfg.format, "folders": folders,
                # webdataset.WebDataset(manifest["webdataset_urls"]) reads every tar, in order
                "webdataset_urls": (storage.join(out, image_shards.TAR_NAME.replace("{:06d}", "{%06d..%06d}")
                                                 % (0, num_shards - 1)) if folders["webdataset"] else None),
                "seed": cfg.seed, "model": {"id": model_id, "path": storage.canonical(cfg.model)},
                "latents": {"saved": cfg.save_latents, "shape": latent_shape, "scaled": True,
                            "dtype": {"parquet": "float32", "webdataset": "float16"}},
                "vae": vae_identity, "sampler": sampler, "images_per_shard": cfg.images_per_shard,
                "decoder": {"class": decoder.class_name, "path": storage.canonical(decoder.path),
                            "weights_sha256": decoder.weights_sha256()},
                "shards": [{"shard": s["shard"], "count": s["count"], "files": s["files"]} for s in shards]}
    if plan:  # which images asked for what, in order (each row and sidecar also carries its condition)
        manifest["conditions"] = [{"condition": text, "count": n} for text, n in plan]
    atomic_write_json(storage.join(out, "manifest.json"), manifest)  # last: its presence means the run is complete
    return summary


def _preview(out: str, cfg: GenerateConfig, shards: list[dict]):
    """A grid of the first 64 images, read back from the written shards."""
    import io

    from PIL import Image

    images: list[np.ndarray] = []
    for s in shards:
        if len(images) >= 64:
            break
        pngs = image_shards.shard_pngs(out, s["shard"], cfg.format)
        images += [np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in pngs[: 64 - len(images)]]
    return preview_grid(images)
