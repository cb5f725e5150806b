"""jobs.fit_vae on a small demo set: a loadable SD-layout checkpoint, unit-variance scaled latents, reproducible
weights and resumption after a kill."""

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

from pipeline.common.config import from_dict
from pipeline.demo import render_shape_image, write_demo_images
from pipeline.vae.autoencoder import encode, load_vae, resolve_vae
from pipeline.vae.fit import FitVaeConfig, fit_vae, to_unit_range
from tests.conftest import REPO

SMALL = dict(resolution=32, block_out_channels=[8, 16], norm_num_groups=8, batch_size=8, eval_images=16,
             warmup_steps=5, log_every=20, checkpoint_every=20, threads=1)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shapes")
    write_demo_images(folder, 96, size=32, images_per_shard=48)
    return folder


def fit(images: Path, out: Path, **overrides) -> dict:
    return fit_vae(from_dict(FitVaeConfig, dict(input=str(images), output=str(out)) | SMALL | overrides))


def test_fit_writes_a_stable_diffusion_layout_vae_with_unit_variance_latents(images, tmp_path):
    record = fit(images, tmp_path / "sd", steps=40)
    assert record["steps"] == 40 and record["train_images"] == 80 and record["held_out_images"] == 16
    assert json.loads((tmp_path / "sd" / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKL"]
    spec = resolve_vae(tmp_path / "sd")  # the code path a real Stable Diffusion checkpoint goes through
    assert spec.subfolder == "vae" and spec.scaling_factor == record["scaling_factor"] != 0.18215
    assert not (tmp_path / "sd" / "checkpoint").exists()  # the export supersedes the training checkpoint
    assert (tmp_path / "sd" / "reconstructions.png").stat().st_size > 0

    vae = load_vae(spec, torch.device("cpu"), torch.float32)
    pixels = torch.stack([torch.from_numpy(np.array(render_shape_image(i, 32)[0]))
                          for i in range(64)]).permute(0, 3, 1, 2)
    z, _, _ = encode(vae, to_unit_range(pixels), seeds=list(range(64)))
    assert abs(z.std().item() - 1.0) < 0.2, z.std()  # scaling_factor = 1 / std, as Stable Diffusion chose 0.18215

    before = (spec.directory / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert fit(images, tmp_path / "sd", steps=40)["weights_sha256"] == record["weights_sha256"]
    assert (spec.directory / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before  # nothing redone


@pytest.mark.integration
def test_a_killed_fit_resumes_to_the_same_weights_as_an_uninterrupted_one(images, tmp_path):
    steps = 120  # checkpoints every 20: the kill lands at the first, far from the end
    reference = fit(images, tmp_path / "straight", steps=steps)
    out = tmp_path / "killed"
    sets = [x for k, v in (SMALL | {"steps": steps}).items()
            for x in ("--set", f"{k}={json.dumps(v) if isinstance(v, list) else v}")]
    proc = subprocess.Popen([sys.executable, "-m", "jobs.fit_vae", "--input", str(images), "--output", str(out),
                             *sets], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint" / "state.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = json.loads((out / "checkpoint" / "state.json").read_text())["meta"]["step"]
    assert 0 < saved < steps

    resumed = subprocess.run([sys.executable, "-m", "jobs.fit_vae", "--input", str(images), "--output", str(out),
                              *sets], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from checkpoint at step" in resumed.stdout + resumed.stderr
    record = json.loads((out / "fit_vae.json").read_text())
    assert record["steps"] == steps and record["weights_sha256"] == reference["weights_sha256"]


def test_bad_settings_fail_in_one_line_before_any_work(images, tmp_path):
    result = subprocess.run([sys.executable, "-m", "jobs.fit_vae", "--input", str(images), "--output",
                             str(tmp_path / "x"), "--set", "resolution=30"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "not a multiple" in result.stderr and not (tmp_path / "x").exists()


def test_the_edge_term_pays_for_blurred_edges_that_mse_cannot_tell_from_a_colour_shift():
    """A blurred edge and a uniform colour offset with the same MSE: only the edge term tells them apart."""
    import torch

    from pipeline.common.config import from_dict
    from pipeline.vae.fit import FitVaeConfig, reconstruction_terms

    x = torch.zeros(1, 3, 16, 16)
    x[..., 8:] = 1.0                                       # a sharp vertical edge
    blur = x.clone()
    blur[..., 7], blur[..., 8] = 0.5, 0.5                  # the edge smeared over two columns
    mse = (blur - x).pow(2).mean()
    shift = x + mse.sqrt()                                 # the same MSE, spread evenly
    assert torch.isclose((shift - x).pow(2).mean(), mse)
    cfg = from_dict(FitVaeConfig, dict(input="i", output="o", l1_weight=0.0, edge_weight=1.0))
    assert reconstruction_terms(blur, x, cfg) > 0.05 and reconstruction_terms(shift, x, cfg) < 1e-6
    assert reconstruction_terms(blur, x, from_dict(FitVaeConfig, dict(input="i", output="o"))) == 0
