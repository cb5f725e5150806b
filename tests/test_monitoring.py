"""Integration: a local two-node Ray cluster, the three jobs through `ray job submit` (the repository as the
job's working dir, data on absolute paths, as on a real cluster), a real Prometheus scraping.

Needs Debian's `prometheus`: installed by the set-up when missing and allowed (root), else the test skips. Everything
binds to 127.0.0.1;
Prometheus rewrites the node addresses Ray's service-discovery file lists to 127.0.0.1 as well.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from pipeline.demo import write_demo_images
from tests.conftest import REPO, _wait_for_http, debian_binary, free_port

pytestmark = pytest.mark.integration  # the long end-to-end tier: `make test-integration`, CI


def _ray_start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats",
                             "--node-ip-address=127.0.0.1", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


@pytest.fixture(scope="module")
def two_nodes():
    """Head (1 CPU) + worker (1 CPU) on 127.0.0.1, with their own temp dir and ports beside the session cluster."""
    temp = Path(tempfile.mkdtemp(prefix="ebdray", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    # Two nodes need Ray's multi-node mode: its single-machine mode (the session's local instances) refuses `ray start
    # --address`, and in multi-node mode Ray puts its nodes on the machine's address, token auth on.
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    gcs, dashboard = free_port(), free_port()
    metrics_ports = [free_port(), free_port()]
    head = _ray_start(["--head", f"--temp-dir={temp}", f"--port={gcs}", "--num-cpus=1", "--include-dashboard=true",
                       "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                       f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={metrics_ports[0]}",
                       f"--ray-client-server-port={free_port()}"],  # the session cluster's head holds the default
                      env)
    nodes = [head]
    try:
        _wait_for_http(f"http://127.0.0.1:{dashboard}/api/version", head)
        nodes.append(_ray_start([f"--address=127.0.0.1:{gcs}", "--num-cpus=1",
                                 f"--dashboard-agent-listen-port={free_port()}",
                                 f"--metrics-export-port={metrics_ports[1]}"], env))
        discovery = temp / "prom_metrics_service_discovery.json"
        deadline = time.monotonic() + 120
        while not all(f":{p}" in (discovery.read_text() if discovery.is_file() else "") for p in metrics_ports):
            assert time.monotonic() < deadline, "the worker node did not join within 120 s"
            time.sleep(0.5)
        yield {"dashboard": f"http://127.0.0.1:{dashboard}", "discovery": discovery, "env": env}
    finally:
        for node in reversed(nodes):
            os.killpg(node.pid, signal.SIGINT)
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def prometheus(two_nodes, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prometheus")
    generate_port, port = free_port(), free_port()
    to_loopback = [{"source_labels": ["__address__"], "regex": r".*:(\d+)", "target_label": "__address__",
                    "replacement": "127.0.0.1:$1"}]
    (folder / "prometheus.yml").write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "ray", "file_sd_configs": [{"files": [str(two_nodes["discovery"])], "refresh_interval": "1s"}],
             "relabel_configs": to_loopback},
            {"job_name": "ebd-generate", "static_configs": [{"targets": [f"127.0.0.1:{generate_port}"]}]}]}))
    server = subprocess.Popen([debian_binary("prometheus", "prometheus"), f"--config.file={folder / 'prometheus.yml'}",
                               f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    _wait_for_http(url + "/-/ready", server)
    yield {"url": url, "generate_port": generate_port}
    server.terminate()
    server.wait(30)


def query(prom: dict, expr: str) -> float | None:
    """The first value of an instant query, or None when it has no result."""
    url = f"{prom['url']}/api/v1/query?query={urllib.parse.quote(expr)}"
    result = json.loads(urllib.request.urlopen(url, timeout=5).read())["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def submit(cluster: dict, *job: str, wait: bool = True):
    command = ["ray", "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(REPO), "--",
               "python", "-m", *job]
    env = cluster["env"] | {"RAY_AUTH_MODE": "token"}
    if not wait:
        return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env)
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in output, output[-4000:]
    return result


def test_jobs_on_two_nodes_and_prometheus_sees_generation_throughput(two_nodes, prometheus, sd_checkpoint, tmp_path):
    write_demo_images(tmp_path / "images", 48, size=32)
    submit(two_nodes, "jobs.precompute", "--config", "configs/precompute.yaml", "--input", str(tmp_path / "images"),
           "--vae", str(sd_checkpoint), "--output", str(tmp_path / "latents"), "--set", "resolution=16",
           "--set", "min_side=8", "--set", "shard_size=12")
    submit(two_nodes, "jobs.train", "--config", "configs/train-demo-cd.yaml", "--latents", str(tmp_path / "latents"),
           "--output", str(tmp_path / "ebm"), "--max-steps", "10", "--set", "objective.channels=[8]",
           "--set", "objective.init_rank=null", "--set", "objective.init_components=1", "--set", "batch_size=8",
           "--set", "holdout_shards=0", "--set", "sampler.steps=5", "--set", "log_every=5",
           "--set", "checkpoint_every=5",
           "--set", "max_failures=2")  # a worker lost on these 1-CPU nodes restarts from its checkpoint (CI lost one)

    n = 64
    job = submit(two_nodes, "jobs.generate", "--config", "configs/generate.yaml", "--model",
                 str(tmp_path / "ebm" / "model"), "--vae", str(sd_checkpoint), "--num-images", str(n), "--output",
                 str(tmp_path / "generated"), "--metrics-port", str(prometheus["generate_port"]),
                 "--set", "images_per_shard=8", "--set", "batch_size=8", "--set", "sampler.steps=100",
                 "--set", "sampler_cpus=0.5", "--set", "decoder_cpus=0.25", "--set", "writer_cpus=0.25",
                 "--set", "sampler_actors=2",  # one per node (auto would start 3 on these 2 CPUs)
                 "--set", "metrics_linger_s=8", wait=False)
    rates: list[float] = []
    deadline = time.monotonic() + 400
    while job.poll() is None and time.monotonic() < deadline:
        rate = query(prometheus, "rate(ebd_images_generated_total[10s])")
        if rate is not None:
            rates.append(rate)
        time.sleep(1)
    output = job.communicate(timeout=60)[0]
    assert job.returncode == 0, output[-4000:]
    assert any(r > 0 for r in rates), rates  # Prometheus saw images being written while the job ran
    assert query(prometheus, "max_over_time(ebd_images_generated_total[10m])") == n

    # The actors' own metrics reach Prometheus through Ray's per-node metrics agents, under the names the
    # Grafana dashboard uses.
    deadline = time.monotonic() + 60
    while query(prometheus, 'sum(max_over_time(ray_ebd_stage_items_total{stage="decode"}[10m]))') != n:
        assert time.monotonic() < deadline, "ray_ebd_stage_items_total never reached N in Prometheus"
        time.sleep(2)
    assert query(prometheus, "sum(max_over_time(ray_ebd_precompute_images_total[10m]))") == 48
