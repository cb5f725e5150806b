"""EBM training on latent shards with Ray Train (TorchTrainer), for any objective in `objectives.py`.

    python -m jobs.train --config configs/train-demo.yaml --latents build/demo/latents-... --output build/demo/ebm

Per step, on each worker:
    z ~ its disjoint share of the shards (a fresh sample from stored moments when present) + small data noise
    loss, metrics, healthy = objective.loss(model, z)   # `objective: dsm` (default) or `cd`
Gradients are averaged across workers (DDP), clipped, and applied by Adam; EMA weights are kept.

Safety nets: a non-finite loss or energies beyond `energy_bound` roll every worker back to the last good
checkpoint with a lower learning rate, at most `max_rollbacks` times. Checkpoints (weights, EMA, optimizer, replay
buffer, step) go through `ray.train.report` every `checkpoint_every` steps as safetensors + JSON; re-running with
the same run name and storage path resumes from the last one. The export `OUTPUT/model/` holds the EMA weights.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch

from . import shards as sh
from . import storage
from .checkpoints import load_optimizer_tensors, optimizer_tensors
from .config import ConfigError, EbdError, JobConfig, from_dict, require
from .objectives import OBJECTIVE_KEYS, OBJECTIVES
from .progress import Progress, configure_logging, log_line

WORKERS_DIR = "workers"   # OUTPUT/workers/rank-N.json: each worker's share of the data


@dataclass
class TrainConfig(JobConfig):
    latents: str | None = None
    output: str | None = None
    run_name: str = "ebd-train"
    objective: Literal["dsm", "cd", "ddpm"] = "dsm"  # denoising score matching; short-run contrastive divergence;
    #                                                   ddpm: the noise-predicting diffusion baseline (not an energy)
    storage_path: str | None = None          # Ray Train checkpoints; default OUTPUT/checkpoints (shared storage!)
    # scale
    num_workers: int = 1
    use_gpu: bool = False                    # nccl on GPUs, gloo on CPUs
    cpus_per_worker: float = 1.0
    max_failures: int = 0                    # Ray Train restarts after a worker dies
    # optimisation
    max_steps: int = 2000
    batch_size: int = 64                     # per worker
    lr: float = 1e-4
    beta1: float = 0.0                       # 0 suits CD's non-stationary negatives; 0.9 suits dsm
    beta2: float = 0.999
    warmup_steps: int = 0                    # linear learning-rate warm-up
    param_grad_clip: float = 1.0             # max global norm of the parameter gradient
    ema_decay: float = 0.999                 # with warm-up: min(decay, (1 + step) / (10 + step))
    # L2 penalty on the network energies E(z+), E(z-). The base term makes energies O(latent dims), and E must
    # offset it by as much to carve modes, so alpha is small: 0.1 (IGEBM's scale) pins the chains to the origin.
    alpha: float = 0.001
    data_noise: float = 0.01                 # std of the noise added to positives
    # model (both objectives): one stage per channels entry
    channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    # dsm: a noise-conditional energy (diffusion_ebm.py) and its sampler from plain noise (langevin.heun/ancestral)
    layers_per_block: int = 1
    norm_groups: int = 16
    sigma_data: float | None = None          # null: the training latents' std
    sigma_min: float = 0.002
    sigma_max: float | None = None           # null: the largest distance between two training latents
    sigma_sampling: Literal["lognormal", "log_uniform"] = "lognormal"
    sigma_p_mean: float = -0.5               # lognormal: ln sigma ~ N(ln sigma_data + p_mean, p_std^2)
    sigma_p_std: float = 1.2
    sampler: Literal["heun", "ancestral"] = "heun"
    sampler_levels: int = 25                 # heun: 2 x levels - 1 gradients per image; ancestral: levels
    sampler_rho: float = 7.0
    mala_levels: int = 0                     # Metropolis-adjusted corrector steps at the last N levels
    mala_steps: int = 1
    mala_step_scale: float = 0.25
    guidance: float = 1.0                    # conditional sampling: E_none + w (E_c - E_none) per term
    # Conditioning (conditions.py): the label fields the energy takes ("label" is the single label; named fields come
    # from precompute's label_fields). Each field is dropped independently with probability label_dropout, so the
    # network also learns the unconditional energy and every single-field one that composition adds up.
    condition_on: list[str] = field(default_factory=list)
    label_dropout: float = 0.3
    # ddpm: a noise-predicting UNet (diffusion_unet.py) sampled by DDIM; layers_per_block, norm_groups as dsm
    attention: bool = False
    num_train_timesteps: int = 1000
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"] = "scaled_linear"
    ddim_steps: int = 50
    ddim_eta: float = 0.0
    # cd: a clean-data energy (ebm.py) and its short-run Langevin sampler
    spectral_norm: bool = False
    sigma0: float = 1.0
    init_rank: int | None = None             # chains start from a rank-r Gaussian fit of the data (EnergyModelConfig)
    init_components: int = 1                 # ... or a mixture of that many, one per k-means cluster
    init_fit_samples: int = 10_000           # training latents the driver reads to fit it
    # sampler (saved with the model; generation uses exactly these)
    langevin_steps: int = 40
    langevin_step_size: float = 0.1
    langevin_noise_scale: float = 0.1        # short-run: mostly gradient flow; tau = 1 needs far steeper energies
    langevin_grad_clip: float | None = None
    langevin_init_std: float = 1.0
    # Replay buffer per worker; 0 (default): pure short-run chains from noise, exactly what generation runs.
    # A buffer trains long-run chains, which generation from noise with the same K does not reproduce.
    buffer_size: int = 0
    reinit_prob: float = 0.05
    # data
    holdout_shards: int = 0                  # the last N shards are never trained on (evaluation's reference)
    # Latents never trained on, by their labels: [{shape: ring, background: checker}] drops every ring on a checker
    # (a combination to generate later by composing the two conditions). Any objective.
    exclude_labels: list[dict[str, str]] = field(default_factory=list)
    use_moments: bool = True                 # draw z+ from stored posterior moments when the shards have them
    shuffle_buffer: int = 4096               # streaming shuffle when a worker's share does not fit in memory
    cache_bytes: int = 2 * 1024**3           # keep a worker's share in memory below this size
    # bookkeeping
    log_every: int = 20
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    energy_bound_per_dim: float = 5.0        # |E| beyond this x latent dims counts as divergence
    max_rollbacks: int = 3
    rollback_lr_factor: float = 0.5
    seed: int = 0
    fault_nan_at_step: int | None = None     # testing: poison the loss once at this step to exercise rollback
    # A run name resumes only the run it names: another config or other data is refused unless this is true.
    allow_config_change: bool = False

    def validate(self) -> None:
        for name in ("latents", "output"):
            require(getattr(self, name) is not None, f"missing {name}: pass --{name} or set it in the config")
        require(self.num_workers >= 1 and self.batch_size >= 1 and self.max_steps >= 0,
                "num_workers and batch_size must be >= 1, max_steps >= 0")
        require(self.lr > 0 and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "lr must be > 0, betas in [0, 1)")
        require(0 <= self.ema_decay < 1 and self.alpha >= 0 and self.data_noise >= 0,
                "ema_decay must be in [0, 1), alpha and data_noise >= 0")
        require(self.buffer_size >= 0 and 0 <= self.reinit_prob <= 1, "buffer_size >= 0, reinit_prob in [0, 1]")
        require(self.holdout_shards >= 0, "holdout_shards must be >= 0")
        require(self.init_rank is None or (self.init_rank >= 1 and self.init_fit_samples >= 2 * self.init_components),
                "init_rank must be null or >= 1, init_fit_samples >= 2 x init_components")
        require(self.init_components >= 1 and (self.init_rank or self.init_components == 1),
                "init_components must be >= 1, and > 1 only with init_rank")
        require(self.log_every >= 1 and self.checkpoint_every >= 1 and self.keep_checkpoints >= 1,
                "log_every, checkpoint_every and keep_checkpoints must be >= 1")
        require(self.energy_bound_per_dim > 0 and self.max_rollbacks >= 0 and 0 < self.rollback_lr_factor < 1,
                "energy_bound_per_dim > 0, max_rollbacks >= 0, rollback_lr_factor in (0, 1)")
        require(self.run_name.replace("-", "").replace("_", "").isalnum(), "run_name may hold only [A-Za-z0-9_-]")
        require(self.warmup_steps >= 0, "warmup_steps must be >= 0")
        require(self.sigma_max is None or self.sigma_max > self.sigma_min, "sigma_max must exceed sigma_min")
        require(self.sigma_data is None or self.sigma_data > 0, "sigma_data must be > 0 or null")
        require(self.sigma_p_std > 0, "sigma_p_std must be > 0")
        require(0 <= self.label_dropout < 1, "label_dropout must be in [0, 1)")
        require(len(set(self.condition_on)) == len(self.condition_on), "condition_on lists a field twice")
        require(all(rule and all(isinstance(k, str) and isinstance(v, str) for k, v in rule.items())
                    for rule in self.exclude_labels),
                "exclude_labels must be a list of non-empty {field: value} mappings, e.g. [{shape: ring}]")
        for key, owners in OBJECTIVE_KEYS.items():  # a key of another objective would be silently ignored
            if self.objective not in owners and getattr(self, key) != _DEFAULTS[key]:
                owner = " or ".join(sorted(owners))
                raise ConfigError(f"config key {key!r} applies to objective {owner}, not {self.objective} "
                                  f"(set objective: {owner}, or drop the key)")
        # The sampler as it will be saved (sigma_max from the data stands in as 2 x sigma_min until it is known).
        OBJECTIVES[self.objective].sampler_settings(self, {"sigma_max": self.sigma_max or 2 * self.sigma_min,
                                                           "sigma_data": 1.0}).validate()


_DEFAULTS = {f.name: (f.default if f.default is not MISSING else f.default_factory()) for f in fields(TrainConfig)}


# ------------------------------------------------------------------------------------------------- data

def split_shards(paths: list[str], rank: int, world: int) -> list[str]:
    """Worker `rank`'s disjoint share: every world-th shard. Together the shares cover every shard once."""
    return paths[rank::world]


