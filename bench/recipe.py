"""Benchmark: what each training-recipe change buys at equal training time, on the shapes and on a real image set.

    .venv/bin/python bench/recipe.py --data shapes --latents build/demo/latents-<id> --vae models/demo \
        --evaluator models/demo/evaluator --steps 1500 [--recipes baseline,edm] [--threads 1]
    make recipe            (the shapes after `make demo`; RECIPE_ARGS adds the emoji set, see the Makefile)

Every recipe is the base config (configs/train.yaml's objective with the data set's widths, by default
configs/train-demo.yaml) with a few keys changed (RECIPES below), trained for the same number of steps at the same
batch, widths and threads, so each row costs the same FLOPs and, on one quiet machine, the same time (the table says
the time each took). Each trained energy generates 1,000 images with the config's sampler (the same solver and noise
range for every row: the range comes from the data) and is scored by jobs.evaluate against the held-out shard in the
evaluator's feature space: FD, recognisable share against held-out real's, class TV, density, coverage and copy share.

Rows land in build/bench/recipe/<data>/rows.jsonl as they finish (a re-run skips them; runs of other recipes may
go on at the same time), and the table is rewritten into bench/recipe.md between that data set's markers each time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import REPO

PYTHON = sys.executable
# Each recipe: --set overrides of the base config. `baseline` is the recipe before the ablation, pinned here so the
# rows stay comparable when the base config takes the winner; each other row changes one thing against it, and
# edm_lr_2x the two that helped on the emoji set together (today's default).
BASELINE = ["objective.preconditioning=epsilon", "objective.loss_weighting=epsilon", "lr=0.0003"]
CHANGES = {
    "baseline": [],
    "edm": ["objective.preconditioning=edm", "objective.loss_weighting=edm"],
    "min_snr": ["objective.loss_weighting=min_snr"],
    "cosine_lr": ["lr_schedule=cosine"],
    "power_ema": ["ema_length=0.1"],
    "lr_2x": ["lr=0.0006"],
    "edm_lr_2x": ["objective.preconditioning=edm", "objective.loss_weighting=edm", "lr=0.0006"],
}
RECIPES = {name: BASELINE + changes for name, changes in CHANGES.items()}


def run(cmd: list[str], log: Path) -> None:
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        done = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[:3])} failed: see {log}")


def train_and_score(args, name: str, work: Path) -> dict:
    """Trains recipe `name`, generates 1,000 images and evaluates them; returns the table row."""
    out, log = work / name, work / f"{name}.log"
    sets = [f"cpus_per_worker={args.threads}", "holdout_shards=auto", *RECIPES[name], *(args.set or [])]
    model = out / "train" / "model"
    trained = json.loads((model / "config.json").read_text())["training"] if (model / "config.json").exists() else {}
    train_wall = None
    if trained.get("steps") != args.steps:  # a row whose scoring failed keeps its model (and its training time)
        tick = time.monotonic()
        run([PYTHON, "-m", "jobs.train", "--config", args.config, "--latents", args.latents, "--output",
             str(out / "train"), "--run-name", f"recipe-{args.data}-{name}", "--max-steps", str(args.steps),
             *[a for s in sets for a in ("--set", s)]], log)
        train_wall = round(time.monotonic() - tick, 1)
    training = json.loads((model / "config.json").read_text())["training"]
    run([PYTHON, "-m", "jobs.generate", "--config", "configs/generate.yaml", "--model", str(model), "--vae", args.vae,
         "--num-images", str(args.images), "--output", str(out / "generated")], log)
    run([PYTHON, "-m", "jobs.evaluate", "--generated", str(out / "generated"), "--reference", args.latents,
         "--evaluator", args.evaluator, "--output", str(out / "report")], log)
    report = json.loads((out / "report" / "report.json").read_text())
    space = next(iter(report["features"].values()))
    gen, ref, metrics = space["metrics"]["generated"], space["reference"], space["metrics"]
    return {"recipe": name, "changes": CHANGES[name], "steps": training["steps"],
            "train_loop_s": training["loop_seconds_this_run"], "train_wall_s": train_wall,
            "fd": gen["fd"], "fd_blurred": metrics.get("blurred", {}).get("fd"),
            "recognisable": gen.get("recognisable"), "recognisable_real": ref.get("recognisable"),
            "class_tv": gen.get("class_tv"), "density": gen.get("density"), "coverage": gen.get("coverage"),
            "copy_share": gen.get("copy_share"), "copy_share_real": metrics.get("held-out real", {}).get("copy_share"),
            "checks": f"{sum(report['checks'][report['check_space']].values())}/"
                      f"{len(report['checks'][report['check_space']])}",
            "grid": str(out / "report" / "samples-vs-real.png")}


def table(rows: list[dict]) -> list[str]:
    def f(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)

    lines = ["| recipe | changes | steps | train s | FD | FD blurred real | recognisable / real's | class TV | density "
             "| coverage | copy share | checks |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["recognisable"] / r["recognisable_real"] if r.get("recognisable") and r.get("recognisable_real") \
            else None
        changes = ", ".join(f"`{c}`" for c in r["changes"]) or "the recipe before: epsilon, lr 3e-4"
        lines.append(f"| {r['recipe']} | {changes} | {r['steps']} | "
                     f"{r['train_loop_s']:.0f} | {f(r['fd'], '{:.2f}')} | {f(r['fd_blurred'], '{:.2f}')} | "
                     f"{f(r['recognisable'])} / {f(r['recognisable_real'])} = {f(ratio, '{:.2f}')} | "
                     f"{f(r['class_tv'])} | {f(r['density'])} | {f(r['coverage'])} | {f(r['copy_share'])} | "
                     f"{r['checks']} |")
    return lines


def write_markdown(data: str, rows: list[dict], args) -> None:
    path = REPO / "bench" / "recipe.md"
    text = path.read_text() if path.exists() else "# Training recipes at equal training time\n"
    begin, end = f"<!-- rows {data} -->", f"<!-- end {data} -->"
    block = "\n".join([begin, f"Data: `{data}` ({args.latents}), {args.steps} steps of the base config "
                       f"`{args.config}` on {args.threads} thread(s), {args.images} images per row.", "",
                       *table(rows), end])
    if begin in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a name for the data set (shapes, emoji, ...)")
    p.add_argument("--latents", required=True)
    p.add_argument("--vae", required=True)
    p.add_argument("--evaluator", required=True)
    p.add_argument("--config", default="configs/train-demo.yaml", help="the base recipe")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--set", action="append", help="an override for every row (e.g. objective.channels=[64,128])")
    p.add_argument("--work", default=str(REPO / "build" / "bench" / "recipe"))
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = Path(args.work) / args.data
    work.mkdir(parents=True, exist_ok=True)
    rows_file = work / "rows.jsonl"
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
    for name in args.recipes.split(","):
        if name not in RECIPES:
            raise SystemExit(f"error: unknown recipe {name!r}; known: {', '.join(RECIPES)}")
        if any(r["recipe"] == name and r["steps"] == args.steps for r in rows):
            continue
        row = train_and_score(args, name, work)
        rows.append(row)
        with rows_file.open("a") as out:
            out.write(json.dumps(row) + "\n")
        print(f"[recipe] {args.data} {name}: FD {row['fd']:.2f}, recognisable {row['recognisable']}, "
              f"density {row['density']}", flush=True)
        every = [json.loads(line) for line in rows_file.read_text().splitlines()]  # other runs' rows too
        write_markdown(args.data, [r for r in every if r["steps"] == args.steps], args)


if __name__ == "__main__":
    main()
