"""Feature-space metrics against closed forms, the evaluator's save/load and VAE identity, and FID Inception weights
loaded from a local file (random weights of the real architecture; nothing reaches the network)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.common.config import EbdError
from pipeline.evaluation import quality
from pipeline.evaluation.features import FIDInceptionV3, ImageEvaluator, InceptionFeatures, load_feature_extractor


def test_frechet_distance_is_zero_for_a_set_against_itself_and_matches_the_closed_form_for_gaussians():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 8, generator=g)
    assert quality.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    # N(mu1, diag(s1)) vs N(mu2, diag(s2)): |mu1 - mu2|^2 + sum(s1 + s2 - 2 sqrt(s1 s2))
    s1, s2 = torch.linspace(0.5, 2.0, 8), torch.linspace(3.0, 0.2, 8)
    mu1, mu2 = torch.zeros(8), torch.full((8,), 0.5)
    a = mu1 + torch.randn(200_000, 8, generator=g) * s1.sqrt()
    b = mu2 + torch.randn(200_000, 8, generator=g) * s2.sqrt()
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum()
    assert quality.frechet_distance(a, b) == pytest.approx(expected.item(), rel=0.02)


def test_kid_is_about_zero_for_two_samples_of_one_distribution_and_positive_for_two_distributions():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2000, 16, generator=g), torch.randn(2000, 16, generator=g)
    same = quality.kernel_inception_distance(a, b, subsets=20, subset_size=500)
    assert abs(same["kid"]) < 3 * same["kid_std"] + 1e-4, same
    other = quality.kernel_inception_distance(a, b * 1.5 + 0.5, subsets=20, subset_size=500)
    assert other["kid"] > 10 * abs(same["kid"]) and other["kid"] > 5 * other["kid_std"], (same, other)


def test_label_metrics_and_copy_share():
    probs = torch.tensor([[0.95, 0.05], [0.5, 0.5], [0.02, 0.98], [0.91, 0.09]])
    assert quality.recognisable_share(probs, 0.9) == 0.75
    assert quality.class_histogram(probs).tolist() == [0.75, 0.25]
    assert quality.total_variation(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == 1.0
    # Sampling noise alone: two fair coins tossed 100 times each differ by |X - Y| / 100 heads, E = sqrt(2 x 25 x 2
    # / pi) / 100 = 0.0564; one class leaves nothing to differ; more samples, less noise.
    coins = quality.total_variation_noise(torch.tensor([0.5, 0.5]), 100, 100)
    assert coins["mean"] == pytest.approx((100 / math.pi) ** 0.5 / 100, abs=0.003)
    # heads and tails move together (one toss is one or the other): |X - Y| / 100 with X - Y ~ N(0, 50) has its 95th
    # percentile at 1.96 x sqrt(50) / 100 = 0.139; per-class counts drawn on their own would read 0.115
    assert coins["p95"] == pytest.approx(0.14, abs=0.006)
    assert quality.total_variation_noise(torch.tensor([1.0, 0.0]), 375, 375) == {"mean": 0.0, "p95": 0.0}
    mix = torch.tensor([0.6, 0.2, 0.1, 0.1])
    assert quality.total_variation_noise(mix, 1500, 375)["mean"] < quality.total_variation_noise(mix, 375, 375)["mean"]
    g = torch.Generator().manual_seed(2)
    train, held_out = torch.randn(500, 4, generator=g), torch.randn(400, 4, generator=g)
    held_to_train, _ = quality.nearest_distances(held_out, train)
    copies = train[:100] + 1e-3 * torch.randn(100, 4, generator=g)
    copies_to_train, index = quality.nearest_distances(copies, train)
    assert index.tolist() == list(range(100))  # each copy's nearest training sample is its original
    assert torch.allclose(copies_to_train.float(), (copies - train[:100]).norm(dim=1), atol=1e-5)
    assert quality.copy_share(copies_to_train, held_to_train) == 1.0
    fresh, _ = quality.nearest_distances(torch.randn(400, 4, generator=g), train)
    assert quality.copy_share(fresh, held_to_train) < 0.12


def tiny_evaluator(kind="classifier", sha="a" * 64) -> ImageEvaluator:
    torch.manual_seed(0)
    return ImageEvaluator({"kind": kind, "classes": ["disc", "ring"] if kind == "classifier" else [],
                           "resolution": 16, "widths": [8, 16], "feature_dim": 12, "projection_dim": 6,
                           "vae": {"weights_sha256": sha}, "confidence": 0.9})


def test_evaluator_saves_and_loads_with_its_config_and_reads_any_image_size(tmp_path):
    model = tiny_evaluator()
    images = torch.randint(0, 256, (5, 3, 24, 24), dtype=torch.uint8)
    model.save_pretrained(tmp_path / "ev")
    assert sorted(p.name for p in (tmp_path / "ev").iterdir()) == ["config.json", "model.safetensors"]
    loaded = ImageEvaluator.from_pretrained(tmp_path / "ev")
    assert loaded.classes == ["disc", "ring"] and loaded.vae_sha256 == "a" * 64
    assert torch.equal(loaded.features(images), model.features(images))
    assert loaded.features(images).shape == (5, 12)
    probs = loaded.probabilities(images)
    assert probs.shape == (5, 2) and torch.allclose(probs.sum(1), torch.ones(5))
    assert tiny_evaluator("contrastive").probabilities(images) is None
    with pytest.raises(EbdError, match="not an evaluator folder"):
        ImageEvaluator.from_pretrained(tmp_path)


def test_inception_weights_load_from_a_local_file_in_either_format(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = FIDInceptionV3().state_dict()
    torch.save(state, tmp_path / "pt_inception-2015-12-05.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "inception.safetensors"))
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    a = InceptionFeatures(tmp_path / "pt_inception-2015-12-05.pth").features(images)
    b = load_feature_extractor("inception", inception_weights=str(tmp_path / "inception.safetensors")).features(images)
    assert a.shape == (2, 2048) and torch.isfinite(a).all() and torch.equal(a, b)

    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(EbdError, match="does not hold FID Inception v3 weights"):
        InceptionFeatures(tmp_path / "other.pth")
    with pytest.raises(EbdError, match="not found"):
        InceptionFeatures(tmp_path / "missing.pth")
    (tmp_path / "pickle.pth").write_bytes(b"\x80\x04cos\nsystem\n.")  # a pickle that would run code
    with pytest.raises(EbdError, match="not a readable Inception weights file"):
        InceptionFeatures(tmp_path / "pickle.pth")


def test_nt_xent_is_lowest_when_views_match():
    from pipeline.evaluation.evaluator_fit import nt_xent

    g = torch.Generator().manual_seed(3)
    a = torch.randn(32, 8, generator=g)
    matched = nt_xent(a, a + 0.01 * torch.randn(32, 8, generator=g), 0.2)
    shuffled = nt_xent(a, a[torch.randperm(32)], 0.2)
    assert matched < shuffled and matched.item() < math.log(63)


def test_an_unlabelled_latent_folder_gives_a_contrastive_evaluator_that_records_its_vae(sd_checkpoint, tmp_path):
    import numpy as np

    from pipeline.common.config import from_dict
    from pipeline.evaluation.evaluator_fit import FitEvaluatorConfig, fit_evaluator
    from pipeline.io.latent_shards import write_latent_dataset
    from pipeline.vae.autoencoder import resolve_vae

    rng = np.random.default_rng(0)
    identity = resolve_vae(sd_checkpoint).identity()
    write_latent_dataset(tmp_path / "latents", rng.normal(size=(96, 4, 4, 4)).astype(np.float32), shard_size=32,
                         vae=identity, shuffled=True)
    config = fit_evaluator(from_dict(FitEvaluatorConfig, dict(
        latents=str(tmp_path / "latents"), output=str(tmp_path / "ev"), resolution=8, widths=[8], feature_dim=8,
        steps=5, batch_size=16)))
    assert config["kind"] == "contrastive" and config["classes"] == []
    assert config["held_out"]["files"] == ["latents-000002.tar"] and config["training"]["images"] == 64
    loaded = ImageEvaluator.from_pretrained(tmp_path / "ev")
    assert loaded.vae_sha256 == identity["weights_sha256"] and loaded.probabilities(torch.zeros(2, 3, 8, 8)) is None
    with pytest.raises(EbdError, match="needs at least two labels"):
        fit_evaluator(from_dict(FitEvaluatorConfig, dict(latents=str(tmp_path / "latents"), kind="classifier",
                                                         output=str(tmp_path / "ev2"), steps=1, batch_size=2)))
