"""Batch sizes: one probe per stage against its memory budget, run with the stage's own resources, or the sizes a
folder's run.json recorded (a resumed run keeps them, so its shards stay byte-identical); and the sampler's
precision, resolved once per placement where the samplers run."""

from __future__ import annotations

from dataclasses import dataclass

from ..common import migrations
from ..common.config import EbdError
from ..common.plugins import import_plugins
from ..io import storage
from ..sampling.conditions import parse_condition
from ..sampling.settings import SamplerSettings
from .config import GenerateConfig
from .stages import absolute_spec, stage_error, stage_threads

# ------------------------------------------------------------------------------------------ sampler precision

def resolve_where_sampled(precision: str, use_gpu: bool) -> str:
    """Ray task (the sampler actors' resources): what `precision` means on the device a sampler actor gets there."""
    from ..common.precision import resolve_precision
    from ..vae.autoencoder import pick_device

    return resolve_precision(pick_device(use_gpu), precision)


def sampler_precision(cfg: GenerateConfig, placement, recorded: str | None = None) -> str:
    """What the samplers of `placement` run in: `cfg.sampler_precision`, or the precision a resumed run recorded,
    resolved once (common.precision.resolve_precision) in a task with a sampler actor's resources, so "auto" asks
    the hardware the samplers get, not the driver's. The stages, probes and sampling core take this value as is."""
    on_gpu = placement.sampler_device == "gpu"
    return _run(resolve_where_sampled, cfg.sampler_cpus, placement.sampler_gpus if on_gpu else 0.0,
                recorded or cfg.sampler_precision, on_gpu)


def _run(fn, cpus: float, gpus: float, *args, **kwargs):
    """`fn(*args, **kwargs)` as a Ray task with a stage's resources; on GPUs in a worker that exits afterwards
    (max_calls=1, so no idle process keeps GPU memory while the actors run; Ray refuses it in .options())."""
    import ray

    task = ray.remote(max_calls=1)(fn) if gpus else ray.remote(fn)
    try:
        return ray.get(task.options(num_cpus=cpus, num_gpus=gpus or None).remote(*args, **kwargs))
    except Exception as e:  # the task's own EbdError (e.g. non-finite chains) as its one line
        raise stage_error(e) or e


# ------------------------------------------------------------------------------------------ batch probes

@dataclass(frozen=True)
class ProbeBudget:
    """What a stage's batch probe may fill, as its actors will run: `ram_bytes` of RAM on a CPU; on CUDA (or with
    `simulated_gpu_bytes`, in tests) the actor's `gpu_share` of the GPU's total memory x `gpu_fraction`, split
    evenly among the actor's `stages` (2 when one actor samples and decodes); never more than `max_batch` items."""
    ram_bytes: int
    max_batch: int
    gpu_share: float = 0.0
    gpu_fraction: float = 0.8
    stages: int = 1
    simulated_gpu_bytes: int | None = None


def probe_sampler_batch(model_dir: str, sampler: SamplerSettings, budget: ProbeBudget, threads: int, *,
                        precision: str, condition: str | None = None, plugins: list[str] | None = None,
                        use_gpu: bool = False) -> dict:
    """Ray task (the sampler actors' resources): the largest chain batch that fits the stage's budget (RAM on a CPU,
    its share of the GPU on CUDA), under the run's widest condition (each term is one more forward per gradient),
    sampled in `precision` (resolved: `sampler_precision`)."""
    import torch

    from ..models import load_model
    from ..sampling.core import sample_latents
    from ..vae.autoencoder import pick_device

    torch.set_num_threads(threads)
    import_plugins(plugins or [])
    device = pick_device(use_gpu)
    model = load_model(model_dir, device)
    probe = sampler.probe()  # memory per step does not grow with the number of steps or levels
    return _probe(lambda n: sample_latents(model, range(n), 0, probe, None if condition is None else [condition] * n,
                                           device=device, precision=precision), device, budget)


def probe_decode_batch(decoder, dtype: str, use_gpu: bool, latent_shape: list, budget: ProbeBudget, threads: int,
                       simulate_oom_above: int | None) -> dict:
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

    return _probe(work, device, budget)


