"""The emoji model shipped in models/emoji/ is what its card says: a VAE, an energy and an evaluator of one emoji set,
and the latents they came from, whose held-out tenth is a stratified sample the energy never trained on (what
`make demo-emoji` scores against)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter

import pytest
import torch

from pipeline.evaluation.features import ImageEvaluator
from pipeline.evaluation.references import read_latents
from pipeline.io import latent_shards as sh
from pipeline.io.files import file_sha256
from pipeline.models import load_model
from pipeline.sampling.core import sample
from pipeline.vae.autoencoder import decode_images, load_vae, resolve_vae
from tests.conftest import REPO

EMOJI = REPO / "models" / "emoji"


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """models/emoji/latents.tar.xz unpacked the way the Makefile's demo-emoji does it."""
    folder = tmp_path_factory.mktemp("emoji") / "latents"
    subprocess.run([sys.executable, "-m", "tarfile", "-e", str(EMOJI / "latents.tar.xz"), str(folder)], check=True)
    return folder


@pytest.fixture(scope="module")
def energy():
    return load_model(EMOJI / "ebm")


def test_the_emoji_models_belong_to_one_vae_and_their_weights_to_their_configs(energy):
    vae_sha = resolve_vae(EMOJI).weights_sha256()
    assert file_sha256(EMOJI / "vae" / "diffusion_pytorch_model.safetensors") == \
        json.loads((EMOJI / "fit_vae.json").read_text())["weights_sha256"]
    assert energy.metadata["latents"]["vae"]["weights_sha256"] == vae_sha
    assert ImageEvaluator.from_pretrained(EMOJI / "evaluator").vae_sha256 == vae_sha
    for folder in ("ebm", "evaluator"):
        config = json.loads((EMOJI / folder / "config.json").read_text())
        assert file_sha256(EMOJI / folder / "model.safetensors") == config["weights_sha256"], folder


def test_the_shipped_latents_are_the_energys_split_and_the_held_out_tenth_is_stratified(latents, energy):
    """Every shard the energy trained on or held out ships, byte for byte; the held-out shards are about 10% of the
    images, in about the same category proportions as the whole set."""
    manifest = sh.read_manifest(latents)
    assert manifest["vae"]["weights_sha256"] == resolve_vae(EMOJI).weights_sha256()
    shipped = {s["file"]: s for s in manifest["shards"]}
    assert all(file_sha256(latents / name) == s["sha256"] for name, s in shipped.items())
    record = energy.metadata["latents"]
    held, trained = ({s["file"]: s["sha256"] for s in record[part]} for part in ("held_out", "trained_on"))
    assert not held.keys() & trained.keys() and held.keys() | trained.keys() == shipped.keys()
    assert all(shipped[name]["sha256"] == sha for name, sha in (held | trained).items())
    total = sum(s["count"] for s in shipped.values())
    held_rows = read_latents(str(latents), sorted(held))
    assert 0.09 <= len(held_rows["labels"]) / total <= 0.11, (len(held_rows["labels"]), total)
    everything, held_out = Counter(manifest["labels"]), Counter(held_rows["labels"])
    tv = sum(abs(everything[c] / total - held_out[c] / len(held_rows["labels"])) for c in everything) / 2
    assert {c for c, n in everything.items() if n >= 10} <= set(held_out)
    assert tv <= 0.02, tv


def test_the_emoji_evaluator_reads_the_decoded_held_out_emoji_as_its_card_says(latents, energy):
    evaluator = ImageEvaluator.from_pretrained(EMOJI / "evaluator")
    rows = read_latents(str(latents), [s["file"] for s in energy.metadata["latents"]["held_out"]])
    vae = load_vae(resolve_vae(EMOJI), torch.device("cpu"), torch.float32)
    probs = evaluator.probabilities(decode_images(vae, rows["latents"]))
    truth = torch.tensor([evaluator.classes.index(label) for label in rows["labels"]])
    accuracy = (probs.argmax(1) == truth).double().mean().item()
    assert accuracy == pytest.approx(evaluator.config["held_out"]["accuracy"], abs=0.01)
    assert accuracy >= 0.8


def test_the_emoji_energy_samples_deterministically_at_its_default_cost(energy):
    assert type(energy).__name__ == "NoiseConditionalEnergy" and energy.sampler.gradient_evaluations() <= 12
    first = sample(energy, 4, energy.sampler, [torch.Generator().manual_seed(i) for i in range(4)])
    again = sample(energy, 2, energy.sampler, [torch.Generator().manual_seed(i) for i in (2, 3)])
    assert torch.isfinite(first).all() and torch.allclose(first[2:], again, atol=1e-4)


def test_make_demo_emoji_generates_as_many_emoji_as_the_held_out_tenth_it_is_scored_against(energy):
    """The evaluation scores min(generated, held-out) samples: the Makefile's EMOJI_IMAGES is the held-out count, so
    no generated image goes unscored and none is missing."""
    makefile = (REPO / "Makefile").read_text()
    images = int(re.search(r"^EMOJI_IMAGES \?= (\d+)$", makefile, flags=re.M).group(1))
    assert images == sum(s["count"] for s in energy.metadata["latents"]["held_out"])
    assert "--num-images $(EMOJI_IMAGES)" in makefile


def test_the_emoji_card_gives_the_energys_training_length_as_its_config_records_it(energy):
    """The card's step count and FLOPs are the export's totals (summed over the runs each started from the last's
    weights)."""
    card = " ".join((EMOJI / "README.md").read_text().split())
    total = energy.metadata["training"].get("total", energy.metadata["training"])
    steps = re.search(r"([\d,]+) steps of 64 in all", card)
    flops = re.search(r"([\d.]+e\d+) training FLOPs", card)
    assert steps and int(steps.group(1).replace(",", "")) == total["steps"]
    assert flops and float(flops.group(1)) == pytest.approx(total["flops"], rel=0.01)
