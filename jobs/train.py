"""Train a model on latent shards with Ray Train (the objective the config names; dsm: a noise-conditional energy).

    python -m jobs.train --config configs/train.yaml --latents LATENTS_DIR --output DIR [--run-name NAME]
                         [--storage-path PATH] [--max-steps N] [--set key=value ...]
    ray job submit --working-dir . -- python -m jobs.train --config configs/train.yaml ...

Re-running the same command with the same --run-name resumes from the last checkpoint. The trained model (EMA
weights, config with sampler settings) lands in DIR/model/.
"""

from pipeline.common.config import job_parser, load_config, run_cli
from pipeline.distributed.training import run_training
from pipeline.training.config import TrainConfig


def main() -> int:
    p = job_parser("jobs.train", __doc__)
    p.add_argument("--latents", help="(required) output folder of the precompute job")
    p.add_argument("--output", help="(required) folder for the model export and worker records")
    p.add_argument("--run-name", help="Ray Train run name; the same name resumes")
    p.add_argument("--storage-path",
                   help="checkpoint storage (shared on a multi-node cluster); default OUTPUT/checkpoints")
    p.add_argument("--max-steps", type=int, help="number of optimisation steps (overrides the config)")
    args = p.parse_args()
    cfg = load_config(TrainConfig, args.config, args.set, latents=args.latents, output=args.output,
                      run_name=args.run_name, storage_path=args.storage_path, max_steps=args.max_steps)
    metrics = run_training(cfg, address=args.address, dashboard=args.dashboard)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
    print(f"[train] finished: {shown}; model in {cfg.output}/model")
    return 0


if __name__ == "__main__":
    run_cli(main)
