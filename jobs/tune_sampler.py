"""Fit the sampler's noise levels to a trained model, so that it samples well in few gradients:

    python -m jobs.tune_sampler --model MODEL_DIR --levels 6

Solves the model's own probability-flow ODE finely from a batch of chain starts, then picks the `levels` levels
whose steps stay closest to it (pipeline/sampling/tuning.py), and writes them into MODEL_DIR/config.json's sampler
(schedule: tuned), with a record of the search (`sampler_tuning`). generate, evaluate and inspect then use them with
no flag; `--set sampler.schedule=karras` goes back to the Karras schedule. Runs on CPU in minutes, without Ray.
"""

from pipeline.common.config import job_parser, load_job_config, run_cli
from pipeline.training.sampler_tuning import TuneSamplerConfig, tune_sampler


def main() -> int:
    p = job_parser("jobs.tune_sampler", __doc__, address=False, config=TuneSamplerConfig,
                   flags=("model", "levels", "chains", "seed"), required=("model",))
    cfg = load_job_config(p.parse_args())
    record = tune_sampler(cfg)
    print(f"[tune-sampler] {cfg.model}: {record['sampler']} on {record['steps']} fitted levels, summed local error "
          f"{record['summed_local_error']:.4g} (Karras levels: {record['karras_summed_local_error']:.4g}); "
          f"{record['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
