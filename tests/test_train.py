"""EBM training through Ray Train on a real local cluster, on latent shards written to disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save

from pipeline.common.config import EbdError, from_dict
from pipeline.io.files import file_sha256
from pipeline.models import load_model
from pipeline.models.short_run_energy import EnergyModel, EnergyModelConfig
from pipeline.sampling.core import SamplerStats, sample
from pipeline.sampling.settings import LangevinSettings
from pipeline.training.config import TrainConfig
from pipeline.training.cost import training_flops_per_sample
from pipeline.training.data import split_shards
from pipeline.training.job import run_training
from pipeline.training.objectives import OBJECTIVES, ContrastiveDivergence
from tests.conftest import (
    BASELINE_RECIPE,
    ENERGY_RECIPE,
    MODE_DISTANCE,
    REPO,
    SHAPE,
    WEIGHT_A,
    mixture,
    mode_check,
    run_job_here,
)

FAST = dict(objective="cd", channels=[16, 32], batch_size=32, lr=1e-3, log_every=50, checkpoint_every=100,
            max_steps=200)
TINY = dict(objective="cd", channels=[8], batch_size=16, langevin_steps=5, log_every=5, checkpoint_every=5)
TINY_DSM = dict(objective="dsm", channels=[8], norm_groups=8, batch_size=16, sampler_levels=5, log_every=5,
                checkpoint_every=5)
START = LangevinSettings(init_std=1.0)


def train(latents, out, **overrides) -> dict:
    cfg = from_dict(TrainConfig, dict(latents=str(latents), output=str(out)) | overrides)
    return run_training(cfg)


def worker_records(out: Path, training_shards: set[str], samples: int, steps: int) -> None:
    """Two workers read disjoint shares that cover the training shards once, and end with identical weights (their
    gradients were averaged through DDP, not applied locally)."""
    records = [json.loads((out / "workers" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    shards_0, shards_1 = set(records[0]["shards"]), set(records[1]["shards"])
    assert not shards_0 & shards_1 and {Path(p).name for p in shards_0 | shards_1} == training_shards
    assert records[0]["samples"] + records[1]["samples"] == samples
    assert records[0]["step"] == records[1]["step"] == steps
    assert records[0]["weights_sha256"] == records[1]["weights_sha256"]


@pytest.mark.integration
def test_contrastive_divergence_on_two_workers_learns_both_modes_and_an_untrained_model_does_not(
        ray_cluster, mixture_latents, tmp_path):
    metrics = train(mixture_latents, tmp_path, num_workers=2, **FAST)
    assert metrics["step"] == 200 and metrics["rollbacks"] == 0
    worker_records(tmp_path, {p.name for p in mixture_latents.glob("*.tar")}, 2048, 200)

    model = EnergyModel.from_pretrained(tmp_path / "model")  # plain safetensors + JSON: no Ray, no pickle
    cfg = from_dict(TrainConfig, dict(latents="x", output="y") | FAST)
    trained_with = ContrastiveDivergence.sampler_settings(cfg.objective, cfg.sampler, {})
    assert model.sampler == trained_with  # generation gets the training sampler
    assert model.metadata["latents"]["manifest_sha256"] == file_sha256(mixture_latents / "manifest.json")
    assert model.metadata["training"]["steps"] == 200 and model.metadata["training"]["num_workers"] == 2

    ok, stats = mode_check(sample(model, 1000, model.sampler, torch.Generator().manual_seed(123)))
    assert ok, stats
    ok, stats = mode_check(sample(model.fresh_copy(0), 1000, model.sampler, torch.Generator().manual_seed(123)))
    assert not ok, stats


def test_denoising_score_matching_learns_the_modes_and_their_weights_from_plain_noise(trained_energy,
                                                                                     mixture_latents):
    """The session's energy (conftest): no MCMC while training, sampled from N(0, s^2 + sigma_max^2) with no fitted
    starts. Log-uniform noise levels give the levels where the two modes merge (sigma ~ 6) their share of training;
    the stochastic ancestral sampler corrects what a deterministic flow would carry over from score errors. It was
    trained on two workers streaming their shares through a shuffle buffer: dsm's double backward goes through DDP
    like cd's single one."""
    shards = sorted(p.name for p in mixture_latents.glob("*.tar"))
    worker_records(trained_energy, set(shards[:-2]), 1536, ENERGY_RECIPE["max_steps"])
    model = load_model(trained_energy / "model")
    config = model.config
    assert type(model).__name__ == "NoiseConditionalEnergy" and model.sampler.name == "ancestral"
    assert [s["file"] for s in model.metadata["latents"]["held_out"]] == shards[-2:]
    assert config.sigma_data == pytest.approx(np.std(mixture(2048, seed=0)), rel=0.02)
    assert MODE_DISTANCE < config.sigma_max < 2 * MODE_DISTANCE  # the data's largest pairwise distance

    stats = SamplerStats()
    ok, found = mode_check(sample(model, 1000, model.sampler, torch.Generator().manual_seed(1), callback=stats))
    assert ok and abs(found["weight_a"] - WEIGHT_A) <= 0.1, found  # the unconditional energy (label dropped)
    assert stats.evaluations == model.sampler.gradient_evaluations() <= 50

    ok, found = mode_check(sample(model.fresh_copy(0), 1000, model.sampler, torch.Generator().manual_seed(1)))
    assert not ok, found  # the untrained energy is the Gaussian base: one blob between the modes


