"""The generation DAG on a real local Ray cluster: counts, keys, formats, resumption, OOM, metrics, GPU placement."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.api import EBDPipeline, generated_dataset
from pipeline.common.config import EbdError, from_dict
from pipeline.generation import GenerateConfig, run_generation
from pipeline.io.files import file_sha256
from pipeline.models.short_run_energy import EnergyModel, EnergyModelConfig
from pipeline.sampling.noise import image_key
from pipeline.sampling.settings import LangevinSettings
from pipeline.vae.autoencoder import resolve_vae
from tests.conftest import REPO, debian_binary, free_port

SIDE = 16  # the tiny VAE: 4 x 8 x 8 latents -> 16 x 16 images


@pytest.fixture(scope="module")
def ebm_dir(sd_checkpoint, tmp_path_factory) -> Path:
    """A small EBM over the tiny VAE's latents, carrying that VAE's identity, as the train job exports it."""
    torch.manual_seed(0)
    metadata = {"sampler": asdict(LangevinSettings(steps=5)),
                "latents": {"vae": resolve_vae(sd_checkpoint).identity(), "shape": [4, 8, 8]}}
    return EnergyModel(EnergyModelConfig([4, 8, 8], [8]), metadata).save_pretrained(
        tmp_path_factory.mktemp("ebm") / "model")


def generate(model, vae, out, **overrides) -> dict:
    cfg = from_dict(GenerateConfig, dict(model=str(model), vae=str(vae), output=str(out), num_images=50,
                                         images_per_shard=16, progress_interval_s=0.0) | overrides)
    return run_generation(cfg)


def parquet_rows(out: Path) -> list[dict]:
    """The rows of every parquet shard, in order, with `image` as its PNG bytes."""
    rows = pq.read_table(out / "parquet").to_pylist()  # the folder: its files in order
    for row in rows:
        assert row["image"]["path"] == f"{row['key']}.png"
        row["image"] = row["image"]["bytes"]
    return rows


@pytest.fixture(scope="module")
def both_formats(ray_cluster, ebm_dir, sd_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "out"  # the shipped config's shape: sampler actors fill the CPUs
    return out, generate(ebm_dir, sd_checkpoint, out, format="both", sampler_actors="auto", sampler_cpus=0.75,
                         decoder_cpus=0.25)


def test_exactly_n_images_with_unique_keys_in_parquet_and_tar(both_formats):
    out, summary = both_formats
    assert summary["images"] == 50
    rows = parquet_rows(out)
    assert len(rows) == 50 and len({r["key"] for r in rows}) == 50
    assert set(rows[0]) == {"key", "image", "width", "height", "seed", "energy", "model", "latent"}
    latent = np.asarray(rows[0]["latent"], dtype=np.float32).reshape(4, 8, 8)  # a fixed-size float32 array
    assert len(rows[0]["latent"]) == 4 * 8 * 8 and np.isfinite(latent).all()
    assert all(r["width"] == r["height"] == SIDE for r in rows)
    assert all(Image.open(io.BytesIO(r["image"])).size == (SIDE, SIDE) for r in rows[:5])
    manifest = json.loads((out / "manifest.json").read_text())
    samples = list(wds.WebDataset(manifest["webdataset_urls"], shardshuffle=False))  # its brace pattern
    assert len(samples) == 50 and [s["__key__"] for s in samples] == [r["key"] for r in rows]
    assert json.loads(samples[0]["json"])["seed"] == rows[0]["seed"]
    assert all(json.loads(s["json"])["key"] == s["__key__"] for s in samples)
    tar_latent = np.load(io.BytesIO(samples[0]["latent.npy"]), allow_pickle=False)  # float16, webdataset's .npy
    assert tar_latent.dtype == np.float16 and np.array_equal(tar_latent, latent.astype(np.float16))
    assert manifest["images"] == 50 and manifest["num_shards"] == 4
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "parquet", "preview.png", "run.json", "stats",
                                                     "summary.json", "webdataset"]
    img2dataset = [json.loads((out / "stats" / "img2dataset" / f"images-{j:06d}_stats.json").read_text())
                   for j in range(4)]
    assert [s["successes"] for s in img2dataset] == [16, 16, 16, 2] and all(s["duration"] > 0 for s in img2dataset)
    assert manifest["sampler"]["steps"] == 5 and manifest["sampler"]["name"] == "langevin"  # the model's own
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", r["key"]) for r in rows)


def test_hugging_face_datasets_reads_the_parquet_with_images_decoded(both_formats):
    datasets = pytest.importorskip("datasets")
    out, _ = both_formats
    ds = datasets.load_dataset("parquet", data_dir=str(out / "parquet"), split="train",
                               cache_dir=str(out.parent / "hf-cache"))
    assert len(ds) == 50 and isinstance(ds.features["image"], datasets.Image)
    first = ds[0]
    assert first["image"].size == (SIDE, SIDE) and first["key"] == parquet_rows(out)[0]["key"]
    assert np.array_equal(np.asarray(first["image"].convert("RGB")),
                          np.asarray(Image.open(io.BytesIO(parquet_rows(out)[0]["image"])).convert("RGB")))


def test_every_common_reader_opens_the_run_by_its_folder_path(ray_cluster, both_formats):
    """pandas, pyarrow.dataset, duckdb, Ray Data and webdataset-through-Ray read the run as a user would point them
    at it: a folder, no glob, no filter; images decode and latents become numpy arrays without a decoder."""
    import duckdb
    import pandas as pd
    import pyarrow.dataset as pads
    import ray

    out, _ = both_formats
    keys = [r["key"] for r in parquet_rows(out)]
    frame = pd.read_parquet(out / "parquet")
    assert list(frame["key"]) == keys
    assert np.stack(frame["latent"]).reshape(-1, 4, 8, 8).shape == (50, 4, 8, 8)
    table = pads.dataset(out / "parquet").to_table()
    assert table.num_rows == 50 and json.loads(table.schema.metadata[b"ebd.latent_shape"]) == [4, 8, 8]
    assert duckdb.sql(f"select count(*), count(distinct key) from read_parquet('{out / 'parquet'}/*.parquet')"
                      ).fetchall() == [(50, 50)]
    assert duckdb.read_parquet(str(out / "parquet")).aggregate("count(*)").fetchall() == [(50,)]
    rows = ray.data.read_parquet(str(out / "parquet")).take_all()
    assert sorted(r["key"] for r in rows) == sorted(keys) and np.asarray(rows[0]["latent"]).size == 256
    samples = ray.data.read_webdataset(str(out / "webdataset")).take_all()
    assert sorted(s["__key__"] for s in samples) == sorted(keys)


def test_a_folder_written_in_the_earlier_layout_is_refused_for_resume_in_one_line(ebm_dir, sd_checkpoint, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "run.json").write_text(json.dumps({"config": {}, "model": "m"}))  # as the earlier ebd left it
    (old / "images-000000.parquet").write_bytes(b"PAR1")
    with pytest.raises(EbdError, match="written before ebd put shards in parquet/ and webdataset/ folders") as err:
        generate(ebm_dir, sd_checkpoint, old)
    assert "\n" not in str(err.value) and sorted(p.name for p in old.iterdir()) == ["images-000000.parquet",
                                                                                    "run.json"]


def test_preview_is_a_png_grid_of_the_first_images(both_formats):
    out, _ = both_formats
    preview = Image.open(out / "preview.png")
    assert preview.format == "PNG" and preview.size == (8 * SIDE, 7 * SIDE)  # 50 images: 8 columns, 7 rows
    first = Image.open(io.BytesIO(parquet_rows(out)[0]["image"])).convert("RGB")
    assert preview.crop((0, 0, SIDE, SIDE)).tobytes() == first.tobytes()


def test_summary_reports_throughput_stage_time_and_batch_sizes(both_formats):
    _, summary = both_formats
    assert summary["images_per_second"] > 0
    assert summary["stage_busy_seconds"]["sampler"] > 0 and summary["stage_busy_seconds"]["decode"] > 0
    assert summary["batch_sizes"]["sampler"] >= 1 and summary["batch_sizes"]["decode"] >= 1
    assert summary["batch_probes"]["decode"]["bytes_per_sample"] >= 0
    assert summary["sampler_actors"] == 2  # auto on the 2-CPU cluster: (2 - 0.25 decoder - 0.25 writer) / 0.75


def test_shards_lost_cut_short_or_altered_after_their_marker_are_regenerated_byte_identical(
        both_formats, ebm_dir, sd_checkpoint):
    out, _ = both_formats
    def shards():  # the data files (the stats/*.json markers beside them hold timings)
        return {f"{p.parent.name}/{p.name}": file_sha256(p) for folder in ("parquet", "webdataset")
                for p in (out / folder).iterdir()}

    before = shards()
    assert len(before) == 8  # 50 images in shards of 16, 16, 16 and 2, as parquet and tar
    (out / "parquet" / "images-000001.parquet").unlink()
    (out / "webdataset" / "images-000001.tar").unlink()
    cut = (out / "webdataset" / "images-000002.tar").read_bytes()
    (out / "webdataset" / "images-000002.tar").write_bytes(cut[:len(cut) // 2])  # cut short after its marker
    altered = bytearray((out / "parquet" / "images-000003.parquet").read_bytes())
    altered[len(altered) // 2] ^= 0xFF  # same size, one byte changed
    (out / "parquet" / "images-000003.parquet").write_bytes(bytes(altered))

    summary = generate(ebm_dir, sd_checkpoint, out, format="both")
    assert summary["images_this_run"] == 16 + 16 + 2 and summary["images"] == 50
    assert shards() == before
    manifest = json.loads((out / "manifest.json").read_text())
    assert {name: sha for shard in manifest["shards"] for name, sha in shard["files"].items()} == before


def test_decoders_are_placed_on_the_advertised_gpu_and_fall_back_to_cpu(both_formats):
    out, summary = both_formats
    assert summary["decoder_gpus_per_actor"] == 1.0  # the cluster advertises a GPU: the pool asked for it
    markers = [json.loads(p.read_text()) for p in (out / "stats").glob("*.json")]
    assert all(m["decode_gpu_ids"] == ["0"] for m in markers)  # Ray assigned it
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert all(m["decode_device"] == expected for m in markers)
    assert summary["batch_probes"]["decode"]["device"] == expected


def test_auto_puts_the_sampler_where_the_predicted_images_per_second_are_higher():
    from pipeline.generation.placement import plan_placement

    def config(**keys):
        return from_dict(GenerateConfig, dict(model="m", vae="v", output="o", sampler_device="auto",
                                              sampler_actors="auto") | keys)  # configs/generate.yaml: auto

    def never() -> dict:
        raise AssertionError("costs are only weighed on a cluster with GPUs")

    # bench/capacity.md's figures: the SD-size energy at 256 px, and the demo's short-run energy
    sd_256 = lambda: {"sampler_gflop": 274.3, "decoder_gflop": 620.0, "evaluations": 12,  # noqa: E731
                      "cpu_gflops": 60.0, "write_cpu_s": 0.0328}
    cheap = lambda: {"sampler_gflop": 0.35, "decoder_gflop": 0.05, "evaluations": 40,  # noqa: E731
                     "cpu_gflops": 40.0, "write_cpu_s": 0.002}
    none = plan_placement(config(), cpus=64, gpus=0, shards=100, costs=never)
    assert (none.sampler_device, none.reason) == ("cpu", "auto: the cluster has no GPUs")
    sd = plan_placement(config(), cpus=64, gpus=8, shards=100, costs=sd_256)
    assert (sd.sampler_device, sd.fused, sd.sampler_actors, sd.decoder_actors) == ("gpu", True, 8, 0)
    # 8 GPUs / (274.3 / 120e3 + 620 / 120e3 s) = 1073 images/s; 64 CPUs / (274.3 / 60 + 0.0328 s) = 13.9
    assert sd.reason.startswith("auto: predicted 1073 images/s with the sampler on 8 GPUs against 13.9 on 64 CPUs")
    assert "120 TFLOP/s per GPU at bfloat16 assumed" in sd.reason and "60 GFLOP/s per CPU measured here" in sd.reason
    many_cpus = plan_placement(config(), cpus=10_000, gpus=1, shards=100, costs=cheap)
    assert many_cpus.sampler_device == "cpu" and many_cpus.decoder_gpus == 1.0
    shared = plan_placement(config(sampler_device="gpu", gpu_stage="separate", sampler_gpus=0.5), cpus=8, gpus=2,
                            shards=100)
    assert (shared.sampler_actors, shared.sampler_gpus, shared.decoder_actors, shared.decoder_gpus) == (3, 0.5, 1, 0.5)
    resumed = plan_placement(config(), cpus=64, gpus=8, shards=100, costs=never, recorded="cpu")
    assert resumed.sampler_device == "cpu" and resumed.reason.startswith("resuming a run started with the sampler")
    with pytest.raises(EbdError, match="the cluster has no GPUs"):
        plan_placement(config(sampler_device="gpu"), cpus=8, gpus=0, shards=1)


def test_the_capacity_model_has_a_gpu_latency_floor_and_a_writer_cost():
    """A tiny latent is launch-bound on a GPU, not FLOP-bound, and every image costs the writer CPU time."""
    from pipeline.generation.placement import predicted_images_per_s

    flop_bound = predicted_images_per_s("gpu", 64, 1, 2.88, 0.49, 23.0, 120.0)
    floored = predicted_images_per_s("gpu", 64, 1, 2.88, 0.49, 23.0, 120.0, evaluations=12, gpu_latency_s=1e-3,
                                     gpu_batch=8)
    assert floored < 1 / (12 * 1e-3 / 8) < flop_bound  # at most one batch of 8 per 12 ms
    assert predicted_images_per_s("gpu", 2, 1, 2.88, 0.49, 23.0, 120.0, write_cpu_s=0.002) == pytest.approx(1000)
    assert predicted_images_per_s("cpu", 2, 0, 2.88, 0.49, 23.0, 120.0, write_cpu_s=0.002) < 2 * 23.0 / 3.37


@pytest.fixture(scope="module")
def gpu_sampled(ray_cluster, ebm_dir, sd_checkpoint, tmp_path_factory):
    """The sampler on GPU shares of the cluster's advertised GPU, fused with the decoder: two actors of half a GPU."""
    out = tmp_path_factory.mktemp("gpu") / "fused"
    return out, generate(ebm_dir, sd_checkpoint, out, num_images=20, images_per_shard=8, batch_size=4,
                         sampler_device="gpu", sampler_gpus=0.5, sampler_actors="auto", sampler_cpus=0.75)


