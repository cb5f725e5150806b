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
from dataclasses import dataclass

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


@dataclass(frozen=True)
class CopyPool:
    """The training images prepared once for every set's search: normalised and flattened (the candidate search),
    and for the aligned distance the spectrum of each edge-padded image with the energy of each of its shifted
    windows. Every set a report scores is searched against the same pool."""
    flat: torch.Tensor           # N x (3 * COPY_SIDE^2)
    spectrum: torch.Tensor       # N x 3 x S x (S // 2 + 1), complex, S = COPY_SIDE + 2 * MAX_SHIFT
    window_energy: torch.Tensor  # N x (2 * MAX_SHIFT + 1) x (2 * MAX_SHIFT + 1)

    def __len__(self) -> int:
        return len(self.flat)


def copy_pool(pool: torch.Tensor) -> CopyPool:
    """`pool` (uint8 N x 3 x H x W) prepared for `copy_ratios`."""
    p, s = _normalised(pool), MAX_SHIFT
    padded = F.pad(p, (s, s, s, s), mode="replicate")
    energy = F.avg_pool2d(padded.pow(2).sum(1, keepdim=True), COPY_SIDE, stride=1).squeeze(1) * COPY_SIDE ** 2
    return CopyPool(p.flatten(1), torch.fft.rfft2(padded), energy)


def _aligned_distances(block: torch.Tensor, pool: CopyPool, candidates: torch.Tensor) -> torch.Tensor:
    """(B x k) distances of each image of `block` to its k candidates, each at its best shift by up to MAX_SHIFT px
    (the candidate edge-padded): |a - w|^2 = |a|^2 + |w|^2 - 2 a.w, with a.w for all shifts at once as one
    cross-correlation, summed over the channels in the frequency domain."""
    size = COPY_SIDE + 2 * MAX_SHIFT
    spectrum = torch.fft.rfft2(block, s=(size, size))                       # zero-padded: no shift wraps around
    product = (spectrum.conj()[:, None] * pool.spectrum[candidates]).sum(2)  # B x k x S x (S // 2 + 1)
    shifts = 2 * MAX_SHIFT + 1
    correlation = torch.fft.irfft2(product, s=(size, size))[..., :shifts, :shifts]
    squared = block.pow(2).flatten(1).sum(1)[:, None, None, None] + pool.window_energy[candidates] - 2 * correlation
    return squared.clamp(min=0).flatten(2).min(2).values.sqrt()


def copy_ratios(images: torch.Tensor, pool: torch.Tensor | CopyPool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's copy ratio against the training images `pool` (uint8 N x 3 x H x W, or prepared by `copy_pool`)
    and the index of its nearest one."""
    pool = pool if isinstance(pool, CopyPool) else copy_pool(pool)
    q = _normalised(images)
    k = min(CANDIDATES, len(pool))
    ratios, nearest = [], []
    for start in range(0, len(q), 128):
        block = q[start:start + 128]
        candidates = torch.cdist(block.flatten(1), pool.flat).topk(k, largest=False).indices
        aligned, order = _aligned_distances(block, pool, candidates).sort(dim=1)
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