def test_split_shards_is_disjoint_and_complete():
    paths = [f"s{i}" for i in range(7)]
    for world in (1, 2, 3, 7):
        shares = [split_shards(paths, r, world) for r in range(world)]
        assert sorted(p for share in shares for p in share) == sorted(paths)
        assert sum(len(s) for s in shares) == len(paths)


def test_an_injected_nan_rolls_back_to_the_last_checkpoint_with_a_lower_lr_and_its_replay_buffer(
        ray_cluster, mixture_latents, tmp_path):
    # The loop's rollback knows no objective (the divergence test below runs dsm): cd here, with a replay buffer,
    # the objective's own state that checkpoints carry and rollbacks restore.
    metrics = train(mixture_latents, tmp_path, max_steps=12, fault_nan_at_step=7, lr=1e-3, buffer_size=100,
                    reinit_prob=0.05, **TINY)
    assert metrics["step"] == 12 and metrics["rollbacks"] == 1
    assert metrics["lr"] == pytest.approx(5e-4)
    assert load_model(tmp_path / "model").metadata["training"]["rollbacks"] == 1
    latest = max((tmp_path / "checkpoints" / "ebd-train").glob("step-*"))
    state = json.loads((latest / "state.json").read_text())
    buffer = load_file(str(latest / state["tensors_file"]))["objective.buffer"]
    assert state["meta"]["state"]["step"] == 12 and state["meta"]["state"]["rollbacks"] == 1
    assert tuple(buffer.shape) == (100, *SHAPE)  # 5 + 7 steps x 16 chains, capped at the buffer size
    assert torch.isfinite(buffer.float()).all()


def test_divergence_beyond_the_rollback_budget_stops_with_a_clear_message(ray_cluster, mixture_latents, tmp_path):
    with pytest.raises(EbdError, match="training diverged 1 times"):
        train(mixture_latents, tmp_path, max_steps=12, fault_nan_at_step=3, max_rollbacks=0, **TINY_DSM)


@pytest.mark.integration
def test_killing_the_job_and_rerunning_the_command_resumes_from_the_checkpoint(ray_cluster, mixture_latents,
                                                                               tmp_path):
    tiny = TINY_DSM | {"log_every": 10, "checkpoint_every": 10}  # configs/train.yaml: the dsm objective
    command = [sys.executable, "-m", "jobs.train", "--config", "configs/train.yaml", "--latents",
               str(mixture_latents), "--output", str(tmp_path), "--run-name", "resume-me", "--max-steps", "40",
               "--address", ray_cluster.address] + [f"--set={k}={json.dumps(v)}" for k, v in tiny.items()]
    snapshot = tmp_path / "checkpoints" / "resume-me" / "checkpoint_manager_snapshot.json"
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.monotonic() + 240
    while not (snapshot.is_file() and _registered_steps(snapshot)):  # a checkpoint Ray Train has recorded
        assert first.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (tmp_path / "model").exists()  # it really died mid-run
    saved = max(_registered_steps(snapshot))

    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = [line for line in (second.stdout + second.stderr).splitlines() if "resumed from checkpoint" in line]
    assert resumed and int(resumed[0].rsplit(" ", 1)[1]) >= saved >= 10
    assert load_model(tmp_path / "model").metadata["training"]["steps"] == 40


