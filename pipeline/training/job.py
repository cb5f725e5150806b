"""Training on Ray Train: the driver side of `jobs.train` (the loop each worker runs is `training/loop.py`).

    python -m jobs.train --config configs/train-demo.yaml --latents build/demo/latents-... --output build/demo/ebm

The driver checks the latents and the config, splits the shards (`holdout_shards`: those precompute set apart, or
the last N, are never trained on),
lets the objective prepare what it needs from the data (cd's chain-start mixture, dsm's noise range), records the
run beside its checkpoints (a run name resumes only the run it names) and starts a TorchTrainer. Re-running the same
command with the same run name and storage path resumes from the last checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import torch

from ..common import migrations
from ..common.config import EbdError, from_dict, require
from ..common.logs import log_line
from ..common.plugins import import_plugins
from ..distributed.cluster import connect
from ..io import latent_shards as sh
from ..io import storage
from ..io.files import atomic_write, file_sha256, read_json
from ..io.weights import WEIGHTS_SHA256, load_weights_folder, read_weights_config
from .config import TrainConfig, flat_record
from .data import excluded
from .loop import train_loop_per_worker
from .objectives import OBJECTIVES


def run_training(cfg: TrainConfig, address: str | None = None, dashboard: bool = False) -> dict:
    """Runs (or resumes) training under Ray Train; returns the final reported metrics."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    latents = storage.canonical(cfg.latents)  # a local folder or an object-store URI
    manifest = sh.read_manifest(latents)
    paths = sh.shard_paths(latents)
    counts = {storage.join(latents, s["file"]): s["count"] for s in manifest["shards"]}
    missing = [p for p in paths if not storage.is_file(p)]
    if missing:
        raise EbdError(f"{len(missing)} shard(s) listed in the manifest are missing, e.g. {missing[0]}")
    train_files, held_files = sh.split_held_out(manifest, cfg.holdout_shards)  # non-empty shards only
    require(bool(train_files), f"holdout_shards={cfg.holdout_shards} leaves no shard to train on "
            f"({len(train_files) + len(held_files)} non-empty shards)")
    require(not held_files or manifest.get("order") == "shuffled",
            f"{cfg.latents} was written in input order (older precompute, or shuffle: false), so its last shards "
            "are not a random sample of the data: re-run precompute into a new folder, or set holdout_shards: 0")
    if cfg.holdout_shards == "auto" and not held_files:
        log_line("train", f"{cfg.latents} has no held-out shards (precompute ran with holdout: 0): training reads "
                          "every shard, so jobs.evaluate needs reference latents this model never saw")
    sha = {storage.join(latents, s["file"]): s["sha256"] for s in manifest["shards"]}

    def shard_record(path: str) -> dict:  # what the model records of a shard it trained on or held out
        return {"file": storage.name(path), "sha256": sha[path], "count": counts[path]}

    held_out = [shard_record(storage.join(latents, f)) for f in held_files]
    paths = [storage.join(latents, f) for f in train_files]
    require(len(paths) >= cfg.num_workers, f"{len(paths)} non-empty shards cannot feed {cfg.num_workers} workers: "
            "use fewer workers or re-run precompute with a smaller shard_size")
    output = storage.canonical(cfg.output)
    storage.check_writable(output)  # one line before any work: no such bucket, no permission
    # A URI (s3://, gs://, ...) goes to Ray Train's pyarrow filesystems as it is; a local path is made absolute.
    checkpoints_at = storage.canonical(cfg.storage_path) if cfg.storage_path else storage.join(output, "checkpoints")
    manifest_sha = file_sha256(storage.join(latents, sh.MANIFEST))
    import_plugins(cfg.plugins)
    objective = OBJECTIVES[cfg.objective.name]
    for rule in cfg.exclude_labels:  # a field the latents lack would silently exclude nothing
        sh.label_vocabulary(manifest, list(rule), cfg.latents)
    prepared = _prepare(cfg, objective, paths, output)
    condition_on = getattr(cfg.objective, "condition_on", None)  # an objective that learns conditional models
    if condition_on:
        prepared["labels"] = sh.label_vocabulary(manifest, condition_on, cfg.latents)
    objective.model_config(cfg.objective, manifest["latent"]["shape"], prepared).validate()
    start_from = _start_from(cfg.init_from, objective.build_model(cfg.objective, manifest["latent"]["shape"],
                                                                  prepared, {}), held_out) if cfg.init_from else None
    metadata = {"sampler": asdict(objective.sampler_settings(cfg.objective, cfg.sampler, prepared)),
                "latents": {"shape": manifest["latent"]["shape"], "scaling_factor": manifest["scaling_factor"],
                            "shift_factor": manifest["shift_factor"], "vae": manifest["vae"],
                            "manifest_sha256": manifest_sha, "resolution": manifest["resolution"],
                            # what evaluation may use as never-seen reference data, by file and content
                            "trained_on": [shard_record(p) for p in paths],
                            "held_out": held_out,
                            "excluded_labels": cfg.exclude_labels}}
    worker_cfg = replace(cfg, output=output)  # validated here: workers take it as it is
    claim_run(checkpoints_at, cfg, manifest_sha)

    connect(address, dashboard=dashboard)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": worker_cfg, "shards": paths, "shard_counts": {p: counts[p] for p in paths},
                           "latent_shape": manifest["latent"]["shape"], "metadata": metadata,
                           "prepared": prepared, "init_from": start_from},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=cfg.run_name, storage_path=checkpoints_at,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             # progress lines are printed once, not echoed again by Ray Train's print patch
                             worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors; show the cause in one line
        raise EbdError(f"training failed: {_root_cause(e)}") from None
    return dict(result.metrics or {})


