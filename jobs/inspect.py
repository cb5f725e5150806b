"""An x-ray of a model and its chains, or of a latents folder alone, as one self-contained HTML page.

    python -m jobs.inspect --model MODEL_DIR --vae SD_OR_VAE_DIR --latents LATENTS_DIR --output DIR
    python -m jobs.inspect --vae SD_OR_VAE_DIR --latents LATENTS_DIR --output DIR      (the data alone)

Writes DIR/index.html (pictures embedded; open it from disk), the PNGs beside it and DIR/inspect.json (the numbers
behind the pictures). Runs on CPU, in process, without Ray (see pipeline/evaluation/inspection.py for what each
section shows).
"""

from pipeline.common.config import job_parser, load_job_config, run_cli
from pipeline.evaluation.inspection import PAGE, InspectConfig, run_inspection


def main() -> int:
    p = job_parser("jobs.inspect", __doc__, address=False, config=InspectConfig,
                   flags=("model", "vae", "latents", "output", "chains", "seed"), required=("vae", "output"))
    args = p.parse_args()
    cfg = load_job_config(args)
    data = run_inspection(cfg)
    print(f"[inspect] page: {cfg.output}/{PAGE} ({data['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    run_cli(main)
