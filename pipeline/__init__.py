"""ebd: bulk image generation with energy-based models over Stable Diffusion VAE latents, on Ray.

    from pipeline import EBDPipeline
    images = EBDPipeline.from_pretrained("models/demo")(num_images=16, seed=0).images

One module per concept:
    api            the Python front door: EBDPipeline (folders -> images), generated_dataset (a Ray Dataset)
    config         job configs: dataclasses validated on construction, YAML, --set overrides, one-line errors
    sources        input images: folder tree, webdataset tars, parquet; planning and reading
    images         decoding and preprocessing, rejections
    vae            the pretrained AutoencoderKL: local loading, scaled encode/decode, SD-layout export
    vae_fit        fitting a small AutoencoderKL to an image set (the demo's VAE)
    shards         latent shards (webdataset), atomic files, manifest
    precompute     images -> latent shards as Ray tasks
    models         model folders (config.json + safetensors) and load_model, whatever the kind
    diffusion_ebm  the noise-conditional energy E(z, sigma) (denoising score matching)
    ebm            the short-run energy U(z) (contrastive divergence), chain starts
    diffusion_unet the latent diffusion baseline (noise prediction, DDIM)
    objectives     training objectives: model and batch -> loss and metrics (dsm, cd, ddpm)
    langevin       samplers as pure functions with one signature
    train          the objective-agnostic training loop under Ray Train
    checkpoints    optimizer state as safetensors tensors (train and vae_fit)
    batching       batch sizes probed against memory; out-of-memory recovery
    generate       the generation DAG on Ray Data
    sinks          generated-image shards: parquet, tar, preview
    metrics        Prometheus metrics (driver endpoint, actor export)
    features       feature spaces that see shape: the evaluator CNN (decoder's domain), FID Inception from a file
    evaluator_fit  fitting the evaluator on decoded training latents (classifier, or contrastive without labels)
    quality        sample-quality metrics: FD, KID, k-NN manifold metrics, MMD, label metrics, memorisation
    evaluate       generated vs held-out real, in feature and pooled spaces, with baselines; report.json / report.md
    pictures       image grids for the reports
    xray           the inspection page: chains, curves, energies, channels, interpolation, neighbours
    progress       progress lines
    demo           procedural demo images and a small random VAE for tests
"""

__all__ = ["EBDPipeline", "EBDOutput", "generated_dataset"]


def __getattr__(name: str):
    # Lazy: `import pipeline.config` stays light (no torch) for the jobs' argument parsing.
    if name in __all__:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
