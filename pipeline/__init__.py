"""ebd: bulk image generation with energy-based models over Stable Diffusion VAE latents, on Ray.

One module per concept:
    config      job configs: dataclasses, YAML, --set overrides, one-line errors
    sources     input images: folder tree, webdataset tars, parquet; planning and reading
    images      decoding and preprocessing, rejections
    vae         the pretrained AutoencoderKL: local loading, scaled encode/decode, SD-layout export
    vae_fit     fitting a small AutoencoderKL to an image set (the demo's VAE)
    shards      latent shards (webdataset), atomic files, manifest
    precompute  images -> latent shards as Ray tasks
    ebm         the energy model U(z) = E_theta(z) + ||z||^2 / (2 sigma0^2), chain starts, save/load
    langevin    samplers as pure functions
    train       contrastive-divergence training under Ray Train
    checkpoints optimizer state as safetensors tensors (train and vae_fit)
    batching    batch sizes probed against memory; out-of-memory recovery
    generate    the generation DAG on Ray Data
    sinks       generated-image shards: parquet, tar, preview
    metrics     Prometheus metrics (driver endpoint, actor export)
    features    feature spaces that see shape: the evaluator CNN (decoder's domain), FID Inception from a file
    evaluator_fit  fitting the evaluator on decoded training latents (classifier, or contrastive without labels)
    quality     sample-quality metrics: FD, KID, k-NN manifold metrics, MMD, label metrics, memorisation
    evaluate    generated vs held-out real, in feature and pooled spaces, with baselines; report.json / report.md
    progress    progress lines
    demo        procedural demo images and a small random VAE for tests
"""