def test_the_diffusion_baseline_resumes_from_its_checkpoint_and_exports(trained_baseline, mixture_latents):
    """The session's baseline (conftest) was trained 4 steps, then resumed to 8."""
    model = load_model(trained_baseline / "model")
    assert type(model).__name__ == "DiffusionUNet" and model.sampler.name == "ddim"
    assert model.metadata["training"] == model.metadata["training"] | {"steps": 8, "objective": "ddpm"}
    assert model.metadata["training"]["loop_seconds_this_run"] > 0
    # the training time of both stretches: the first's carried in its checkpoint (a resume recorded only its own)
    first = json.loads((trained_baseline / "checkpoints" / "baseline" / "step-00000004" / "state.json").read_text())
    seconds = model.metadata["training"]
    assert first["meta"]["state"]["loop_seconds"] > 0
    assert seconds["loop_seconds"] == pytest.approx(first["meta"]["state"]["loop_seconds"] +
                                                    seconds["loop_seconds_this_run"], abs=0.11)
    records = json.loads((trained_baseline / "workers" / "rank-0.json").read_text())
    assert records["resumed_from_step"] == 4 and records["step"] == 8
    last = json.loads((trained_baseline / "checkpoints" / "baseline" / "step-00000008" / "state.json").read_text())
    assert last["tensors_file"] == "state-00000008.safetensors" and last["meta"]["state"]["step"] == 8
    # The run name resumes only the run it names: another learning rate is refused before anything starts...
    with pytest.raises(EbdError, match=r"run 'baseline' .* another config or data \(lr: 0.0001 -> 0.002\)"):
        train(mixture_latents, trained_baseline, max_steps=12, **(BASELINE_RECIPE | {"lr": 2e-3}))
    assert load_model(trained_baseline / "model").metadata["training"]["steps"] == 8
    # ... and when told to resume anyway, a checkpoint of another objective still cannot be loaded.
    with pytest.raises(EbdError, match="trained with objective ddpm, this run asks for dsm"):
        train(mixture_latents, trained_baseline, max_steps=12, **(TINY_DSM | {"run_name": "baseline",
                                                                             "allow_config_change": True}))


def test_a_run_started_from_an_exported_model_takes_its_weights_and_adds_up_the_training(
        trained_baseline, mixture_latents, tmp_path):
    """init_from: a finished model trained on without its checkpoints. With no steps the export is the model it
    started from, weight for weight; with steps, the record names where it started and the totals of both runs."""
    start = trained_baseline / "model"
    recipe = BASELINE_RECIPE | {"run_name": "continued", "init_from": str(start)}
    train(mixture_latents, tmp_path / "same", max_steps=0, **recipe)
    same, saved = load_file(tmp_path / "same" / "model" / "model.safetensors"), load_file(start / "model.safetensors")
    assert same.keys() == saved.keys() and all(torch.equal(same[k], saved[k]) for k in saved)
    train(mixture_latents, tmp_path / "on", max_steps=4, **recipe)
    training = load_model(tmp_path / "on" / "model").metadata["training"]
    started = json.loads((start / "config.json").read_text())
    assert training["init_from"]["weights_sha256"] == started["weights_sha256"]
    assert training["steps"] == 4 and training["total"]["steps"] == 12 and isinstance(training["total"]["steps"], int)
    assert training["total"]["flops"] == pytest.approx(3 * training["flops"], rel=0.01)  # 12 steps of the same net
    moved = load_file(tmp_path / "on" / "model" / "model.safetensors")
    assert any(not torch.equal(moved[k], saved[k]) for k in saved)
    # another architecture is refused in one line before anything starts
    with pytest.raises(EbdError, match=r"init_from .* another architecture .*\(channels: \[8\] there, \[16\] here\)"):
        train(mixture_latents, tmp_path / "wide", max_steps=2, **(recipe | {"channels": [16], "run_name": "wide"}))
    assert not (tmp_path / "wide" / "model").exists()
    # ... as is another kind of model (a diffusion UNet's weights under an energy's objective) ...
    with pytest.raises(EbdError, match=r"init_from .* holds DiffusionUNet .* config trains a NoiseConditionalEnergy"):
        train(mixture_latents, tmp_path / "kind", max_steps=2, **(TINY_DSM | {"init_from": str(start),
                                                                              "run_name": "k"}))
    # ... and a start that trained on a shard this run holds out as evaluation's reference (the baseline read all 8)
    with pytest.raises(EbdError, match=r"init_from .* trained on latents-\d+\.tar, which this run holds out"):
        train(mixture_latents, tmp_path / "seen", max_steps=2, **(recipe | {"holdout_shards": 2, "run_name": "s"}))


