"""Train a model on latent shards with Ray Train (the objective the config names; dsm: a noise-conditional energy).

    python -m jobs.train --config configs/train.yaml --latents LATENTS_DIR --output DIR [--run-name NAME]
                         [--storage-path PATH] [--max-steps N] [--set key=value ...]
    ray job submit --working-dir . -- python -m jobs.train --config configs/train.yaml ...

Re-running the same command with the same --run-name resumes from the last checkpoint. The trained model (EMA
weights, config with sampler settings) lands in DIR/model/.
"""

from pipeline.common.config import job_parser, load_job_config, run_cli
from pipeline.training.config import TrainConfig
from pipeline.training.job import run_training


def main() -> int:
    p = job_parser("jobs.train", __doc__, config=TrainConfig, required=("latents", "output"),
                   flags=("latents", "output", "run_name", "storage_path", "max_steps"))
    args = p.parse_args()
    cfg = load_job_config(args)
    metrics = run_training(cfg, address=args.address, dashboard=args.dashboard)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
    print(f"[train] finished: {shown}; model in {cfg.output}/model")
    return 0


if __name__ == "__main__":
    run_cli(main)
