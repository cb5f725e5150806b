"""Near-copies of training images, found on the images themselves (not in a feature space, where a smear and an
image of the same class sit close together).

Each image is compared at COPY_SIDE px, smoothed by a 3 x 3 box (JPEG's ringing does not hide a copy), each colour
channel normalised to zero mean and unit norm (nor does a brightness or contrast change), and each candidate pair at
its best alignment within +-MAX_SHIFT px (a shifted copy is still a copy). A generated image's **copy ratio** is
its distance to its nearest training image over the mean distance to the next RATIO_NEIGHBOURS: a ratio, not a
distance, so an image of a plain kind is not a copy for being close to many (Carlini et al. 2023 count an extraction
the same way). The copy share is the share of a set whose ratio is under the 5th percentile of held-out real images'
ratios, so group-held-out real reads 0.05 by construction; `near_copies` makes the near-copier the check must catch
(training images shifted, colour-jittered and re-encoded as JPEG). The bar is only as good as the reference: where
held-out images have twins in training (a split by image), their own ratios are low and near-copies pass
(bench/yardstick-emoji.md).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from torch.nn import functional as F

COPY_SIDE = 64
MAX_SHIFT = 3
CANDIDATES = 16          # nearest by plain distance, then aligned
RATIO_NEIGHBOURS = 5


def _normalised(images: torch.Tensor) -> torch.Tensor:
    x = images.float() / 255.0
    if x.shape[-2:] != (COPY_SIDE, COPY_SIDE):
        x = F.interpolate(x, size=(COPY_SIDE, COPY_SIDE), mode="bilinear", antialias=True, align_corners=False)
    x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = x - x.mean(dim=(2, 3), keepdim=True)
    return x / x.flatten(2).norm(dim=2).clamp(min=1e-3)[..., None, None]


def _aligned_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per pair (a[i], b[i]): the smallest distance over shifts of b by up to MAX_SHIFT px (edge-padded)."""
    s = MAX_SHIFT
    padded = F.pad(b, (s, s, s, s), mode="replicate")
    best = None
    for dy in range(2 * s + 1):
        for dx in range(2 * s + 1):
            d = (a - padded[..., dy:dy + COPY_SIDE, dx:dx + COPY_SIDE]).flatten(1).norm(dim=1)
            best = d if best is None else torch.minimum(best, d)
    return best


def copy_ratios(images: torch.Tensor, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's copy ratio against the training images `pool` (uint8 N x 3 x H x W) and the index of its nearest
    one."""
    q, p = _normalised(images), _normalised(pool)
    k = min(CANDIDATES, len(pool))
    ratios, nearest = [], []
    for start in range(0, len(q), 256):
        block = q[start:start + 256]
        d = torch.cdist(block.flatten(1), p.flatten(1))
        candidates = d.topk(k, largest=False).indices
        aligned = _aligned_distance(block.repeat_interleave(k, 0), p[candidates.flatten()]).view(len(block), k)
        aligned, order = aligned.sort(dim=1)
        others = aligned[:, 1:1 + RATIO_NEIGHBOURS].mean(1).clamp(min=1e-6)
        ratios.append(aligned[:, 0] / others)
        nearest.append(candidates.gather(1, order[:, :1]).squeeze(1))
    return torch.cat(ratios), torch.cat(nearest)


def near_copies(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Training images made into the near-copies a memorising model emits: shifted by up to 3 px at 64 px (3/64 of
    the side at any size), brightness and contrast jittered by up to 10%, and re-encoded as JPEG (quality 75)."""
    from PIL import Image

    n, _, h, w = images.shape
    most = round(3 * h / 64)  # 3 px at 64 px: what the comparison aligns (MAX_SHIFT at COPY_SIDE)
    shift = torch.randint(-most, most + 1, (n, 2), generator=generator)
    gain = 1 + 0.2 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5)
    offset = 25.5 * (torch.rand(n, 3, 1, 1, generator=generator) - 0.5)
    x = images.float()
    x = torch.stack([torch.roll(x[i], (int(shift[i, 0]), int(shift[i, 1])), dims=(1, 2)) for i in range(n)])
    x = ((x - 127.5) * gain + 127.5 + offset).round().clamp(0, 255).to(torch.uint8)
    out = []
    for image in x:
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=75)
        out.append(torch.from_numpy(np.array(Image.open(buffer).convert("RGB"))).permute(2, 0, 1))
    return torch.stack(out)
