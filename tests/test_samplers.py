"""The samplers as pure functions: schedules, gradient counts, per-chain determinism, Metropolis correctness, and
the noise-conditional energy's Gaussian start."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.common.config import ConfigError, EbdError
from pipeline.models import load_model
from pipeline.models.noise_energy import NoiseConditionalEnergy, NoiseConditionalEnergyConfig
from pipeline.sampling.core import SamplerStats, sample
from pipeline.sampling.denoisers import EnergyGradient
from pipeline.sampling.samplers import langevin, mala
from pipeline.sampling.schedules import karras_sigmas
from pipeline.sampling.settings import AnnealedSettings, LangevinSettings, sampler_settings


def gaussian_energy(z: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
    """N(0, (1 + sigma^2) I): the exact noise-conditional energy of standard normal data."""
    return z.flatten(1).pow(2).sum(1) / (2 * (1 + (sigma or 0.0) ** 2))


def energy_model(seed: int = 0, shape=(4, 8, 8)) -> NoiseConditionalEnergy:
    """A small noise-conditional energy with random (not zero) output weights, so its energy is not just the base."""
    torch.manual_seed(seed)
    model = NoiseConditionalEnergy(NoiseConditionalEnergyConfig(list(shape), [16, 32], sigma_max=20.0))
    torch.nn.init.normal_(model.net.conv_out.weight, std=0.05)
    return model.eval()


def gens(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_the_karras_schedule_runs_from_sigma_max_down_to_sigma_min():
    sigmas = karras_sigmas(25, 0.002, 40.0)
    assert len(sigmas) == 25 and sigmas[0] == pytest.approx(40.0) and sigmas[-1] == pytest.approx(0.002)
    assert (sigmas[1:] < sigmas[:-1]).all()
    assert (sigmas < 1.0).sum() > 10  # rho = 7 spends most levels where detail forms


@pytest.mark.parametrize("settings", [AnnealedSettings("heun", 25, 0.002, 20.0),
                                      AnnealedSettings("ancestral", 40, 0.002, 20.0),
                                      AnnealedSettings("heun", 10, 0.002, 20.0, mala_levels=3, mala_steps=2),
                                      LangevinSettings(steps=7)], ids=["heun", "ancestral", "heun+mala", "langevin"])
def test_each_sampler_uses_exactly_the_gradients_its_settings_promise(settings):
    model = energy_model()
    if settings.name == "langevin":
        from pipeline.models.short_run_energy import EnergyModel, EnergyModelConfig
        model = EnergyModel(EnergyModelConfig([4, 8, 8], [8])).eval()
    stats = SamplerStats()
    z = sample(model, 3, settings, gens([0, 1, 2]), callback=stats)
    assert z.shape == (3, 4, 8, 8) and torch.isfinite(z).all()
    assert stats.evaluations == settings.gradient_evaluations()


def test_the_default_sampler_stays_within_50_gradients_and_correctors_need_a_level_below_the_top():
    assert AnnealedSettings().gradient_evaluations() == 49  # 25 Heun levels
    with pytest.raises(ConfigError, match="mala_levels must be in"):
        AnnealedSettings(levels=5, mala_levels=5).validate()


@pytest.mark.parametrize("name", ["heun", "ancestral"])
def test_a_chain_depends_only_on_its_own_seed(name):
    model = energy_model()
    settings = AnnealedSettings(name, 8, 0.002, 20.0, mala_levels=2)
    together = sample(model, 3, settings, gens([5, 6, 7]))
    assert torch.equal(together, sample(model, 3, settings, gens([5, 6, 7])))  # same seeds, same latents
    alone = sample(model, 1, settings, gens([6]))
    # chain 6 alone or beside others: the same chain (up to float32 rounding of differently-sized batches)
    assert torch.allclose(together[1], alone[0], atol=1e-4)
    assert not torch.allclose(together[0], together[1], atol=1e-2)


def test_mala_keeps_the_target_where_unadjusted_langevin_drifts_and_reports_acceptance():
    step, start = 0.8, 3 * torch.randn(4000, 16, generator=torch.Generator().manual_seed(0))  # 3x too wide
    stats = SamplerStats()
    energy = EnergyGradient(gaussian_energy)
    corrected = mala(energy, start, None, step, steps=30, generator=torch.Generator().manual_seed(1), callback=stats)
    unadjusted = langevin(energy, start, LangevinSettings(steps=30, step_size=2 * step, noise_scale=1.0),
                          torch.Generator().manual_seed(1))
    assert corrected.std().item() == pytest.approx(1.0, abs=0.03)  # reached the target N(0, I) and stays there
    assert unadjusted.std().item() == pytest.approx(math.sqrt(1 / (1 - step / 2)), abs=0.03)  # ULA's biased 1.29
    assert 0 < stats.acceptance < 1
    assert stats.evaluations == 31  # one at the start, one per proposal


def test_an_untrained_energy_is_exactly_the_gaussian_of_data_scaled_noise(tmp_path):
    config = NoiseConditionalEnergyConfig([4, 8, 8], [16, 32], sigma_data=0.8, sigma_max=30.0)
    model = load_model(NoiseConditionalEnergy(config, {"sampler": {"name": "heun", "levels": 25,
                                                                    "sigma_max": 30.0}}).save_pretrained(tmp_path))
    z = torch.randn(5, 4, 8, 8)
    for sigma in (0.01, 1.0, 30.0):
        assert torch.allclose(model(z, sigma), z.flatten(1).pow(2).sum(1) / (2 * (0.64 + sigma ** 2)), rtol=1e-5)
    start = model.initial_latents(2000, model.sampler, torch.Generator().manual_seed(0))
    assert start.std().item() == pytest.approx(math.sqrt(0.64 + 900), rel=0.02)
    out = sample(model, 400, model.sampler, torch.Generator().manual_seed(0))
    # With the exact energy, 25 Heun levels carry the start onto N(0, s^2) (measured: 1.5% wide; 12 levels: 8%).
    assert out.std().item() == pytest.approx(0.8, rel=0.03)


def test_sampler_settings_are_validated_in_one_line():
    with pytest.raises(EbdError, match="unknown sampler 'euler'"):
        sampler_settings({"name": "euler"})
    with pytest.raises(ConfigError, match="unknown config key 'levls'"):
        sampler_settings({"name": "heun", "levls": 3})
    with pytest.raises(ConfigError, match="sigma_min < sigma_max"):
        sampler_settings({"name": "ancestral", "sigma_min": 5.0, "sigma_max": 1.0})
    assert sampler_settings({"steps": 3}) == LangevinSettings(steps=3)  # models saved before samplers had names