def _registered_steps(snapshot: Path) -> list[int]:
    try:
        return [r["metrics"]["step"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]
    except (ValueError, KeyError):  # caught mid-write: not registered yet
        return []


def test_train_config_errors_are_one_line(tmp_path, mixture_latents, capsys):
    code, err = run_job_here(capsys, "jobs.train", "--latents", str(mixture_latents), "--output", str(tmp_path / "o"),
                             "--set", "langevin_stpes=3")
    assert code == 2 and err.count("\n") == 1 and "unknown config key 'langevin_stpes'" in err
    code, err = run_job_here(capsys, "jobs.train", "--latents", str(mixture_latents), "--output", str(tmp_path / "o"),
                             "--set", "langevin_steps=3")  # a cd key on the default (dsm) objective would be ignored
    assert code == 2 and "'langevin_steps' applies to objective cd, not dsm" in err
    code, err = run_job_here(capsys, "jobs.train", "--latents", str(mixture_latents), "--output", str(tmp_path / "o"),
                             "--set", "objective.sigma_mx=3")
    assert code == 2 and "unknown config key 'sigma_mx' for DSMSettings" in err
    code, err = run_job_here(capsys, "jobs.train", "--latents", str(tmp_path), "--output", str(tmp_path / "o"))
    assert code == 2 and "not a finished latents folder" in err
    assert not (tmp_path / "o").exists()


def test_the_chain_start_gaussian_matches_the_training_latents_and_travels_with_the_model(tmp_path):
    mixing = torch.tensor([[2.0, 0, 0, 0, 0, 0, 0, 0], [0.5, 1.0, 0, 0, 0, 0, 0, 0]]).repeat(4, 1)[:8] + torch.eye(8)
    data = (torch.randn(8000, 8, generator=torch.Generator().manual_seed(0)) @ mixing + 3.0).reshape(-1, 2, 2, 2)
    full = EnergyModel(EnergyModelConfig([2, 2, 2], [4], init_rank=8))
    full.fit_initializer(data)
    loaded = EnergyModel.from_pretrained(full.save_pretrained(tmp_path / "m"))  # the fit is saved with the weights
    z = loaded.initial_latents(20000, START, torch.Generator().manual_seed(1)).flatten(1)
    flat = data.flatten(1)
    assert torch.allclose(z.mean(0), flat.mean(0), atol=0.1)
    assert torch.allclose(torch.cov(z.T), torch.cov(flat.T), atol=0.15)

    low = EnergyModel(EnergyModelConfig([2, 2, 2], [4], init_rank=2))  # top 2 directions + isotropic rest
    low.fit_initializer(data)
    z = low.initial_latents(20000, START, torch.Generator().manual_seed(1)).flatten(1)
    assert abs(torch.cov(z.T).trace() - torch.cov(flat.T).trace()) < 0.05 * torch.cov(flat.T).trace()

    # One generator per chain: chain i's start depends on its own generator only, as generation needs.
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    assert torch.equal(loaded.initial_latents(2, START, gens([5, 6]))[1],
                       loaded.initial_latents(1, START, gens([6]))[0])


def test_a_mixture_of_chain_start_gaussians_finds_the_clusters_and_keeps_their_shares(tmp_path):
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-6.0] * 8, [0.0] * 4 + [6.0] * 4, [6.0] * 8])
    shares = torch.tensor([0.5, 0.3, 0.2])
    which = torch.multinomial(shares, 6000, replacement=True, generator=gen)
    spread = torch.tensor([0.3, 0.6, 1.0])[which, None]  # each cluster has its own width
    data = (centres[which] + spread * torch.randn(6000, 8, generator=gen)).reshape(-1, 2, 2, 2)
    model = EnergyModel(EnergyModelConfig([2, 2, 2], [4], init_rank=2, init_components=3))
    model.fit_initializer(data, seed=0)
    loaded = EnergyModel.from_pretrained(model.save_pretrained(tmp_path / "m"))

    z = loaded.initial_latents(20000, START, torch.Generator().manual_seed(1)).flatten(1)
    nearest = torch.cdist(z, centres).argmin(1)
    assert torch.allclose(torch.bincount(nearest, minlength=3) / len(z), shares, atol=0.02)
    for j, width in enumerate((0.3, 0.6, 1.0)):  # no start falls between clusters; each has its cluster's width
        members = z[nearest == j]
        assert (members - centres[j]).norm(dim=1).max() < 8 * width
        assert abs(members.std(0).mean() - width) < 0.1 * width
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    assert torch.equal(loaded.initial_latents(2, START, gens([5, 6]))[1],
                       loaded.initial_latents(1, START, gens([6]))[0])


