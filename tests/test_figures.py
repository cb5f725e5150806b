"""Figures quoted in the README, docs, Makefile comments and model cards agree with the record they come from: a
model folder's own training record (config.json, fit_vae.json) or the bench table it links (bench/pareto.md). A
figure retold in prose and then changed at its source fails here, not in a reader's hands."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import REPO

DEMO = REPO / "models" / "demo"


def minutes(seconds: float) -> str:
    return str(round(seconds / 60))


def training_seconds(folder: str) -> float:
    return json.loads((DEMO / folder / "config.json").read_text())["training"]["loop_seconds_this_run"]


def pareto_row(solver: str, evaluations: int, model: str = "energy") -> dict:
    """One row of bench/pareto.md's table, by its model, solver and evaluations."""
    lines = (REPO / "bench" / "pareto.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| model | solver |"))
    names = [c.strip() for c in header.strip("|").split("|")]
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == len(names) and cells[:3] == [model, solver, str(evaluations)]:
            return {name: cell for name, cell in zip(names, cells)}
    raise AssertionError(f"bench/pareto.md has no row {model} {solver} {evaluations}")


def rounded(text: str, places: int) -> str:
    return f"{float(text):.{places}f}"


VAE = json.loads((DEMO / "fit_vae.json").read_text())
RECIPE_SECONDS = float(re.search(r"steps 0-9,000 in ([\d,]+) s", (DEMO / "ebm" / "README.md").read_text())
                       .group(1).replace(",", ""))
IPNDM, HEUN = pareto_row("ipndm", 12), pareto_row("heun", 49)
BF16 = pareto_row("ipndm (precision=bfloat16)", 12)
SCORE_IPNDM, SCORE_BEST = pareto_row("ipndm", 12, "score"), pareto_row("dpmpp_2m", 50, "score")

# (file, pattern whose group is the quoted figure, the figure its source gives)
QUOTES = [
    # the demo energy's recipe (configs/train-demo.yaml, 9,000 steps): the first stretch of its run, in its card
    ("Makefile", r"9,000 steps, about (\d+) minutes on 2 CPUs", minutes(RECIPE_SECONDS)),
    ("docs/demo.md", r"configs/train-demo.yaml`, about (\d+) minutes", minutes(RECIPE_SECONDS)),
    ("docs/demo.md", r"the recipe's 9,000 in (\d+) minutes", minutes(RECIPE_SECONDS)),
    ("models/demo/ebm/README.md", r"steps 0-9,000 in [\d,]+ s \((\d+) minutes\)", minutes(RECIPE_SECONDS)),
    ("models/demo/unet/README.md", r"took 9,000 steps in (\d+) minutes", minutes(RECIPE_SECONDS)),
    # and the shipped weights' last stretch: its config.json
    ("models/demo/ebm/README.md", r"12,000-13,000 in ([\d,]+) s", f"{round(training_seconds('ebm')):,}"),
    ("models/demo/unet/README.md", r"Training loop [\d,]+ s \((\d+) minutes\)", minutes(training_seconds("unet"))),
    ("docs/demo.md", r"sampled by DDIM;\s+(\d+) minutes", minutes(training_seconds("unet"))),
    ("docs/demo.md", r"it replaced \((\d+) minutes", minutes(training_seconds("ebm-cd"))),
    # the demo VAE: fit_vae.json
    ("Makefile", r"the VAE \(about (\d+) minutes on 2 CPUs\)", minutes(VAE["train_seconds"])),
    ("Makefile", r"the demo VAE's recipe \(about\s+#\s+(\d+) minutes", minutes(VAE["train_seconds"])),
    ("docs/demo.md", r"\((\d+) minutes on 2 CPUs; \[fit-vae.md", minutes(VAE["train_seconds"])),
    ("models/demo/README.md", r"Wall time: [\d,]+ s \((\d+) minutes\)", minutes(VAE["train_seconds"])),
    ("docs/demo.md", r"held-out PSNR (\d+\.\d) dB", f"{VAE['held_out_psnr_db']:.1f}"),
    # sample quality: bench/pareto.md
    ("README.md", r"iPNDM with 12 gradients \([\d.]+ GFLOP/image\): FD (\d+\.\d\d)", rounded(IPNDM["FD"], 2)),
    ("README.md", r"iPNDM with 12 gradients \([\d.]+ GFLOP/image\): FD [\d.]+, class TV (\d\.\d+)",
     rounded(IPNDM["class TV"], 3)),
    ("README.md", r"\((\d+\.\d) GFLOP/image\): FD", rounded(IPNDM["GFLOP/image"], 1)),
    ("README.md", r"Heun with 49\s+gradients \([\d.]+ GFLOP\): FD (\d+\.\d\d)", rounded(HEUN["FD"], 2)),
    ("models/demo/ebm/README.md", r"iPNDM-12: FD (\d+\.\d\d)", rounded(IPNDM["FD"], 2)),
    ("models/demo/ebm/README.md",
     r"iPNDM-12: FD [\d.]+,\s+recognisable [\d.]+,\s+class TV [\d.]+,\s+density\s+(\d\.\d+)", IPNDM["density"]),
    ("README.md", r"FD (\d\.\d\d) at iPNDM-12 \(", rounded(SCORE_IPNDM["FD"], 2)),
    ("README.md", r"better density \((\d\.\d\d) at iPNDM-12\)", rounded(SCORE_IPNDM["density"], 2)),
    ("README.md", r"at best (\d\.\d+) \(DPM-Solver\+\+, 50", SCORE_BEST["FD"]),
    ("models/demo/score/README.md", r"\| iPNDM \(12\) \| [\d.]+ \| (\d\.\d\d) \|", rounded(SCORE_IPNDM["FD"], 2)),
    ("models/demo/score/README.md", r"\| DPM-Solver\+\+\(2M\) \(50\) \| [\d.]+ \| (\d\.\d+) \|", SCORE_BEST["FD"]),
    # the score network's training time: its config.json
    ("models/demo/score/README.md", r"in a loop of ([\d,]+) s", f"{training_seconds('score'):,.0f}"),
    # the default sampler's FD against 49-gradient Heun's (once told as "within 10%" in five places; it is 1.11x)
    *((path, r"(\d\.\d\d)x", f"{float(IPNDM['FD']) / float(HEUN['FD']):.2f}")
      for path in ("configs/train.yaml", "configs/train-demo.yaml", "configs/train-sd.yaml", "docs/training.md",
                   "docs/benchmarks.md", "pipeline/training/objectives/dsm.py")),
    ("docs/generation.md", r"faster at FD (\d\.\d+) against", BF16["FD"]),
    ("docs/generation.md", r"faster at FD [\d.]+ against (\d\.\d+)", IPNDM["FD"]),
]