def test_sampler_actors_on_gpu_shares_make_exactly_the_images_the_cpu_shape_makes(
        gpu_sampled, ebm_dir, sd_checkpoint, tmp_path):
    out, summary = gpu_sampled
    placement = summary["placement"]
    assert (placement["sampler_device"], placement["fused"], placement["sampler_actors"]) == ("gpu", True, 2)
    assert placement["sampler_gpus"] == 0.5 and placement["decoder_actors"] == 0
    markers = [json.loads(p.read_text()) for p in sorted((out / "stats").glob("*.json"))]
    expected = "cuda" if torch.cuda.is_available() else "cpu"  # no CUDA here: CPU tensors, said in one log line
    assert [m["count"] for m in markers] == [8, 8, 4]
    assert all(m["sampler_gpu_ids"] == ["0"] and m["decode_gpu_ids"] == ["0"] for m in markers)  # Ray's shares
    assert all(m["sampler_device"] == m["decode_device"] == expected for m in markers)
    rows = parquet_rows(out)
    assert [r["key"] for r in rows] == [image_key(0, i) for i in range(20)]

    on_cpus = generate(ebm_dir, sd_checkpoint, tmp_path / "cpu", num_images=20, images_per_shard=8, batch_size=4)
    assert on_cpus["placement"]["sampler_device"] == "cpu"
    if expected == "cpu":  # the same device type and batch sizes: the same bytes, whatever the actors' shape
        assert [(r["key"], r["image"], r["latent"]) for r in parquet_rows(tmp_path / "cpu")] == \
               [(r["key"], r["image"], r["latent"]) for r in rows]


