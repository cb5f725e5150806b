"""The `ebd` command: `ebd JOB [flags]` runs the job `python -m jobs.JOB [flags]` runs, with the same flags.

    ebd precompute --config configs/precompute.yaml --input DIR --vae DIR --output DIR
    ebd train --config configs/train.yaml --latents DIR --output DIR
    ebd generate --config configs/generate.yaml --model DIR --vae DIR --num-images N --output DIR
    ebd evaluate | inspect | fit-vae | fit-evaluator | demo-assets | pair-decoder | tune-sampler ... (`ebd JOB --help`)

`--config configs/NAME.yaml` finds the shipped configs from any working directory.
"""

import difflib
import importlib
import sys

from pipeline.common.config import run_cli

JOBS = {"precompute": "precompute images into latent shards", "train": "fit a model on latent shards",
        "generate": "generate images in bulk", "evaluate": "score a generation run against held-out latents",
        "inspect": "an x-ray page of a model and its chains", "fit-vae": "fit a small VAE to an image set",
        "fit-evaluator": "fit the evaluation's feature network", "demo-assets": "render the demo images",
        "pair-decoder": "declare a tiny decoder (TAESD) for a VAE's latents",
        "tune-sampler": "fit the sampler's noise levels to a trained model"}


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] in ("--version", "-V"):
        from importlib.metadata import version

        print(f"ebd {version('ebd')}")
        return
    if not args or args[0] in ("-h", "--help") or args[0] not in JOBS:
        lines = [__doc__.strip().splitlines()[0], "", "jobs:"] + [f"  {name:<14} {what}" for name, what in JOBS.items()]
        lines += ["", "ebd JOB --help: its flags; ebd JOB --show-config [--config FILE]: its config keys and values",
                  "ebd --version"]
        if args and args[0] not in ("-h", "--help"):
            close = difflib.get_close_matches(args[0], JOBS, n=1)
            print(f"error: unknown job {args[0]!r}" + (f": did you mean {close[0]!r}?" if close else "")
                  + f" (jobs: {', '.join(JOBS)})", file=sys.stderr)
            sys.exit(2)
        print("\n".join(lines))
        return
    module = importlib.import_module(f"jobs.{args[0].replace('-', '_')}")
    sys.argv = [f"ebd {args[0]}", *args[1:]]
    run_cli(module.main)


if __name__ == "__main__":
    main()
