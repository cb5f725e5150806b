"""Benchmark: the realism test's design, this tree's against another commit's `realism.py`, on the same images.

    .venv/bin/python bench/realism_design.py --against 1669f45 \
        --run shapes build/demo/generated-4f50095bd25c build/demo/latents-a1fa89a3b84c-e7f1bdd6 models/demo/evaluator \
        --run emoji build/demo/emoji-a6e9fe047cad build/demo/emoji-latents-9b22667f2626 models/emoji/evaluator \
        --output bench/realism-design.json

Each run (a generation run of `make demo`, its latents and evaluator) is read and decoded once by this tree's
evaluation, as `jobs.evaluate` does with its defaults; both designs then test every scored set against the same
decoded held-out real images (each with its own defaults), in one process, one after the other. The issue's bars:
the control (decoded training real) within 0.5 +/- 0.06, the Gaussian, blurred and untrained rows >= 0.9.
"""

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import REPO, write_result  # noqa: E402

FIGURES = ("accuracy", "auc", "taken_for_real", "real_taken_for_real", "realism_ratio")


def realism_of(rev: str, work: Path):
    """`rev`'s realism_test, loaded from its own copy of realism.py (it imports nothing but torch)."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:pipeline/evaluation/realism.py"],
                            check=True, capture_output=True, text=True).stdout
    path = work / f"realism_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"realism_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.realism_test


def scored_sets(generated: str, reference: str, evaluator: str) -> tuple[torch.Tensor, dict, dict]:
    """The reference images, every scored set and the groups, as `jobs.evaluate` builds them."""
    from pipeline.evaluation.report import BASELINES, EvaluateConfig, decode_sets, extra_rows, load_inputs, read_rows

    cfg = EvaluateConfig(generated=generated, reference=reference, evaluator=evaluator, output="unused")
    run = load_inputs(cfg)
    rows = read_rows(cfg, run)
    images = decode_sets(cfg, run, rows)
    scored = {k: images[k] for k in ("generated", *BASELINES, *extra_rows(rows["sets"])) if k in images}
    groups = {"real_groups": rows["held_groups"],
              "groups": {"train": rows["pool_groups"][:rows["n"]],
                         "near_copies": rows["pool_groups"][rows["near_copy_source"]]}}
    return images["reference"], scored, groups


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", required=True, metavar="REV", help="the commit whose realism.py is the other design")
    p.add_argument("--run", nargs=4, action="append", required=True,
                   metavar=("NAME", "GENERATED", "REFERENCE", "EVALUATOR"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default="bench/out/realism-design.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from pipeline.evaluation.realism import realism_test

    with tempfile.TemporaryDirectory() as work:
        designs = {"this": lambda real, sets, g: realism_test(real, sets, paired=("raw",), **g),
                   args.against: lambda real, sets, g, old=realism_of(args.against, Path(work)): old(real, sets, **g)}
        result = {"benchmark": "the realism test, this tree's design against another commit's, on make demo's runs",
                  "command": " ".join(["python", *sys.argv]), "against": args.against, "threads": args.threads,
                  "runs": {}}
        for name, generated, reference, evaluator in args.run:
            real, sets, groups = scored_sets(generated, reference, evaluator)
            result["runs"][name] = {}
            for design, test in designs.items():
                tick = time.monotonic()
                rows = test(real, sets, groups)
                result["runs"][name][design] = {
                    "seconds": round(time.monotonic() - tick, 1),
                    "rows": {k: {m: row[m] for m in ("images", *FIGURES)} for k, row in rows.items()}}
    write_result(args.output, result)


if __name__ == "__main__":
    main()
