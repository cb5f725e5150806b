"""The GPU check: everything ebd claims about GPUs, measured on one GPU in at most 8 minutes, written to bench/gpu.md.

    .venv/bin/python bench/gpu_check.py                     # on a machine with an NVIDIA GPU (after make install)
    .venv/bin/python bench/gpu_check.py --dry-run --output /tmp/gpu.md   # on a CPU: every step, tiny sizes

Sections (each a function below, each timed; one that fails is reported and the rest still run):
1. environment: device, torch / CUDA / cuDNN versions, the TF32 flags as PyTorch leaves them and as ebd sets them.
2. precision: the demo energy sampled on the device in float32, tf32, bfloat16 and float16 against CPU float32 on the
   same chains: latent and energy differences, FD between each set and the CPU set in the demo evaluator's feature
   space, images/s.
3. repeat: the same chains sampled twice in one process and once in a fresh one: byte-identical or not.
4. memory: configs/train-sd.yaml's energy (random weights) and Stable Diffusion 1.x's decoder (random weights, fp16)
   probed against a full GPU's budget (`common.memory`), then run at the chosen size: peak reserved memory against
   the budget.
5. out of memory: a chunked job forced past the GPU's memory, recovered by halving (`run_in_chunks`): every item
   once.
6. shares: jobs.generate with two fused actors on half a GPU each: the budgets they sized for and the images made.
7. tests: the suite's GPU placement tests (its cluster advertises one GPU; here CUDA is real).
8. rates: one evaluation's time per precision at a large and a small batch, for the capacity model
   (placement.ASSUMED_GPU_TFLOPS, gpu_latency_ms): achieved TFLOP/s and the per-evaluation floor.

`--dry-run` runs every section on the CPU at tiny sizes (sections 6 and 7 are skipped), so the script cannot rot:
the test suite runs it. Nothing in a dry run is a GPU figure; its output says so on its first line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

from common import REPO, write_result

DEMO = REPO / "models" / "demo"
PRECISIONS = ("float32", "tf32", "bfloat16", "float16")


class Check:
    def __init__(self, dry: bool):
        import torch

        self.dry = dry
        self.device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
        self.samples = 4 if dry else 1000

    def sample(self, model, n: int, precision: str, device=None, batch: int | None = None):
        from pipeline.common.precision import resolve_precision
        from pipeline.sampling.core import sample_latents

        device = device or self.device
        return sample_latents(model, range(n), 0, model.sampler, device=device,
                              precision=resolve_precision(device, precision), batch_size=batch or n)


def environment(check: Check) -> dict:
    import torch

    from pipeline.common.precision import exact_float32

    out = {"device": torch.cuda.get_device_name(0) if check.device.type == "cuda" else "cpu (dry run)",
           "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "tf32_defaults": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}}
    with exact_float32("cuda", "float32"):
        out["tf32_under_float32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32,
                                     "cudnn": torch.backends.cudnn.allow_tf32}
    if check.device.type == "cuda":
        out["total_memory_gib"] = round(torch.cuda.mem_get_info()[1] / 2**30, 1)
        out["bf16_native"] = torch.cuda.is_bf16_supported(including_emulation=False)
    return out


def precision(check: Check) -> dict:
    import torch

    from pipeline.evaluation import quality
    from pipeline.evaluation.features import ImageEvaluator
    from pipeline.models import load_model
    from pipeline.vae.autoencoder import decode_images, load_vae, resolve_vae

    cpu_model = load_model(DEMO / "ebm")
    model = load_model(DEMO / "ebm", check.device)
    vae = load_vae(resolve_vae(DEMO), torch.device("cpu"), torch.float32)
    evaluator = ImageEvaluator.from_pretrained(DEMO / "evaluator")
    reference = check.sample(cpu_model, check.samples, "float32", device="cpu", batch=256)
    ref_features = evaluator.features(decode_images(vae, reference.latents))
    rows = {}
    for name in PRECISIONS:
        tick = time.perf_counter()
        got = check.sample(model, check.samples, name, batch=256)
        seconds = time.perf_counter() - tick
        latents, energies = got.latents.cpu(), got.energies.cpu()
        features = evaluator.features(decode_images(vae, latents))
        rows[name] = {"images_per_s": round(check.samples / seconds, 1),
                      "latent_max_abs_diff": float((latents - reference.latents).abs().max()),
                      "latent_rms_diff": float((latents - reference.latents).pow(2).mean().sqrt()),
                      "energy_max_abs_diff": float((energies - reference.energies).abs().max()),
                      "fd_to_cpu_float32": round(quality.frechet_distance(ref_features, features), 4)}
    return {"samples": check.samples, "reference": "CPU float32, the same chains", "rows": rows}


def repeat(check: Check) -> dict:
    from pipeline.models import load_model

    model = load_model(DEMO / "ebm", check.device)
    n = 64 if not check.dry else 4
    digests = [hashlib.sha256(check.sample(model, n, "float32").latents.cpu().numpy().tobytes()).hexdigest()
               for _ in range(2)]
    code = (f"import sys, hashlib; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'bench')!r}]\n"
            "from gpu_check import Check, DEMO\nfrom pipeline.models import load_model\n"
            f"c = Check({check.dry}); m = load_model(DEMO / 'ebm', c.device)\n"
            f"print(hashlib.sha256(c.sample(m, {n}, 'float32').latents.cpu().numpy().tobytes()).hexdigest())")
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1]
    return {"chains": n, "same_process_identical": digests[0] == digests[1], "fresh_process_identical":
            fresh == digests[0]}


def memory(check: Check) -> dict:
    import torch
    from diffusers import AutoencoderKL

    from pipeline.common.config import load_config
    from pipeline.common.memory import gpu_budget_bytes, probe_batch_size
    from pipeline.training.config import TrainConfig
    from pipeline.training.objectives import OBJECTIVES
    from pipeline.vae.autoencoder import decode

    sys.path.insert(0, str(REPO / "bench"))
    from sd_scale import sd_vae_config

    cfg = load_config(TrainConfig, REPO / "configs" / "train-sd.yaml", latents="x", output="y")
    objective, prepared = OBJECTIVES[cfg.objective.name], {"sigma_data": 1.0, "sigma_max": 80.0}
    metadata = {"sampler": asdict(objective.sampler_settings(cfg.objective, cfg.sampler, prepared))}
    shape = [4, 8, 8] if check.dry else [4, 32, 32]
    channels = {"objective": replace(cfg.objective, channels=[16, 32], norm_groups=8)} if check.dry else {}
    energy = objective.build_model(channels.get("objective", cfg.objective), shape, prepared, metadata)
    energy = energy.to(check.device).eval()
    decoder_config = sd_vae_config() | ({"block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D"] * 2,
                                         "up_block_types": ["UpDecoderBlock2D"] * 2, "norm_num_groups": 8}
                                        if check.dry else {})
    dtype = torch.float32 if check.dry else torch.float16
    decoder = AutoencoderKL(**decoder_config).to(check.device, dtype).eval()
    total = torch.cuda.mem_get_info()[1] if check.device.type == "cuda" else 4 * 2**30
    budget = gpu_budget_bytes(total, 1.0, 0.8, stages=2)
    settings = replace(energy.sampler, levels=2)
    stages = {"sampler": lambda n: _sample(energy, n, settings, check.device),
              "decoder": lambda n: decode(decoder, torch.randn(n, *shape, device=check.device, dtype=dtype))}
    out = {"budget_gib_per_stage": round(budget / 2**30, 2), "latent_shape": shape}
    for name, work in stages.items():
        found = probe_batch_size(work, check.device, budget, max_batch=8 if check.dry else 512)
        if check.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        work(found["batch_size"])
        peak = torch.cuda.max_memory_reserved() if check.device.type == "cuda" else None
        out[name] = {"batch_size": found["batch_size"], "bytes_per_sample": found["bytes_per_sample"],
                     "max_memory_reserved_gib": None if peak is None else round(peak / 2**30, 2),
                     "within_budget": None if peak is None else peak <= budget}
    return out


def _sample(model, n: int, settings, device):
    from pipeline.sampling.core import sample

    return sample(model, n, settings, device=device)


def out_of_memory(check: Check) -> dict:
    import torch

    from pipeline.common.memory import SimulatedOutOfMemory, run_in_chunks

    items, seen, shrinks = 64, [], []
    free = torch.cuda.mem_get_info()[0] if check.device.type == "cuda" else 0

    def work(a: int, b: int):
        if check.device.type == "cuda":  # a chunk of 16 or more asks for more than the GPU has free
            block = torch.empty(int(free / 12 * (b - a)), dtype=torch.uint8, device=check.device)
            del block
        elif b - a >= 16:
            raise SimulatedOutOfMemory(b - a, 15)
        seen.extend(range(a, b))

    _, sizes = run_in_chunks(items, 64, work, on_oom=shrinks.append)
    return {"items": items, "each_once": sorted(seen) == list(range(items)), "chunks": sizes, "shrinks": shrinks,
            "real_out_of_memory": check.device.type == "cuda"}


def shares(check: Check) -> dict:
    if check.dry:
        return {"skipped": "dry run (tests/test_generate.py covers shares on a declared GPU)"}
    with tempfile.TemporaryDirectory() as work:
        done = subprocess.run([sys.executable, "-m", "jobs.generate", "--config", "configs/generate.yaml",
                               "--model", str(DEMO / "ebm"), "--vae", str(DEMO), "--num-images", "512",
                               "--output", f"{work}/out", "--set", "sampler_device=gpu", "--set", "sampler_gpus=0.5",
                               "--set", "sampler_actors=2"], cwd=REPO, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            return {"failed": done.stderr.strip().splitlines()[-3:]}
        summary = json.loads(Path(f"{work}/out/summary.json").read_text())
    return {"images": summary["images"], "images_per_s": round(summary["images_per_second"], 1),
            "placement": summary["placement"]["reason"], "batch_sizes": summary["batch_sizes"],
            "budgets": {k: v.get("budget_bytes") for k, v in summary["batch_probes"].items()}}


def gpu_tests(check: Check) -> dict:
    if check.dry:
        return {"skipped": "dry run"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_generate.py", "-k",
                           "gpu or sharing or decoders_are_placed"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    return {"exit_code": done.returncode, "summary": done.stdout.strip().splitlines()[-1:]}


def rates(check: Check) -> dict:
    import torch

    from pipeline.common.precision import precision_context, resolve_precision
    from pipeline.models import load_model
    from pipeline.sampling.cost import evaluation_flops

    model = load_model(DEMO / "ebm", check.device)
    flops = evaluation_flops(model)
    evaluate = model.sampling_model(model.sampler)
    out = {"model": "models/demo/ebm", "gflop_per_evaluation": round(flops / 1e9, 4)}
    for name in PRECISIONS:
        row = {}
        for batch in ((1, 4) if check.dry else (1, 1024)):
            z = torch.randn(batch, *model.config.latent_shape, device=check.device)
            with precision_context(check.device, resolve_precision(check.device, name)):
                evaluate(z, 1.0)
                if check.device.type == "cuda":
                    torch.cuda.synchronize()
                tick = time.perf_counter()
                for _ in range(5):
                    evaluate(z, 1.0)
                if check.device.type == "cuda":
                    torch.cuda.synchronize()
            seconds = (time.perf_counter() - tick) / 5
            row[f"batch_{batch}"] = {"ms": round(seconds * 1e3, 3), "tflops": round(flops * batch / seconds / 1e12, 3)}
        out[name] = row
    return out


SECTIONS = {"environment": environment, "precision": precision, "repeat": repeat, "memory": memory,
            "out of memory": out_of_memory, "shares": shares, "tests": gpu_tests, "rates": rates}


def markdown(result: dict) -> str:
    lines = ["# GPU check (`bench/gpu_check.py`)", ""]
    if result["dry_run"]:
        lines += ["**Dry run on a CPU: no figure here is a GPU's.**", ""]
    lines += [f"Run {result['date']}, {result['seconds']:.0f} s in all.", ""]
    for name, section in result["sections"].items():
        lines += [f"## {name} ({section['seconds']:.1f} s)", "", "```json",
                  json.dumps(section["result"], indent=1), "```", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="every section on the CPU at tiny sizes")
    p.add_argument("--output", default=str(REPO / "bench" / "gpu.md"))
    args = p.parse_args()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here: run on a GPU machine, or pass --dry-run")
    check, started, sections = Check(args.dry_run), time.monotonic(), {}
    for name, fn in SECTIONS.items():
        tick = time.monotonic()
        try:
            result = fn(check)
        except Exception as e:  # noqa: BLE001 - one failed section is reported; the others still run
            result = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc().splitlines()[-4:]}
        sections[name] = {"seconds": round(time.monotonic() - tick, 1), "result": result}
        print(f"[gpu_check] {name}: {sections[name]['seconds']} s", flush=True)
    result = {"dry_run": args.dry_run, "date": time.strftime("%Y-%m-%d"), "seconds": time.monotonic() - started,
              "sections": sections}
    Path(args.output).write_text(markdown(result))
    write_result(Path(args.output).with_suffix(".json") if args.dry_run else REPO / "bench" / "out" / "gpu.json",
                 result)


if __name__ == "__main__":
    main()
