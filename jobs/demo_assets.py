"""Make the demo's image set, offline and deterministically: coloured shapes on varied backgrounds, labelled.

    python -m jobs.demo_assets --output build/demo [--num-images 10000] [--size 64]

Writes DIR/images/shapes-NNNNNN.tar (webdataset: KEY.png + KEY.cls, 1000 images per shard) in about 10 s.
Idempotent: shards already there are kept. The demo's VAE and EBM are shipped in models/demo/.
"""

from pathlib import Path

from pipeline.common.config import job_parser, load_job_config, run_cli
from pipeline.demo import DemoAssetsConfig, write_demo_images


def main() -> int:
    p = job_parser("jobs.demo_assets", __doc__, address=False, config=DemoAssetsConfig,
                   flags=("output", "num_images", "size", "seed"), required=("output",))
    cfg = load_job_config(p.parse_args())
    shards = write_demo_images(Path(cfg.output) / "images", cfg.num_images, cfg.size, cfg.seed)
    print(f"{cfg.num_images} demo images in {len(shards)} shards under {Path(cfg.output) / 'images'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
