"""The DAG on the connected cluster: where its stages run (placement.py) and how they are chained as Ray Data
operators, from the shards to make to the written shards' stats."""

from __future__ import annotations

import logging
import math

from ..io import storage
from ..sampling.settings import SamplerSettings
from .config import GenerateConfig
from .stages import DecodeStage, SampleDecodeStage, SamplerSpec, SamplerStage, absolute_spec, stage_threads, write_shard


def place_stages(cfg: GenerateConfig, model, sampler: SamplerSettings, decoder, shards: int,
                 recorded: str | None = None):
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
        evaluations = sampler.gradient_evaluations()
        pixels = math.prod(model.config.latent_shape[1:]) * decoder.downscale_factor ** 2
        return {"sampler_gflop": evaluation_flops(model, sampler) * evaluations / 1e9, "evaluations": evaluations,
                "decoder_gflop": decode_flops(vae, model.config.latent_shape) / 1e9,
                "cpu_gflops": cfg.cpu_gflops or cpu_gflops(model, sampler),
                "write_cpu_s": pixels * WRITE_CPU_S_PER_PIXEL}

    resources = ray.cluster_resources()
    return plan_placement(cfg, resources.get("CPU", 0), resources.get("GPU", 0), shards, costs, recorded)


def decoded_shards(cfg: GenerateConfig, shards: list[int], sampler: SamplerSettings, decoder, placement,
                   batch_sizes: dict, *, precision: str, plan: list | None = None, progress=None,
                   shard_chunks: dict | None = None):
    """The DAG's first two stages as a Ray Dataset: one row per shard {shard, latents, images, info}. `decoder`: the
    VaeSpec to decode with (the VAE, or a tiny decoder paired with it); `placement`: where they run (placement.py);
    `precision`: what the samplers run in, resolved for that placement (probes.sampler_precision); `plan`: a
    conditional run's conditions."""
    import ray
    from ray.data import ActorPoolStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the job prints its own progress (a bar on a terminal, else lines) ...
    ctx.raise_original_map_exception = True  # a stage's own EbdError reaches the driver as itself (one line)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # ... so Ray's "bars disabled" is noise
    items = ray.data.from_items([{"shard": j} for j in shards], override_num_blocks=len(shards))
    on_gpu = placement.sampler_device == "gpu"
    spec = SamplerSpec(model_dir=storage.canonical(cfg.model), sampler=sampler, seed=cfg.seed,
                       images_per_shard=cfg.images_per_shard, num_images=cfg.num_images,
                       batch_size=batch_sizes["sampler"], threads=stage_threads(cfg.sampler_cpus), precision=precision,
                       plan=plan, plugins=cfg.plugins, use_gpu=on_gpu, gpu_share=placement.sampler_gpus,
                       gpu_fraction=cfg.gpu_memory_fraction)
    sampling = dict(spec=spec, progress=progress, shard_chunks=shard_chunks)
    decoding = dict(decoder=absolute_spec(decoder), dtype=cfg.vae_dtype, batch_size=batch_sizes["decode"],
                    simulate_oom_above=cfg.simulate_oom_above, progress=progress, gpu_fraction=cfg.gpu_memory_fraction,
                    shard_chunks=shard_chunks)
    samplers = ActorPoolStrategy(size=placement.sampler_actors)
    if placement.fused:
        return items.map_batches(
            SampleDecodeStage, batch_size=1, compute=samplers, num_cpus=cfg.sampler_cpus,
            num_gpus=placement.sampler_gpus,
            fn_constructor_kwargs=dict(sampler=sampling, decoder=decoding | dict(use_gpu=True,
                                                                                threads=stage_threads(cfg.sampler_cpus))))
    decoding["gpu_share"] = placement.decoder_gpus
    latents = items.map_batches(SamplerStage, batch_size=1, compute=samplers, num_cpus=cfg.sampler_cpus,
                                num_gpus=placement.sampler_gpus if on_gpu else None,
                                fn_constructor_kwargs=sampling)
    return latents.map_batches(
        DecodeStage, batch_size=1, compute=ActorPoolStrategy(size=placement.decoder_actors),
        num_cpus=cfg.decoder_cpus, num_gpus=placement.decoder_gpus,
        fn_constructor_kwargs=decoding | dict(use_gpu=placement.decoder_gpus > 0,
                                              threads=stage_threads(cfg.decoder_cpus)))


def build_dag(cfg: GenerateConfig, pending: list[int], sampler: SamplerSettings, decoder, placement, batch_sizes: dict,
               model_id: str, *, precision: str, plan: list | None, progress=None, shard_chunks: dict | None = None):
    return decoded_shards(cfg, pending, sampler, decoder, placement, batch_sizes, precision=precision, plan=plan,
                          progress=progress, shard_chunks=shard_chunks).map_batches(
        write_shard, batch_size=1, num_cpus=cfg.writer_cpus,
        fn_kwargs=dict(output=storage.canonical(cfg.output), formats=tuple(cfg.formats), seed=cfg.seed,
                       images_per_shard=cfg.images_per_shard, model_id=model_id, save_latents=cfg.save_latents,
                       plugins=tuple(cfg.plugins)))


