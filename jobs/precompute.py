"""Precompute VAE latents: images -> AutoencoderKL encoder -> scaled latent shards (webdataset tars).

    python -m jobs.precompute --config configs/precompute.yaml --input IMAGES --vae SD_OR_VAE_DIR --output DIR
    ray job submit --working-dir . -- python -m jobs.precompute --config configs/precompute.yaml ...

IMAGES is a folder tree (first subfolder = label), webdataset/img2dataset tars, or parquet files. Re-running
the same command resumes: complete shards are skipped. See pipeline/distributed/precompute.py for the output contract.
"""

from pipeline.common.config import job_parser, load_config, run_cli
from pipeline.distributed.precompute import PrecomputeConfig, run_precompute


def main() -> int:
    p = job_parser("jobs.precompute", __doc__)
    p.add_argument("--input", help="(required) image folder, tar shard(s) or parquet file(s)")
    p.add_argument("--vae", help="(required) Stable Diffusion checkpoint folder (with vae/) or AutoencoderKL folder")
    p.add_argument("--output", help="(required) output folder for shards and manifest")
    p.add_argument("--input-format", choices=["auto", "folder", "webdataset", "parquet"],
                   help="how to read --input (default auto: by what it holds)")
    args = p.parse_args()
    cfg = load_config(PrecomputeConfig, args.config, args.set, input=args.input, vae=args.vae,
                      output=args.output, input_format=args.input_format)
    run_precompute(cfg, address=args.address, dashboard=args.dashboard)
    return 0


if __name__ == "__main__":
    run_cli(main)