# Keys a resumed run may change: how long and on what it runs, how often it reports. Any other key changes the
# model or what it learns, so resuming under it would silently train a different run from the old one's weights.
RESUMABLE_KEYS = {"output", "storage_path", "num_workers", "use_gpu", "cpus_per_worker", "max_failures", "max_steps",
                  "log_every", "checkpoint_every", "keep_checkpoints", "cache_bytes", "fault_nan_at_step",
                  "allow_config_change"}
RUN_RECORD = "ebd-run.json"


def claim_run(checkpoints_at: str, cfg: TrainConfig, manifest_sha: str) -> None:
    """Records the run's config and data beside its checkpoints, or refuses (one line) a run name whose recorded
    config or data differ, unless `allow_config_change`; local or in an object store (s3://, gs://). Records
    written before the config had sections compare by what they meant (`common.migrations.train_config`)."""
    path = storage.join(checkpoints_at, cfg.run_name, RUN_RECORD)
    record = {"config": {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_KEYS},
              "latents_manifest_sha256": manifest_sha}
    if storage.is_file(path):
        old = read_json(path)
        before, now = _comparable(old["config"]), _comparable(record["config"])
        # a key newer than the record reads as its default: runs started before it existed still resume
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if old["latents_manifest_sha256"] != manifest_sha:
            changed.append("the latents (another manifest)")
        if before.get("objective.name") != now.get("objective.name"):  # no override helps: the weights cannot load
            raise EbdError(f"run {cfg.run_name!r} in {checkpoints_at} was trained with objective "
                           f"{before.get('objective.name')}, this run asks for {now.get('objective.name')}: use a "
                           "new --run-name (or the same objective)")
        if changed and not cfg.allow_config_change:
            first = changed[0]
            detail = f"{first}: {before.get(first)!r} -> {now.get(first)!r}" if first in before or first in now \
                else first
            raise EbdError(f"run {cfg.run_name!r} in {checkpoints_at} was started with another config or data ({detail}"
                           f"{f' and {len(changed) - 1} more' if len(changed) > 1 else ''}): use a new --run-name, "
                           "or --set allow_config_change=true to resume its weights anyway")
        if not changed:
            return
    storage.write_bytes(path, json.dumps(record, indent=1, sort_keys=True).encode())


