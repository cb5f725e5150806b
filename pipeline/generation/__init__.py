"""Bulk generation: a streaming Ray Data DAG of sampler actors -> decoder actors -> shard writers.

    shards to make --> SamplerStage  (CPU actors, or GPU shares)  the model's own sampler (sampling.core): latents
                   --> DecodeStage   (GPU actors when the cluster has GPUs, else CPU)  uint8 images
                   --> write_shard   (tasks)  PNG -> parquet and/or tar, atomically, then a done marker

With the sampler on GPUs (`sampler_device`, placement.py) the first two stages may be one: SampleDecodeStage
samples a shard and decodes it on the same GPU.

One row is one output shard (images [j * S, (j + 1) * S)). Ray Data's streaming executor runs the stages
concurrently with backpressure, so no stage holds more than a few shards. Image i's key and noise seed derive
from (run seed, i) and every chain uses its own generator, so any shard regenerated alone is byte-identical.
Each stage's batch size is probed once per run against its memory budget and recorded in OUT/run.json; a resumed
run reuses it. Re-running the same command skips complete shards and ends with exactly N images.

Modules, in the order a run meets them: `config` (GenerateConfig, every key), `job` (the driver: run_generation),
`placement` (where the stages run), `probes` (batch sizes), `dag` (the Ray Data chain), `stages` (the actors and the
writer task) and `manifest` (run.json, summary.json, manifest.json, preview.png). Ray plumbing that every job shares
(connecting to a cluster) is in `distributed/`.
"""

from .config import GenerateConfig
from .job import run_generation

__all__ = ["GenerateConfig", "run_generation"]
