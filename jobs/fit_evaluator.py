"""Fit the evaluator that reads the generator's images (see pipeline/evaluation/evaluator_fit.py). The demo's
evaluator in models/demo/evaluator/ was made by:

    python -m jobs.fit_evaluator --config configs/fit-evaluator-demo.yaml --latents build/demo/latents \
        --output models/demo/evaluator

Trains on the latents' training shards decoded by their VAE; measures accuracy on the held-out shards.
"""

from pipeline.common.config import job_parser, load_job_config, run_cli
from pipeline.evaluation.evaluator_fit import FitEvaluatorConfig, fit_evaluator


def main() -> int:
    p = job_parser("jobs.fit_evaluator", __doc__, address=False, config=FitEvaluatorConfig,
                   flags=("latents", "output", "vae", "steps"), required=("latents", "output"))
    args = p.parse_args()
    cfg = load_job_config(args)
    config = fit_evaluator(cfg)
    held = config["held_out"]
    extra = (f"; held-out decoded latents: accuracy {held['accuracy']:.3f}, recognised {held['recognised']:.3f}"
             if "accuracy" in held else "")
    print(f"[fit_evaluator] {config['kind']} with {len(config['classes'])} classes in {cfg.output}{extra}")
    for name, sub in config.get("attributes", {}).items():
        print(f"[fit_evaluator] attribute {name} ({len(sub['classes'])} values): held-out accuracy "
              f"{sub['held_out']['accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    run_cli(main)