def excluded(labels: dict[str, str], rules: list[dict[str, str]]) -> bool:
    """Whether a latent with these labels matches one of `exclude_labels`' rules (every field of the rule)."""
    return any(all(labels.get(k) == v for k, v in rule.items()) for rule in rules)


class LatentBatches:
    """Endless batches (latents, labels) of positives from one worker's shards; each epoch visits every one of its
    shards. labels: B x fields, each the value's index in `vocabulary` + 1 (0: the latent lacks it), or None when no
    field is asked for. Latents matching `exclude` are skipped (`excluded` counts them over one epoch)."""

    def __init__(self, paths: list[str], batch_size: int, seed: int, use_moments: bool, data_noise: float,
                 in_memory: bool, shuffle_buffer: int, vocabulary: dict[str, list[str]] | None = None,
                 exclude: list[dict[str, str]] | None = None):
        self.paths, self.batch_size, self.use_moments, self.data_noise = paths, batch_size, use_moments, data_noise
        self.vocabulary, self.exclude = vocabulary or {}, exclude or []
        self.rng = np.random.default_rng(seed)
        self.torch_gen = torch.Generator().manual_seed(seed)
        self.shuffle_buffer = shuffle_buffer
        self.excluded = 0
        self.epoch = 0
        self.cache = self._load_all() if in_memory else None

    def _record(self, s: dict) -> tuple | None:
        labels = sh.labels_of(s["meta"])
        if self.exclude and excluded(labels, self.exclude):
            self.excluded += self.epoch == 0
            return None
        m = s["moments"] if self.use_moments else None
        index = torch.tensor([values.index(labels[f]) + 1 if labels.get(f) in values else 0
                              for f, values in self.vocabulary.items()], dtype=torch.long)
        return torch.from_numpy(s["latent"]), None if m is None else torch.from_numpy(m), index

    def _load_all(self) -> list[tuple]:
        return [r for s in sh.iter_latents(self.paths) if (r := self._record(s)) is not None]

    def _records(self) -> Iterator[tuple]:
        while True:
            if self.cache is not None:
                for i in self.rng.permutation(len(self.cache)):
                    yield self.cache[i]
            else:
                buffer: list = []
                for path in self.rng.permutation(self.paths):
                    for s in sh.iter_latents([str(path)]):
                        if (record := self._record(s)) is None:
                            continue
                        buffer.append(record)
                        if len(buffer) >= self.shuffle_buffer:
                            yield buffer.pop(int(self.rng.integers(len(buffer))))
                for i in self.rng.permutation(len(buffer)):
                    yield buffer[i]
            self.epoch += 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        records = self._records()
        while True:
            batch = [next(records) for _ in range(self.batch_size)]
            if all(m is not None for _, m, _ in batch):  # a fresh posterior sample: mean + std * eps
                moments = torch.stack([m for _, m, _ in batch])
                eps = torch.randn(moments[:, 0].shape, generator=self.torch_gen)
                z = moments[:, 0] + torch.exp(0.5 * moments[:, 1]) * eps
            else:
                z = torch.stack([lat for lat, _, _ in batch])
            labels = torch.stack([index for _, _, index in batch]) if self.vocabulary else None
            yield z + self.data_noise * torch.randn(z.shape, generator=self.torch_gen), labels


