"""Fit a small AutoencoderKL to an image set and save it as a Stable Diffusion-layout checkpoint (see
pipeline/vae/fit.py). The demo's VAE in models/demo/ was made by:

    python -m jobs.fit_vae --config configs/fit-vae-demo.yaml --input build/demo/images --output models/demo

Re-running the same command resumes from OUTPUT/checkpoint/, or does nothing when the fit is complete.
"""

from pipeline.common.config import job_parser, load_job_config, run_cli
from pipeline.vae.fit import FitVaeConfig, fit_vae


def main() -> int:
    p = job_parser("jobs.fit_vae", __doc__, address=False, config=FitVaeConfig, flags=("input", "output", "steps"),
                   required=("input", "output"))
    args = p.parse_args()
    cfg = load_job_config(args)
    record = fit_vae(cfg)
    print(f"[fit_vae] {record['steps']} steps in {record['train_seconds']} s; held-out PSNR "
          f"{record['held_out_psnr_db']} dB; scaling_factor {record['scaling_factor']}; VAE in {cfg.output}/vae")
    return 0


if __name__ == "__main__":
    run_cli(main)
