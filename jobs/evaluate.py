"""Score a generation run against held-out real latents, with baselines (see pipeline/evaluate.py).

    python -m jobs.evaluate --generated GEN_DIR --reference LATENTS_DIR --output DIR [--check]

Writes DIR/report.json, DIR/report.md and DIR/samples-vs-real.png. With --check, exits 1 when the model fails
the report's checks (density and coverage thresholds, beating the moment-matched Gaussian).
"""

import sys

from pipeline.config import job_parser, load_config, run_cli
from pipeline.evaluate import EvaluateConfig, run_evaluation


def main() -> int:
    p = job_parser("jobs.evaluate", __doc__)
    p.add_argument("--generated", help="output folder of jobs.generate")
    p.add_argument("--reference", help="latents folder (jobs.precompute output) holding the held-out shards")
    p.add_argument("--output", help="folder for report.json, report.md and samples-vs-real.png")
    p.add_argument("--train-latents", help="training latents, when they are not in --reference")
    p.add_argument("--model", help="the EBM folder, when it moved since generation")
    p.add_argument("--num-samples", type=int, help="samples per set (default 1000)")
    p.add_argument("--check", action="store_true", help="exit 1 unless every check passes")
    args = p.parse_args()
    cfg = load_config(EvaluateConfig, args.config, args.set, generated=args.generated, reference=args.reference,
                      output=args.output, train_latents=args.train_latents, model=args.model,
                      num_samples=args.num_samples)
    report = run_evaluation(cfg)
    for space, checks in report["checks"].items():
        m = report["spaces"][space]["metrics"]
        print(f"[evaluate] {space}: density {m['generated']['density']:.3f} coverage {m['generated']['coverage']:.3f}"
              f" (Gaussian {m['gaussian']['density']:.3f} / {m['gaussian']['coverage']:.3f}, floor "
              f"{m['train']['density']:.3f} / {m['train']['coverage']:.3f}); "
              f"{sum(checks.values())}/{len(checks)} checks pass")
    print(f"[evaluate] verdict on {report['check_space']}: {'passed' if report['passed'] else 'FAILED'}; "
          f"report in {cfg.output}/report.md")
    if args.check and not report["passed"]:
        failed = [name for name, ok in report["checks"][report["check_space"]].items() if not ok]
        print(f"error: quality check failed: {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main)
