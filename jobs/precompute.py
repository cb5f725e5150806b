"""Precompute VAE latents: images -> AutoencoderKL encoder -> scaled latent shards (webdataset tars).

    python -m jobs.precompute --config configs/precompute.yaml --input IMAGES --vae SD_OR_VAE_DIR --output DIR
    ray job submit --working-dir . -- python -m jobs.precompute --config configs/precompute.yaml ...

IMAGES is a folder tree (first subfolder = label), webdataset/img2dataset tars, or parquet files. Re-running
the same command resumes: complete shards are skipped. See pipeline/precompute.py for the output contract.
"""

import argparse

from pipeline.config import load_config, run_cli
from pipeline.precompute import PrecomputeConfig, run_precompute


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.precompute", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML config (see configs/precompute.yaml)")
    p.add_argument("--input", help="image folder, tar shard(s) or parquet file(s)")
    p.add_argument("--vae", help="local Stable Diffusion checkpoint folder (with vae/) or AutoencoderKL folder")
    p.add_argument("--output", help="output folder for shards and manifest")
    p.add_argument("--input-format", choices=["auto", "folder", "webdataset", "parquet"])
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    args = p.parse_args()
    cfg = load_config(PrecomputeConfig, args.config, args.set, input=args.input, vae=args.vae,
                      output=args.output, input_format=args.input_format)
    run_precompute(cfg, address=args.address)
    return 0


if __name__ == "__main__":
    run_cli(main)
