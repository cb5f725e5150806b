"""Shared fixtures, built once per session and used across modules: one real local Ray cluster (2 CPUs), one S3 server,
tiny VAEs saved to disk, one latent set (a two-mode mixture) and the models trained on it through Ray Train (a
conditional noise-conditional energy with two workers, the diffusion baseline), and image makers."""

from __future__ import annotations

import io
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")  # Ray 2.60's default for new clusters; every client sends the token
# The session cluster runs ebd's local-instance settings (pipeline/distributed/cluster.py): on 127.0.0.1 only, no
# preemption watcher. On top, more idle workers kept warm than CPUs: many short Ray runs start faster on 2 CPUs.
from pipeline.distributed.cluster import LOCAL_ENV  # noqa: E402

for _name, _value in LOCAL_ENV.items():
    os.environ.setdefault(_name, _value)
os.environ.setdefault("RAY_num_workers_soft_limit", "8")
# Ray Train's controller checks its workers every 2 s by default, so a run's end is seen up to 2 s late: the suite's
# dozen short training runs poll faster.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

# The jobs' log lines on stderr, as `run_cli` sets them up: tests that call the library in-process read them there.
from pipeline.common.logs import configure_logging  # noqa: E402

configure_logging()


def _session_auth_token() -> None:
    """`ray start` with token auth refuses to start without a token (a fresh machine has no ~/.ray/auth_token):
    the test session makes its own in a private file, leaving the user's home alone. Subprocesses (ray start, ray
    job submit, the jobs) inherit RAY_AUTH_TOKEN_PATH from this environment."""
    import secrets

    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = Path(tempfile.mkdtemp(prefix="ebd-test-auth-")) / "auth_token"
    path.write_text(secrets.token_hex(32))
    path.chmod(0o600)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)


_session_auth_token()

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The object-store tests' S3 endpoint (moto's server on 127.0.0.1, started by the `s3` fixture). Its address and
# throwaway credentials go into the environment now, before any Ray cluster starts, so every Ray worker and job
# subprocess inherits them, exactly as a user's cluster inherits AWS_* from its nodes' environment. They replace
# whatever AWS settings the user has: no test ever reaches a real bucket.
S3_PORT = int(os.environ.get("EBD_TEST_S3_PORT") or free_port())  # once: test modules import this file again
os.environ.update({"EBD_TEST_S3_PORT": str(S3_PORT), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
                   "AWS_ACCESS_KEY_ID": "ebd-test", "AWS_SECRET_ACCESS_KEY": "ebd-test-secret",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                   "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull})
if "EBD_CACHE" not in os.environ:  # local copies of bucket models: a throwaway folder, not the user's ~/.cache/ebd
    os.environ["EBD_CACHE"] = tempfile.mkdtemp(prefix="ebd-test-cache-")


@dataclass
class LocalCluster:
    address: str          # GCS address, for ray.init(address=...) and --address
    dashboard_url: str    # job submission endpoint, for `ray job submit --address`
    env: dict             # environment for CLI subprocesses (token auth, the venv's python first on PATH)


@pytest.fixture(scope="session")
def s3():
    """A real S3 API on 127.0.0.1 (moto's server), with a bucket `ebd-test`; yields the bucket's URI."""
    import pyarrow.fs as pafs

    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_http(f"http://127.0.0.1:{S3_PORT}/", server, what="moto's S3 server")
        pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir(
            "ebd-test")
        yield "s3://ebd-test"
    finally:
        server.terminate()
        server.wait(30)


@pytest.fixture(scope="session")
def ray_cluster():
    """One real Ray cluster for the session, started as users start one (`ray start --head`, 2 CPUs, bound to
    127.0.0.1): tests in this process connect with ray.init, job tests submit to its dashboard. It advertises one
    GPU, so GPU requests are really scheduled; with no CUDA here, the code that gets one falls back to the CPU."""
    import ray

    gcs_port, dashboard_port = free_port(), free_port()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--num-cpus=2", "--num-gpus=1",
         f"--port={gcs_port}", "--node-ip-address=127.0.0.1", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--disable-usage-stats",
         # its own job agent port: the default (52365) is taken by any other Ray cluster on this machine, and a
         # cluster whose agent cannot bind refuses every `ray job submit` ("No available agent")
         f"--dashboard-agent-listen-port={free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    cluster = LocalCluster(f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}", env)
    try:
        _wait_for_http(cluster.dashboard_url + "/api/version", head)
        # the repository on every worker's path, as `ray job submit --working-dir` puts it there: the test-only model
        # kind (tests/toy_kind.py) loads in Ray workers through `plugins`, as a user's own package would
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                                     os.environ.get("PYTHONPATH")]))}})
        yield cluster
    finally:
        ray.shutdown()
        os.killpg(head.pid, signal.SIGINT)  # `ray start --block` stops its own processes on SIGINT
        try:
            head.wait(3)  # about 2 s when idle; a throwaway cluster still busy is killed whole
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        _forget_cluster(gcs_port)


