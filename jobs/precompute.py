"""Precompute VAE latents: images -> AutoencoderKL encoder -> scaled latent shards (webdataset tars).

    python -m jobs.precompute --config configs/precompute.yaml --input IMAGES --vae SD_OR_VAE_DIR --output DIR
    ray job submit --working-dir . -- python -m jobs.precompute --config configs/precompute.yaml ...

IMAGES is a folder tree (first subfolder = label), webdataset/img2dataset tars, or parquet files. Re-running
the same command resumes: complete shards are skipped. See pipeline/vae/precompute.py for the output contract.
"""

from pipeline.common.config import job_parser, load_job_config, run_cli
from pipeline.vae.precompute import PrecomputeConfig, run_precompute


def main() -> int:
    p = job_parser("jobs.precompute", __doc__, config=PrecomputeConfig, required=("input", "vae", "output"),
                   flags=("input", "vae", "output", "input_format"))
    args = p.parse_args()
    cfg = load_job_config(args)
    run_precompute(cfg, address=args.address, dashboard=args.dashboard)
    return 0


if __name__ == "__main__":
    run_cli(main)
