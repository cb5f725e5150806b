"""jobs.inspect: the x-ray page of the shipped demo models, opened in a real headless browser, and the numbers
behind its pictures (chain energies, nearest-neighbour distances, interpolation endpoints)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.demo import render_shape_image
from pipeline.evaluation.inspection import InspectConfig, record_chains, run_inspection, slerp
from pipeline.io.latent_shards import iter_latents, shard_paths, write_latent_dataset
from pipeline.models import load_model
from pipeline.sampling.settings import sampler_settings
from pipeline.vae.autoencoder import decode_images, encode, load_vae, resolve_vae
from pipeline.vae.fit import to_unit_range
from tests.conftest import REPO

DEMO = REPO / "models" / "demo"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def vae():
    return load_vae(resolve_vae(DEMO), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def latents_folder(tmp_path_factory, vae):
    """300 demo images (another seed than the demo set's) through the shipped VAE, as a latents folder of 3 shards;
    latent 1 is an exact copy of latent 0 (a duplicate the data x-ray must find)."""
    pixels = torch.stack([torch.from_numpy(np.array(render_shape_image(i, 64, seed=3)[0])) for i in range(300)])
    z = encode(vae, to_unit_range(pixels.permute(0, 3, 1, 2)), seeds=list(range(300)))[0].clone()
    z[1] = z[0]
    folder = tmp_path_factory.mktemp("latents")
    write_latent_dataset(folder, z.numpy(), shard_size=100, vae=resolve_vae(DEMO).identity(), shuffled=True)
    return folder


@pytest.fixture(scope="module")
def dsm_page(tmp_path_factory, latents_folder):
    out = tmp_path_factory.mktemp("xray-dsm")
    cfg = InspectConfig(output=str(out), vae=str(DEMO), model=str(DEMO / "ebm"), latents=str(latents_folder),
                        chains=12, filmstrips=2, interpolations=2, neighbours=3, neighbours_k=3, seed=5)
    return cfg, run_inspection(cfg)


def folder_latents(folder) -> dict[str, torch.Tensor]:
    return {r["key"]: torch.from_numpy(np.asarray(r["latent"], dtype=np.float32))
            for r in iter_latents(shard_paths(folder))}


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (CI's .ci/run installs it)")
@pytest.mark.integration
def test_the_page_opens_in_a_real_browser_with_every_image_and_no_errors(dsm_page, tmp_path):
    from PIL import Image
    from playwright.sync_api import sync_playwright

    cfg, _ = dsm_page
    written = sorted(p.name for p in Path(cfg.output).glob("*.png"))
    assert {"chains.png", "curves.png", "energies.png", "channels.png", "interpolation.png",
            "interpolation-energy.png", "neighbours.png"} == set(written)
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((Path(cfg.output) / "index.html").resolve().as_uri(), wait_until="load")
        images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        browser.close()
    assert errors == []
    assert sorted(alt for alt, _, _ in images) == written  # every PNG is on the page, embedded
    assert all(complete and width > 0 for _, complete, width in images)
    shot = np.asarray(Image.open(tmp_path / "page.png").convert("RGB"))
    assert shot.shape[0] > 2000  # the whole page, not a blank first screen
    assert shot.std() > 20 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 1000


def test_the_chains_are_recorded_as_run_and_their_steps_shrink_to_the_data(dsm_page):
    cfg, data = dsm_page
    chains = data["chains"]
    assert chains["evaluations"] == 12 and chains["chains"] == 12  # 12 iPNDM levels, as generation runs them
    assert chains["sigmas"][0] == pytest.approx(chains["sampler"]["sigma_max"])
    assert chains["sigmas"][-1] == pytest.approx(chains["sampler"]["sigma_min"])
    steps = chains["curves"]["step"]["median"]
    assert len(steps) == 11 and steps[-1] < 0.01 * steps[0]  # one step between each two of the 12 levels
    assert chains["frames"][0] == 0 and chains["frames"][-1] == 11  # the first and the last evaluation


def test_a_trained_energy_falls_along_its_chains(tmp_path, latents_folder):
    """The shipped short-run CD model: its energy U falls along its Langevin chains (median over chains), step
    after step."""
    data = run_inspection(InspectConfig(output=str(tmp_path), vae=str(DEMO), model=str(DEMO / "ebm-cd"),
                                        latents=str(latents_folder), chains=16, filmstrips=1, interpolations=1,
                                        neighbours=1))
    median = data["chains"]["curves"]["energy"]["median"]
    assert len(median) == 40
    assert median[-1] < median[0] - 1.0
    assert np.mean(np.diff(median) < 0) > 0.9
    assert data["energies"]["median"]["generated"] < data["energies"]["median"]["chain starts"]


def test_neighbour_distances_are_the_real_distances_to_the_nearest_latents(dsm_page, latents_folder):
    cfg, data = dsm_page
    model = load_model(cfg.model)
    _, samples, _ = record_chains(model, sampler_settings(data["chains"]["sampler"]), cfg.chains, 1, cfg.seed)
    pool = folder_latents(latents_folder)
    keys = list(pool)
    everything = torch.stack([pool[k] for k in keys]).flatten(1)
    nb = data["neighbours"]
    assert nb["pool"] == "folder" and len(nb["distances"]) == cfg.neighbours
    for q, (distances, names) in enumerate(zip(nb["distances"], nb["keys"])):
        sample = samples[q].flatten()
        recomputed = [float((sample - pool[k].flatten()).norm()) for k in names]
        assert distances == pytest.approx(recomputed, rel=1e-4)
        assert distances[0] == pytest.approx(float((everything - sample).norm(dim=1).min()), rel=1e-4)
        assert distances == sorted(distances)


def test_interpolation_ends_are_the_real_latents_and_decode_to_their_images(dsm_page, latents_folder, vae):
    cfg, data = dsm_page
    model, pool = load_model(cfg.model), folder_latents(latents_folder)
    for pair in data["interpolation"]:
        a, b = pool[pair["from"]], pool[pair["to"]]
        path = slerp(a, b, cfg.interpolation_steps)
        assert torch.allclose(path[0], a, atol=1e-6) and torch.allclose(path[-1], b, atol=1e-6)
        ends = decode_images(vae, path[[0, -1]])
        assert torch.equal(ends, decode_images(vae, torch.stack([a, b])))
        with torch.no_grad():
            expected = model.energy(torch.stack([a, b]))
        assert [pair["energy"][0], pair["energy"][-1]] == pytest.approx(expected.tolist(), rel=1e-3)
        mid = path[len(path) // 2].flatten()
        assert float(mid.norm()) == pytest.approx((float(a.norm()) + float(b.norm())) / 2, rel=0.05)


def test_the_data_xray_finds_a_duplicated_latent(tmp_path, latents_folder):
    out = tmp_path / "data"
    result = subprocess.run([sys.executable, "-m", "jobs.inspect", "--vae", str(DEMO), "--latents",
                             str(latents_folder), "--output", str(out), "--set", "neighbours=2"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "inspect.json").read_text())
    assert "chains" not in data and (out / "index.html").is_file()
    first = data["neighbours"]
    assert first["query_keys"] == ["000000000", "000000001"]
    assert first["keys"][0][0] == "000000001" and first["distances"][0][0] == 0.0  # latent 0's copy, and back
    assert first["keys"][1][0] == "000000000" and first["distances"][1][0] == 0.0
    assert all(q not in row for q, row in zip(first["query_keys"], first["keys"]))  # never its own neighbour


def test_bad_inputs_are_one_line_and_write_nothing(tmp_path, latents_folder):
    other_vae = tmp_path / "latents-of-another-vae"
    write_latent_dataset(other_vae, np.zeros((4, 4, 8, 8), np.float32), vae={"path": "x", "weights_sha256": "f" * 64})
    for args, message in ((["--vae", str(DEMO)], "give --model DIR, --latents DIR or both"),
                          (["--vae", str(DEMO), "--latents", str(other_vae)], "latents of another VAE")):
        out = tmp_path / "out"
        result = subprocess.run([sys.executable, "-m", "jobs.inspect", *args, "--output", str(out)], cwd=REPO,
                                capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