def _forget_cluster(gcs_port: int) -> None:
    """Removes Ray's pointer to the cluster just stopped (as `ray stop` does), or a later plain ray.init()
    would try to join the dead cluster."""
    pointer = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
    try:
        if pointer.read_text().strip().endswith(f":{gcs_port}"):
            pointer.unlink()
    except OSError:
        pass


def _wait_for_http(url: str, process: subprocess.Popen, timeout: float = 120.0, what: str = "ray start") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:  # 401 without a token: the server is up
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@pytest.fixture(scope="session")
def sd_checkpoint(tmp_path_factory) -> Path:
    """A tiny random AutoencoderKL saved as `vae/` of a Stable Diffusion-layout folder (downscale factor 2)."""
    from pipeline.demo import write_sd_style_vae

    return write_sd_style_vae(tmp_path_factory.mktemp("sd") / "tiny-sd", seed=0, block_out_channels=(8, 16))


@pytest.fixture(scope="session")
def vae_only_dir(sd_checkpoint) -> Path:
    """The same VAE as a VAE-only folder (config.json + safetensors at the top)."""
    return sd_checkpoint / "vae"


def debian_binary(binary: str, package: str) -> str:
    """The path of `binary`, installing Debian's `package` first when it is missing and we may (root with apt);
    skips the test otherwise."""
    import shutil

    path = shutil.which(binary)
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", package], env=env,
                       capture_output=True, timeout=900)
        path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed and cannot be installed here (apt-get install {package})")
    return path


