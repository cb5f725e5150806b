"""Where the generation DAG's stages run: sampler actors on CPUs feeding decoder actors, or sampler actors on GPUs.

    placement = plan_placement(cfg, cpus=64, gpus=8, shards=100, costs=lambda: {...})
    placement.sampler_device, placement.fused, placement.sampler_actors, placement.reason

Shapes:
- `cpu`: sampler actors of `sampler_cpus` each fill the CPUs the decoder actors and one writer leave (the demo's
  shape: at its 4 x 8 x 8 latents a CPU samples faster than a GPU decoder is worth waiting for).
- `gpu`, fused (`gpu_stage: fused`): one actor per `sampler_gpus` share of a GPU samples a shard and decodes it
  where it is, so latents never cross a process or a node and the decoder's weights share the GPU with the energy.
- `gpu`, separate (`gpu_stage: separate`): sampler actors and decoder actors hold their own GPU shares (a cluster
  whose decoders must sit on other GPUs than the sampler, e.g. a different GPU type).
`auto` chooses by predicted images/s (`predicted_images_per_s`, the capacity model bench/capacity.md tabulates):
- CPU samplers: CPUs x `cpu_gflops` (measured on the driver from the model's own evaluation on one thread, unless
  set) over the sampler's FLOPs per image (`sampling.cost`), capped by the GPU decoders and by the writer's CPU time.
- GPU samplers: per GPU, the sampler's FLOPs at the GPU's rate for the run's precision, but never faster than a
  per-evaluation latency floor (kernel launches: a tiny latent is launch-bound, not FLOP-bound) over the batch, plus
  the decoder's FLOPs; capped by the CPUs the writer needs per image.
The GPU rates are assumptions (`ASSUMED_GPU_TFLOPS`, `gpu_latency_ms`) until bench/gpu_check.py measures them on a
GPU; the reason each run records says which figures were assumed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable


@dataclass(frozen=True)
class Placement:
    sampler_device: str          # "cpu" | "gpu"
    fused: bool                  # GPU sampler actors decode their own shards (no decoder actors)
    sampler_actors: int
    sampler_gpus: float          # GPU share per sampler actor (0 on CPUs)
    decoder_actors: int          # 0 when fused
    decoder_gpus: float          # GPU share per decoder actor (0: decode on CPUs)
    reason: str

    def describe(self) -> str:
        if self.sampler_device == "cpu":
            return (f"{self.sampler_actors} CPU sampler actors -> {self.decoder_actors} decoder actors "
                    f"({self.decoder_gpus:g} GPU each)")
        if self.fused:
            return f"{self.sampler_actors} GPU actors sampling and decoding ({self.sampler_gpus:g} GPU each)"
        return (f"{self.sampler_actors} GPU sampler actors ({self.sampler_gpus:g} GPU each) -> "
                f"{self.decoder_actors} decoder actors ({self.decoder_gpus:g} GPU each)")

    def to_dict(self) -> dict:
        return asdict(self)


def plan_placement(cfg, cpus: float, gpus: float, shards: int,
                   costs: Callable[[], dict] | None = None, recorded: str | None = None) -> Placement:
    """The shape `cfg` (a GenerateConfig) asks for on a cluster of `cpus` CPUs and `gpus` GPUs for `shards` shards.
    `costs()` gives {"sampler_gflop", "decoder_gflop"} per image (only `auto` on a cluster with GPUs calls it);
    `recorded`, the device a resumed run's folder was started on, overrides the setting (its images stay
    byte-identical only on the device type that began them)."""
    device, reason = cfg.sampler_device, f"sampler_device: {cfg.sampler_device}"
    if recorded is not None:
        device, reason = recorded, f"resuming a run started with the sampler on {recorded}"
    elif device == "auto":
        device, reason = _auto(cfg, cpus, gpus, costs)
    if device == "gpu" and gpus <= 0:
        from ..common.config import EbdError
        raise EbdError("sampler_device: gpu, but the cluster has no GPUs: use cpu (or auto), or add GPU nodes")
    if device == "cpu":
        decoder_gpus = _decoder_share(cfg, gpus)
        if cfg.sampler_actors == "auto":  # what the CPUs hold beside the decoders and one writer, one per shard at most
            free = cpus - cfg.decoder_actors * cfg.decoder_cpus - cfg.writer_cpus
            actors = min(max(1, int(free / cfg.sampler_cpus + 1e-9)), shards)
        else:
            actors = cfg.sampler_actors
        return Placement("cpu", False, actors, 0.0, cfg.decoder_actors, decoder_gpus, reason)
    fused = cfg.gpu_stage == "fused"
    decoder_actors = 0 if fused else cfg.decoder_actors
    decoder_gpus = 0.0 if fused else (cfg.sampler_gpus if cfg.decoder_gpus == "auto" else float(cfg.decoder_gpus))
    if cfg.sampler_actors == "auto":
        by_gpus = int((gpus - decoder_actors * decoder_gpus) / cfg.sampler_gpus + 1e-9)
        by_cpus = int((cpus - decoder_actors * cfg.decoder_cpus - cfg.writer_cpus) / cfg.sampler_cpus + 1e-9)
        actors = max(1, min(by_gpus, by_cpus, shards))
    else:
        actors = cfg.sampler_actors
    return Placement("gpu", fused, actors, cfg.sampler_gpus, decoder_actors, decoder_gpus, reason)


# TFLOP/s an H100-class GPU is assumed to reach on an energy's autograd UNet (GroupNorm, small convolutions, forward +
# backward) per precision: about a third of the fp32 peak (67) without tensor cores, an eighth of the dense tensor
# peak (989) with them. Assumed, not measured: bench/gpu_check.py measures them where a GPU is lent (bench/gpu.md).
ASSUMED_GPU_TFLOPS = {"float32": 20.0, "tf32": 60.0, "bfloat16": 120.0, "float16": 120.0}
WRITE_CPU_S_PER_PIXEL = 5e-7   # PNG + parquet + tar per output pixel on one CPU thread (bench/capacity.md: 64 px)


def predicted_images_per_s(device: str, cpus: float, gpus: float, sampler_gflop: float, decoder_gflop: float,
                           cpu_gflops: float, gpu_tflops: float, *, evaluations: int = 1, gpu_latency_s: float = 0.0,
                           gpu_batch: int = 1, write_cpu_s: float = 0.0) -> float:
    """The capacity model's images/s for a shape: CPU samplers capped by the GPU decoders (or the CPUs decoding
    too, without GPUs), or GPUs that sample and decode, each no faster than `evaluations` x `gpu_latency_s` per batch
    of `gpu_batch` allows; both capped by the CPUs the writer needs (`write_cpu_s` per image)."""
    writer_cap = cpus / write_cpu_s if write_cpu_s > 0 and cpus > 0 else float("inf")
    if device == "gpu":
        sampler_s = max(sampler_gflop / (gpu_tflops * 1e3), evaluations * gpu_latency_s / max(1, gpu_batch))
        return min(gpus / (sampler_s + decoder_gflop / (gpu_tflops * 1e3)), writer_cap)
    if gpus <= 0:
        return cpus / ((sampler_gflop + decoder_gflop) / cpu_gflops + write_cpu_s)
    return min(cpus / (sampler_gflop / cpu_gflops + write_cpu_s), gpus * gpu_tflops * 1e3 / decoder_gflop)


def gpu_rate(cfg, precision: str) -> tuple[float, bool]:
    """(TFLOP/s, assumed?) for the GPU samplers at `precision`: the config's `gpu_tflops`, else the assumed table."""
    if cfg.gpu_tflops is not None:
        return cfg.gpu_tflops, False
    return ASSUMED_GPU_TFLOPS.get(precision, ASSUMED_GPU_TFLOPS["float32"]), True


