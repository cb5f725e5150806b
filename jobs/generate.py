"""Generate images in bulk: sampler actors (CPUs or GPUs) -> decoder actors (GPUs when present) -> parquet/tar shards.

    python -m jobs.generate --config configs/generate.yaml --model EBM_DIR --vae SD_OR_VAE_DIR --num-images N
                            --output DIR [--decoder TINY_DIR] [--format parquet|webdataset|both] [--seed S]
                            [--batch-size B] [--condition "shape=ring AND background=checker" | --conditions FILE]
                            [--metrics-port P] [--metrics-host H] [--pushgateway URL] [--address ADDR]

Re-running the same command resumes: complete shards are skipped and the run ends with exactly N images. A
conditional model takes --condition (every image) or --conditions (a YAML/JSON file of condition -> count); each
image's row and sidecar carry its condition.
"""

from pipeline.common.config import job_parser, load_config, run_cli
from pipeline.generation import GenerateConfig, run_generation


def main() -> int:
    p = job_parser("jobs.generate", __doc__)
    p.add_argument("--model", help="(required) trained EBM folder (config.json + model.safetensors)")
    p.add_argument("--vae", help="(required) Stable Diffusion checkpoint folder (with vae/) or AutoencoderKL folder")
    p.add_argument("--decoder", help="tiny decoder (AutoencoderTiny folder paired with the VAE: ebd pair-decoder) "
                                     "to decode with instead of the VAE's own")
    p.add_argument("--num-images", type=int, help="images to make (default 1000, or the conditions file's total)")
    p.add_argument("--condition", help='what every image asks a conditional model for, e.g. "shape=ring", '
                                       '"shape=ring AND background=checker", "shape=ring AND NOT background=stripes"')
    p.add_argument("--conditions", help="YAML or JSON file mapping condition -> count: a mix in one run")
    p.add_argument("--output", help="(required) output folder for shards, manifest, preview and summary")
    p.add_argument("--format", choices=["parquet", "webdataset", "both"],
                   help="shards to write: parquet/, webdataset/ or both (default both)")
    p.add_argument("--seed", type=int, help="run seed: image i's key and noise derive from (seed, i) (default 0)")
    p.add_argument("--batch-size", type=int, help="batch size of both stages (default: probed from memory)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (0: any free port)")
    p.add_argument("--metrics-host", help="bind address of the metrics endpoint (default 127.0.0.1)")
    p.add_argument("--pushgateway", help="Prometheus pushgateway URL for the final values")
    args = p.parse_args()
    cfg = load_config(GenerateConfig, args.config, args.set, model=args.model, vae=args.vae, decoder=args.decoder,
                      num_images=args.num_images, condition=args.condition, conditions=args.conditions,
                      output=args.output, format=args.format, seed=args.seed,
                      batch_size=args.batch_size, metrics_port=args.metrics_port, metrics_host=args.metrics_host,
                      pushgateway=args.pushgateway)
    run_generation(cfg, address=args.address, dashboard=args.dashboard)
    return 0


if __name__ == "__main__":
    run_cli(main)
