"""Quality metrics against known answers: same distribution, shifted, collapsed, and the published calibration."""

import pytest
import torch

from pipeline.evaluation.quality import all_metrics, density_coverage, mmd_rbf, pool_latents, precision_recall


def gaussian(n, d, seed, shift=0.0, scale=1.0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * scale + shift


def test_two_samples_of_one_gaussian_match_the_published_calibration():
    real, fake = gaussian(2000, 1000, 0), gaussian(2000, 1000, 1)
    dc = density_coverage(real, fake)
    assert 0.9 < dc["density"] < 1.2 and dc["coverage"] > 0.9      # Naeem et al.: ~1.06 and ~0.97
    pr = precision_recall(real, fake)
    assert 0.25 < pr["precision"] < 0.8 and 0.25 < pr["recall"] < 0.8  # read low in high dimensions (~0.48)
    assert abs(mmd_rbf(real, fake)) < 0.01


def test_a_shifted_distribution_scores_badly_on_every_metric():
    real, fake = gaussian(500, 64, 0), gaussian(500, 64, 1, shift=1.0)
    m = all_metrics(real, fake)
    assert m["density"] < 0.1 and m["coverage"] < 0.1 and m["precision"] < 0.2 and m["recall"] < 0.2
    assert m["mmd"] > 0.1


def test_dropping_a_mode_keeps_precision_but_halves_recall_and_coverage():
    modes = torch.where(torch.arange(500) % 2 == 0, 4.0, -4.0)[:, None]
    real = gaussian(500, 16, 0) + modes                  # two well-separated modes
    one_mode = gaussian(500, 16, 1) + 4.0                 # a model that only makes the first
    m = all_metrics(real, one_mode)
    assert m["precision"] > 0.7
    assert 0.3 < m["recall"] < 0.6 and 0.3 < m["coverage"] < 0.6


def test_pool_latents_reduces_dimensions_by_averaging():
    z = torch.arange(4 * 8 * 8, dtype=torch.float32).reshape(1, 4, 8, 8)
    pooled = pool_latents(z, 4)
    assert pooled.shape == (1, 4, 4, 4)
    assert pooled[0, 0, 0, 0] == pytest.approx(z[0, 0, :2, :2].mean())
