"""Adding a model kind (docs/model-kinds.md): a test-only kind in a plugin module (tests/toy_kind.py), registered
in one line each for its model and its objective, trained through Ray Train, generated from through the Ray DAG and
evaluated, with nothing else in ebd changed."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from pipeline.common.config import ConfigError, from_dict, load_config
from pipeline.evaluation.report import EvaluateConfig, run_evaluation
from pipeline.generation import GenerateConfig, run_generation
from pipeline.io.image_shards import read_generated
from pipeline.models import KINDS, load_model
from pipeline.models.base import PretrainedModel
from pipeline.training.config import TrainConfig
from pipeline.training.job import run_training
from pipeline.training.objectives import OBJECTIVES
from tests.conftest import REPO, mixture

PLUGIN = "tests.toy_kind"


def test_a_kind_from_a_plugin_trains_generates_and_evaluates(ray_cluster, mixture_latents, sd_checkpoint, tmp_path):
    # built as every job builds its config: load_config imports the plugins first (validation itself imports nothing)
    run_training(load_config(TrainConfig, None, **dict(latents=str(mixture_latents), output=str(tmp_path / "toy"),
                                                        plugins=[PLUGIN], objective={"name": "toy"}, batch_size=64,
                                                        lr=0.05, beta1=0.9, max_steps=150, log_every=50,
                                                        checkpoint_every=150, holdout_shards=2)))
    model = load_model(tmp_path / "toy" / "model")
    assert type(model).__name__ == "ToyGaussian" and "ToyGaussian" in KINDS and "toy" in OBJECTIVES
    data = torch.from_numpy(mixture(2048, seed=0))
    assert model.mean.detach().mean().item() == pytest.approx(data.mean().item(), abs=0.05)  # it learned the data's
    assert model.log_scale.exp().item() == pytest.approx(data.std().item(), rel=0.2)          # mean and spread

    # written in a third output format a second plugin registers (tests/third_format.py): the run, resume, the
    # manifest and evaluation all go through the format registry
    plugins = [PLUGIN, "tests.third_format"]
    summary = run_generation(load_config(GenerateConfig, None, model=str(tmp_path / "toy" / "model"),
                                         vae=str(sd_checkpoint), output=str(tmp_path / "gen"), plugins=plugins,
                                         num_images=40, images_per_shard=20, batch_size=20, formats=["zipped"],
                                         progress_interval_s=0.0))
    assert summary["images"] == 40 and summary["sampler"] == "euler" and summary["gradient_evaluations_per_image"] == 8
    latents, _ = read_generated(tmp_path / "gen")
    assert latents.shape == (40, 4, 4, 4) and abs(latents.mean().item() - data.mean().item()) < 0.15

    assert sorted(p.name for p in (tmp_path / "gen").iterdir() if p.is_dir()) == ["stats", "zipped"]
    report = run_evaluation(load_config(EvaluateConfig, None, generated=str(tmp_path / "gen"),
                                        reference=str(mixture_latents), output=str(tmp_path / "r"), plugins=plugins,
                                        check_space="latents", num_samples=40, memorisation_pool=64, image_side=8,
                                        realism_epochs=2))
    assert report["samples"] == 40 and report["model"]["id"].startswith("model-")
    assert set(report["spaces"]["latents"]["metrics"]) >= {"generated", "untrained", "starts", "gaussian"}


def test_a_config_naming_a_kind_nobody_registered_is_one_line(mixture_latents):
    with pytest.raises(ConfigError, match="unknown objective 'nosuch'"):
        from_dict(TrainConfig, dict(latents=str(mixture_latents), output="o", objective="nosuch"))
    with pytest.raises(ConfigError, match="plugin 'tests.no_such_plugin' cannot be imported"):
        load_config(TrainConfig, None, latents=str(mixture_latents), output="o", plugins=["tests.no_such_plugin"])


def test_the_docs_paragraph_names_what_the_code_has():
    """Every method, registry and file docs/model-kinds.md tells a newcomer to write or use exists."""
    text = (REPO / "docs" / "model-kinds.md").read_text()
    methods = {name for name in re.findall(r"`(\w+)\(", text)}
    owners = (PretrainedModel, KINDS["NoiseConditionalEnergy"].CONFIG, OBJECTIVES["dsm"], OBJECTIVES["dsm"].Settings)
    for name in methods:
        assert any(hasattr(owner, name) for owner in owners), name
    for name in re.findall(r"`((?:pipeline|tests)/[\w/.]+\.(?:py|md))`", text):
        assert "your_" in name or (REPO / name).is_file(), name
    assert {"KINDS", "OBJECTIVES", "register", "plugins"} <= set(re.findall(r"`(\w+)`", text))
    assert json.loads(json.dumps(sorted(KINDS)))  # the registry is plain data: names -> classes
    assert np.all([issubclass(cls, PretrainedModel) for cls in KINDS.values()])