def test_a_gpu_sampled_run_resumes_on_its_device_and_regenerates_a_lost_shard_byte_identical(
        gpu_sampled, ebm_dir, sd_checkpoint, capsys):
    out, _ = gpu_sampled
    before = {p.name: file_sha256(p) for p in (out / "parquet").iterdir()}
    (out / "parquet" / "images-000001.parquet").unlink()
    (out / "webdataset" / "images-000001.tar").unlink()
    summary = generate(ebm_dir, sd_checkpoint, out, num_images=20, images_per_shard=8, batch_size=4,
                       sampler_device="cpu")  # the folder's own device wins: its shards stay byte-identical
    assert summary["images_this_run"] == 8 and summary["placement"]["sampler_device"] == "gpu"
    assert "resuming a run started with the sampler on gpu" in capsys.readouterr().err
    assert {p.name: file_sha256(p) for p in (out / "parquet").iterdir()} == before


@pytest.mark.integration
def test_actors_sharing_a_gpu_size_for_at_most_its_budget_together(ray_cluster, ebm_dir, sd_checkpoint, tmp_path):
    """Two fused actors of half a GPU each (2 GiB of simulated GPU memory): every stage probes against its own share
    of the GPU's total memory, so the four budgets (two actors x sampler and decoder) add up to at most the
    fraction of one GPU, and each chosen batch fits its budget."""
    summary = generate(ebm_dir, sd_checkpoint, tmp_path, num_images=16, images_per_shard=8, sampler_device="gpu",
                       sampler_gpus=0.5, sampler_actors="auto", sampler_cpus=0.75, simulate_gpu_memory_gb=2.0)
    probes, total = summary["batch_probes"], 2.0 * 1024**3
    assert summary["placement"]["sampler_actors"] == 2 and summary["placement"]["fused"]
    assert probes["sampler"]["budget_bytes"] == probes["decode"]["budget_bytes"] == int(total * 0.5 * 0.8 / 2)
    assert 2 * (probes["sampler"]["budget_bytes"] + probes["decode"]["budget_bytes"]) <= 0.8 * total
    for stage in ("sampler", "decode"):
        assert summary["batch_sizes"][stage] * probes[stage]["bytes_per_sample"] <= probes[stage]["budget_bytes"]
    assert summary["images"] == 16


