"""An x-ray of a model and its chains, or of a latents folder alone, as one self-contained HTML page.

    python -m jobs.inspect --model MODEL_DIR --vae SD_OR_VAE_DIR --latents LATENTS_DIR --output DIR
    python -m jobs.inspect --vae SD_OR_VAE_DIR --latents LATENTS_DIR --output DIR      (the data alone)

Writes DIR/index.html (pictures embedded; open it from disk), the PNGs beside it and DIR/inspect.json (the numbers
behind the pictures). Runs on CPU, in process, without Ray (see pipeline/evaluation/inspection.py for what each
section shows).
"""

from pipeline.common.config import job_parser, load_config, run_cli
from pipeline.evaluation.inspection import PAGE, InspectConfig, run_inspection


def main() -> int:
    p = job_parser("jobs.inspect", __doc__, address=False)
    p.add_argument("--model", help="model folder (config.json + model.safetensors); omit for the data alone")
    p.add_argument("--vae", help="(required) Stable Diffusion checkpoint folder (with vae/) or AutoencoderKL folder")
    p.add_argument("--latents", help="latents folder (jobs.precompute output): the real data to compare with")
    p.add_argument("--output", help="(required) folder for index.html, the PNGs and inspect.json")
    p.add_argument("--chains", type=int, help="chains behind the curves and histograms (default 64)")
    p.add_argument("--seed", type=int, help="run seed of the chains shown (default 0)")
    args = p.parse_args()
    cfg = load_config(InspectConfig, args.config, args.set, model=args.model, vae=args.vae, latents=args.latents,
                      output=args.output, chains=args.chains, seed=args.seed)
    data = run_inspection(cfg)
    print(f"[inspect] page: {cfg.output}/{PAGE} ({data['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    run_cli(main)
