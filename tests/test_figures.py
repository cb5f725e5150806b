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
    ("docs/generation.md", r"faster at FD (\d\.\d\d) against", rounded(BF16["FD"], 2)),
    ("docs/generation.md", r"faster at FD [\d.]+ against (\d\.\d\d)", rounded(IPNDM["FD"], 2)),
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

    manifest = (REPO / "pipeline" / "generation" / "manifest.py").read_text()
    dtypes = dict(re.findall(r'"(parquet|webdataset)": "(float\d+)"', manifest))
    comment = next(line for line in (REPO / "configs" / "generate.yaml").read_text().splitlines()
                   if line.startswith("save_latents:"))
    assert f"parquet: {dtypes['parquet']}" in comment and f"tar: {dtypes['webdataset']}" in comment


def card_rows(path: str, after: str = "") -> dict[str, dict[str, float]]:
    """A model card's evaluation table (`| set | FD | ...`, the first one after the text `after`): {row name: {column:
    figure}}, bold and notes dropped."""
    text = (REPO / path).read_text()
    lines = text[text.index(after):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| set | FD |"))
    names = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.replace("*", "").strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = {name: float(m.group()) for name, cell in zip(names[1:], cells[1:])
                          if (m := re.match(r"\d+(\.\d+)?", cell))}
    return rows


def card_row(rows: dict, name: str) -> dict[str, float]:
    """The row of a card's table whose name starts with `name`."""
    return next(figures for row_name, figures in rows.items() if row_name.startswith(name))


def demo_real_recognisable() -> float:
    """The share of decoded held-out latents the demo evaluator recognises, as the energy's card quotes it."""
    card = (REPO / "models/demo/ebm/README.md").read_text()
    return float(re.search(r"([\d.]+) recognised on those\s+held-out images", card).group(1))


def row_checks(rows: dict, name: str, real_recognisable: float, conditional: bool = False) -> dict[str, bool]:
    """jobs.evaluate's feature checks, with its own default bars, on one row of a card's table."""
    from pipeline.evaluation.scoring import feature_checks

    row = card_row(rows, name)
    figures = {"fd": row["FD"], "density": row["density"], "coverage": row["coverage"],
               "recognisable": row["recognisable"], "class_tv": row["class TV"], "copy_share": row["copy share"]}
    return feature_checks(figures, {"fd": rows["moment-matched Gaussian"]["FD"]},
                          {"recognisable": real_recognisable}, default_bars(), conditional)


def default_bars():
    from dataclasses import fields
    from types import SimpleNamespace

    from pipeline.evaluation.report import EvaluateConfig
    return SimpleNamespace(**{f.name: f.default for f in fields(EvaluateConfig)})


def failed_checks(path: str, real_recognisable: float, row: str = "this model") -> list[str]:
    """The checks jobs.evaluate's verdict fails, recomputed with its own bars from a row of the card's table."""
    return [name for name, ok in row_checks(card_rows(path), row, real_recognisable).items() if not ok]


def test_what_the_docs_say_of_the_demo_verdict_is_what_its_figures_give():
    """The README, docs/demo.md and the energy's card each say what `make demo`'s verdict reads and how many of its
    six checks pass; recomputed from the card's own table with jobs.evaluate's bars, the verdict must read that."""
    failed = failed_checks("models/demo/ebm/README.md", demo_real_recognisable())
    verdict = ("FAILED" if failed else "PASSED", 6 - len(failed))
    words = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
    for path in ("models/demo/ebm/README.md", "docs/demo.md", "README.md"):
        said = re.findall(r"reads (FAILED|PASSED), (\w+) checks? of six", " ".join((REPO / path).read_text().split()))
        assert said, f"{path} no longer says what the demo's verdict reads: update the claim's pattern"
        assert [(word, words[count]) for word, count in said] == [verdict], f"{path} says {said}; the figures give " \
            f"{verdict} (failed: {failed})"


def test_what_the_readme_and_the_emoji_card_say_of_the_emoji_model_is_what_its_table_gives():
    """The emoji card's verdict sentence and the README's first screen against the card's evaluation table (the
    figures `make demo-emoji` printed), recomputed with jobs.evaluate's bars."""
    path = "models/emoji/README.md"
    rows = card_rows(path)
    model, real = card_row(rows, "this model"), card_row(rows, "held-out real, decoded")
    failed = [re.split(r" [<>]=", name)[0] for name in failed_checks(path, real["recognisable"])]
    card, readme = (REPO / path).read_text(), " ".join((REPO / "README.md").read_text().split())
    said = re.search(r"verdict reads (FAILED|PASSED), (\d) checks of 6(?:: ([\w ]+) fails?)?", card)
    assert said and said.group(1) == ("FAILED" if failed else "PASSED") and int(said.group(2)) == 6 - len(failed)
    assert (said.group(3).split(" and ") if said.group(3) else []) == failed
    demo = " ".join((REPO / "docs/demo.md").read_text().split())
    assert ("the emoji verdict passes all six checks, with class TV at " + f"{model['class TV']:.3f}" in demo) == \
        (not failed), "docs/demo.md's emoji verdict is not the card's"
    assert re.search(r"its recognisable share is ([\d.]+) of held-out real's", readme).group(1) == \
        f"{model['recognisable'] / real['recognisable']:.2f}"
    assert re.search(r"`make demo`'s reads ([\d.]+)\)", readme).group(1) == f"{model['class TV']:.3f}"
    assert re.search(r"its FD \(([\d.]+)\)", readme).group(1) == f"{model['FD']:.2f}"
    # the class TV over four generation seeds: the README's figure is the card's seed table's, whose seeds include
    # make demo's (seed 0) and whose pooled figure lies within the seeds' range
    seeds = next(line for line in card.splitlines() if line.startswith("| ") and "steps (this model) |" in line)
    cells = [c.strip() for c in seeds.strip("|").split("|")]
    each, pooled = [float(v) for v in cells[4].split(", ")], float(cells[5])
    assert model["class TV"] == each[0] and min(each) <= pooled <= max(each)
    assert re.search(r"class TV ([\d.]+) over four generation seeds", readme).group(1) == f"{pooled:.3f}"


def test_what_docs_evaluation_says_of_the_baseline_rows_is_what_the_demo_figures_give():
    """docs/evaluation.md tells which checks the demo report's baseline rows pass; recomputed from the energy card's
    table (the same report's figures), and its note on the held-out row at 240 samples from the conditional card."""
    doc = " ".join((REPO / "docs/evaluation.md").read_text().split())
    card = "models/demo/ebm/README.md"
    real = demo_real_recognisable()
    assert "shows the raw held-out images passing all six" in doc
    assert failed_checks(card, real, "held-out real, raw") == []
    assert "training real failing only the copy check" in doc
    assert failed_checks(card, real, "training real, decoded") == ["copy share <= 0.1"]
    assert "and the Gaussian failing" in doc
    assert failed_checks(card, real, "moment-matched Gaussian")
    said = re.search(r"at 240 \(the conditional demo\) it is ([\d.]+) and that row fails the copy check", doc)
    rows = card_rows("models/demo/ebm-compose/README.md", after="What `make demo` shows")
    assert said and float(said.group(1)) == rows["held-out real, raw"]["copy share"] > default_bars().max_copy_share


def test_what_docs_demo_says_of_the_conditional_verdict_is_what_its_figures_give():
    """docs/demo.md says make demo's conditional run is judged per condition, not on its class mix, and so reads
    PASSED; the conditional card holds that report's figures: recomputed with jobs.evaluate's checks, they must give
    the verdict both say (class TV, 0.154 there, would fail it if it were checked)."""
    from pipeline.evaluation.scoring import condition_checks

    path = "models/demo/ebm-compose/README.md"
    card = (REPO / path).read_text()
    section = card[card.index("What `make demo` shows"):]
    rows = card_rows(path, after="What `make demo` shows")
    checks = row_checks(rows, "this model", rows["held-out real, decoded"]["recognisable"], conditional=True)
    lines = [line for line in section.splitlines() if line.startswith("| condition |") or
             line.startswith("| meets every term |")][:2]
    conditions = [c.strip() for c in lines[0].strip("|").split("|")[1:]]
    shares = [float(c) for c in lines[1].strip("|").split("|")[1:]]
    assert len(conditions) == len(shares) == 11
    checks |= condition_checks({c: {"all_terms": s} for c, s in zip(conditions, shares)}, default_bars())
    verdict = "PASSED" if all(checks.values()) else "FAILED"
    assert not any("class TV" in name for name in checks)
    said = re.search(r"\*\*(PASSED|FAILED), (\d+) of (\d+)\*\*", section)
    assert said and said.groups() == (verdict, str(sum(checks.values())), str(len(checks)))
    doc = " ".join((REPO / "docs/demo.md").read_text().split())
    claim = re.search(r"not on the class proportions it chose, so its verdict line reads (PASSED|FAILED)", doc)
    assert claim and claim.group(1) == verdict


def test_the_readme_quotes_the_demo_energys_density_from_its_card():
    model = card_row(card_rows("models/demo/ebm/README.md"), "this model")
    said = re.search(r"density, (\d\.\d+) against 0.7", (REPO / "README.md").read_text())
    assert said and float(said.group(1)) == model["density"]
