"""Generate images in bulk: sampler actors (CPUs or GPUs) -> decoder actors (GPUs when present) -> parquet/tar shards.

    python -m jobs.generate --config configs/generate.yaml --model EBM_DIR --vae SD_OR_VAE_DIR --num-images N
                            --output DIR [--decoder TINY_DIR] [--formats parquet webdataset] [--seed S]
                            [--batch-size B] [--condition "shape=ring AND background=checker" | --conditions FILE]
                            [--metrics-port P] [--metrics-host H] [--pushgateway URL] [--address ADDR]

Re-running the same command resumes: complete shards are skipped and the run ends with exactly N images. A
conditional model takes --condition (every image) or --conditions (a YAML/JSON file of condition -> count); each
image's row and sidecar carry its condition.
"""

from pipeline.common import migrations
from pipeline.common.config import job_parser, load_job_config, run_cli
from pipeline.generation import GenerateConfig, run_generation


def main() -> int:
    p = job_parser("jobs.generate", __doc__, config=GenerateConfig, required=("model", "vae", "output"),
                   flags=("model", "vae", "decoder", "num_images", "condition", "conditions", "output", "formats",
                          "seed", "batch_size", "metrics_port", "metrics_host", "pushgateway"))
    p.add_argument("--format", choices=["parquet", "webdataset", "both"], help="the older one-word --formats")
    args = p.parse_args()
    if args.format and not args.formats:  # the older spelling, read as an older config's key is
        args.formats = migrations.generate_config({"format": args.format})["formats"]
    cfg = load_job_config(args)
    run_generation(cfg, address=args.address, dashboard=args.dashboard)
    return 0


if __name__ == "__main__":
    run_cli(main)
