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
`auto` chooses by predicted images/s: the sampler's FLOPs per image (`sampling.cost`) over `cpu_gflops` per CPU,
capped by the GPU decoders, against the GPUs sampling and decoding at `gpu_tflops` each. Both rates are
assumptions (the config's, with bench/capacity.md's measured CPU figure as the default), stated in the reason the
run's summary records.
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


def predicted_images_per_s(device: str, cpus: float, gpus: float, sampler_gflop: float, decoder_gflop: float,
                           cpu_gflops: float, gpu_tflops: float) -> float:
    """The capacity model's rate for a shape: CPU samplers capped by the GPU decoders (or the CPUs decoding too,
    without GPUs), or GPUs that sample and decode."""
    if device == "gpu":
        return gpus * gpu_tflops * 1e3 / (sampler_gflop + decoder_gflop)
    if gpus <= 0:
        return cpus * cpu_gflops / (sampler_gflop + decoder_gflop)
    return min(cpus * cpu_gflops / sampler_gflop, gpus * gpu_tflops * 1e3 / decoder_gflop)


def _auto(cfg, cpus: float, gpus: float, costs: Callable[[], dict] | None) -> tuple[str, str]:
    if gpus <= 0:
        return "cpu", "auto: the cluster has no GPUs"
    c = costs()
    rates = {device: predicted_images_per_s(device, cpus, gpus, c["sampler_gflop"], c["decoder_gflop"],
                                            cfg.cpu_gflops, cfg.gpu_tflops) for device in ("cpu", "gpu")}
    device = "gpu" if rates["gpu"] > rates["cpu"] else "cpu"
    return device, (f"auto: predicted {rates['gpu']:.4g} images/s with the sampler on {gpus:g} GPUs against "
                    f"{rates['cpu']:.4g} on {cpus:g} CPUs ({c['sampler_gflop']:.4g} GFLOP per image to sample, "
                    f"{c['decoder_gflop']:.4g} to decode; assuming {cfg.cpu_gflops:g} GFLOP/s per CPU and "
                    f"{cfg.gpu_tflops:g} TFLOP/s per GPU)")


def _decoder_share(cfg, gpus: float) -> float:
    if cfg.decoder_gpus != "auto":
        return float(cfg.decoder_gpus)
    return 1.0 if gpus > 0 else 0.0
