"""Sample-quality metrics on two sets of vectors (N x D tensors: features of an image network from
pipeline/evaluation/features.py, or flattened, pooled latents and down-sampled images).

- Frechet distance (FID's formula when the features are Inception's): ||mu_r - mu_g||^2 + tr(S_r + S_g -
  2 (S_r S_g)^(1/2)), the trace term from the eigenvalues of S_r^(1/2) S_g S_r^(1/2) (symmetric, so stable).
- KID (Binkowski et al. 2018): unbiased MMD^2 under the cubic polynomial kernel (x.y / D + 1)^3, mean and std
  over random subsets.

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


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to the two sets (float64 throughout)."""
    a, b = real.flatten(1).double(), fake.flatten(1).double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], a.shape[1]), torch.cov(b.T).reshape(b.shape[1], b.shape[1])
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = (vecs * vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = 50, subset_size: int = 1000,
                              seed: int = 0) -> dict[str, float]:
    """KID: unbiased MMD^2 under k(x, y) = (x.y / D + 1)^3 over `subsets` random subsets of both sets (at most half
    of each set, so the subsets differ and their spread says how much the estimate moves)."""
    a, b = real.flatten(1).double(), fake.flatten(1).double()
    size = max(2, min(subset_size, len(a) // 2, len(b) // 2))
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=generator)[:size]]
        y = b[torch.randperm(len(b), generator=generator)[:size]]
        kxx, kyy, kxy = [(u @ v.T / a.shape[1] + 1) ** 3 for u, v in ((x, x), (y, y), (x, y))]
        off = size * (size - 1)
        values.append(((kxx.sum() - kxx.diagonal().sum()) / off + (kyy.sum() - kyy.diagonal().sum()) / off
                       - 2 * kxy.mean()).item())
    values = torch.tensor(values, dtype=torch.float64)
    return {"kid": values.mean().item(), "kid_std": values.std().item() if len(values) > 1 else 0.0}


def recognisable_share(probabilities: torch.Tensor, confidence: float = 0.9) -> float:
    """The share of samples a classifier assigns to one class with probability >= confidence."""
    return (probabilities.max(dim=1).values >= confidence).double().mean().item()


def class_histogram(probabilities: torch.Tensor) -> torch.Tensor:
    """The share of samples predicted as each class (argmax)."""
    counts = torch.bincount(probabilities.argmax(dim=1), minlength=probabilities.shape[1]).double()
    return counts / counts.sum()


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    """Total-variation distance between two histograms: 0 identical, 1 disjoint; dropped modes show here."""
    return 0.5 * (p.double() - q.double()).abs().sum().item()


def total_variation_noise(histogram: torch.Tensor, n: int, m: int, draws: int = 4000, seed: int = 0) -> dict:
    """What class TV sampling alone gives: the TV between the histograms of n and m draws from one class mix
    (`histogram`), over `draws` seeded pairs: its mean and 95th percentile. A generator whose images the evaluator
    sorts into real's proportions, scored as a run is (n generated against m reference), reads this much: below the
    95th percentile class TV cannot tell a class mix from real's."""
    gen = torch.Generator().manual_seed(seed)
    tv = 0.5 * (_multinomial_shares(histogram, n, draws, gen) - _multinomial_shares(histogram, m, draws, gen)).abs()
    tv = tv.sum(dim=1)
    return {"mean": tv.mean().item(), "p95": tv.quantile(0.95).item()}


def _multinomial_shares(histogram: torch.Tensor, n: int, draws: int, generator: torch.Generator) -> torch.Tensor:
    """`draws` class histograms of n samples each from `histogram`, as a chain of binomials (memory draws x classes,
    whatever n)."""
    p = histogram.double().clamp(min=0)
    p = p / p.sum()
    remaining = torch.full((draws,), float(n), dtype=torch.float64)
    mass_left, counts = 1.0, []
    for share in p.tolist():
        prob = torch.full((draws,), min(1.0, share / mass_left) if mass_left > 0 else 0.0, dtype=torch.float64)
        count = torch.binomial(remaining, prob, generator=generator)
        counts.append(count)
        remaining, mass_left = remaining - count, mass_left - share
    return torch.stack(counts, dim=1) / n


def nearest_distances(queries: torch.Tensor, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query, the distance to its nearest neighbour in `pool` and that neighbour's index."""
    d = _distances(queries.flatten(1), pool.flatten(1))
    values, index = d.min(dim=1)
    return values, index


def copy_share(generated_to_train: torch.Tensor, held_out_to_train: torch.Tensor, quantile: float = 0.05) -> float:
    """Memorisation ("authenticity", Alaa et al. 2022): the share of generated samples closer to their nearest
    training sample than all but `quantile` of held-out real images are. Held-out real data scores about
    `quantile` by construction; a model that copies its training set scores near 1."""
    threshold = torch.quantile(held_out_to_train.double(), quantile)
    return (generated_to_train.double() < threshold).double().mean().item()


def feature_metrics(real: torch.Tensor, fake: torch.Tensor, kid_subset_size: int = 1000) -> dict[str, float]:
    """The feature-space table's distribution metrics: FD, KID (mean, std), precision/recall, density/coverage."""
    real, fake = real.flatten(1), fake.flatten(1)
    return ({"fd": frechet_distance(real, fake)} | kernel_inception_distance(real, fake, subset_size=kid_subset_size)
            | precision_recall(real, fake) | density_coverage(real, fake))


def all_metrics(real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
    """Every metric above, on flattened inputs."""
    real, fake = real.flatten(1), fake.flatten(1)
    return precision_recall(real, fake) | density_coverage(real, fake) | {"mmd": mmd_rbf(real, fake)}


def pool_latents(z: torch.Tensor, side: int) -> torch.Tensor:
    """Average-pools C x h x w latents to C x side x side: fewer dimensions when there are few samples."""
    return torch.nn.functional.adaptive_avg_pool2d(z.float(), side)