# --------------------------------------------------------------------------------------------- training

def train_loop_per_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    configure_logging()  # a Ray worker process: progress lines to its stderr (ray job logs)
    cfg = from_dict(TrainConfig, loop_config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    device = ray.train.torch.get_device()
    latent_shape = tuple(loop_config["latent_shape"])

    torch.manual_seed(cfg.seed)  # identical initial weights on every worker
    gen = torch.Generator()  # the objective's randomness (noise levels, chains); seeded below, after any resume
    objective = OBJECTIVES[cfg.objective](cfg, latent_shape, gen)
    model = objective.build_model(cfg, latent_shape, _load_prepared(loop_config["prepared"]),
                                  loop_config["metadata"]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = {"step": 0, "lr": cfg.lr, "rollbacks": 0, "fault_injected": False}

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            _load_state(Path(folder), model, optimizer, ema, objective, state, device)
        if rank == 0:
            log_line("train", f"resumed from checkpoint at step {state['step']}")
    ddp_model = ray.train.torch.prepare_model(model) if world > 1 else model  # DDP averages gradients

    my_shards = split_shards(loop_config["shards"], rank, world)
    counts = loop_config["shard_counts"]
    my_count = sum(counts[p] for p in my_shards)
    record = {"rank": rank, "world": world, "shards": my_shards, "samples": my_count,
              "resumed_from_step": state["step"]}  # 0: a fresh start; else the checkpoint it restarted from
    record_path = storage.join(cfg.output, WORKERS_DIR, f"rank-{rank}.json")
    sh.atomic_write_json(record_path, record)
    in_memory = my_count * math.prod(latent_shape) * 4 * 3 <= cfg.cache_bytes
    data = LatentBatches(my_shards, cfg.batch_size, cfg.seed * 1000 + rank + state["step"], cfg.use_moments,
                         cfg.data_noise, in_memory, cfg.shuffle_buffer, model.label_vocabulary, cfg.exclude_labels)
    batches = iter(data)
    gen.manual_seed(cfg.seed * 7919 + rank * 104729 + state["step"])
    last_good = _snapshot(model, optimizer, ema, objective, state)
    metrics = _Metrics(world, device)
    shown = ("loss", *objective.METRICS, "param_grad_norm", "samples_per_s")
    log = Progress("train", total=cfg.max_steps, unit="steps", interval_s=0) if rank == 0 else None
    gauges = _PrometheusGauges(shown + ("step", "lr", "rollbacks")) if rank == 0 else None

    started = time.monotonic()
    while state["step"] < cfg.max_steps:
        tick = time.perf_counter()
        pos, labels = next(batches)
        pos, labels = pos.to(device), None if labels is None else labels.to(device)
        loss, values, healthy = objective.loss(ddp_model, model, pos, labels)
        if cfg.fault_nan_at_step == state["step"] and not state["fault_injected"]:
            state["fault_injected"] = True
            loss, healthy = loss * float("nan"), False

        if _diverged(healthy, world, device):
            state["rollbacks"] += 1
            if state["rollbacks"] > cfg.max_rollbacks:
                raise EbdError(f"training diverged {state['rollbacks']} times (non-finite or out-of-bounds loss or "
                               f"energies); last good step {last_good['state']['step']}: lower lr (cd: or raise "
                               "alpha) and re-run with a new --run-name")
            lr = state["lr"] * cfg.rollback_lr_factor
            _restore(last_good, model, optimizer, ema, objective, state)
            state["lr"] = lr
            if log:
                log.log(f"divergence at step {state['step']}: rolled back to step {last_good['state']['step']}, "
                        f"lr -> {lr:g} (rollback {state['rollbacks']}/{cfg.max_rollbacks})")
            continue

        for group in optimizer.param_groups:  # the base rate (lowered by rollbacks) after a linear warm-up
            group["lr"] = state["lr"] * min(1.0, (state["step"] + 1) / max(1, cfg.warmup_steps))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.param_grad_clip)
        optimizer.step()
        _update_ema(ema, model, min(cfg.ema_decay, (1 + state["step"]) / (10 + state["step"])))
        state["step"] += 1
        metrics.add(values | {"loss": loss.item(), "param_grad_norm": grad_norm.item()}, len(pos),
                    time.perf_counter() - tick)

        step = state["step"]
        save = step % cfg.checkpoint_every == 0 or step == cfg.max_steps
        if step % cfg.log_every == 0 or save:
            values = metrics.reduce() | {"step": step, "lr": state["lr"], "rollbacks": state["rollbacks"],
                                         "epoch": data.epoch}
            if log:
                log.done = step
                log.log(log.line(" ".join(f"{k}={values[k]:.4g}" for k in shown if k in values)))
                gauges.set(values)
            if save:
                with tempfile.TemporaryDirectory() as folder:
                    if rank == 0:
                        _save_state(Path(folder), model, optimizer, ema, objective, state, cfg)
                    ray.train.report(values, checkpoint=ray.train.Checkpoint.from_directory(folder)
                                     if rank == 0 else None, checkpoint_dir_name=f"step-{step:08d}")
                last_good = _snapshot(model, optimizer, ema, objective, state)
            else:
                ray.train.report(values)

    # Every worker records a digest of its final weights: equal digests show the gradients were synchronised.
    sh.atomic_write_json(record_path, record | {"step": state["step"], "weights_sha256": _weights_digest(model),
                                                "excluded_per_epoch": data.excluded})
    if rank == 0:
        export = type(model)(model.config, dict(model.metadata))
        export.metadata["training"] = {"objective": cfg.objective, "steps": state["step"],
                                       "rollbacks": state["rollbacks"], "final_lr": state["lr"],
                                       "num_workers": world, "run_name": cfg.run_name,
                                       "loop_seconds_this_run": round(time.monotonic() - started, 1)}
        export.save_pretrained(storage.join(cfg.output, "model"), state_dict=ema)


class _Metrics:
    """Per-name sums over the steps since the last log, averaged over steps and workers on reduce() (a NaN, e.g. a
    noise band no sample fell in this step, is left out of its average)."""

    def __init__(self, world: int, device):
        self.world, self.device = world, device
        self.names: list[str] = []
        self.reset()

    def reset(self):
        self.sums: dict[str, list[float]] = {}
        self.samples, self.seconds = 0, 0.0

    def add(self, values: dict, samples: int, seconds: float):
        for name, value in values.items():
            if name not in self.names:
                self.names.append(name)
            total = self.sums.setdefault(name, [0.0, 0])
            if math.isfinite(value):
                total[0] += value
                total[1] += 1
        self.samples += samples
        self.seconds += seconds

    def reduce(self) -> dict:
        sums = [self.sums.get(n, [0.0, 0]) for n in self.names]
        values = torch.tensor([v for pair in sums for v in pair] + [self.samples, self.seconds], dtype=torch.float64)
        if self.world > 1:  # every worker logs the same names in the same order: the objective fixes them
            import torch.distributed as dist
            values = values.to(self.device)
            dist.all_reduce(values)
            values = values.cpu()
        out = {n: float(values[2 * i] / values[2 * i + 1]) if values[2 * i + 1] else float("nan")
               for i, n in enumerate(self.names)}
        samples, seconds = float(values[-2]), float(values[-1])
        self.reset()
        # samples/s of the whole job: all workers' samples over one worker's (mean) wall time
        out["samples_per_s"] = samples / (seconds / self.world) if seconds else 0.0
        return out


class _PrometheusGauges:
    """Training metrics through Ray's metrics export (scraped as ray_ebd_train_*), set by rank 0 only."""

    def __init__(self, names: tuple[str, ...]):
        try:
            from ray.util.metrics import Gauge
            self.gauges = {n: Gauge(f"ebd_train_{n}", description=f"EBM training: {n.replace('_', ' ')}")
                           for n in names}
        except Exception:  # metrics export is optional (ray without [default])  # noqa: BLE001
            self.gauges = {}

    def set(self, values: dict) -> None:
        for name, gauge in self.gauges.items():
            if name in values and math.isfinite(values[name]):
                gauge.set(float(values[name]))


def _weights_digest(model) -> str:
    import hashlib
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode() + value.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def _diverged(healthy: bool, world: int, device) -> bool:
    """True on every worker if any worker's objective saw an unhealthy step (non-finite loss, energies or loss out
    of bounds)."""
    bad = torch.tensor([0.0 if healthy else 1.0], device=device)
    if world > 1:
        import torch.distributed as dist
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bool(bad.item())


def _update_ema(ema: dict, model, decay: float) -> None:
    """Averages the parameters; buffers (the fitted chain-start mixture, counters) are copied, so the export holds
    them exactly as fitted rather than rounded by the averaging."""
    parameters = {name for name, _ in model.named_parameters()}
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if name in parameters and value.dtype.is_floating_point:
                ema[name].mul_(decay).add_(value.detach(), alpha=1 - decay)
            else:
                ema[name].copy_(value)


def _snapshot(model, optimizer, ema, objective, state) -> dict:
    return {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict()),
            "ema": copy.deepcopy(ema), "objective": copy.deepcopy(objective.state_tensors()), "state": dict(state)}


