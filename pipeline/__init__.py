"""ebd: bulk image generation with energy-based models over Stable Diffusion VAE latents, on Ray.

One module per concept: config, sources, images, vae, shards, precompute, progress, demo.
"""
