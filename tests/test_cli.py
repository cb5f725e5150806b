"""The job entry points as a user runs them: real subprocesses, exit codes, one-line errors, files on disk."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, encode_image, rgb_image, run_job_here


def run_job(*args, timeout=300, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    for label in ("a", "b"):
        (root / label).mkdir()
        for i in range(3):
            (root / label / f"{i}.png").write_bytes(encode_image(rgb_image(i + (10 if label == "b" else 0)), "PNG"))
    return root


def test_precompute_cli_end_to_end_on_an_existing_cluster(ray_cluster, small_folder, sd_checkpoint, tmp_path):
    out = tmp_path / "latents"
    result = run_job("jobs.precompute", "--config", "configs/precompute.yaml", "--input", str(small_folder),
                     "--vae", str(sd_checkpoint), "--output", str(out), "--address", ray_cluster.address,
                     "--set", "resolution=16", "--set", "min_side=8", "--set", "shard_size=4")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    # configs/precompute.yaml holds 10% out: 1 of 6 in a shard of its own, written last
    assert manifest["totals"] == {"seen": 6, "encoded": 6, "rejected": 0, "shards": 3}
    assert manifest["held_out"] == {"share": 0.1, "files": ["latents-000002.tar"], "images": 1}
    assert manifest["labels"] == {"a": 3, "b": 3}
    assert "6/6 images (100%)" in result.stderr and "images/s" in result.stderr


# `ray job submit` of precompute, train and generate, on a two-node cluster: tests/test_monitoring.py.


@pytest.mark.parametrize("extra, message", [
    (["--set", "resolutoin=64"], "unknown config key 'resolutoin'"),
    (["--set", "resolution=abc"], "config key 'resolution' must be int"),
    (["--set", "dtype=float8"], "config key 'dtype' must be one of"),
    (["--set", "shard_size=0"], "shard_size must be >= 1"),
    (["--set", "resolution=15"], "not a multiple of the VAE's downscale factor 2"),
    (["--set", "noequals"], "--set expects key=value"),
    (["--input-format", "parquet"], "no .parquet files under"),
    (["--set", "max_pixels=-5"], "max_pixels, min_side and max_file_bytes must be positive"),
    (["--set", "progress_interval_s=.nan"], "must be a finite number"),
    (["--set", "image_formats=[PNG, EPS]"], "EPS is never decoded"),
    (["--config", "typo/precompute.yaml"], "config file not found: typo/precompute.yaml"),
])
def test_config_errors_are_one_line_exit_2_and_write_nothing(small_folder, sd_checkpoint, tmp_path, extra, message,
                                                            capsys):
    out = tmp_path / "out"
    code, err = run_job_here(capsys, "jobs.precompute", "--config", "configs/precompute.yaml", "--input",
                             str(small_folder), "--vae", str(sd_checkpoint), "--output", str(out), *extra)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert message in err
    assert not out.exists()


@pytest.mark.parametrize("vae, message", [
    ("stabilityai/sd-vae-ft-mse", "looks like a hub id: ebd never downloads weights"),
    ("/nonexistent/vae", "VAE not found at /nonexistent/vae"),
])
def test_a_vae_that_is_not_on_disk_is_a_clear_error(small_folder, tmp_path, vae, message, capsys):
    code, err = run_job_here(capsys, "jobs.precompute", "--input", str(small_folder), "--vae", vae, "--output",
                             str(tmp_path / "o"))
    assert code == 2 and message in err and err.count("\n") == 1


def test_missing_required_and_bad_yaml(small_folder, sd_checkpoint, tmp_path):
    """As real subprocesses: the exit code and the one line a shell sees."""
    result = run_job("jobs.precompute", "--input", str(small_folder), "--vae", str(sd_checkpoint))
    assert result.returncode == 2 and result.stderr == "error: missing output: pass --output or set it in the config\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text("resolution: [1, 2\n")
    result = run_job("jobs.precompute", "--config", str(bad), "--input", str(small_folder),
                     "--vae", str(sd_checkpoint), "--output", str(tmp_path / "o"))
    assert result.returncode == 2 and "is not valid YAML" in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.integration
def test_the_ebd_command_runs_a_job_from_another_working_directory(ray_cluster, tmp_path):
    """`ebd generate` (the installed console script) from a folder outside the repository: the shipped config is
    found by its usual relative name, and the run ends with exactly N images."""
    ebd = Path(sys.executable).with_name("ebd")
    demo = REPO / "models" / "demo"
    result = subprocess.run([str(ebd), "generate", "--config", "configs/generate.yaml", "--model", str(demo / "ebm"),
                             "--vae", str(demo), "--num-images", "6", "--output", "out", "--address",
                             ray_cluster.address, "--set", "sampler={levels: 4}", "--set", "images_per_shard=4",
                             "--batch-size", "4"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["images"] == 6 and manifest["sampler"]["levels"] == 4
    usage = subprocess.run([str(ebd), "generate", "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: ebd generate")


def test_the_cli_gives_its_version_suggests_names_and_lists_the_effective_config(tmp_path):
    ebd = str(Path(sys.executable).with_name("ebd"))

    def run(*args):
        return subprocess.run([ebd, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)

    from importlib.metadata import version
    assert run("--version").stdout.strip() == f"ebd {version('ebd')}"
    typo = run("generte")
    assert typo.returncode == 2 and "did you mean 'generate'?" in typo.stderr
    key = run("train", "--config", "train.yaml", "--latents", "l", "--output", "o", "--set", "max_step=3")
    assert key.returncode == 2 and key.stderr.count("\n") == 1 and "did you mean 'max_steps'?" in key.stderr
    shown = run("generate", "--show-config", "--config", "configs/generate.yaml", "--set", "sampler_device=gpu",
                "--num-images", "7")
    assert shown.returncode == 0, shown.stderr
    lines = {line.split(":")[0]: line for line in shown.stdout.splitlines() if not line.startswith("#")}
    assert lines["num_images"].startswith("num_images: 7") and lines["sampler_device"].startswith("sampler_device: gpu")
    assert lines["images_per_shard"].startswith("images_per_shard: 256")  # the file's value, as the job would use
    assert "# auto: 1 per decoder actor" in lines["decoder_gpus"] and "simulate_oom_above" not in shown.stdout
    usage = run("generate", "--help").stdout
    assert "(required) trained EBM folder" in usage and "run seed" in usage and "--show-config" in usage


def test_a_built_wheel_carries_the_shipped_configs(tmp_path):
    """`--config NAME.yaml` after `pip install ebd`: the wheel holds pipeline/configs/*.yaml."""
    import zipfile

    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("ebd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"pipeline/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")}
    assert shipped and shipped <= names


def test_every_shipped_config_validates_for_its_job():
    """configs/NAME*.yaml loads into its job's config with the paths the command line gives; a key renamed in code
    but not in a shipped config would fail here, not in a user's run."""
    from pipeline.common.config import load_config
    from pipeline.evaluation.evaluator_fit import FitEvaluatorConfig
    from pipeline.generation import GenerateConfig
    from pipeline.generation.config import with_plan
    from pipeline.training.config import TrainConfig
    from pipeline.vae.fit import FitVaeConfig
    from pipeline.vae.precompute import PrecomputeConfig

    jobs = {"train": (TrainConfig, dict(latents="l", output="o")),
            "generate": (GenerateConfig, dict(model="m", vae="v", output="o")),
            "precompute": (PrecomputeConfig, dict(input="i", vae="v", output="o")),
            "fit-vae": (FitVaeConfig, dict(input="i", output="o")),
            "fit-evaluator": (FitEvaluatorConfig, dict(latents="l", output="o"))}
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert len(configs) >= 9
    for path in configs:
        if path.stem.startswith("conditions"):  # a conditions file (jobs.generate --conditions), not a job config
            cfg = with_plan(load_config(GenerateConfig, None, conditions=str(path), **jobs["generate"][1]))
            assert cfg.num_images >= 1 and cfg.num_images == sum(cfg.conditions.values())
            continue
        job = next(name for name in sorted(jobs, key=len, reverse=True) if path.stem.startswith(name))
        cls, paths = jobs[job]
        load_config(cls, path, **paths)


def test_job_configs_are_frozen_values_whose_validation_reads_and_imports_nothing(tmp_path):
    """Every job's config, built from its shipped YAML as the job builds it, is a frozen value: a key cannot be
    reassigned and validating again changes nothing. Validation is pure: a config naming a conditions file that is
    not there, or a plugin that cannot be imported, builds; the driver's steps (`with_plan`, `load_config`) are where
    those are read, in one line."""
    import dataclasses

    from pipeline.common.config import ConfigError, JobConfig, load_config
    from pipeline.generation.config import GenerateConfig, with_plan
    from pipeline.training.config import TrainConfig

    classes = {cls.__name__: cls for cls in _subclasses(JobConfig)}
    assert len(classes) >= 9, sorted(classes)
    required = {"input": "i", "output": "o", "vae": "v", "model": "m", "latents": "l", "decoder": "d", "generated": "g",
                "reference": "r", "evaluator": "e"}
    for name, cls in classes.items():
        assert cls.__dataclass_params__.frozen, f"{name} is not frozen"
        fields = {f.name for f in dataclasses.fields(cls)}
        cfg = load_config(cls, None, **{k: v for k, v in required.items() if k in fields})
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cfg, next(iter(fields)), None)
        before = dataclasses.asdict(cfg)
        cfg.validate()
        assert dataclasses.asdict(cfg) == before, name
    train = TrainConfig(latents="l", output="o", objective={"name": "dsm", "sigma_max": 30.0}, sampler={"levels": 9})
    assert train.objective.sigma_max == 30.0 and train.sampler == {"levels": 9}  # the section's typed form, once
    assert TrainConfig(latents="l", output="o", plugins=["no_such_module_here"]).plugins == ["no_such_module_here"]
    with pytest.raises(ConfigError, match="plugin 'no_such_module_here' cannot be imported"):
        load_config(TrainConfig, None, latents="l", output="o", sets=["plugins=[no_such_module_here]"])
    missing = tmp_path / "mix.yaml"
    cfg = GenerateConfig(model="m", vae="v", output="o", conditions=str(missing))
    with pytest.raises(ConfigError, match="conditions file not found"):
        with_plan(cfg)
    missing.write_text("'shape=ring': 3\n'shape=disk': 4\n")
    assert with_plan(cfg).num_images == 7 and cfg.num_images is None and with_plan(cfg).conditions["shape=ring"] == 3


def _subclasses(cls: type) -> list[type]:
    import importlib
    import pkgutil

    import pipeline
    for module in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
        importlib.import_module(module.name)
    found, todo = [], list(cls.__subclasses__())
    while todo:
        found.append(todo.pop())
        todo += found[-1].__subclasses__()
    return found


@pytest.mark.parametrize("job", ["generate", "train", "inspect"])
def test_a_misspelt_sampler_key_is_one_line_with_did_you_mean_when_the_config_loads(job):
    """`--set sampler.levles=10` fails as the config loads (before any model is read), for every job that takes a
    sampler section."""
    paths = {"generate": ["--model", "m", "--vae", "v", "--output", "o"], "train": ["--latents", "l", "--output", "o"],
             "inspect": ["--output", "o", "--vae", "v"]}
    result = run_job(f"jobs.{job}", *paths[job], "--set", "sampler.levles=10", timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert "unknown sampler key 'levles': did you mean 'levels'?" in result.stderr


def test_pair_decoder_checks_shapes_and_generates_decoder_flag_is_checked_before_any_work(sd_checkpoint, tmp_path):
    """`ebd pair-decoder` refuses a tiny decoder whose up-sampling disagrees with the VAE and records one that fits;
    generate's --decoder reaches the job, which refuses a decoder paired with another VAE in one line, writing
    nothing."""
    from dataclasses import asdict

    from diffusers import AutoencoderTiny

    from pipeline.demo import write_sd_style_vae
    from pipeline.models.short_run_energy import EnergyModel, EnergyModelConfig
    from pipeline.sampling.settings import LangevinSettings
    from pipeline.vae.autoencoder import resolve_vae

    def tiny(folder, blocks):
        AutoencoderTiny(encoder_block_out_channels=(8,) * blocks, decoder_block_out_channels=(8,) * blocks,
                        num_encoder_blocks=(1,) * blocks, num_decoder_blocks=(1,) * blocks).save_pretrained(
            folder, safe_serialization=True)
        return folder

    wide = tiny(tmp_path / "wide", 3)  # up-samples 4x; the tiny VAE down-samples 2x
    refused = run_job("jobs.pair_decoder", "--decoder", str(wide), "--vae", str(sd_checkpoint))
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0, refused.stderr
    assert "up-sampled 4x; the VAE's are 4-channel, 2x" in refused.stderr
    assert not (wide / "ebd_pairs_with.json").exists()

    other = write_sd_style_vae(tmp_path / "other", seed=3, block_out_channels=(8, 16))
    decoder = tiny(tmp_path / "tiny", 2)
    paired = run_job("jobs.pair_decoder", "--decoder", str(decoder), "--vae", str(other))
    assert paired.returncode == 0, paired.stderr
    recorded = json.loads((decoder / "ebd_pairs_with.json").read_text())["vae_weights_sha256"]
    assert recorded == [resolve_vae(other).weights_sha256()]

    metadata = {"sampler": asdict(LangevinSettings(steps=2)),
                "latents": {"vae": resolve_vae(sd_checkpoint).identity(), "shape": [4, 8, 8]}}
    model = EnergyModel(EnergyModelConfig([4, 8, 8], [8]), metadata).save_pretrained(tmp_path / "model")
    result = run_job("jobs.generate", "--config", "configs/generate.yaml", "--model", str(model), "--vae",
                     str(sd_checkpoint), "--decoder", str(decoder), "--output", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "was made for another VAE's latents" in result.stderr and not (tmp_path / "out").exists()


def test_numbers_parse_as_yaml_1_2_and_senseless_values_are_refused():
    from pipeline.common.config import ConfigError, load_config
    from pipeline.training.config import TrainConfig

    cfg = load_config(TrainConfig, "configs/train.yaml", ["lr=1e-4", "objective.sigma_min=5E-3"], latents="l",
                      output="o")
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)
    for setting, message in (("lr=.inf", "finite"), ("lr=inf", "must be float"), ("lr=-1e-4", "lr must be > 0"),
                             ("cpus_per_worker=0", "cpus_per_worker must be > 0"), ("seed=-3", "seed must be >= 0")):
        with pytest.raises(ConfigError, match=message):
            load_config(TrainConfig, "configs/train.yaml", [setting], latents="l", output="o")


JOBS = sorted(p.stem for p in (REPO / "jobs").glob("*.py") if p.stem not in ("__init__", "cli"))
FLAG_OF = {"generate": "--formats", "precompute": "--input-format", "train": "--max-steps", "fit_vae": "--steps",
           "fit_evaluator": "--latents", "inspect": "--chains", "evaluate": "--num-samples",
           "pair_decoder": "--decoder", "demo_assets": "--num-images", "tune_sampler": "--levels"}


@pytest.mark.parametrize("job", JOBS)
def test_every_job_shows_its_effective_config_and_names_a_mistyped_key(job, capsys):
    """The same front for every job (flags made from its config): --show-config lists the keys with a flag's value
    applied, and a mistyped --set key is one line with a suggestion, exit 2."""
    import importlib

    module = importlib.import_module(f"jobs.{job}")
    parser_args = {"generate": ["--num-images", "7"], "demo_assets": ["--size", "32"], "train": ["--max-steps", "7"]}
    argv = sys.argv
    try:
        sys.argv = [f"python -m jobs.{job}", "--show-config", *parser_args.get(job, [])]
        from pipeline.common import config as config_module
        config_module.SHOW_CONFIG = True
        with pytest.raises(SystemExit) as shown:
            module.main()
        assert shown.value.code == 0
        listing = capsys.readouterr().out
        assert listing.startswith("# ") and "the effective config" in listing
        if job in parser_args:
            key = parser_args[job][0][2:].replace("-", "_")
            assert f"\n{key}: {parser_args[job][1]}" in listing
        config_module.SHOW_CONFIG = False
        first_key = listing.splitlines()[1].split(":")[0]
        sys.argv = [f"python -m jobs.{job}", "--set", f"{first_key}x=1"]
        with pytest.raises(SystemExit) as wrong:
            config_module.run_cli(module.main)
        assert wrong.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"did you mean '{first_key}'?" in err
        sys.argv = [f"python -m jobs.{job}", "--help"]
        with pytest.raises(SystemExit) as helped:
            module.main()
        usage = capsys.readouterr().out
        assert helped.value.code == 0 and usage.startswith("usage: ") and "--show-config" in usage
        flag = FLAG_OF[job]  # made from the config field, with the field's comment as its help
        assert re.search(rf"{flag} \S+\s+\S", usage), usage
    finally:
        sys.argv = argv
        config_module.SHOW_CONFIG = False