def test_a_stage_that_cannot_fit_one_item_ends_the_job_in_one_line_before_any_shard(ebm_dir, sd_checkpoint,
                                                                                      tmp_path):
    with pytest.raises(EbdError, match=r"^the decode stage cannot fit one item in its memory budget .* give it a "
                                       r"larger share") as failed:
        generate(ebm_dir, sd_checkpoint, tmp_path, num_images=8, sampler_batch_size=4, simulate_oom_above=0)
    assert "\n" not in str(failed.value) and not list(tmp_path.glob("parquet/*.parquet"))


@pytest.mark.integration
def test_two_fresh_runs_of_one_command_under_different_load_write_byte_identical_shards(
        ray_cluster, ebm_dir, sd_checkpoint, tmp_path):
    """Probed batch sizes (nothing set) depend on memory and the cap alone, not on how busy the machine is: the
    second run shares the CPUs with two busy processes and still writes the same bytes."""
    def run(out):
        return generate(ebm_dir, sd_checkpoint, out, num_images=24, images_per_shard=24, format="parquet")

    quiet = run(tmp_path / "quiet")
    burners = [subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 120\n"
                                 "while time.time() < end: sum(i * i for i in range(10000))"]) for _ in range(2)]
    try:
        busy = run(tmp_path / "busy")
    finally:
        for p in burners:
            p.kill()
    assert quiet["batch_sizes"] == busy["batch_sizes"]
    assert file_sha256(tmp_path / "quiet/parquet/images-000000.parquet") == \
        file_sha256(tmp_path / "busy/parquet/images-000000.parquet")


@pytest.mark.integration
def test_non_finite_latents_fail_the_run_in_one_line_and_never_reach_a_png(ebm_dir, sd_checkpoint, tmp_path):
    """A model that makes NaN (here: one poisoned weight) fails its chunk loudly: `ebd generate` exits 2 with one
    line, and nothing is decoded or written. Each run starts its own local Ray: a failed Ray Data run can leave its
    actor pool holding CPUs for a while, which the session's shared cluster cannot spare."""
    from pipeline.models import load_model

    model = load_model(ebm_dir)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    poisoned = model.save_pretrained(tmp_path / "poisoned")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for precision in ("float32", "auto"):  # in the sampler actors, whatever the precision resolved to
        out = tmp_path / precision
        done = subprocess.run([sys.executable, "-m", "jobs.generate", "--model", str(poisoned), "--vae",
                               str(sd_checkpoint), "--num-images", "8", "--output", str(out), "--set",
                               "images_per_shard=8", "--set", "batch_size=8", "--set",
                               f"sampler_precision={precision}"], cwd=REPO, capture_output=True, text=True,
                              timeout=300, env=env)
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert done.returncode == 2, done.stderr[-2000:]
        assert len(errors) == 1 and re.search(r"chains \(images 0\.\.\d+\) ended non-finite", errors[0])
        assert not list(out.glob("*/*.parquet")) and not list(out.glob("*/*.tar"))


def test_auto_on_a_cluster_with_a_gpu_runs_separate_gpu_sampler_and_decoder_pools(ray_cluster, ebm_dir,
                                                                                  sd_checkpoint, tmp_path):
    # gpu_latency_ms 0: at this model's size and 4-image shards the launch floor would rightly keep it on the CPUs
    summary = generate(ebm_dir, sd_checkpoint, tmp_path, num_images=12, images_per_shard=4, batch_size=4,
                       sampler_device="auto", gpu_stage="separate", sampler_gpus=0.5, gpu_latency_ms=0.0)
    placement = summary["placement"]
    assert placement["reason"].startswith("auto: predicted") and placement["sampler_device"] == "gpu"
    assert (placement["sampler_actors"], placement["decoder_actors"], placement["decoder_gpus"]) == (1, 1, 0.5)
    markers = [json.loads(p.read_text()) for p in (tmp_path / "stats").glob("*.json")]
    assert len(markers) == 3 and all(m["sampler_gpu_ids"] == m["decode_gpu_ids"] == ["0"] for m in markers)
    assert len({r["key"] for r in parquet_rows(tmp_path)}) == 12


def test_webdataset_only_and_changed_config_refused(ray_cluster, ebm_dir, sd_checkpoint, tmp_path, capsys):
    nobody = f"http://127.0.0.1:{free_port()}"  # a pushgateway that is down: a warning, the run still succeeds
    summary = generate(ebm_dir, sd_checkpoint, tmp_path, format="webdataset", num_images=10, batch_size=4,
                       pushgateway=nobody)
    assert summary["images"] == 10
    assert f"warning: the final metrics were not pushed to {nobody}" in capsys.readouterr().err
    # the data files: one tar and no parquet (the img2dataset stats json beside the tar is not data)
    assert sorted(p.name for p in (tmp_path / "webdataset").iterdir()) == ["images-000000.tar"]
    assert not (tmp_path / "parquet").exists()
    assert (tmp_path / "stats" / "img2dataset" / "images-000000_stats.json").exists()
    with pytest.raises(EbdError, match="different config"):
        generate(ebm_dir, sd_checkpoint, tmp_path, format="webdataset", num_images=12, batch_size=4)


