"""ebd: bulk image generation with energy-based models over Stable Diffusion VAE latents, on Ray.

    from pipeline import EBDPipeline
    images = EBDPipeline.from_pretrained("models/demo")(num_images=16, seed=0).images

Subpackages, each a layer that imports only the layers below it (checked in CI by import-linter, pyproject.toml):

    api.py, demo.py  the Python front door (EBDPipeline, generated_dataset); the demo's procedural images
    generation/      the generation job: config, driver, placement, batch probes, the Ray Data DAG, stages, manifest
    evaluation/      sample quality (report, metrics, feature networks) and the x-ray page of a model
    training/        the training job (its Ray Train driver), config, data, the worker loop, one module per objective
    models/          one module per model kind and the registry that loads a model folder
    sampling/        the one sampling core, samplers, their settings, conditions, schedules, seeds
    vae/             the pretrained VAE (load, encode, decode, tiny decoders), the latent precompute job (Ray
                     tasks) and fitting a small VAE
    distributed/     what every Ray job shares: connecting to a cluster, local-instance settings, quiet workers
    io/              storage, atomic files, tars, latent and image shards, input sources, weights, checkpoints
    common/          configs and one-line errors, logging and progress, memory probes, metrics, the optimiser
"""

__all__ = ["EBDPipeline", "EBDOutput", "generated_dataset"]


def __getattr__(name: str):
    # Lazy: `import pipeline.common.config` stays light (no torch) for the jobs' argument parsing.
    if name in __all__:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
