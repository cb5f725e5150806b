"""Score a generation run against held-out real latents, with baselines (see pipeline/evaluation/report.py).

    python -m jobs.evaluate --generated GEN_DIR --reference LATENTS_DIR --evaluator EVALUATOR_DIR --output DIR \
        [--compare OTHER_GEN_DIR] [--seeds N] [--check]

Writes DIR/report.json, DIR/report.md and its pictures. The verdict is in the evaluator's feature space (fitted to
this VAE by jobs.fit_evaluator), or FID Inception's with --inception-weights FILE. With --check, exits 1 when the
model fails it.
"""

import sys

from pipeline.common.config import job_parser, load_job_config, run_cli
from pipeline.evaluation.markdown import spread_line
from pipeline.evaluation.report import EvaluateConfig, plain_summary, run_evaluation


def main() -> int:
    p = job_parser("jobs.evaluate", __doc__, address=False, config=EvaluateConfig,
                   flags=("generated", "reference", "output", "evaluator", "inception_weights", "train_latents",
                          "model", "num_samples", "seeds"), required=("generated", "reference", "output"))
    p.add_argument("--compare", action="append", metavar="GEN_DIR",
                   help="another generation run of the same VAE to score as an extra row (repeatable)")
    p.add_argument("--check", action="store_true", help="exit 1 unless every check of the verdict passes")
    args = p.parse_args()
    cfg = load_job_config(args, compare=args.compare)
    report = run_evaluation(cfg)
    for name, space in report["features"].items():
        gen, ref = space["metrics"]["generated"], space["reference"]
        text = f"[evaluate] features ({name}): FD {gen['fd']:.3g} (Gaussian {space['metrics']['gaussian']['fd']:.3g})"
        if "recognisable" in gen:
            text += (f", recognisable {gen['recognisable']:.3f} (held-out real {ref['recognisable']:.3f}, evaluator "
                     f"accuracy {ref.get('accuracy', float('nan')):.3f}), class TV {gen['class_tv']:.3f}")
        print(text + f", copy share {gen['copy_share']:.3f}")
    if report.get("seeds"):
        print(f"[evaluate] {spread_line(report['seeds'])}")
    for space, checks in report["checks"].items():
        print(f"[evaluate] {space}: {sum(checks.values())}/{len(checks)} checks pass")
    for line in plain_summary(report, cfg.output):
        print(f"[evaluate] {line}")
    if args.check and not report["passed"]:
        failed = [name for name, ok in report["checks"][report["check_space"]].items() if not ok]
        print(f"error: quality check failed: {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main)
