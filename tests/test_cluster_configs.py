"""The cluster and monitoring configs: they parse, and dashboards and alerts use only metrics the jobs export."""

import json
import re
import sys
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from pipeline.common.metrics import RAY_EXPORTED, DriverMetrics
from tests.conftest import REPO

CLUSTER = REPO / "cluster"


def exported_series() -> set[str]:
    """Every series name the jobs export: the driver's registry as exposed, and Ray's for the actors' metrics."""
    metrics = DriverMetrics()
    metrics.record_shard({"count": 1, "sampler_batch_seconds": [0.1], "sampler_batch_size": 1})
    metrics.set_in_flight(1)
    from prometheus_client import generate_latest
    names = {s.name for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
             for s in family.samples}
    return names | set(RAY_EXPORTED) | {f"{n}_{suffix}" for n in RAY_EXPORTED for suffix in ("bucket", "count", "sum")}


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:ray_)?ebd_[a-z_]+)\b", expr))


def test_grafana_dashboard_references_only_exported_metrics():
    dashboard = json.loads((CLUSTER / "grafana" / "ebd-dashboard.json").read_text())
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in metric_names(target["expr"])}
    assert used, "the dashboard queries no ebd metric"
    assert used <= exported_series(), sorted(used - exported_series())
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("images per second", "sampler vs decode", "batch size", "in flight", "rejected"):
        assert topic in titles


def test_prometheus_config_and_alert_rules_use_exported_metrics():
    config = yaml.safe_load((CLUSTER / "prometheus" / "prometheus.yml").read_text())
    jobs = {c["job_name"]: c for c in config["scrape_configs"]}
    assert jobs["ray"]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    assert jobs["ebd-generate"]["static_configs"][0]["targets"]
    rules = yaml.safe_load((CLUSTER / "prometheus" / "rules.yml").read_text())
    exprs = [r["expr"] for group in rules["groups"] for r in group["rules"]]
    assert any("ebd_images_generated_total" in e for e in exprs)
    assert set().union(*map(metric_names, exprs)) <= exported_series()


def test_cluster_manifests_parse_and_have_cpu_and_gpu_worker_groups():
    ray_up = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    assert {"cpu_sampler", "gpu_decoder"} <= set(ray_up["available_node_types"])
    for name in ("raycluster.yaml", "rayjob.yaml"):
        doc = yaml.safe_load((CLUSTER / "kuberay" / name).read_text())
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        gpu_limits = groups["gpu-decoder"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert "cpu-sampler" in groups and gpu_limits["nvidia.com/gpu"] == "1"
        # object storage by default: every pod gets the bucket's endpoint and credentials from the Secret
        pods = [spec["headGroupSpec"]] + list(groups.values())
        assert all(pod["template"]["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "ebd-s3"}}]
                   for pod in pods)
        assert spec["authOptions"] == {"mode": "token"}  # the dashboard listens on the pod address: token auth
        if "entrypoint" in doc["spec"]:
            paths = re.findall(r"--(?:model|vae|output) (\S+)", doc["spec"]["entrypoint"])
            assert len(paths) == 3 and all(p.startswith("s3://") for p in paths), paths


def test_the_dockerfile_lints_and_the_kuberay_manifests_run_the_images_it_builds():
    """No container engine in CI: the Dockerfile is checked by hadolint (from PyPI), and every container of the
    KubeRay manifests runs ebd:cpu, or ebd:cuda on GPU workers (the Dockerfile's two build variants)."""
    import shutil
    import subprocess

    import pytest

    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (test extra, x86_64 only)")
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "constraints.txt" in dockerfile and "TORCH_INDEX" in dockerfile
    for manifest in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        for doc in yaml.safe_load_all(manifest.read_text()):
            text = json.dumps(doc)
            for container in re.findall(r'"image": "([^"]+)"', text):
                assert container in ("ebd:cpu", "ebd:cuda"), (manifest.name, container)
            assert '"nvidia.com/gpu"' not in text or "ebd:cuda" in text  # GPU workers get the CUDA build


def test_sampling_from_python_needs_no_ray():
    """The core install (no `cluster` extra) is enough for EBDPipeline: it imports no Ray."""
    import subprocess

    code = ("import sys; sys.modules['ray'] = None; from pipeline import EBDPipeline; "
            "out = EBDPipeline.from_pretrained('models/demo', device='cpu')(num_images=2, sampler={'levels': 3}); "
            "assert len(out.images) == 2")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_working_directory_a_job_submits_is_the_code_and_configs_and_small(tmp_path):
    """`ray job submit --working-dir .` zips the repository the way Ray does it here; over 100 MiB Ray refuses it."""
    from zipfile import ZipFile

    from ray._private.runtime_env.packaging import create_package
    package = tmp_path / "working_dir.zip"
    create_package(str(REPO), package, include_gitignore=True)
    names = ZipFile(package).namelist()
    assert {"jobs/train.py", "jobs/generate.py", "pipeline/api.py", "configs/train.yaml"} <= set(names)
    assert not [n for n in names if n.startswith(("models/", "bench/", ".git/", ".venv/", "build/"))], names[:20]
    assert package.stat().st_size < 8 * 2**20, package.stat().st_size  # the code is ~1 MiB; Ray's cap is 100 MiB
