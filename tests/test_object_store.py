"""Object storage end to end, against a real S3 API (moto's server on 127.0.0.1, started by conftest's `s3`), and
Ray worker processes killed mid-job.

The chain: demo tars in a bucket -> precompute (one encode worker SIGKILLed) -> latents in the bucket -> training
from the bucket with checkpoints in the bucket (the training worker SIGKILLed; Ray Train restarts it from its last
checkpoint) -> a model in the bucket -> generation into the bucket (a sampler actor SIGKILLed), exactly N with unique
keys in both formats, byte-identical to an undisturbed run; a driver SIGKILLed mid-run and re-run ends exact and
byte-identical; a bucket that does not exist is one line, exit 2.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.common.config import EbdError, from_dict
from pipeline.demo import write_demo_images
from pipeline.generation import GenerateConfig, run_generation
from pipeline.io import storage
from pipeline.io.files import read_json
from pipeline.io.latent_shards import iter_latents, shard_paths
from pipeline.io.tars import read_tar_samples
from pipeline.models import load_model
from pipeline.training.config import TrainConfig
from pipeline.training.job import run_training
from pipeline.vae.precompute import PrecomputeConfig, run_precompute
from tests.conftest import REPO

pytestmark = pytest.mark.integration  # the long end-to-end tier: `make test-integration`, CI

IMAGES, SHARD = 48, 12


def upload_folder(local: Path, location: str) -> None:
    """Copies a local folder's files to `location`, config.json last (a model folder with a config is complete)."""
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: (p.name == "config.json", str(p)))
    for path in files:
        storage.write_bytes(storage.join(location, *path.relative_to(local).parts), path.read_bytes())