def rgb_image(seed: int, size=(24, 20)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def encode_image(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels in a few bytes: a decompression bomb as far as a header goes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------- one latent set, its models

SHAPE = (4, 4, 4)  # decoded by the tiny test VAE (2x up-sampling) to 8 x 8 images
WEIGHT_A, CENTER, STD = 0.7, 0.75, 0.3          # modes at +0.75 ("upper") and -0.75 ("lower") in every dimension
MODE_DISTANCE = 2 * CENTER * np.sqrt(np.prod(SHAPE))  # = 12


def mixture(n: int, seed: int) -> np.ndarray:
    """Two well-separated modes (weights 0.7 / 0.3): a Gaussian with the same mean and covariance puts most of its
    samples between them, where there is no data."""
    rng = np.random.default_rng(seed)
    in_a = rng.random(n) < WEIGHT_A
    return (rng.normal(0, STD, (n, *SHAPE)) + np.where(in_a, CENTER, -CENTER)[:, None, None, None]).astype(np.float32)


def mode_labels(latents: np.ndarray) -> list[str]:
    return ["upper" if z.mean() > 0 else "lower" for z in latents]


def mode_check(z, tolerance: float = 0.15) -> tuple[bool, dict]:
    """Weights within `tolerance` of the truth and per-mode mean error under a quarter of the distance between
    modes."""
    in_a = z.flatten(1).mean(1) > 0
    weight = in_a.float().mean().item()
    err_a = (z[in_a].mean(0) - CENTER).norm().item() if in_a.any() else float("inf")
    err_b = (z[~in_a].mean(0) + CENTER).norm().item() if (~in_a).any() else float("inf")
    stats = {"weight_a": weight, "err_a": err_a, "err_b": err_b}
    return abs(weight - WEIGHT_A) <= tolerance and max(err_a, err_b) < MODE_DISTANCE / 4, stats


@pytest.fixture(scope="session")
def mixture_latents(tmp_path_factory, sd_checkpoint) -> Path:
    """2,048 i.i.d. draws of the mixture as a latents folder of 8 shards (any shard is a fair held-out sample),
    labelled by mode and recorded as latents of the tiny test VAE."""
    from pipeline.io.latent_shards import write_latent_dataset
    from pipeline.vae.autoencoder import resolve_vae

    folder = tmp_path_factory.mktemp("mixture") / "latents"
    data = mixture(2048, seed=0)
    write_latent_dataset(folder, data, shard_size=256, labels=mode_labels(data), shuffled=True,
                         vae=resolve_vae(sd_checkpoint).identity(), scaling_factor=0.18215)
    return folder


ENERGY_RECIPE = dict(objective=dict(name="dsm", channels=[16], norm_groups=8, sigma_sampling="log_uniform",
                                    condition_on=["label"]),
                     sampler={"name": "ancestral"}, holdout_shards=2, batch_size=32, lr=1e-3, beta1=0.9,
                     ema_decay=0.99, data_noise=0.0, max_steps=600, log_every=100, checkpoint_every=300)


@pytest.fixture(scope="session")
def trained_energy(ray_cluster, mixture_latents, tmp_path_factory) -> Path:
    """The session's trained model, through Ray Train as users train: the noise-conditional energy of the mixture,
    conditioned on its mode label, on two workers that stream their disjoint shares (cache_bytes 0) and average
    their gradients; the last two shards held out. Returns the run's output folder (the model is in model/)."""
    from pipeline.common.config import from_dict
    from pipeline.training.config import TrainConfig
    from pipeline.training.job import run_training

    out = tmp_path_factory.mktemp("energy") / "run"
    run_training(from_dict(TrainConfig, dict(latents=str(mixture_latents), output=str(out), num_workers=2,
                                             cache_bytes=0, shuffle_buffer=64) | ENERGY_RECIPE))
    return out


BASELINE_RECIPE = dict(objective="ddpm", channels=[8], norm_groups=8, batch_size=16, log_every=4, checkpoint_every=4,
                       run_name="baseline")


@pytest.fixture(scope="session")
def trained_baseline(ray_cluster, mixture_latents, tmp_path_factory) -> Path:
    """The diffusion baseline: 4 steps, then the same run asked to go to 8 (a resume from its checkpoint)."""
    from pipeline.common.config import from_dict
    from pipeline.training.config import TrainConfig
    from pipeline.training.job import run_training

    out = tmp_path_factory.mktemp("baseline") / "run"
    for steps in (4, 8):
        run_training(from_dict(TrainConfig, dict(latents=str(mixture_latents), output=str(out), max_steps=steps)
                               | BASELINE_RECIPE))
    return out


def run_job_here(capsys, module: str, *args: str) -> tuple[int, str]:
    """`python -m MODULE ARGS` run in this process, as its entry point runs (`run_cli`): (exit code, stderr). For
    the many one-line-error checks; tests/test_cli.py runs real subprocesses for the rest."""
    import importlib

    from pipeline.common.config import run_cli

    job, argv = importlib.import_module(module), sys.argv
    sys.argv = [f"python -m {module}", *args]
    try:
        run_cli(job.main)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
    return code, capsys.readouterr().err
