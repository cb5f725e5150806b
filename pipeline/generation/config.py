"""The generation job's config: every key `ebd generate --set` takes, with a comment that says what it does."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ..common import migrations
from ..common.config import JobConfig, require
from ..io.output_formats import format_names
from ..sampling.conditions import load_plan
from ..sampling.settings import sampler_overrides


@dataclass(frozen=True)
class GenerateConfig(JobConfig):
    model: str | None = None                     # trained EBM folder (config.json + model.safetensors), any kind
    vae: str | None = None                       # a Stable Diffusion checkpoint (with vae/) or AutoencoderKL folder
    # A tiny decoder (AutoencoderTiny folder paired with the VAE, see `ebd pair-decoder`) to decode with instead of
    # the VAE's own decoder: about 18x fewer FLOPs at Stable Diffusion's sizes, softer images.
    decoder: str | None = None
    output: str | None = None                    # folder for the shards, manifest, preview and summary
    num_images: int | None = None                # images to make (null: 1000, or the conditions' total)
    # Conditional models (conditions.py): one condition for every image ("shape=ring AND background=checker"), or a
    # mix, condition -> count (a mapping, or the path of a YAML/JSON file of one; the job reads it once, as it starts).
    condition: str | None = None
    conditions: dict[str, int] | str | None = None  # condition -> count, or a YAML/JSON file of it: a mix
    seed: int = 0                                # run seed: image i's key and noise derive from (seed, i)
    # Shards to write, one data folder each (io/output_formats.FORMATS: parquet/, webdataset/, or one a plugin adds)
    formats: list[str] = field(default_factory=lambda: ["parquet", "webdataset"], metadata={"parse": format_names})
    images_per_shard: int = 256
    save_latents: bool = True                    # each latent too (parquet: float32 array, tar: float16 .npy)
    # Sampler: the model's saved settings, with these keys changed (e.g. {levels: 10} or {mala_levels: 3}; a
    # short-run (cd) model is only valid under its training settings, so change those knowingly).
    sampler: dict[str, Any] = field(default_factory=dict, metadata={"parse": sampler_overrides})
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
    metrics_host: str = "127.0.0.1"              # bind address of the metrics endpoint
    pushgateway: str | None = None               # push final values here when the job ends
    metrics_linger_s: float = 0.0                # keep the endpoint up this long after the end (one scrape)
    progress_interval_s: float = 5.0
    simulate_oom_above: int | None = None        # testing: the decoder runs out of memory above this batch (0: always)
    simulate_gpu_memory_gb: float | None = None  # testing: a GPU stage on a CPU sizes against this much "GPU memory"

    @classmethod
    def migrate(cls, values: dict) -> dict:
        """Keys of older configs in today's names (common/migrations.py)."""
        return migrations.generate_config(values)

    def validate(self) -> None:
        for name in ("model", "vae", "output"):
            require(getattr(self, name) is not None, f"missing {name}: pass --{name} or set it in the config")
        require(self.condition is None or self.conditions is None, "give condition or conditions, not both")
        if isinstance(self.conditions, dict):  # a mix given inline: its counts are the images (a file: with_plan)
            _check_total(self.num_images, load_plan(None, self.conditions))
        require((self.num_images is None or self.num_images >= 1) and self.images_per_shard >= 1,
                "num_images and images_per_shard must be >= 1")
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


DEFAULT_NUM_IMAGES = 1000


def with_plan(cfg: GenerateConfig) -> GenerateConfig:
    """The config a run works from: a conditions file read (the driver's I/O, once, as the job starts), a mix's counts
    as `conditions` and their total as `num_images`, else `num_images` or DEFAULT_NUM_IMAGES."""
    plan = load_plan(cfg.condition, cfg.conditions)
    if plan is not None and cfg.condition is None:
        return replace(cfg, conditions=dict(plan), num_images=_check_total(cfg.num_images, plan))
    return cfg if cfg.num_images is not None else replace(cfg, num_images=DEFAULT_NUM_IMAGES)


def _check_total(num_images: int | None, plan: list[list]) -> int:
    total = sum(n for _, n in plan)
    require(num_images in (None, total), f"num_images ({num_images}) disagrees with the conditions' total ({total}): "
            "drop num_images, or change the counts")
    return total
