"""Sampling: from a model to latents.

    core         sample_latents: (model, image indices, run seed, settings, conditions) -> latents; the one place
                 every job samples through
    samplers     the samplers, pure functions with one signature (k-diffusion style)
    settings     each sampler family's settings, a dataclass saved with the model
    denoisers    every model kind wrapped as the samplers evaluate it: (energy, grad_z E) at (z, sigma)
    conditions   conditions ("shape=ring AND NOT background=stripes"), plans, composed energies
    schedules    noise-level schedules (Karras)
    noise        the one seed scheme (chain_seed, image_key) and per-chain noise
"""