@pytest.mark.parametrize("path, pattern, expected", QUOTES, ids=[f"{q[0]}:{q[1][:30]}" for q in QUOTES])
def test_a_quoted_figure_agrees_with_its_source(path, pattern, expected):
    found = re.findall(pattern, (REPO / path).read_text())
    assert found, f"{path} no longer quotes /{pattern}/: update QUOTES with the new wording"
    assert set(found) == {expected}, f"{path} quotes {found}, its source says {expected}"


def test_the_two_commands_and_the_saved_latents_dtypes_are_told_the_same_everywhere():
    """Claims about the tool itself, beside the figures: the README's two commands are the Makefile's, and what
    configs/generate.yaml says of the saved latents is what the manifest records."""
    readme = (REPO / "README.md").read_text()
    block = readme[readme.index("## Two commands"):].split("```")[1]
    commands = re.findall(r"^(make \w+)", block, flags=re.M)
    makefile = (REPO / "Makefile").read_text().splitlines()[0]
    assert commands and re.findall(r"`(make \w+)`", makefile.split(";")[0]) == commands

    from pipeline.io.output_formats import FORMATS  # what the manifest records of each format's latents

    dtypes = {name: fmt.latent_dtype for name, fmt in FORMATS.items()}
    comment = next(line for line in (REPO / "configs" / "generate.yaml").read_text().splitlines()
                   if line.startswith("save_latents:"))
    assert f"parquet: {dtypes['parquet']}" in comment and f"tar: {dtypes['webdataset']}" in comment


REPORTS = {"shapes": "models/demo/ebm/report.json", "conditional": "models/demo/ebm-compose/report.json",
           "emoji": "models/emoji/ebm/report.json"}
CLAIMING = ("README.md", "docs/demo.md", "docs/evaluation.md", "models/demo/ebm/README.md",
            "models/demo/ebm-compose/README.md", "models/emoji/README.md")


def committed_report(name: str) -> dict:
    """The report `make demo` wrote for the shapes, the conditional run or the emoji, committed beside its card."""
    return json.loads((REPO / REPORTS[name]).read_text())