def test_an_output_format_added_as_one_class_flows_through_generate_resume_the_manifest_and_evaluation(
        ray_cluster, ebm_dir, sd_checkpoint, both_formats, tmp_path):
    """A third format (tests/third_format.py: one class, registered by a plugin module) is written by the Ray writer
    tasks, named by the manifest, resumed shard by shard, and read back by evaluation's readers: the same images and
    latents as the parquet run of the same command."""
    import tests.third_format  # noqa: F401 - the driver knows the format as load_config would make it
    from pipeline.io.image_shards import generated_manifest, iter_generated_images, read_conditions, read_generated

    out = tmp_path / "run"
    settings = dict(formats=["zipped"], plugins=["tests.third_format"], num_images=20, sampler_actors="auto",
                    sampler_cpus=0.75, decoder_cpus=0.25)
    assert generate(ebm_dir, sd_checkpoint, out, **settings)["images_this_run"] == 20
    assert sorted(p.name for p in (out / "zipped").iterdir()) == ["images-000000.zip", "images-000001.zip"]
    assert not (out / "parquet").exists() and not (out / "webdataset").exists()
    manifest = generated_manifest(str(out))
    assert manifest["formats"] == ["zipped"] and manifest["folders"]["zipped"] == "zipped"
    assert manifest["folders"]["parquet"] is None and manifest["webdataset_urls"] is None
    assert [sorted(s["files"]) for s in manifest["shards"]] == [["zipped/images-000000.zip"],
                                                               ["zipped/images-000001.zip"]]
    latents, images = read_generated(str(out))
    parquet_latents, parquet_images = read_generated(str(both_formats[0]), torch.arange(20))
    assert torch.equal(images, parquet_images) and torch.allclose(latents, parquet_latents, atol=1e-6)
    assert torch.equal(torch.cat(list(iter_generated_images(str(out), torch.arange(20), batch_size=8))), images)
    assert read_conditions(str(out)) == [None] * 20

    lost = out / "zipped" / "images-000001.zip"
    before = file_sha256(lost)
    lost.unlink()
    (out / "manifest.json").unlink()
    assert generate(ebm_dir, sd_checkpoint, out, **settings)["images_this_run"] == 4  # only the lost shard
    assert file_sha256(lost) == before


@pytest.fixture(scope="module")
def tiny_decoder(sd_checkpoint, tmp_path_factory) -> Path:
    """An AutoencoderTiny (TAESD's blocks, narrowed to the tiny VAE's 2x up-sampling) paired with the tiny VAE."""
    from pipeline.demo import write_tiny_decoder

    return write_tiny_decoder(tmp_path_factory.mktemp("taesd") / "tiny", sd_checkpoint, seed=0,
                              encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                              num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1))


def test_a_tiny_decoder_runs_through_the_dag_exactly_and_reproducibly_through_out_of_memory(
        ray_cluster, ebm_dir, sd_checkpoint, tiny_decoder, both_formats, tmp_path):
    """The tiny decoder in place of the VAE's, and a decoder that runs out of memory above 5 latents (the one fault
    we cannot cause on a CPU: a test double of CUDA's out-of-memory error): it halves its batch and loses nothing,
    and a shard regenerated alone, through the same shrinks, is byte-identical."""
    from pipeline.vae.autoencoder import decode, load_vae, resolve_decoder, to_uint8

    out = tmp_path / "tiny"
    settings = dict(format="both", num_images=20, decoder=str(tiny_decoder), batch_size=8, simulate_oom_above=5)
    summary = generate(ebm_dir, sd_checkpoint, out, **settings)
    assert summary["images"] == 20 and summary["decoder"] == "AutoencoderTiny"
    assert summary["oom_shrinks"] >= 1
    markers = [json.loads(p.read_text()) for p in sorted((out / "stats").glob("*.json"))]
    assert all(max(m["decode_chunks"]) <= 5 for m in markers)
    assert sum(sum(m["decode_chunks"]) for m in markers) == 20
    rows = parquet_rows(out)
    assert len(rows) == 20 and len({r["key"] for r in rows}) == 20
    assert len(list(wds.WebDataset(sorted(str(p) for p in (out / "webdataset").iterdir()),
                                   shardshuffle=False))) == 20
    spec = resolve_decoder(tiny_decoder, resolve_vae(sd_checkpoint))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["decoder"]["class"] == "AutoencoderTiny"
    assert manifest["decoder"]["weights_sha256"] == spec.weights_sha256()

    # The pixels are the tiny decoder's: the stored latent decoded by it here, not by the VAE's own decoder (the
    # same key in the VAE-decoded run has the same latent and other pixels).
    tiny = load_vae(spec, torch.device("cpu"), torch.float32)
    z = torch.from_numpy(np.asarray(rows[0]["latent"], dtype=np.float32).reshape(4, 8, 8))[None]
    here = to_uint8(decode(tiny, z))[0].permute(1, 2, 0).numpy().astype(int)
    written = np.asarray(Image.open(io.BytesIO(rows[0]["image"])).convert("RGB")).astype(int)
    by_vae = next(r for r in parquet_rows(both_formats[0]) if r["key"] == rows[0]["key"])
    assert by_vae["latent"] == rows[0]["latent"]
    by_vae_pixels = np.asarray(Image.open(io.BytesIO(by_vae["image"])).convert("RGB")).astype(int)
    assert np.abs(here - written).mean() < 1.0 < np.abs(by_vae_pixels - written).mean()

    # A shard regenerated alone is byte-identical, cut into the chunks it was first made with although memory now
    # allows the whole batch (an out-of-memory on a GPU need not happen again); the folder refuses the VAE's own
    # decoder (other pixels).
    parquet, tar = out / "parquet" / "images-000000.parquet", out / "webdataset" / "images-000000.tar"
    before = file_sha256(parquet), file_sha256(tar)
    first_chunks = json.loads((out / "stats" / "images-000000.json").read_text())["decode_chunks"]
    assert first_chunks == [4, 4, 4, 4]  # 8 ran out of memory: halved, and kept for the rest of the shard
    parquet.unlink()
    tar.unlink()
    again = generate(ebm_dir, sd_checkpoint, out, **{k: v for k, v in settings.items() if k != "simulate_oom_above"})
    assert again["images_this_run"] == 16 and again["images"] == 20 and again["oom_shrinks"] == 0
    assert json.loads((out / "stats" / "images-000000.json").read_text())["decode_chunks"] == first_chunks
    assert (file_sha256(parquet), file_sha256(tar)) == before
    with pytest.raises(EbdError, match="different decoder_weights_sha256"):
        generate(ebm_dir, sd_checkpoint, out, **(settings | {"decoder": None}))


