"""The VAE whose latents ebd learns: loading a pretrained AutoencoderKL (or a tiny decoder paired with it) from disk,
scaled encode and decode (`autoencoder`), the precompute job that encodes an image set into latent shards on Ray
(`precompute`), and fitting a small VAE to an image set (`fit`, the demo's stand-in)."""