def test_what_the_docs_say_of_each_verdict_is_what_its_committed_report_reads():
    """Every "the <set> report reads PASSED|FAILED, N of M checks" in the README, docs and cards is the verdict of the
    report.json committed beside that model's card; each report's verdict is told somewhere."""
    told = set()
    for path in CLAIMING:
        text = " ".join((REPO / path).read_text().split())
        for name, word, passing, total in re.findall(r"[Tt]he (shapes|conditional|emoji) report reads (PASSED|FAILED), "
                                                     r"(\d+) of (\d+) checks", text):
            report = committed_report(name)
            checks = report["checks"][report["check_space"]]
            assert (word, int(passing), int(total)) == ("PASSED" if report["passed"] else "FAILED",
                                                        sum(checks.values()), len(checks)), (path, name)
            told.add(name)
    assert told == set(REPORTS)


def test_the_readmes_emoji_figures_are_its_committed_reports():
    """The README's first screen quotes the emoji report: recognisable against real's, the share called none of
    these, class TV and the realism test's ratio."""
    report = committed_report("emoji")
    space = report["features"]["evaluator"]
    gen, ref = space["metrics"]["generated"], space["reference"]
    readme = " ".join((REPO / "README.md").read_text().split())
    assert re.search(r"recognisable (\d\.\d\d) of held-out real's", readme).group(1) == \
        f"{gen['recognisable'] / ref['recognisable']:.2f}"
    assert re.search(r"(\d\.\d\d\d) of them \"none of these\"", readme).group(1) == f"{gen['none_share']:.3f}"
    assert re.search(r"class TV (\d\.\d\d\d)", readme).group(1) == f"{gen['class_tv']:.3f}"
    assert re.search(r"taken for real (\d\.\d\d) times as often as real", readme).group(1) == \
        f"{report['realism']['rows']['generated']['realism_ratio']:.2f}"


def test_the_readmes_make_demo_time_is_the_measured_one():
    """README's "(N minutes on 2 CPUs)" beside `make demo` is bench/demo-time.json's wall time, rounded."""
    line = next(x for x in (REPO / "README.md").read_text().splitlines() if x.startswith("make demo "))
    minutes = int(re.search(r"\((\d+) minutes on 2 CPUs\)", line).group(1))
    measured = json.loads((REPO / "bench" / "demo-time.json").read_text())
    assert minutes == round(measured["wall_s"] / 60) and measured["cpus"] == 2


# ------------------------------------------------------------------------------------------------ every decimal
# The README, docs/ and the model cards may quote a decimal figure only if a committed measurement file holds it at
# the precision quoted: a JSON or YAML file (a report.json, a config.json's training record, bench/*.json, a config)
# or a table a bench script wrote (bench/*.md). Seconds may be quoted in minutes or hours, bytes in MiB or GiB, shares
# as percentages. A figure retold from a report that is gone has no source: it is removed or measured again.
QUOTING = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "models").glob("**/README.md")])
DECIMAL = re.compile(r"(?<![\w.])(\d+\.\d+)(?![\w.])")


def _tracked(*patterns: str) -> list:
    import subprocess

    names = subprocess.run(["git", "ls-files", *patterns], cwd=REPO, capture_output=True, text=True).stdout.split()
    return [REPO / name for name in names]


def _numbers_in(value, found: set[float]) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        x = float(value)
        for scaled in (x, 100 * x, x / 60, x / 3600, x / 2**20, x / 2**30, x / 1e3, x / 1e6):
            found.update(round(scaled, places) for places in range(6))
        found.add(x)
    elif isinstance(value, dict):
        for item in value.values():
            _numbers_in(item, found)
    elif isinstance(value, list):
        for item in value:
            _numbers_in(item, found)
    elif isinstance(value, str):
        for text in re.findall(r"\d+\.\d+|\d+", value):
            _numbers_in(float(text), found)


@pytest.fixture(scope="module")
def measured() -> set[float]:
    import yaml

    found: set[float] = set()
    for path in _tracked("*.json", "*.yaml", "*.yml"):
        text = path.read_text()
        _numbers_in(json.loads(text) if path.suffix == ".json" else yaml.safe_load(text), found)
    for path in _tracked("bench/*.md"):
        found.update(float(text) for text in DECIMAL.findall(path.read_text()))
    return found


@pytest.mark.parametrize("path", QUOTING, ids=lambda p: str(p.relative_to(REPO)))
def test_every_decimal_figure_a_doc_quotes_is_in_a_committed_measurement_file(path, measured):
    unsourced = []
    for number, line in ((m, n + 1) for n, text in enumerate(path.read_text().splitlines())
                         for m in DECIMAL.findall(text)):
        if round(float(number), len(number.split(".")[1])) not in measured:
            unsourced.append(f"{number} (line {line})")
    assert not unsourced, f"{path.relative_to(REPO)} quotes figures no committed measurement file holds: {unsourced}"
