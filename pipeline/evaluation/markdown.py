"""report.md: the report's figures as a page a person reads."""

from __future__ import annotations

ROW_LABELS = {"generated": "generated (this run)", "raw": "held-out real, raw (before the VAE)",
              "train": "training real, decoded (floor; copier)", "blurred": "training real, blurred to 1/8 side",
              "gaussian": "moment-matched Gaussian", "untrained": "untrained model, same sampler",
              "starts": "chain starts, no step",
              "near_copies": "near-copies of training real (shifted, jittered, JPEG)"}
POOLED_METRICS = ("precision", "recall", "density", "coverage", "mmd")
BASELINES = ("raw", "train", "blurred", "gaussian", "untrained", "starts", "near_copies")


def extra_rows(sets: dict) -> list[str]:
    """Rows beyond the generated set and the standard baselines (the `--compare` runs)."""
    return [k for k in sets if k not in ("generated", *BASELINES)]


def realism_row_checks(report: dict, key: str) -> dict[str, bool]:
    """The realism test's checks of one row (none when the test did not run)."""
    return ((report.get("realism") or {}).get("checks") or {}).get(key, {})


def row_checks(report: dict, space: dict, key: str) -> dict[str, bool]:
    """Every check one row of a feature space's table gets: the space's own and the realism test's."""
    return space["checks"][key] | realism_row_checks(report, key)


def verdict_line(report: dict) -> str:
    """The report's first line: PASSED or FAILED, how many checks pass and which failed (`make demo` prints it)."""
    checks = report["checks"][report["check_space"]]
    failed = [name for name, ok in checks.items() if not ok]
    return (f"**{'PASSED' if report['passed'] else 'FAILED'}**: {len(checks) - len(failed)} of {len(checks)} checks "
            f"pass" + (f" (failed: {'; '.join(failed)})" if failed else "") + f", verdict on {report['check_space']}.")


def spread_line(spread: dict) -> str:
    """report.md's paragraph on the draws."""
    figures = ", ".join(f"{name.replace('_', ' ')} {f['mean']:.3f} +/- {f['std']:.3f}"
                        for name, f in spread["figures"].items())
    return (f"Over {spread['draws']} draws of {spread['images']} generated images (`--seeds "
            f"{spread['draws']}`, rows {', '.join(spread['rows'][1:])} beside generated): {figures} (mean +/- "
            f"standard deviation); the checks of the verdict's space pass on {sum(spread['passed'])} of "
            f"{spread['draws']} draws.")