def _probe(work, device, budget: ProbeBudget) -> dict:
    """`probe_batch_size` against the stage's `budget` (ProbeBudget); {"out_of_memory": why} when one item does not
    fit."""
    import torch

    from ..common.memory import ProbeOutOfMemory, gpu_budget_bytes, limit_gpu_memory, probe_batch_size

    budget_bytes = budget.ram_bytes
    if budget.gpu_share and (device.type == "cuda" or budget.simulated_gpu_bytes):
        total = budget.simulated_gpu_bytes or torch.cuda.mem_get_info(device)[1]
        budget_bytes = gpu_budget_bytes(total, budget.gpu_share, budget.gpu_fraction, budget.stages)
        limit_gpu_memory(device, budget.gpu_share, budget.gpu_fraction)  # as the actor will run
    try:
        return probe_batch_size(work, device, budget_bytes, max_batch=budget.max_batch)
    except ProbeOutOfMemory as e:
        return {"out_of_memory": str(e), "budget_bytes": int(budget_bytes)}


def recorded_batch_sizes(run: dict) -> dict | None:
    """The batch sizes a folder's run.json records, in today's keys."""
    return migrations.batch_sizes(run.get("batch_sizes"))


def choose_batch_sizes(cfg: GenerateConfig, sampler: SamplerSettings, decoder, latent_shape: list, placement,
                        plan: list | None = None, *, precision: str) -> dict:
    """Configured sizes, or one probe per stage run with that stage's own resources, against its own budget (a
    fused GPU actor's two stages split its share), one after another where they share a GPU; the sampler's probe
    samples in `precision` (resolved: `sampler_precision`)."""
    sampler_size = cfg.sampler_batch_size or cfg.batch_size
    decode = cfg.decode_batch_size or cfg.batch_size
    ram = int(cfg.ram_budget_gb * 1024**3)
    simulated = int(cfg.simulate_gpu_memory_gb * 1024**3) if cfg.simulate_gpu_memory_gb else None
    on_gpu = placement.sampler_device == "gpu"
    sampler_gpus = placement.sampler_gpus if on_gpu else 0.0
    decode_gpus = placement.sampler_gpus if placement.fused else placement.decoder_gpus
    stages = 2 if placement.fused else 1
    found = {}

    def budget(gpus: float) -> ProbeBudget:
        cap = cfg.max_batch_size if gpus else min(cfg.max_batch_size, cfg.cpu_max_batch_size)
        return ProbeBudget(ram, cap, gpus, cfg.gpu_memory_fraction, stages, simulated)

    if sampler_size is None:
        widest = max((text for text, _ in plan), key=lambda t: len(parse_condition(t))) if plan else None
        found["sampler"] = _run(
            probe_sampler_batch, cfg.sampler_cpus, sampler_gpus, storage.canonical(cfg.model), sampler,
            budget(sampler_gpus), stage_threads(cfg.sampler_cpus), precision=precision, condition=widest,
            plugins=cfg.plugins, use_gpu=on_gpu)
    if decode is None:  # after the sampler's probe: on a shared GPU each probe sees only its own memory
        found["decode"] = _run(
            probe_decode_batch, cfg.sampler_cpus if placement.fused else cfg.decoder_cpus, decode_gpus,
            absolute_spec(decoder), cfg.vae_dtype, decode_gpus > 0, latent_shape, budget(decode_gpus),
            stage_threads(cfg.decoder_cpus), cfg.simulate_oom_above)
    for stage, probe in found.items():
        if "out_of_memory" in probe:
            raise EbdError(f"the {stage} stage cannot fit one item in its memory budget "
                           f"({probe['budget_bytes'] / 2**20:.0f} MiB): {probe['out_of_memory']}; give it a larger "
                           "share (sampler_gpus / decoder_gpus, gpu_memory_fraction, ram_budget_gb), a smaller "
                           "resolution or vae_dtype float16")
    return {"sampler": sampler_size or found["sampler"]["batch_size"],
            "decode": decode or found["decode"]["batch_size"], "probes": found}