class Killer:
    """SIGKILLs the first process whose title (Ray sets `ray::TASK` / `ray::ACTOR` while it runs) contains
    `title`, from a thread, while the job runs in the foreground."""

    def __init__(self, title: str):
        self.title, self.killed, self._stop = title, None, threading.Event()
        self._thread = threading.Thread(target=self._hunt, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _hunt(self):
        me = os.getpid()
        while not self._stop.is_set() and self.killed is None:
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or int(pid) == me:
                    continue
                try:
                    title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                except OSError:
                    continue
                if title.startswith("ray::") and self.title in title:
                    os.kill(int(pid), signal.SIGKILL)
                    self.killed = int(pid)
                    return
            time.sleep(0.002)


@pytest.fixture(scope="module")
def bucket(s3) -> str:
    """A fresh prefix in the test bucket, per module run."""
    return storage.join(s3, f"run-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def latents(ray_cluster, bucket, sd_checkpoint, tmp_path_factory) -> str:
    """Demo tars uploaded to the bucket, precomputed into the bucket while one encode worker is SIGKILLed."""
    local = tmp_path_factory.mktemp("images")
    write_demo_images(local, IMAGES, size=32, images_per_shard=16)
    (local / "shapes-000001.tar").rename(local / "shapes 1 #%41.tar")  # object names as real buckets have them
    upload_folder(local, storage.join(bucket, "images"))
    out = storage.join(bucket, "latents")
    cfg = from_dict(PrecomputeConfig, dict(input=storage.join(bucket, "images"), vae=str(sd_checkpoint), output=out,
                                           resolution=16, min_side=8, shard_size=SHARD, batch_size=2,
                                           progress_interval_s=0.0, holdout=0.0))
    with Killer("encode_shard") as killer:
        manifest = run_precompute(cfg)
    assert killer.killed, "no encode worker was seen running"
    manifest["killed_worker"] = killer.killed
    return out


def test_precompute_reads_tars_from_a_bucket_and_writes_every_shard_once_despite_a_killed_worker(latents):
    manifest = read_json(storage.join(latents, "manifest.json"))
    assert manifest["totals"] == {"seen": IMAGES, "encoded": IMAGES, "rejected": 0, "shards": IMAGES // SHARD}
    assert not manifest["stratified_by_label"]  # a tar's labels are read after planning: the plain seeded order
    keys = [r["key"] for r in iter_latents(shard_paths(latents))]
    assert len(keys) == IMAGES == len(set(keys))
    for shard in manifest["shards"]:  # every shard committed: tar, then its done marker, recorded hashes agree
        marker = read_json(storage.join(latents, "stats", shard["file"].replace(".tar", ".json")))
        assert marker["sha256"] == shard["sha256"] == storage.file_sha256(storage.join(latents, shard["file"]))
    assert sum(manifest["labels"].values()) == IMAGES  # the .cls labels came through the bucket


@pytest.fixture(scope="module")
def model(latents, bucket) -> str:
    """Trained from the bucket into the bucket (checkpoints too); the training worker is SIGKILLed after its first
    checkpoint and Ray Train's failure config restarts it from that checkpoint."""
    out = storage.join(bucket, "ebm")
    cfg = from_dict(TrainConfig, dict(latents=latents, output=out, run_name="s3", objective="cd", channels=[8],
                                      batch_size=8, sampler={"steps": 5}, max_steps=40, log_every=10,
                                      checkpoint_every=10,
                                      holdout_shards=1, max_failures=1))
    checkpoints = storage.join(out, "checkpoints", "s3")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(metrics=run_training(cfg)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 240
    while not _registered_checkpoints(checkpoints):
        assert thread.is_alive(), "training ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint in the bucket within 240 s"
        time.sleep(0.2)
    with Killer("RayTrainWorker") as killer:
        while killer.killed is None and thread.is_alive():
            time.sleep(0.05)
    thread.join(300)
    assert killer.killed and "metrics" in result, "training did not survive its worker's death"
    return storage.join(out, "model")


def _registered_checkpoints(run_folder: str) -> list[int]:
    """Steps of the checkpoints Ray Train has registered (uploaded is not enough: a restart resumes from these)."""
    try:
        snapshot = read_json(storage.join(run_folder, "checkpoint_manager_snapshot.json"))
        return [r["metrics"]["step"] for r in snapshot["checkpoint_results"]]
    except (FileNotFoundError, ValueError, KeyError):
        return []


def test_training_reads_the_bucket_survives_a_killed_worker_and_exports_there(model):
    trained = load_model(model)  # from a cached local copy of the bucket folder
    assert trained.metadata["training"]["steps"] == 40
    worker = read_json(storage.join(model.rsplit("/", 1)[0], "workers", "rank-0.json"))
    assert worker["resumed_from_step"] >= 10 and worker["step"] == 40  # restarted from a checkpoint, not step 0
    assert [s["file"] for s in trained.metadata["latents"]["held_out"]] == ["latents-000003.tar"]


def _generate(model: str, vae, out: str, **overrides) -> dict:
    cfg = from_dict(GenerateConfig, dict(model=model, vae=str(vae), output=out, num_images=40, images_per_shard=8,
                                         batch_size=8, format="both", sampler_actors=1, sampler={"steps": 60},
                                         save_latents=True,
                                         progress_interval_s=0.0)
                    | overrides)
    return run_generation(cfg)


def _shard_hashes(out: str) -> dict[str, str]:
    return {p[len(out) + 1:]: storage.file_sha256(p) for p in storage.list_files(out)
            if p.endswith((".parquet", ".tar"))}  # "parquet/images-000000.parquet": ...


@pytest.fixture(scope="module")
def bucket_vae(bucket, sd_checkpoint) -> str:
    """The Stable Diffusion-layout VAE folder in the bucket: decoder actors read it through their node's cache."""
    upload_folder(sd_checkpoint, storage.join(bucket, "sd"))
    return storage.join(bucket, "sd")


@pytest.fixture(scope="module")
def clean_run(model, bucket, bucket_vae) -> str:
    out = storage.join(bucket, "generated-clean")
    _generate(model, bucket_vae, out)
    return out


def test_generation_into_a_bucket_gives_exactly_n_unique_keys_in_both_formats(clean_run):
    hashes = _shard_hashes(clean_run)
    assert len(hashes) == 10  # 5 parquet + 5 tar
    rows = [r for name in sorted(hashes) if name.endswith(".parquet")
            for r in pq.read_table(io.BytesIO(storage.read_bytes(storage.join(clean_run, name)))).to_pylist()]
    tar_keys = [s["__key__"] for name in sorted(hashes) if name.endswith(".tar")
                for s in read_tar_samples(storage.join(clean_run, name))]
    assert len(rows) == 40 == len({r["key"] for r in rows}) and sorted(tar_keys) == sorted(r["key"] for r in rows)
    assert read_json(storage.join(clean_run, "manifest.json"))["images"] == 40
    assert storage.is_file(storage.join(clean_run, "preview.png"))


def test_a_killed_sampler_actor_then_a_killed_driver_leave_a_run_that_resumes_exact_and_byte_identical(
        ray_cluster, clean_run, model, bucket, bucket_vae):
    """One run, two faults: a sampler actor SIGKILLed (Ray restarts it and its shard is made again), then the driver
    SIGKILLed after a shard is committed; the same command again finishes it. Every shard ends byte-identical to an
    undisturbed run's: none lost, doubled or changed."""
    out = storage.join(bucket, "generated-killed")
    command = [sys.executable, "-m", "jobs.generate", "--config", "configs/generate.yaml", "--model", model,
               "--vae", bucket_vae, "--output", out, "--address", ray_cluster.address, "--num-images", "40",
               "--format", "both", "--set", "images_per_shard=8", "--set", "batch_size=8",
               "--set", "sampler_actors=1", "--set", "sampler.steps=60", "--set", "save_latents=true"]
    with Killer("MapBatches(SamplerStage)") as killer:
        first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
        deadline = time.monotonic() + 240
        while killer.killed is None:
            assert first.poll() is None, "the run ended before a sampler actor was seen"
            assert time.monotonic() < deadline, "no sampler actor within 240 s"
            time.sleep(0.05)
    while not storage.list_files(storage.join(out, "stats")):
        assert first.poll() is None, "the run ended before its first shard"
        assert time.monotonic() < deadline, "no shard within 240 s"
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not storage.is_file(storage.join(out, "manifest.json"))  # killed mid-run

    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert read_json(storage.join(out, "summary.json"))["images_this_run"] < 40  # committed shards were kept
    assert _shard_hashes(out) == _shard_hashes(clean_run)


def test_evaluation_reads_the_run_the_reference_and_the_raw_inputs_from_the_bucket(clean_run, latents, bucket_vae,
                                                                                  tmp_path):
    from pipeline.evaluation.report import EvaluateConfig, run_evaluation

    report = run_evaluation(from_dict(EvaluateConfig, dict(
        generated=clean_run, reference=latents, output=str(tmp_path / "report"), check_space="latents",
        num_samples=12, memorisation_pool=36, image_side=8, realism_epochs=2)))
    assert report["generated"] == clean_run and report["reference"] == latents
    assert report["samples"] == 12 and report["held_out_shards"] == ["latents-000003.tar"]
    # the held-out images, read back from the input tars in the bucket (one of them named 'shapes 1 #%41.tar')
    assert not any("could not be read" in note for note in report["notes"]), report["notes"]
    assert (tmp_path / "report" / "report.md").is_file()


def test_a_missing_bucket_is_one_line_exit_2_and_writes_nothing(model, sd_checkpoint, tmp_path):
    with pytest.raises(EbdError, match="cannot write to s3://no-such-bucket/out"):
        _generate(model, sd_checkpoint, "s3://no-such-bucket/out")
    result = subprocess.run([sys.executable, "-m", "jobs.precompute", "--config", "configs/precompute.yaml",
                             "--input", "s3://no-such-bucket/images", "--vae", str(sd_checkpoint),
                             "--output", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "s3://no-such-bucket/images" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_shard_object_without_its_done_marker_is_rewritten_never_trusted(clean_run, model, bucket, bucket_vae):
    out = storage.join(bucket, "generated-unmarked")
    for path in storage.list_files(clean_run):  # a copy of the finished run, in another prefix
        storage.write_bytes(path.replace(clean_run, out), storage.read_bytes(path))
    # As a run killed between a shard's files and its marker leaves it: shard 2 half there, no marker, no manifest.
    storage.write_bytes(storage.join(out, "parquet", "images-000002.parquet"), b"PAR1 truncated")
    storage.delete(storage.join(out, "stats", "images-000002.json"))
    storage.delete(storage.join(out, "manifest.json"))
    summary = _generate(model, bucket_vae, out)
    assert summary["images_this_run"] == 8  # only the unmarked shard was made again
    assert _shard_hashes(out) == _shard_hashes(clean_run)