def _auto(cfg, cpus: float, gpus: float, costs: Callable[[], dict] | None) -> tuple[str, str]:
    if gpus <= 0:
        return "cpu", "auto: the cluster has no GPUs"
    from ..common.precision import resolve_precision

    c = costs()
    # The precision the assumed GPU (ASSUMED_GPU_TFLOPS: H100-class, bfloat16 native) would sample in.
    precision = resolve_precision("cuda", cfg.sampler_precision, native_bf16=True)
    tflops, assumed = gpu_rate(cfg, precision)
    cpu_gflops = cfg.cpu_gflops or c["cpu_gflops"]
    batch = min(cfg.max_batch_size, cfg.images_per_shard)
    rates = {device: predicted_images_per_s(device, cpus, gpus, c["sampler_gflop"], c["decoder_gflop"], cpu_gflops,
                                            tflops, evaluations=c["evaluations"],
                                            gpu_latency_s=cfg.gpu_latency_ms / 1e3, gpu_batch=batch,
                                            write_cpu_s=c["write_cpu_s"]) for device in ("cpu", "gpu")}
    device = "gpu" if rates["gpu"] > rates["cpu"] else "cpu"
    return device, (f"auto: predicted {rates['gpu']:.4g} images/s with the sampler on {gpus:g} GPUs against "
                    f"{rates['cpu']:.4g} on {cpus:g} CPUs ({c['sampler_gflop']:.4g} GFLOP per image to sample in "
                    f"{c['evaluations']} evaluations, {c['decoder_gflop']:.4g} to decode; "
                    f"{cpu_gflops:.3g} GFLOP/s per CPU {'set' if cfg.cpu_gflops else 'measured here'}, "
                    f"{tflops:g} TFLOP/s per GPU at {precision} {'assumed' if assumed else 'set'}, "
                    f"{cfg.gpu_latency_ms:g} ms per GPU evaluation assumed)")


def _decoder_share(cfg, gpus: float) -> float:
    if cfg.decoder_gpus != "auto":
        return float(cfg.decoder_gpus)
    return 1.0 if gpus > 0 else 0.0