def test_a_tiny_decoder_for_another_vae_or_without_a_pairing_is_refused(ebm_dir, sd_checkpoint, tiny_decoder,
                                                                        tmp_path):
    import shutil

    from pipeline.demo import write_sd_style_vae
    from pipeline.vae.autoencoder import pair_decoder

    other = write_sd_style_vae(tmp_path / "other", seed=1, block_out_channels=(8, 16))
    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_decoder, foreign)
    (foreign / "ebd_pairs_with.json").unlink()
    with pytest.raises(EbdError, match="does not say which VAE it decodes for"):
        generate(ebm_dir, sd_checkpoint, tmp_path / "a", decoder=str(foreign))
    pair_decoder(foreign, resolve_vae(other))
    with pytest.raises(EbdError, match="made for another VAE's latents"):
        generate(ebm_dir, sd_checkpoint, tmp_path / "b", decoder=str(foreign))
    with pytest.raises(EbdError, match="not an AutoencoderTiny"):
        generate(ebm_dir, sd_checkpoint, tmp_path / "c", decoder=str(sd_checkpoint / "vae"))
    wide = write_sd_style_vae(tmp_path / "wide", seed=2, block_out_channels=(8, 16, 16))  # 4x down-sampling
    with pytest.raises(EbdError, match="up-sampled 2x; the VAE's are 4-channel, 4x"):
        pair_decoder(tiny_decoder, resolve_vae(wide))
    assert not any((tmp_path / name).exists() for name in "abc")  # refused before anything was written


def test_a_model_trained_on_another_vae_is_refused(ebm_dir, tmp_path):
    from pipeline.demo import write_sd_style_vae

    other = write_sd_style_vae(tmp_path / "other", seed=1, block_out_channels=(8, 16))
    with pytest.raises(EbdError, match="trained on latents of another VAE"):
        generate(ebm_dir, other, tmp_path / "out")


