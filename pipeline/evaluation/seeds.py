"""Several draws of the generated set (`--seeds N`): N disjoint sets of `num_samples` images of one run, each an
independent draw of chains (what another generation seed gives), scored as rows of one report. The verdict stays on
the first draw, "generated"; beside it, each headline figure's mean and spread over the draws and on how many of
them the verdict's checks pass, so a figure read on one draw comes with its error bar."""

from __future__ import annotations

import statistics

from .markdown import realism_row_checks, row_checks
from .scoring import pooled_checks

HEADLINE = ("fd", "recognisable", "none_share", "class_tv", "density", "coverage", "copy_share")


def draw_names(seeds: int) -> list[str]:
    """The rows of the draws: the first is the report's "generated"."""
    return ["generated", *(f"generated #{k}" for k in range(2, seeds + 1))]


def verdict_space(report: dict) -> dict:
    """The space (feature or pooled) the verdict is read in."""
    key = report["check_space"]
    return report["features"][key[len("features ("):-1]] if key.startswith("features (") else report["spaces"][key]


def draw_checks(report: dict, cfg, name: str) -> dict[str, bool]:
    """Every check of the verdict's space on one row (a pooled space keeps the generated row's checks only)."""
    space = verdict_space(report)
    if report["check_space"].startswith("features ("):
        return row_checks(report, space, name)
    return pooled_checks(space["metrics"], cfg, name) | realism_row_checks(report, name)


def spread_over_draws(report: dict, cfg) -> dict:
    """Mean, sample standard deviation, min and max of each headline figure over the draws (and of the realism
    test's accuracy and ratio when it ran), and which draws pass every check of the verdict's space."""
    seeds, names = cfg.seeds, draw_names(cfg.seeds)
    space, realism = verdict_space(report), (report.get("realism") or {}).get("rows", {})
    values = {m: [space["metrics"][name][m] for name in names] for m in HEADLINE if m in space["metrics"]["generated"]}
    if realism:
        values |= {f"realism_{m}": [realism[name][m] for name in names] for m in ("accuracy", "realism_ratio")}
    passed = [all(draw_checks(report, cfg, name).values()) for name in names]
    return {"draws": seeds, "images": report["samples"], "rows": names, "passed": passed,
            "figures": {m: {"mean": round(statistics.fmean(v), 4), "std": round(statistics.stdev(v), 4),
                            "min": round(min(v), 4), "max": round(max(v), 4)} for m, v in values.items()}}

