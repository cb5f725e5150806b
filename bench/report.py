"""Collects the benchmarks' JSON (bench/out/) into bench/results.json and the markdown table bench/results.md.

    .venv/bin/python bench/report.py        (make bench runs the three benchmarks, then this)

Every figure is a ratio measured within one run (Ray vs a bare loop on the same cores, achieved vs peak FLOP/s,
the memory probe's batch vs the best of a sweep): absolute times drift on shared machines, ratios much less.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from common import REPO

OUT = REPO / "bench" / "out"


def rows(results: dict) -> list[dict]:
    """One row per headline figure: what was compared, the two measurements and their ratio."""
    out = []
    if (p := results.get("precompute")) is not None:
        out.append({"benchmark": "precompute", "figure": "Ray job / bare loop (images/s)",
                    "measured": f"{p['ray_images_per_s']} vs {p['bare_images_per_s']}", "ratio": p["ray_over_bare"],
                    "setup": f"{p['images']} images at {p['resolution']} px, {p['cpus']} CPUs"})
    if (t := results.get("train")) is not None:
        runs = t["runs"]
        out.append({"benchmark": "train", "figure": "2 workers x 1 CPU / 1 worker x 1 CPU (samples/s)",
                    "measured": f"{runs['2x1cpu']['samples_per_s']} vs {runs['1x1cpu']['samples_per_s']}",
                    "ratio": t["two_workers_over_one"],
                    "setup": f"latents {'x'.join(map(str, t['latent_shape']))}, K={t['langevin_steps']}"})
        out.append({"benchmark": "train", "figure": "2 workers x 1 CPU / 1 worker x 2 threads (samples/s)",
                    "measured": f"{runs['2x1cpu']['samples_per_s']} vs {runs['1x2cpu']['samples_per_s']}",
                    "ratio": t["two_workers_over_one_worker_two_threads"], "setup": "same"})
    if (g := results.get("generate")) is not None:
        for m in g["models"]:
            name = f"{m['model']} ({m['sampler']}, {m['gradient_evaluations_per_image']} gradients/image)"
            out += [
                {"benchmark": "generate", "figure": f"{name}: Ray DAG / bare loop (images/s)",
                 "measured": f"{m['ray_images_per_s']} vs {m['bare_images_per_s']}", "ratio": m["ray_over_bare"],
                 "setup": f"{g['images']} images, start-up included; steady state {m['ray_steady_images_per_s']} "
                          f"images/s after {m['ray_startup_s']} s"},
                {"benchmark": "generate", "figure": f"{name}: Ray DAG steady state / bare loop (images/s)",
                 "measured": f"{m['ray_steady_images_per_s']} vs {m['bare_images_per_s']}",
                 "ratio": m.get("ray_steady_over_bare"),
                 "setup": f"{m.get('sampler_actors', 1)} sampler actors (configs/generate.yaml's shape); "
                          f"start-up {m['ray_startup_s']} s apart"},
                {"benchmark": "generate", "figure": f"{name}: sampler achieved / fp32 GEMM peak (GFLOP/s)",
                 "measured": f"{m['sampler_gflops_achieved']} vs {g['matmul_gflops_peak']}",
                 "ratio": m["sampler_fraction_of_peak"],
                 "setup": f"{m['sampler_images_per_s']} images/s, {m['gflop_per_image']} GFLOP/image"},
            ]
    if (k := results.get("kernels")) is not None:
        for stage, variants in k["stages"].items():
            for name in ("channels_last", "compile"):
                v = variants[name]
                out.append({"benchmark": "kernels", "figure": f"{stage}: {name} / eager (speed)",
                            "measured": f"{v['seconds_per_batch']} vs {variants['eager']['seconds_per_batch']} s",
                            "ratio": v["speed_over_eager"],
                            "setup": f"batch {k['batch']}, latents {'x'.join(map(str, k['latent_shape']))}, first "
                                     f"call {v['first_call_seconds']} s, max abs diff {v['max_abs_difference']:.1e}"})
    return out


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = ["# Benchmark results", "",
             f"{m['cpu']} ({m['cores']} cores), torch {m['torch']}, {m['date']}. Produced by `make bench` "
             "(bench/report.py); the raw JSON is in bench/results.json.", "",
             "| benchmark | figure | measured | ratio | setup |", "|---|---|---|---|---|"]
    lines += [f"| {r['benchmark']} | {r['figure']} | {r['measured']} | **{r['ratio']}** | {r['setup']}"
              + (f" (measured {report['results'][r['benchmark']]['measured_on']})"
                 if "measured_on" in report["results"][r["benchmark"]] else "") + " |" for r in report["rows"]]
    if (g := report["results"].get("generate")) is not None:
        lines += ["", "Sampling-stage batch sweep (this process, no Ray; each sampler cut to 4 gradients):", "",
                  "| model | batch | images/s |", "|---|---|---|"]
        lines += [f"| {m['model']} | {r['batch_size']}{' (probed)' if r.get('auto') else ''} | "
                  f"{r['sampler_images_per_s_at_4_gradients']} |" for m in g["models"] for r in m["sweep"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    import torch

    results = {name: json.loads((OUT / f"{name}.json").read_text())
               for name in ("precompute", "train", "generate", "kernels") if (OUT / f"{name}.json").is_file()}
    previous = REPO / "bench" / "results.json"  # a benchmark not re-run keeps its last committed figures
    if previous.is_file():
        earlier = json.loads(previous.read_text())
        for name, result in earlier.get("results", {}).items():
            if name not in results:
                results[name] = result | {"measured_on": result.get("measured_on", earlier["machine"]["date"])}
    if not results:
        raise SystemExit("no benchmark results in bench/out/: run `make bench`")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else \
        platform.processor()
    report = {"machine": {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
                          "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                          "date": time.strftime("%Y-%m-%d")},
              "rows": rows(results), "results": results}
    (REPO / "bench" / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (REPO / "bench" / "results.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