def test_conditions_a_model_cannot_honour_are_refused_in_one_line_before_any_work(ebm_dir, sd_checkpoint, tmp_path):
    from pipeline.models.noise_energy import NoiseConditionalEnergy, NoiseConditionalEnergyConfig

    with pytest.raises(EbdError, match="trained without labels, so it takes no condition"):
        generate(ebm_dir, sd_checkpoint, tmp_path / "a", condition="shape=ring")
    metadata = {"sampler": {"name": "heun", "levels": 3, "sigma_max": 20.0},
                "latents": {"vae": resolve_vae(sd_checkpoint).identity(), "shape": [4, 8, 8]}}
    conditional = NoiseConditionalEnergy(NoiseConditionalEnergyConfig(
        [4, 8, 8], [16, 32], sigma_max=20.0, labels={"shape": ["ring", "square"]}), metadata).save_pretrained(
        tmp_path / "conditional")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"shape=ring": 2, "shape=disc": 3}))
    with pytest.raises(EbdError, match="unknown value 'disc' for shape: conditional knows ring, square"):
        generate(conditional, sd_checkpoint, tmp_path / "b", num_images=None, conditions=str(plan))
    with pytest.raises(EbdError, match=r"num_images \(4\) disagrees with the conditions' total \(5\)"):
        generate(conditional, sd_checkpoint, tmp_path / "b", num_images=4, conditions=str(plan))
    done = subprocess.run([sys.executable, "-m", "jobs.generate", "--model", str(conditional), "--vae",
                           str(sd_checkpoint), "--output", str(tmp_path / "c"), "--condition", "colour=red"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: unknown label field 'colour' in condition 'colour=red': conditional knows shape"]
    assert not any((tmp_path / name).exists() for name in "abc")


@pytest.mark.integration
def test_a_noise_conditional_energy_at_4x32x32_trains_and_generates_through_the_dag(ray_cluster, sd_checkpoint,
                                                                                   tmp_path):
    # Stable Diffusion's latent layout at a small side: train a tiny dsm model, conditioned on two label fields with
    # one combination left out, for a few steps through the Ray Train job; then generate from plain noise through
    # the same DAG from a conditions file, in both formats, with a sampler override.
    from pipeline.io.latent_shards import write_latent_dataset
    from pipeline.training.config import TrainConfig
    from pipeline.training.job import run_training

    latents = np.random.default_rng(0).normal(size=(64, 4, 32, 32)).astype(np.float32)
    labels = [{"shape": "ab"[i % 2], "colour": ["red", "blue", "green"][i % 3]} for i in range(64)]
    write_latent_dataset(tmp_path / "latents", latents, shard_size=32, label_fields=labels)
    run_training(from_dict(TrainConfig, dict(latents=str(tmp_path / "latents"), output=str(tmp_path / "train"),
                                             objective="dsm", channels=[8, 16], norm_groups=8, batch_size=8,
                                             max_steps=3, log_every=3, checkpoint_every=3, sampler_levels=6,
                                             condition_on=["shape", "colour"],
                                             exclude_labels=[{"shape": "a", "colour": "red"}])))
    model_dir = tmp_path / "train" / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["_class_name"] == "NoiseConditionalEnergy" and config["sampler"]["name"] == "ipndm"
    assert config["model"]["labels"] == {"shape": ["a", "b"], "colour": ["blue", "green", "red"]}
    assert config["latents"]["excluded_labels"] == [{"shape": "a", "colour": "red"}]
    worker = json.loads((tmp_path / "train" / "workers" / "rank-0.json").read_text())
    assert worker["excluded_per_epoch"] == sum(1 for x in labels if x == {"shape": "a", "colour": "red"}) == 11

    # One run asks for a mix: exact counts per condition in plan order, each row and sidecar carrying its condition,
    # the left-out combination asked for by composition, a NOT term; the sampler stage probes its batch size with
    # the corrector on and the widest condition (the decoder's is set: 4).
    plan = tmp_path / "conditions.yaml"
    plan.write_text("shape=a AND colour=red: 4\nshape=b: 3\nshape=b AND NOT colour=green: 3\n")
    out = tmp_path / "out"
    settings = dict(num_images=None, conditions=str(plan), images_per_shard=5, decode_batch_size=4, max_batch_size=8,
                    sampler={"name": "heun", "levels": 4, "mala_levels": 1, "guidance": 2.0})
    summary = generate(model_dir, sd_checkpoint, out, **settings)
    assert summary["images"] == 10 and summary["sampler"] == "heun" and summary["batch_sizes"]["sampler"] >= 1
    assert summary["gradient_evaluations_per_image"] == 2 * 4 - 1 + 2  # 4 Heun levels, one MALA level of 1 step
    assert 0 < summary["mala_acceptance"] <= 1
    asked = ["shape=a AND colour=red"] * 4 + ["shape=b"] * 3 + ["shape=b AND NOT colour=green"] * 3
    rows = parquet_rows(out)
    assert [r["condition"] for r in rows] == asked and [r["key"] for r in rows] == [image_key(0, i) for i in range(10)]
    assert all(r["width"] == r["height"] == 64 for r in rows)
    assert len(rows[0]["latent"]) == 4 * 32 * 32 and np.isfinite(rows[0]["latent"]).all()
    sidecars = [json.loads(s["json"]) for s in wds.WebDataset(sorted(str(p) for p in (out / "webdataset").iterdir()),
                                                              shardshuffle=False)]
    assert [s["condition"] for s in sidecars] == asked
    assert json.loads((out / "manifest.json").read_text())["conditions"] == [
        {"condition": c, "count": n} for c, n in (("shape=a AND colour=red", 4), ("shape=b", 3),
                                                  ("shape=b AND NOT colour=green", 3))]
    # the same command again finds every shard done; another plan, or flags of another kind of model, are refused
    kept = (out / "summary.json").read_bytes()
    assert generate(model_dir, sd_checkpoint, out, **settings)["images_this_run"] == 0
    assert (out / "summary.json").read_bytes() == kept  # a no-op resume leaves the run's own timings alone
    with pytest.raises(EbdError, match="unknown config key .steps. for NoiseLevelSettings"):
        generate(model_dir, sd_checkpoint, tmp_path / "o2", langevin_steps=5)
    with pytest.raises(EbdError, match="noise range this energy was trained on"):
        generate(model_dir, sd_checkpoint, tmp_path / "o3", sampler={"sigma_max": 1e4})
    with pytest.raises(EbdError, match="different conditions"):
        generate(model_dir, sd_checkpoint, out, **settings | {"num_images": 10, "conditions": None,
                                                              "condition": "shape=b"})


def test_the_diffusion_baseline_generates_exactly_n_through_the_dag_with_any_sampler(trained_baseline,
                                                                                  sd_checkpoint, tmp_path):
    """The session's baseline (conftest: objective ddpm of the same job, a noise-predicting UNet), through the same
    DAG: DDIM along its own timesteps, and a noise-level solver on a Karras schedule in its trained range."""
    model_dir = trained_baseline / "model"
    assert json.loads((model_dir / "config.json").read_text())["_class_name"] == "DiffusionUNet"
    summary = generate(model_dir, sd_checkpoint, tmp_path / "out", num_images=10, images_per_shard=4,
                       batch_size=4, sampler={"steps": 5}, format="both")
    assert summary["images"] == 10 and summary["sampler"] == "ddim" and summary["gradient_evaluations_per_image"] == 5
    rows = parquet_rows(tmp_path / "out")
    assert len(rows) == 10 and len({r["key"] for r in rows}) == 10
    assert all(np.isnan(r["energy"]) for r in rows)  # a noise predictor has no energy
    assert len(list(wds.WebDataset(sorted(str(p) for p in (tmp_path / "out" / "webdataset").iterdir()),
                                   shardshuffle=False))) == 10
    with pytest.raises(EbdError, match="must lie in this network's trained noise range"):
        generate(model_dir, sd_checkpoint, tmp_path / "karras", sampler={"name": "dpmpp_2m", "schedule": "karras"})


def test_a_folder_of_no_known_model_kind_is_refused_in_one_line(ebm_dir, sd_checkpoint, tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((ebm_dir / "model.safetensors").read_bytes())
    (folder / "config.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(EbdError, match="holds a 'StableDiffusionPipeline' model; ebd generates from"):
        generate(folder, sd_checkpoint, tmp_path / "out")
    with pytest.raises(EbdError, match="unknown config key 'levels'"):  # a cd model's sampler has no levels
        generate(ebm_dir, sd_checkpoint, tmp_path / "out2", sampler={"levels": 4})


def _generate_command(ray_cluster, ebm_dir, sd_checkpoint, out, *extra) -> list[str]:
    return [sys.executable, "-m", "jobs.generate", "--config", "configs/generate.yaml", "--model", str(ebm_dir),
            "--vae", str(sd_checkpoint), "--output", str(out), "--address", ray_cluster.address,
            "--set", "images_per_shard=8", "--set", "batch_size=8", "--set", "sampler.steps=150",
            "--set", "sampler_actors=1", *extra]  # one sampler actor: these runs test resumption and metrics


# A driver SIGKILLed mid-run and re-run: tests/test_object_store.py (into a bucket, where it also checks that the
# resumed run is byte-identical to an undisturbed one).


@pytest.fixture(scope="module")
def pushgateway():
    """A real Prometheus pushgateway (Debian's package, installed when missing) on a free loopback port."""
    exe = debian_binary("prometheus-pushgateway", "prometheus-pushgateway")
    url = f"http://127.0.0.1:{free_port()}"
    server = subprocess.Popen([exe, f"--web.listen-address={url[7:]}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/-/ready", timeout=1)
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "pushgateway did not start"
            time.sleep(0.1)
    yield url
    server.terminate()
    server.wait(10)


@pytest.mark.integration
def test_the_metrics_endpoint_counts_up_to_n_during_a_run_and_the_final_values_are_pushed(
        ray_cluster, ebm_dir, sd_checkpoint, tmp_path, pushgateway):
    port = free_port()
    command = _generate_command(ray_cluster, ebm_dir, sd_checkpoint, tmp_path, "--num-images", "40",
                                "--metrics-port", str(port), "--set", "metrics_linger_s=5",
                                "--pushgateway", pushgateway)
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: list[float] = []
    deadline = time.monotonic() + 300
    while job.poll() is None and time.monotonic() < deadline:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
        except OSError:
            time.sleep(0.2)
            continue
        match = re.search(r"^ebd_images_generated_total ([0-9.e+]+)$", text, re.M)
        if match:
            seen.append(float(match.group(1)))  # counted per decoded batch, ahead of the shard writes
            if seen[-1] == 40 and re.search(r"^ebd_shards_written_total 5\.0$", text, re.M):
                assert re.search(r"^ebd_gradient_evaluations_total [1-9]", text, re.M)
                assert 'ebd_batch_seconds_count{stage="decode"}' in text
                assert 'ebd_batch_size{stage="sampler"} 8.0' in text
                break
        time.sleep(0.2)
    job.wait(timeout=120)
    assert job.returncode == 0, job.stderr.read()[-3000:]
    assert seen and seen[-1] == 40, seen
    assert seen == sorted(seen) and min(seen) < 40  # watched it rise, not only the end state
    text = urllib.request.urlopen(pushgateway + "/metrics", timeout=5).read().decode()  # pushed when the job ended
    assert re.search(r'^ebd_images_generated_total\{[^}]*job="ebd_generate"[^}]*\} 40$', text, re.M), text[-2000:]
    assert re.search(r'^ebd_shards_written_total\{[^}]*\} 5$', text, re.M)


def test_the_python_pipeline_gives_the_images_the_job_wrote(both_formats, ebm_dir, sd_checkpoint):
    """EBDPipeline (no Ray) and the generation DAG make the same image for the same (seed, i)."""
    out, _ = both_formats
    rows = parquet_rows(out)[20:25]
    pipe = EBDPipeline.from_pretrained(sd_checkpoint, model=ebm_dir, device="cpu")
    made = pipe(num_images=5, seed=0, start=20, output_type="np")
    assert made.image_keys == [r["key"] for r in rows]
    for row, image in zip(rows, made.images):
        written = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB")).astype(int)
        assert np.abs(written - image.astype(int)).max() <= 1  # batch shapes differ: float rounding at most
    assert made.energies.tolist() == pytest.approx([r["energy"] for r in rows], rel=1e-4, abs=1e-4)


def test_generated_dataset_streams_the_dags_image_rows(ray_cluster, both_formats, ebm_dir, sd_checkpoint):
    out, _ = both_formats
    written = {r["key"]: r for r in parquet_rows(out)}
    rows = generated_dataset(str(ebm_dir), str(sd_checkpoint), 20, seed=0, images_per_shard=8).take_all()
    assert sorted(r["key"] for r in rows) == [image_key(0, i) for i in range(20)]
    for r in rows[:4]:
        assert r["image"].shape == (SIDE, SIDE, 3) and r["latent"].shape == (4, 8, 8)
        png = np.asarray(Image.open(io.BytesIO(written[r["key"]]["image"])).convert("RGB")).astype(int)
        assert np.abs(png - r["image"].astype(int)).max() <= 1


def test_a_sampler_setting_is_parsed_once_on_the_driver_and_the_stages_take_it_as_it_is(
        ray_cluster, ebm_dir, sd_checkpoint, tmp_path, monkeypatch):
    parsed = []
    validate = LangevinSettings.validate

    def counted(self):  # every parse of a sampler dict (from_dict) validates once; copies (replace) do not
        parsed.append(self.steps)
        validate(self)

    monkeypatch.setattr(LangevinSettings, "validate", counted)
    generate(ebm_dir, sd_checkpoint, tmp_path / "out", num_images=4, images_per_shard=4, batch_size=4,
             sampler={"steps": 7}, formats=["parquet"])
    assert parsed.count(7) == 1  # the user's setting: parsed once, between the CLI and the sampler
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["sampler"]["steps"] == 7 and manifest["formats"] == ["parquet"]
    stages = [REPO / "pipeline" / "generation" / f"{m}.py" for m in ("stages", "probes", "dag")]
    assert not any(call in p.read_text() for p in stages for call in ("sampler_settings(", "resolve_sampler("))
