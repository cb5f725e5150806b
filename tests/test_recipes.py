"""The training-recipe keys bench/recipe.md measures: loss weightings, EDM preconditioning, the cosine rate and
EDM2's power-function EMA, each checked against its formula, and all of them through a real Ray Train run."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.common.config import ConfigError, from_dict
from pipeline.common.optim import learning_rate, power_ema_decay, power_ema_gamma
from pipeline.models import load_model
from pipeline.training.config import TrainConfig
from pipeline.training.objectives.dsm import DenoisingScoreMatching, DSMSettings

PREPARED = {"sigma_data": 0.5, "sigma_max": 40.0}


def objective(**keys) -> tuple[DenoisingScoreMatching, torch.nn.Module]:
    settings = DSMSettings(channels=[8], norm_groups=8, **keys)
    settings.validate()
    model = DenoisingScoreMatching.build_model(settings, [4, 8, 8], PREPARED, {})
    return DenoisingScoreMatching(settings, None, [4, 8, 8], torch.Generator().manual_seed(0)), model


def test_loss_weightings_follow_their_formulas_and_health_ignores_them():
    sigma = torch.tensor([0.01, 0.5, 5.0])
    s = PREPARED["sigma_data"]
    assert torch.equal(objective()[0].weights(sigma, s), torch.ones(3))
    assert torch.allclose(objective(loss_weighting="edm")[0].weights(sigma, s), 1 + (sigma / s) ** 2)
    snr = (s / sigma) ** 2
    assert torch.allclose(objective(loss_weighting="min_snr", min_snr_gamma=5.0)[0].weights(sigma, s),
                          snr.clamp(max=5.0) / snr)
    # an EDM-weighted loss at sigma 40 is 6,400 x the epsilon error: the divergence guard still reads the error
    dsm, model = objective(loss_weighting="edm")
    loss, _, healthy = dsm.loss(model, model, torch.randn(8, 4, 8, 8) * 0.5)
    assert healthy and math.isfinite(loss.item())


def test_edm_preconditioning_scales_the_network_part_starts_gaussian_and_survives_a_save(tmp_path):
    _, plain = objective()
    _, edm = objective(preconditioning="edm")
    edm.load_state_dict(plain.state_dict())
    z, sigma = torch.randn(4, 4, 8, 8), 3.0
    var = PREPARED["sigma_data"] ** 2 + sigma ** 2
    gaussian = z.flatten(1).pow(2).sum(1) / (2 * var)
    assert torch.allclose(edm(z, sigma), gaussian) and torch.allclose(plain(z, sigma), gaussian)  # g = 0 at start
    with torch.no_grad():  # a trained-looking network part, the same in both
        plain.net.conv_out.weight.normal_(0, 0.1)
    edm.load_state_dict(plain.state_dict())
    scale = PREPARED["sigma_data"] / math.sqrt(var)
    assert torch.allclose(edm(z, sigma) - gaussian, scale * (plain(z, sigma) - gaussian), atol=1e-5)
    loaded = load_model(edm.save_pretrained(tmp_path / "edm"))
    assert loaded.config.preconditioning == "edm" and torch.allclose(loaded(z, sigma), edm(z, sigma))


def test_power_function_ema_matches_edm2_and_the_cosine_rate_ends_at_zero():
    # EDM2 (Karras et al. 2024): sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94
    assert power_ema_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert power_ema_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    gamma = power_ema_gamma(0.10)
    assert power_ema_decay(1, gamma) == 0.0  # the first step replaces the average
    assert power_ema_decay(100, gamma) < power_ema_decay(10_000, gamma) < 1  # longer runs, longer averages
    assert learning_rate(999, 1e-3, 100, total_steps=1000) == pytest.approx(0, abs=1e-8)
    assert learning_rate(100, 1e-3, 100, total_steps=1000) == pytest.approx(1e-3)


def test_recipe_keys_are_validated_in_one_line(tmp_path):
    base = dict(latents=str(tmp_path), output=str(tmp_path / "o"))
    for bad, match in [({"ema_length": 0.5}, "ema_length"), ({"lr_schedule": "linear"}, "lr_schedule"),
                       ({"objective": {"name": "dsm", "loss_weighting": "snr"}}, "loss_weighting"),
                       ({"objective": {"name": "dsm", "min_snr_gamma": 0}}, "min_snr_gamma")]:
        with pytest.raises(ConfigError, match=match):
            from_dict(TrainConfig, base | bad)


@pytest.mark.integration
def test_a_dsm_run_with_every_recipe_key_trains_and_exports_them(ray_cluster, mixture_latents, tmp_path):
    from pipeline.training.job import run_training

    cfg = from_dict(TrainConfig, dict(
        latents=str(mixture_latents), output=str(tmp_path), max_steps=12, batch_size=16, log_every=4,
        checkpoint_every=12, warmup_steps=2, lr=1e-3, lr_schedule="cosine", ema_length=0.1,
        objective={"name": "dsm", "channels": [8], "norm_groups": 8, "preconditioning": "edm",
                   "loss_weighting": "edm"}))
    metrics = run_training(cfg)
    assert metrics["step"] == 12 and metrics["rollbacks"] == 0
    assert metrics["lr"] == pytest.approx(learning_rate(11, 1e-3, 2, total_steps=12))  # the last step's rate
    assert metrics["lr"] < 1e-4
    model = load_model(tmp_path / "model")
    assert model.config.preconditioning == "edm"


def test_the_default_recipe_for_real_images_trains_with_edm_preconditioning_and_weighting():
    """configs/train.yaml (the README's recipe) and configs/train-sd.yaml use what bench/recipe.md measured to help on
    real images, and configs/train-demo.yaml, the shipped demo energy's recipe, since it was retrained with it."""
    from pipeline.common.config import load_config
    from tests.conftest import REPO

    for name, expected in (("train.yaml", "edm"), ("train-sd.yaml", "edm"), ("train-demo.yaml", "edm")):
        cfg = load_config(TrainConfig, REPO / "configs" / name, latents="l", output="o")
        assert (cfg.objective.preconditioning, cfg.objective.loss_weighting) == (expected, expected), name
    # and the rate of bench/recipe.md's edm_lr_2x row (twice the demo recipe's), the best row on the real images
    for name in ("train.yaml", "train-demo.yaml"):
        assert load_config(TrainConfig, REPO / "configs" / name, latents="l", output="o").lr == 0.0006
