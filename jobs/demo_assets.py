"""Make the demo's image set, offline and deterministically: coloured shapes on varied backgrounds, labelled.

    python -m jobs.demo_assets --output build/demo [--num-images 10000] [--size 64]

Writes DIR/images/shapes-NNNNNN.tar (webdataset: KEY.png + KEY.cls, 1000 images per shard) in about 10 s.
Idempotent: shards already there are kept. The demo's VAE and EBM are shipped in models/demo/.
"""

import argparse
from pathlib import Path

from pipeline.common.config import EbdError, run_cli
from pipeline.demo import write_demo_images


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.demo_assets", description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="folder for the images and their labels")
    p.add_argument("--num-images", type=int, default=10000, help="images to render (default 10000)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = p.parse_args()
    if args.num_images < 1 or args.size < 16:
        raise EbdError("--num-images must be >= 1 and --size >= 16")
    shards = write_demo_images(Path(args.output) / "images", args.num_images, args.size, args.seed)
    print(f"{args.num_images} demo images in {len(shards)} shards under {Path(args.output) / 'images'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