def test_models_saved_with_a_single_chain_start_gaussian_still_load(tmp_path):
    data = torch.randn(500, 2, 2, 2, generator=torch.Generator().manual_seed(0)) + 2.0
    model = EnergyModel(EnergyModelConfig([2, 2, 2], [4], init_rank=4))
    model.fit_initializer(data)
    folder = model.save_pretrained(tmp_path / "m")
    old = {k: v.squeeze(0) if k.startswith("init_") else v
           for k, v in load_file(str(folder / "model.safetensors")).items() if k != "init_weight"}
    (folder / "model.safetensors").write_bytes(safetensors_save(old))  # the layout written before mixtures
    config = json.loads((folder / "config.json").read_text())
    config.pop("weights_sha256")  # ... by an ebd that recorded no weights hash either
    (folder / "config.json").write_text(json.dumps(config))
    loaded = EnergyModel.from_pretrained(folder)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(loaded.initial_latents(8, START, g()), model.initial_latents(8, START, g()))


@pytest.mark.integration
def test_a_training_job_on_its_own_local_ray_logs_no_state_api_warnings(mixture_latents, tmp_path):
    """A job that starts its own local instance (no dashboard, so no State API) used to print Ray Train's
    placement-group cleaner warning every second of the run."""
    tiny = TINY_DSM | {"log_every": 10, "checkpoint_every": 20}
    done = subprocess.run([sys.executable, "-m", "jobs.train", "--config", "configs/train.yaml", "--latents",
                           str(mixture_latents), "--output", str(tmp_path), "--max-steps", "20"]
                          + [f"--set={k}={json.dumps(v)}" for k, v in tiny.items()],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "started a local Ray instance" in done.stderr
    assert "Failed to query Ray Train Controller" not in done.stdout + done.stderr
    assert "Reporting training result" not in done.stdout + done.stderr  # the loop's own progress line says it
    assert "[train] 20/20 steps" in done.stdout + done.stderr
    training = load_model(tmp_path / "model").metadata["training"]
    assert training["steps"] == 20
    # the compute it records: 20 steps x 16 latents x one latent's step, counted on a model of the same config
    cfg = from_dict(TrainConfig, dict(latents="x", output="y") | TINY_DSM)
    objective = OBJECTIVES["dsm"]
    model = objective.build_model(cfg.objective, SHAPE, objective.placeholder(cfg.objective), {})
    per_sample = training_flops_per_sample(objective(cfg.objective, None, SHAPE, torch.Generator()), model,
                                           torch.randn(2, *SHAPE))
    assert training["flops"] == pytest.approx(20 * 16 * per_sample, rel=1e-3)