def render_markdown(report: dict) -> str:
    lines = [f"# Sample quality: {report['model']['id']}", "",
             verdict_line(report) + " "
             f"{report['samples']} samples per set, each compared with {report['samples']} held-out real latents "
             f"decoded by the same VAE ({len(report['held_out_shards'])} shard(s) the model never trained on). "
             "Sampler: " + ", ".join(f"{k}={v}" for k, v in report["sampler"].items()) + ".", ""]
    if report.get("seeds"):  # --seeds N: the headline figures' spread over N draws of the generated set
        lines += [spread_line(report["seeds"]), ""]
    for name, space in report["features"].items():
        ref = space["reference"]
        labelled = bool(space["classes"])
        lines += [f"## Feature space ({name}): {space['description']}", ""]
        if labelled:
            lines += [f"Decoded held-out real images: recognisable {ref['recognisable']:.3f}"
                      + (f", evaluator accuracy {ref['accuracy']:.3f}" if "accuracy" in ref else "")
                      + " (the yardstick can read the decoder's images only as well as this).", ""]
            noise, n = ref["class_tv_noise"], report["samples"]
            lines += [f"Class TV from sampling alone: a generator whose images the evaluator sorts into real's "
                      f"proportions reads {noise['mean']:.3f} on average at {n} against {n} (95th percentile "
                      f"{noise['p95']:.3f}). Below that percentile class TV cannot tell the class mix from real's; "
                      "above it the mix is wrong (at the 5% level).", ""]
            every = space.get("generated_all")
            if every:  # the run had more images than the table scores: its class mix read with less noise
                lines += [f"Over all {every['images']} generated images (`label_samples`): recognisable "
                          f"{every['recognisable']:.3f}, class TV {every['class_tv']:.3f}; sampling alone reads "
                          f"{every['class_tv_noise']['mean']:.3f} on average at {every['images']} against "
                          f"{report['samples']} (95th percentile {every['class_tv_noise']['p95']:.3f}). The table's "
                          f"rows stay {report['samples']} against {report['samples']}, comparable with each other.", ""]
        header = ["set", "FD", "KID x 1e3", "precision", "recall", "density", "coverage"]
        none = labelled and space.get("none_class")
        header += ["recognisable", "class TV"] if labelled else []
        header += ["none of these"] if none else []
        header += ["copy share", "checks"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for key, m in space["metrics"].items():
            cells = [ROW_LABELS.get(key, key), f"{m['fd']:.3g}", f"{1e3 * m['kid']:.2f} ± {1e3 * m['kid_std']:.2f}"]
            cells += [f"{m[x]:.3f}" for x in ("precision", "recall", "density", "coverage")]
            cells += [f"{m['recognisable']:.3f}", f"{m['class_tv']:.3f}"] if labelled else []
            cells += [f"{m['none_share']:.3f}"] if none else []
            passed = row_checks(report, space, key)
            cells += [f"{m['copy_share']:.3f}", f"{sum(passed.values())}/{len(passed)}"]
            lines.append("| " + " | ".join(cells) + " |")
        if not labelled:
            lines += ["", "This evaluator knows no labels: recognisable and class TV need a classifier and are "
                      "skipped."]
        if none:
            lines += ["", "Recognisable counts images the evaluator assigns to a real class with confidence; \"none of "
                      "these\" is the share it assigns to its class of non-images (noise, mixes, blurs, shuffled "
                      "patches), one bin of the class histogram."]
        lines += ["", "Copy share, on the images (not in this feature space): samples closer to their nearest training "
                  "image, relative to the next five, than 95% of held-out real images are (held-out real scores 0.05 "
                  "by construction; the training row is the exact copier, the near-copies row a shifted, "
                  "colour-jittered, re-encoded one). The 8 generated images most like a training image, beside it: "
                  "memorisation.png.", ""]
        if labelled:
            lines += ["Per class, a row of real and a row of generated images (by the evaluator's label):", "",
                      "![per class](per-class.png)", ""]
    if report.get("conditions"):
        accuracy = ", ".join(f"{name} {v:.3f}" for name, v in report["conditions"]["attribute_accuracy"].items()
                             if v is not None)
        lines += ["## Conditions", "", "Per condition, the share of its samples whose attribute the evaluator's "
                  "classifier for that field reads as asked (a NOT term: as anything else), and the share meeting "
                  "every term" + (f" (the classifiers are this accurate on decoded held-out latents: {accuracy})"
                                  if accuracy else "") + ":", "",
                  "| condition | samples | terms | all terms |", "|---|---|---|---|"]
        for text, c in report["conditions"]["scores"].items():
            terms = ", ".join(f"{t} {'n/a' if v is None else f'{v:.3f}'}" for t, v in c["terms"].items())
            every = "n/a" if c["all_terms"] is None else f"{c['all_terms']:.3f}"
            lines.append(f"| {text} | {c['images']} | {terms} | {every} |")
        lines += ["", "16 samples per condition:", "", "![conditions](conditions.png)", ""]
    if report.get("realism"):
        realism = report["realism"]["rows"]
        first = next(iter(realism.values()))
        lines += ["## Realism test (on pixels)", "",
                  f"A small CNN is trained to tell each set from the decoded held-out real images ({first['images']} a "
                  f"side, {first['folds']}-fold, on 32 px copies) and scored on the fold it did not see: accuracy 0.5 "
                  "means it cannot tell them apart, as for the control (training real against held-out real). "
                  "\"Taken for real\": the share of the set's images its held-out fold scores as real, beside the "
                  "share of real images it does.", "",
                  "| set | accuracy | AUC | taken for real | real taken for real | ratio | check |",
                  "|---|---|---|---|---|---|---|"]
        for key, row in realism.items():
            ok = all(report["realism"]["checks"][key].values())
            lines.append(f"| {ROW_LABELS.get(key, key)} | {row['accuracy']:.3f} | {row['auc']:.3f} | "
                         f"{row['taken_for_real']:.3f} | {row['real_taken_for_real']:.3f} | {row['realism_ratio']:.3f} "
                         f"| {'pass' if ok else 'fail'} |")
        lines += ["", "The 16 generated images the test most and least often took for real:", "",
                  "![realism](realism.png)", ""]
    lines += ["Generated samples (left) beside decoded held-out real latents (right):", "",
              "![generated vs real](samples-vs-real.png)", ""]
    for name, space in report["spaces"].items():
        lines += [f"## Pooled {name}: {space['description']}", "",
                  "| set | precision (k=3) | recall (k=3) | density (k=5) | coverage (k=5) | MMD² (RBF) |",
                  "|---|---|---|---|---|---|"]
        for key in ("generated", "train", "gaussian", "untrained", "starts", *extra_rows(space["metrics"])):
            m = space["metrics"][key]
            lines.append(f"| {ROW_LABELS.get(key, key)} | " + " | ".join(f"{m[x]:.3f}" for x in POOLED_METRICS) + " |")
        gain = space["energy_gain"]
        lines += ["", "What the sampler adds to its chain starts (generated minus starts): "
                  + ", ".join(f"{x} {gain[x]:+.3f}" for x in ("precision", "recall", "density", "coverage")) + ".", ""]
    lines += ["## Checks", ""]
    for space, checks in report["checks"].items():
        lines += [f"- [{'x' if ok else ' '}] {space}: {name}" for name, ok in checks.items()]
    lines += ["", "Notes:", ""]
    lines += [f"- {note}" for note in report["notes"]]
    lines += ["- Pooled spaces cannot tell a ring from a disc; the feature space is the verdict. Density rewards "
              "contraction (narrow samples sit in dense real regions), so read it with recall and coverage.",
              "- Precision and recall read low in high dimensions even for a perfect model; density and coverage "
              "are calibrated (about 1 for two sets from one distribution). The floor row shows what real data "
              "scores here.", ""]
    return "\n".join(lines)


def summary_table(report: dict) -> str:
    """A report's headline figures, one row per set: what a model card shows (bench/cards.py renders it between
    `<!-- report: PATH -->` and `<!-- /report -->`, and a test holds every card to its report.json)."""
    space = next(iter(report["features"].values()))
    realism = (report.get("realism") or {}).get("rows", {})
    ref = space["reference"]
    labelled, none = bool(space["classes"]), space.get("none_class")
    header = ["set", "FD"] + (["recognisable x real's", "class TV"] if labelled else []) + \
        (["none of these"] if none else []) + ["density", "coverage", "copy share"] + \
        (["realism accuracy", "taken for real x real's"] if realism else []) + ["checks"]
    lines = [verdict_line(report), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    metrics = space["metrics"]  # a saved report's rows come back sorted by name: the table's own order instead
    for key in [k for k in ("generated", *BASELINES) if k in metrics] + extra_rows(metrics):
        m = metrics[key]
        cells = [ROW_LABELS.get(key, key), f"{m['fd']:.3g}"]
        if labelled:
            cells += [f"{m['recognisable'] / ref['recognisable']:.2f}" if ref["recognisable"] else "-",
                      f"{m['class_tv']:.3f}"]
        cells += [f"{m['none_share']:.3f}"] if none else []
        cells += [f"{m['density']:.3f}", f"{m['coverage']:.3f}", f"{m['copy_share']:.3f}"]
        if realism:
            cells += [f"{realism[key]['accuracy']:.3f}", f"{realism[key]['realism_ratio']:.2f}"] if key in realism \
                else ["-", "-"]
        passed = row_checks(report, space, key)
        cells.append(f"{sum(passed.values())}/{len(passed)}")
        lines.append("| " + " | ".join(cells) + " |")
    noise = ref.get("class_tv_noise")
    lines += ["", f"{report['samples']} samples a set against as many decoded held-out real images (recognisable "
              f"{ref['recognisable']:.3f}" + (f", class TV from sampling alone {noise['mean']:.3f}, 95th percentile "
                                               f"{noise['p95']:.3f}" if noise else "") + ")."]
    return "\n".join(lines)