def _restore(snapshot, model, optimizer, ema, objective, state) -> None:
    """Back to the snapshot, including the objective's own state (cd's replay buffer must not keep the negatives of
    the steps that diverged)."""
    model.load_state_dict(snapshot["model"])
    objective.load_state_tensors(copy.deepcopy(snapshot["objective"]))
    optimizer.load_state_dict(copy.deepcopy(snapshot["optimizer"]))
    for k, v in snapshot["ema"].items():
        ema[k].copy_(v)
    history = {k: state[k] for k in ("rollbacks", "fault_injected")}  # run history survives the rollback
    state.update(snapshot["state"])
    state.update(history)


# ---------------------------------------------------------------------------- checkpoints (no pickle)

def _save_state(folder: Path, model, optimizer, ema, objective, state: dict, cfg: TrainConfig) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.items()}
    tensors |= optimizer_tensors(optimizer)
    tensors |= {f"objective.{k}": v for k, v in objective.state_tensors().items()}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / "state.safetensors"))
    (folder / "state.json").write_text(json.dumps({
        "state": state, "config": asdict(cfg),
        "optimizer_param_groups": [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]}
                                   for g in optimizer.state_dict()["param_groups"]]}, indent=2))


def _load_state(folder: Path, model, optimizer, ema, objective, state: dict, device) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "state.safetensors"))
    meta = json.loads((folder / "state.json").read_text())
    saved = meta["config"].get("objective", "cd")  # checkpoints from before objectives existed are cd's
    if saved != type(objective).NAME:
        raise EbdError(f"the checkpoint in {folder} was trained with objective {saved}, this run asks for "
                       f"{type(objective).NAME}: use another --run-name (or the same objective)")
    if "buffer" in tensors:  # cd's replay buffer, as checkpoints stored it before objectives had their own state
        tensors["objective.buffer"] = tensors.pop("buffer")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for k, v in tensors.items():
        if k.startswith("ema."):
            ema[k[4:]].copy_(v)
    load_optimizer_tensors(optimizer, tensors, meta["optimizer_param_groups"], device)
    objective.load_state_tensors({k[10:]: v for k, v in tensors.items() if k.startswith("objective.")})
    state.update(meta["state"])


