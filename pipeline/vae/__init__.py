"""The VAE whose latents ebd learns: loading a pretrained AutoencoderKL (or a tiny decoder paired with it) from disk,
scaled encode and decode (`autoencoder`), and fitting a small one to an image set (`fit`, the demo's stand-in)."""
