"""Sample-quality metrics that need no Inception network: k-NN manifold metrics and kernel MMD.

All functions take two sets of vectors (N x D tensors: flattened, pooled latents or down-sampled images).

- precision / recall, k = 3 (Kynkaanniemi et al. 2019): the share of generated samples inside the real samples'
  k-NN balls, and the reverse. They read low in high dimensions even for a perfect model.
- density / coverage, k = 5 (Naeem et al. 2020): how many real k-NN balls each generated sample falls in (about 1
  for a perfect model), and the share of real balls that hold at least one generated sample.
  Calibration: two independent N(0, I) sets in 1000-d give density ~1.06, coverage ~0.97.
- MMD^2 with an RBF kernel at the median pairwise distance (unbiased estimator, Gretton et al. 2012).
"""

from __future__ import annotations

import torch


def _distances(a: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    return torch.cat([torch.cdist(a[i:i + chunk].double(), b.double()) for i in range(0, len(a), chunk)])


def knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    d = _distances(x, x)
    return d.kthvalue(k + 1, dim=1).values  # the 1st smallest is the point itself, at distance 0


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict[str, float]:
    real_radii, fake_radii = knn_radii(real, k), knn_radii(fake, k)
    fake_to_real = _distances(fake, real)
    precision = (fake_to_real <= real_radii[None, :]).any(dim=1).double().mean().item()
    recall = (fake_to_real.T <= fake_radii[None, :]).any(dim=1).double().mean().item()
    return {"precision": precision, "recall": recall}


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict[str, float]:
    real_radii = knn_radii(real, k)
    inside = _distances(fake, real) <= real_radii[None, :]   # fake j inside real ball i
    density = inside.double().sum().item() / (k * len(fake))
    coverage = inside.any(dim=0).double().mean().item()
    return {"density": density, "coverage": coverage}


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None) -> float:
    """Unbiased MMD^2 between x and y under exp(-d^2 / (2 h^2)); h is the median pairwise distance if not given."""
    xy = torch.cat([x, y]).double()
    d = _distances(xy, xy)
    if bandwidth is None:
        bandwidth = d[torch.triu_indices(len(xy), len(xy), 1).unbind()].median().item()
    kernel = torch.exp(-d.pow(2) / (2 * bandwidth ** 2))
    n, m = len(x), len(y)
    kxx, kyy, kxy = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:]
    return ((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
            - 2 * kxy.mean()).item()


def all_metrics(real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
    """Every metric above, on flattened inputs."""
    real, fake = real.flatten(1), fake.flatten(1)
    return precision_recall(real, fake) | density_coverage(real, fake) | {"mmd": mmd_rbf(real, fake)}


def pool_latents(z: torch.Tensor, side: int) -> torch.Tensor:
    """Average-pools C x h x w latents to C x side x side: fewer dimensions when there are few samples."""
    return torch.nn.functional.adaptive_avg_pool2d(z.float(), side)