# ------------------------------------------------------------------------------------------------ driver

def run_training(cfg: TrainConfig, address: str | None = None) -> dict:
    """Runs (or resumes) training under Ray Train; returns the final reported metrics."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    latents = storage.canonical(cfg.latents)  # a local folder or an object-store URI
    manifest = sh.read_manifest(latents)
    paths = sh.shard_paths(latents)
    counts = {storage.join(latents, s["file"]): s["count"] for s in manifest["shards"]}
    missing = [p for p in paths if not storage.is_file(p)]
    if missing:
        raise EbdError(f"{len(missing)} shard(s) listed in the manifest are missing, e.g. {missing[0]}")
    paths = [p for p in paths if counts.get(p, 0) > 0]
    require(len(paths) > cfg.holdout_shards, f"holdout_shards={cfg.holdout_shards} leaves no shard to train on "
            f"({len(paths)} non-empty shards)")
    require(not cfg.holdout_shards or manifest.get("order") == "shuffled",
            f"{cfg.latents} was written in input order (older precompute, or shuffle: false), so its last shards "
            "are not a random sample of the data: re-run precompute into a new folder, or set holdout_shards: 0")
    sha = {storage.join(latents, s["file"]): s["sha256"] for s in manifest["shards"]}
    held_out = [{"file": storage.name(p), "sha256": sha[p], "count": counts[p]}
                for p in paths[len(paths) - cfg.holdout_shards:]] if cfg.holdout_shards else []
    paths = paths[: len(paths) - cfg.holdout_shards]
    require(len(paths) >= cfg.num_workers, f"{len(paths)} non-empty shards cannot feed {cfg.num_workers} workers: "
            "use fewer workers or re-run precompute with a smaller shard_size")
    output = storage.canonical(cfg.output)
    storage.check_writable(output)  # one line before any work: no such bucket, no permission
    # A URI (s3://, gs://, ...) goes to Ray Train's pyarrow filesystems as it is; a local path is made absolute.
    checkpoints_at = storage.canonical(cfg.storage_path) if cfg.storage_path else storage.join(output, "checkpoints")
    manifest_sha = sh.file_sha256(storage.join(latents, sh.MANIFEST))
    objective = OBJECTIVES[cfg.objective]
    for rule in cfg.exclude_labels:  # a field the latents lack would silently exclude nothing
        sh.label_vocabulary(manifest, list(rule), cfg.latents)
    prepared = _prepare(cfg, objective, paths, output)
    if cfg.condition_on:
        prepared["labels"] = sh.label_vocabulary(manifest, cfg.condition_on, cfg.latents)
    objective.model_config(cfg, manifest["latent"]["shape"], prepared).validate()
    metadata = {"sampler": asdict(objective.sampler_settings(cfg, prepared)),
                "latents": {"shape": manifest["latent"]["shape"], "scaling_factor": manifest["scaling_factor"],
                            "shift_factor": manifest["shift_factor"], "vae": manifest["vae"],
                            "manifest_sha256": manifest_sha, "resolution": manifest["resolution"],
                            # what evaluation may use as never-seen reference data, by file and content
                            "trained_on": [{"file": storage.name(p), "sha256": sha[p], "count": counts[p]}
                                           for p in paths],
                            "held_out": held_out,
                            "excluded_labels": cfg.exclude_labels}}
    cfg_dict = asdict(cfg) | {"output": output}
    claim_run(checkpoints_at, cfg, manifest_sha)

    if not ray.is_initialized():
        ray.init(address=address)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg_dict, "shards": paths, "shard_counts": {p: counts[p] for p in paths},
                           "latent_shape": manifest["latent"]["shape"], "metadata": metadata,
                           "prepared": prepared},
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
    config or data differ, unless `allow_config_change`; local or in an object store (s3://, gs://)."""
    path = storage.join(checkpoints_at, cfg.run_name, RUN_RECORD)
    record = {"config": {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_KEYS},
              "latents_manifest_sha256": manifest_sha}
    if storage.is_file(path):
        old = sh.read_json(path)
        # a key newer than the record reads as its default: runs started before it existed still resume
        changed = sorted(k for k in set(old["config"]) | set(record["config"])
                         if old["config"].get(k, _DEFAULTS.get(k)) != record["config"].get(k))
        if old["latents_manifest_sha256"] != manifest_sha:
            changed.append("the latents (another manifest)")
        if changed and not cfg.allow_config_change:
            first = changed[0]
            detail = f"{first}: {old['config'].get(first)!r} -> {record['config'].get(first)!r}" \
                if first in record["config"] or first in old["config"] else first
            raise EbdError(f"run {cfg.run_name!r} in {checkpoints_at} was started with another config or data ({detail}"
                           f"{f' and {len(changed) - 1} more' if len(changed) > 1 else ''}): use a new --run-name, "
                           "or --set allow_config_change=true to resume its weights anyway")
        if not changed:
            return
    storage.write_bytes(path, json.dumps(record, indent=1, sort_keys=True).encode())


def _prepare(cfg: TrainConfig, objective, paths: list[str], output: str) -> dict:
    """What the objective needs from the data before the workers start (the chain-start mixture for cd, the noise
    range for dsm), from the first training latents (never held-out ones). Numbers travel in the
    loop config; tensors go to OUTPUT/prepared.safetensors (a resumed run prepares the same again)."""
    from safetensors.torch import save

    wanted, latents = objective.prepare_samples(cfg), []
    for record in sh.iter_latents(paths) if wanted else []:
        if cfg.exclude_labels and excluded(sh.labels_of(record["meta"]), cfg.exclude_labels):
            continue
        latents.append(torch.from_numpy(record["latent"]))
        if len(latents) >= wanted:
            break
    prepared = objective.prepare(cfg, torch.stack(latents) if latents else None)
    tensors = prepared.pop("tensors", {})
    if tensors:
        path = storage.join(output, "prepared.safetensors")
        sh.atomic_write(path, lambda f: f.write(save(tensors)))
        prepared["tensors_path"] = path
    return prepared


def _load_prepared(prepared: dict) -> dict:
    from safetensors.torch import load

    path = prepared.get("tensors_path")
    return prepared | {"tensors": load(storage.read_bytes(path)) if path else {}}


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

