"""Fit the evaluator that reads the generator's images (see pipeline/evaluation/evaluator_fit.py). The demo's
evaluator in models/demo/evaluator/ was made by:

    python -m jobs.fit_evaluator --config configs/fit-evaluator-demo.yaml --latents build/demo/latents \
        --output models/demo/evaluator

Trains on the latents' training shards decoded by their VAE; measures accuracy on the held-out shards.
"""

from pipeline.common.config import job_parser, load_config, run_cli
from pipeline.evaluation.evaluator_fit import FitEvaluatorConfig, fit_evaluator


def main() -> int:
    p = job_parser("jobs.fit_evaluator", __doc__, address=False)
    p.add_argument("--latents", help="(required) latents folder (jobs.precompute output) with labels")
    p.add_argument("--output", help="(required) evaluator folder (config.json + model.safetensors)")
    p.add_argument("--vae", help="VAE folder, if not the one the latents' manifest records")
    p.add_argument("--steps", type=int, help="optimisation steps (overrides the config)")
    args = p.parse_args()
    cfg = load_config(FitEvaluatorConfig, args.config, args.set, latents=args.latents, output=args.output,
                      vae=args.vae, steps=args.steps)
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
