"""Levels fitted to a model (`ebd tune-sampler`, sampling/tuning.py): the search is exact, the fitted levels beat the
Karras levels with as many gradients on the exact Gaussian, and the folder samples with them with no flag."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from pipeline.common.config import ConfigError
from pipeline.models import load_model
from pipeline.models.noise_energy import NoiseConditionalEnergy, NoiseConditionalEnergyConfig
from pipeline.sampling.core import sample_latents
from pipeline.sampling.settings import sampler_settings, with_overrides
from pipeline.sampling.tuning import cheapest_path
from tests.conftest import run_job_here

S = 0.8  # an untrained energy with sigma_data S is exactly the Gaussian N(0, S^2 I)'s noise-conditional energy


def test_the_search_finds_the_cheapest_path_of_exactly_k_steps():
    """Against every path by brute force, on a random cost matrix."""
    torch.manual_seed(0)
    n = 9
    cost = torch.rand(n, n, dtype=torch.float64).triu(1)
    cost[cost == 0] = math.inf
    for steps in (1, 3, 5, n - 1):
        path, total = cheapest_path(cost, steps)
        brute = min((sum(float(cost[a, b]) for a, b in zip(p, p[1:])), p)
                    for middle in itertools.combinations(range(1, n - 1), steps - 1) for p in [(0, *middle, n - 1)])
        assert total == pytest.approx(brute[0]) and tuple(path) == brute[1]


@pytest.fixture
def gaussian_folder(tmp_path):
    config = NoiseConditionalEnergyConfig([4, 8, 8], [16, 32], sigma_data=S, sigma_max=40.0)
    sampler = {"name": "ipndm", "levels": 12, "sigma_min": 0.002, "sigma_max": 40.0}
    return NoiseConditionalEnergy(config, {"sampler": sampler}).save_pretrained(tmp_path / "model")


def test_fitted_levels_carry_the_gaussian_closer_to_the_exact_flow_than_karras_levels(gaussian_folder, capsys):
    """The probability-flow ODE of N(0, S^2 I) maps a start z to z S / sqrt(S^2 + sigma_max^2) exactly: with 5
    gradients, iPNDM on the fitted levels lands nearer that than on 5 Karras levels. The folder then samples with
    them, 5 gradients per image, with no flag; a job may still ask for the Karras schedule."""
    code, err = run_job_here(capsys, "jobs.tune_sampler", "--model", str(gaussian_folder), "--levels", "5",
                             "--chains", "16")
    assert code == 0, err
    saved = json.loads((gaussian_folder / "config.json").read_text())
    assert saved["sampler"]["schedule"] == "tuned" and len(saved["sampler"]["sigmas"]) == 5
    record = saved["sampler_tuning"]
    assert record["summed_local_error"] < record["karras_summed_local_error"]
    assert record["replaced"]["levels"] == 12 and record["replaced"]["schedule"] == "karras"

    model = load_model(gaussian_folder)
    assert model.sampler.sigmas == saved["sampler"]["sigmas"] and model.sampler.sigmas[0] == 40.0

    def error(settings) -> float:
        samples = sample_latents(model, range(200), 7, settings)
        assert samples.evaluations_per_chain == 5
        starts = model.initial_latents(200, settings, [torch.Generator().manual_seed(s) for s in samples.seeds])
        exact = starts * S / math.sqrt(S ** 2 + 40.0 ** 2)
        return ((samples.latents - exact).norm() / exact.norm()).item()

    karras = model.resolve_sampler({"schedule": "karras"})
    assert karras.sigmas is None and karras.levels == 5
    assert error(model.sampler) < 0.5 * error(karras)


def test_a_tuned_schedule_is_checked_and_left_whole():
    with pytest.raises(ConfigError, match="a tuned schedule's sigmas must be 3 decreasing positive levels"):
        sampler_settings({"name": "ipndm", "levels": 3, "schedule": "tuned", "sigmas": [5.0, 6.0, 1.0]})
    with pytest.raises(ConfigError, match="sigmas are the levels of schedule: tuned only"):
        sampler_settings({"name": "ipndm", "levels": 2, "sigmas": [5.0, 1.0]})
    tuned = sampler_settings({"name": "ipndm", "levels": 3, "schedule": "tuned", "sigmas": [40.0, 3.0, 0.5]})
    with pytest.raises(ConfigError, match="for another count of levels set schedule: karras, or tune again"):
        with_overrides(tuned, {"levels": 8})
    assert with_overrides(tuned, {"schedule": "karras", "levels": 8}).sigmas is None
    assert with_overrides(tuned, {"name": "dpmpp_2m"}).sigmas == [40.0, 3.0, 0.5]
