"""Images that are not images of the data: what the evaluator's "none of these" class learns from (Outlier Exposure,
Hendrycks et al. 2019), so that its recognisable share counts only what it can name (a softmax over the real classes
alone is confident off its data: decoded noise read "recognisable" 0.895 on the shapes).

Kinds, each a failure a generator shows, made from the evaluator's own decoded training data:
    noise      latents of pure noise at a log-uniform scale (0.3 to 40 x the latents' std: an untrained sampler's
               output to its chain starts), decoded
    latent mix a point between two training latents, decoded: the smear an underfit model gives between modes
    pixel mix  two images blended half and half
    blur       an image shrunk to 1/8 - 1/4 of its side and back
    patches    an image's 4 x 4 grid of patches shuffled

The first two need the VAE and are decoded once into a bank; the last three are made per batch from whatever
images the batch holds (`pixel_non_images`).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

NONE_CLASS = "(none of these)"   # the extra class's name; no label may be it (jobs.fit_evaluator refuses)
KINDS = ("noise", "latent mix", "pixel mix", "blur", "patches")


def latent_non_images(latents: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` latents of the two decoded kinds, half each: noise at a log-uniform scale, and mixes of two training
    latents at a weight in [0.3, 0.7]."""
    shape, std = latents.shape[1:], latents.float().std()
    noise = count // 2
    scale = torch.exp(torch.empty(noise, 1, 1, 1).uniform_(torch.log(torch.tensor(0.3)).item(),
                                                            torch.log(torch.tensor(40.0)).item(),
                                                            generator=generator))
    out = [torch.randn(noise, *shape, generator=generator) * scale * std]
    a, b = (torch.randint(len(latents), (count - noise,), generator=generator) for _ in range(2))
    weight = torch.empty(count - noise, 1, 1, 1).uniform_(0.3, 0.7, generator=generator)
    out.append((1 - weight) * latents[a].float() + weight * latents[b].float())
    return torch.cat(out)


def pixel_non_images(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One non-image per image (uint8 N x 3 x H x W, N >= 2): each a pixel mix with another of them, a blur or a
    patch shuffle, the kind drawn at random."""
    n, _, h, w = images.shape
    x = images.float()
    kind = torch.randint(3, (n,), generator=generator)
    partner = (torch.arange(n) + torch.randint(1, n, (n,), generator=generator)) % n
    mixed = 0.5 * x + 0.5 * x[partner]
    factor = int(torch.randint(4, 9, (1,), generator=generator))
    small = F.interpolate(x, size=(max(1, h // factor), max(1, w // factor)), mode="area")
    blurred = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    out = torch.where((kind == 0)[:, None, None, None], mixed, torch.where((kind == 1)[:, None, None, None],
                                                                            blurred, shuffled_patches(x, generator)))
    return out.round().clamp(0, 255).to(torch.uint8)


def shuffled_patches(x: torch.Tensor, generator: torch.Generator, grid: int = 4) -> torch.Tensor:
    """Each image's grid x grid patches in a random order (a side that does not divide keeps its last rows)."""
    n, c, h, w = x.shape
    ph, pw = h // grid, w // grid
    out = x.clone()
    patches = x[:, :, :ph * grid, :pw * grid].reshape(n, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(n, grid * grid, c, ph, pw)
    order = torch.argsort(torch.rand(n, grid * grid, generator=generator), dim=1)
    patches = patches[torch.arange(n)[:, None], order].reshape(n, grid, grid, c, ph, pw)
    out[:, :, :ph * grid, :pw * grid] = patches.permute(0, 3, 1, 4, 2, 5).reshape(n, c, ph * grid, pw * grid)
    return out
