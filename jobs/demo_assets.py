"""Make the demo's inputs, offline: a labelled procedural image set and a small VAE in SD checkpoint layout.

    python -m jobs.demo_assets --output build/demo [--num-images 600] [--size 64]

Writes DIR/images/SHAPE/NNNNNN.png and DIR/sd-tiny/{model_index.json, vae/}. Idempotent.
"""

import argparse
from pathlib import Path

from pipeline.config import EbdError, run_cli
from pipeline.demo import write_demo_images, write_sd_style_vae


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.demo_assets", description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True)
    p.add_argument("--num-images", type=int, default=600)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.num_images < 1 or args.size < 16:
        raise EbdError("--num-images must be >= 1 and --size >= 16")
    out = Path(args.output)
    write_demo_images(out / "images", args.num_images, args.size, args.seed)
    if not (out / "sd-tiny" / "vae" / "config.json").is_file():
        write_sd_style_vae(out / "sd-tiny", seed=args.seed, block_out_channels=(16, 32, 32, 32))
    print(f"demo images in {out / 'images'}, VAE in {out / 'sd-tiny'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
