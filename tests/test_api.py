"""The Python front door: EBDPipeline from the shipped demo folder, configs that validate when built in Python, and
an import that leaves the process environment alone."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from pipeline import EBDPipeline
from pipeline.common.config import ConfigError, EbdError
from pipeline.generation import GenerateConfig
from pipeline.sampling.noise import image_key
from pipeline.training.config import TrainConfig
from tests.conftest import REPO


@pytest.fixture(scope="module")
def pipe():
    return EBDPipeline.from_pretrained(REPO / "models" / "demo", device="cpu")


def test_the_demo_folder_loads_its_energy_and_gives_deterministic_images_per_seed(pipe):
    assert type(pipe.model).__name__ == "NoiseConditionalEnergy"  # model_index.json names ebm/
    first = pipe(num_images=4, seed=7, sampler={"levels": 8})
    again = pipe(num_images=4, seed=7, sampler={"levels": 8}, batch_size=3)
    other = pipe(num_images=4, seed=8, sampler={"levels": 8})
    assert [im.size for im in first.images] == [(64, 64)] * 4 and first.latents.shape == (4, 4, 8, 8)
    assert first.image_keys == [image_key(7, i) for i in range(4)]
    arrays = [np.asarray(im) for im in first.images]
    assert all(np.abs(a.astype(int) - np.asarray(b).astype(int)).max() <= 1 for a, b in zip(arrays, again.images))
    assert all(np.abs(a.astype(int) - np.asarray(b).astype(int)).mean() > 5 for a, b in zip(arrays, other.images))
    tail = pipe(num_images=2, seed=7, start=2, sampler={"levels": 8}, output_type="latent")
    assert tail.images == [] and tail.image_keys == first.image_keys[2:]
    assert np.allclose(tail.latents.numpy(), first.latents[2:].numpy(), atol=1e-4)  # image i depends on (seed, i)


def test_generators_seed_images_like_the_generate_job_and_a_list_seeds_each_image(pipe):
    import torch

    one = pipe(num_images=3, generator=torch.Generator().manual_seed(5), sampler={"levels": 6}, output_type="latent")
    by_seed = pipe(num_images=3, seed=5, sampler={"levels": 6}, output_type="latent")
    assert one.image_keys == by_seed.image_keys == [image_key(5, i) for i in range(3)]
    assert torch.allclose(one.latents, by_seed.latents)
    each = pipe(num_images=2, generator=[torch.Generator().manual_seed(s) for s in (11, 5)], sampler={"levels": 6},
                output_type="latent")
    assert each.image_keys == [image_key(11, 0), image_key(5, 0)]
    assert torch.allclose(each.latents[1], by_seed.latents[0], atol=1e-5)  # image 0 of seed 5, whatever its batch
    with pytest.raises(ConfigError, match="one per image"):
        pipe(num_images=3, generator=[torch.Generator()])


def test_calls_report_progress_and_return_tuples_as_diffusers_pipelines_do(pipe):
    seen = []
    images, latents, energies, keys = pipe(num_images=2, seed=1, sampler={"levels": 4}, output_type="np",
                                           return_dict=False, callback=seen.append)
    assert len(seen) == pipe.model.resolve_sampler({"levels": 4}).gradient_evaluations()
    assert images[0].shape == (64, 64, 3) and images[0].dtype == np.uint8 and latents.shape == (2, 4, 8, 8)
    assert energies.shape == (2,) and keys == [image_key(1, 0), image_key(1, 1)]


def test_diffusers_own_loader_opens_the_demo_folder_and_save_pretrained_round_trips(pipe, tmp_path, monkeypatch):
    import torch
    from diffusers import DiffusionPipeline

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))  # the two shim files are copied there
    loaded = DiffusionPipeline.from_pretrained(REPO / "models" / "demo", trust_remote_code=True,
                                               low_cpu_mem_usage=False)
    assert type(loaded).__name__ == "EBDPipeline" and type(loaded.ebm).__name__ == "NoiseConditionalEnergy"
    ours = pipe(num_images=2, seed=4, sampler={"levels": 5}, output_type="np").images
    theirs = loaded(num_images=2, seed=4, sampler={"levels": 5}, output_type="np").images
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs))

    pipe.save_pretrained(tmp_path / "saved")
    assert {p.name for p in (tmp_path / "saved").iterdir()} >= {"model_index.json", "vae", "ebm"}
    again = EBDPipeline.from_pretrained(tmp_path / "saved", device="cpu")
    back = again(num_images=2, seed=4, sampler={"levels": 5}, output_type="np").images
    assert all(np.array_equal(a, b) for a, b in zip(ours, back))
    again.to(torch.float64)  # any dtype goes to the VAE; the model stays float32: the sampler's small steps need it
    assert again.vae.dtype == torch.float64 and next(again.ebm.parameters()).dtype == torch.float32


def test_the_conditional_demo_energy_takes_a_condition_from_python():
    pipe = EBDPipeline.from_pretrained(REPO / "models" / "demo", model="ebm-compose", device="cpu")
    out = pipe(num_images=2, seed=3, sampler={"levels": 6}, condition="shape=ring AND NOT background=stripes",
               output_type="latent")
    assert out.latents.shape == (2, 4, 8, 8) and out.image_keys == [image_key(3, 0), image_key(3, 1)]
    with pytest.raises(EbdError, match="unknown value 'hexagon' for shape"):
        pipe(num_images=1, condition="shape=hexagon")


def test_bad_pipeline_arguments_are_one_line_errors(pipe, tmp_path):
    with pytest.raises(ConfigError, match="num_images"):
        pipe(num_images=0)
    with pytest.raises(ConfigError, match="sigma_min/sigma_max"):
        pipe(num_images=1, sampler={"sigma_max": 1e6})
    with pytest.raises(ConfigError, match="names no model"):
        EBDPipeline.from_pretrained(tmp_path)
    with pytest.raises(EbdError, match="trained without labels, so it takes no condition"):
        pipe(num_images=1, condition="shape=ring")


def test_configs_built_in_python_validate_on_construction():
    with pytest.raises(ConfigError, match="num_images"):
        GenerateConfig(model="m", vae="v", output="o", num_images=-5)
    with pytest.raises(ConfigError):
        TrainConfig(latents="l", output="o", lr=-1.0)


def test_importing_the_package_leaves_the_environment_unchanged():
    code = ("import os; before = dict(os.environ); "
            "import pipeline, pipeline.api, pipeline.vae.autoencoder, pipeline.generation, "
            "pipeline.training.job, pipeline.evaluation.report, pipeline.evaluation.inspection, "
            "pipeline.vae.precompute; from pipeline import EBDPipeline; "
            "changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)); "
            "print(changed); assert not changed")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_float16_decoding_on_cuda_honours_the_vaes_force_upcast():
    """SDXL's VAE says force_upcast: true (it overflows to NaN in float16): `auto` keeps it in float32 on CUDA."""
    import torch

    from pipeline.vae.autoencoder import VaeSpec, resolve_dtype

    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    assert resolve_dtype("auto", cuda, VaeSpec("sdxl", "vae", {"force_upcast": True})) == torch.float32
    assert resolve_dtype("auto", cuda, VaeSpec("sd15", "vae", {})) == torch.float16
    assert resolve_dtype("auto", torch.device("cpu"), VaeSpec("sd15", "vae", {})) == torch.float32
    assert resolve_dtype("float16", cuda, VaeSpec("sdxl", "vae", {"force_upcast": True})) == torch.float16