def _comparable(config: dict) -> dict:
    """A recorded config as `key` / `section.key` values with every default filled in and the sampler resolved."""
    known = set(TrainConfig.__dataclass_fields__)
    values = {k: v for k, v in migrations.train_config(dict(config)).items() if k in known and k not in RESUMABLE_KEYS}
    return {k: v for k, v in flat_record(from_dict(TrainConfig, values | {"output": "-"})).items()
            if k not in RESUMABLE_KEYS}


def _start_from(folder: str, model, held_out: list[dict]) -> dict:
    """What the workers need of `init_from` (its path, weights digest and training facts), after checking, in one
    line each, that it is a complete folder of the kind and architecture this run builds (`model`, built here from
    the config) and that it never trained on a shard this run holds out (evaluation would score it on seen data)."""
    folder = storage.canonical(folder)
    hint = ": init_from names an exported model, e.g. a run's OUTPUT/model"
    recorded = read_weights_config(folder, hint=hint).get(WEIGHTS_SHA256)
    config, tensors = load_weights_folder(folder, hint=hint)  # checks the weights against that record
    kind = f"a {type(model).__name__} ({model.FORMAT})"
    if config.get("format") != model.FORMAT:
        raise EbdError(f"init_from {folder} holds {config.get('_class_name', 'no ebd model')} "
                       f"({config.get('format')}), this config trains {kind}: use a folder this objective exported")
    saved = asdict(from_dict(type(model.config), type(model).upgrade_config(config.get("model", {}))))
    built = asdict(model.config)
    differ = sorted(k for k in set(saved) | set(built) if json.dumps(saved.get(k)) != json.dumps(built.get(k)))
    if differ:
        k = differ[0]
        raise EbdError(f"init_from {folder} holds another architecture than this config builds ({k}: {saved.get(k)!r} "
                       f"there, {built.get(k)!r} here): use the config it was trained with (what the data decides, "
                       "such as dsm's sigma_data and sigma_max, can be set to the values there)")
    model.load_state_dict(type(model).upgrade_state_dict(model, tensors))  # every name and shape, before Ray starts
    seen = {s["sha256"]: s["file"] for s in config.get("latents", {}).get("trained_on", [])}
    overlap = [s["file"] for s in held_out if s["sha256"] in seen]
    if overlap:
        raise EbdError(f"init_from {folder} trained on {overlap[0]}, which this run holds out as evaluation's "
                       "reference: start from a model trained on this split, or hold out other shards")
    return {"path": folder, "weights_sha256": recorded, "training": config.get("training", {})}


def _prepare(cfg: TrainConfig, objective, paths: list[str], output: str) -> dict:
    """What the objective needs from the data before the workers start (the chain-start mixture for cd, the noise
    range for dsm), from the first training latents (never held-out ones). Numbers travel in the
    loop config; tensors go to OUTPUT/prepared.safetensors (a resumed run prepares the same again)."""
    from safetensors.torch import save

    wanted, latents = objective.prepare_samples(cfg.objective), []
    for record in sh.iter_latents(paths) if wanted else []:
        if cfg.exclude_labels and excluded(sh.labels_of(record["meta"]), cfg.exclude_labels):
            continue
        latents.append(torch.from_numpy(record["latent"]))
        if len(latents) >= wanted:
            break
    prepared = objective.prepare(cfg.objective, torch.stack(latents) if latents else None, cfg.seed)
    tensors = prepared.pop("tensors", {})
    if tensors:
        path = storage.join(output, "prepared.safetensors")
        atomic_write(path, lambda f: f.write(save(tensors)))
        prepared["tensors_path"] = path
    return prepared


def _root_cause(error: BaseException) -> str:
    seen = error
    while True:
        nxt = getattr(seen, "cause", None) or seen.__cause__
        if nxt is None or nxt is seen:
            break
        seen = nxt
    lines = [line for line in str(seen).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else type(seen).__name__
    return text if isinstance(seen, EbdError) or "Error" in text else f"{type(seen).__name__}: {text}"

