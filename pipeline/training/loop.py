"""The training loop each Ray Train worker runs, for any objective in `objectives/`.

Per step, on each worker:
    z ~ its disjoint share of the shards (a fresh sample from stored moments when present) + small data noise
    loss, metrics, healthy = objective.loss(model, z)
Gradients are averaged across workers (DDP), clipped, and applied by Adam; EMA weights are kept.

Safety nets: an unhealthy step on any worker (a non-finite loss, or energies or a loss out of the objective's
bounds) rolls every worker back to the last good checkpoint with a lower learning rate, at most `max_rollbacks`
times. Checkpoints (weights, EMA, optimizer, the objective's own state, step; `io.checkpoints`) go through
`ray.train.report` every `checkpoint_every` steps; re-running with the same run name and storage path resumes from
the last one. Rank 0 exports the EMA weights to OUTPUT/model/ at the end. The driver is `job.py`.
"""

from __future__ import annotations

import copy
import hashlib
import math
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..common.config import EbdError
from ..common.logs import Progress, configure_logging, log_line
from ..common.metrics import TrainingGauges
from ..common.optim import adam, learning_rate, power_ema_decay, power_ema_gamma, set_learning_rate
from ..common.plugins import import_plugins
from ..io import storage
from ..io.checkpoints import load_training_state, save_training_state
from ..io.files import atomic_write_json
from ..io.weights import WEIGHTS_SHA256, load_weights_folder, read_weights_config
from .config import TrainConfig
from .cost import training_flops_per_sample
from .data import LatentBatches, split_shards
from .objectives import OBJECTIVES

WORKERS_DIR = "workers"   # OUTPUT/workers/rank-N.json: each worker's share of the data


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker: set up (or resume), step until max_steps, export."""
    configure_logging()  # a Ray worker process: progress lines to its stderr (ray job logs)
    import_plugins(loop_config["cfg"].plugins)  # what its model kinds and objectives register, in this process
    run = WorkerRun(loop_config)
    if not run.resume() and loop_config.get("init_from"):
        run.start_from(loop_config["init_from"])
    run.start()
    while run.state["step"] < run.cfg.max_steps:
        run.step()
    run.finish()


class WorkerRun:
    """One worker's training run: the model, its optimiser and EMA, the objective, the data and the counters."""

    def __init__(self, loop_config: dict):
        import ray.train
        import ray.train.torch

        self.loop_config = loop_config
        self.cfg: TrainConfig = loop_config["cfg"]  # validated on the driver
        cfg = self.cfg
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
        self.device = ray.train.torch.get_device()
        self.latent_shape = tuple(loop_config["latent_shape"])
        objective = OBJECTIVES[cfg.objective.name]
        metadata = loop_config["metadata"]

        torch.manual_seed(cfg.seed)  # identical initial weights on every worker
        self.gen = torch.Generator()  # the objective's randomness (noise levels, chains); seeded in start()
        self.objective = objective(cfg.objective, _sampler_of(metadata), self.latent_shape, self.gen)
        self.model = objective.build_model(cfg.objective, self.latent_shape, _load_prepared(loop_config["prepared"]),
                                           metadata).to(self.device)
        self.optimizer = adam(self.model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        self.ema = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.ema_gamma = power_ema_gamma(cfg.ema_length) if cfg.ema_length is not None else None
        self.state = {"step": 0, "lr": cfg.lr, "rollbacks": 0, "fault_injected": False}

    # ------------------------------------------------------------------------------------------ set up

    def resume(self) -> bool:
        """Loads the last checkpoint Ray Train reports for this run, if any (True if it did)."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return False
        with checkpoint.as_directory() as folder:
            self._load(Path(folder))
        if self.rank == 0:
            log_line("train", f"resumed from checkpoint at step {self.state['step']}")
        return True

    def start_from(self, init: dict) -> None:
        """The model and its EMA both start from an exported model's (EMA) weights (`init_from`, checked by the
        driver); the optimiser, the step count, the learning-rate warm-up and the EMA's warm-up start afresh. What
        the objective prepared from this run's data (cd's chain-start mixture) is kept: a fine-tune on other latents
        starts its chains there."""
        if read_weights_config(init["path"]).get(WEIGHTS_SHA256) != init["weights_sha256"]:
            raise EbdError(f"init_from {init['path']} changed after the run started: start it again")
        _, tensors = load_weights_folder(init["path"])  # checks the weights against that record
        self.model.load_state_dict(self.model.upgrade_state_dict(tensors))
        self.model.load_state_dict(_load_prepared(self.loop_config["prepared"])["tensors"], strict=False)
        for k, v in self.model.state_dict().items():
            self.ema[k].copy_(v)
        self.state["init_from"] = init  # travels in the checkpoints: a resume records what this run started from
        if self.rank == 0:
            log_line("train", f"starting from the weights of {init['path']} "
                              f"({init['training'].get('steps', '?')} steps there)")

    def start(self) -> None:
        """Data share, worker record, seeds, the first good snapshot, logging."""
        import ray.train.torch

        cfg, rank = self.cfg, self.rank
        self.ddp_model = ray.train.torch.prepare_model(self.model) if self.world > 1 else self.model  # DDP
        my_shards = split_shards(self.loop_config["shards"], rank, self.world)
        my_count = sum(self.loop_config["shard_counts"][p] for p in my_shards)
        self.record = {"rank": rank, "world": self.world, "shards": my_shards, "samples": my_count,
                       "resumed_from_step": self.state["step"]}  # 0: a fresh start; else the checkpoint's step
        self.record_path = storage.join(cfg.output, WORKERS_DIR, f"rank-{rank}.json")
        atomic_write_json(self.record_path, self.record)
        in_memory = my_count * math.prod(self.latent_shape) * 4 * 3 <= cfg.cache_bytes
        self.data = LatentBatches(my_shards, cfg.batch_size, cfg.seed * 1000 + rank + self.state["step"],
                                  use_moments=cfg.use_moments, data_noise=cfg.data_noise, in_memory=in_memory,
                                  shuffle_buffer=cfg.shuffle_buffer, vocabulary=self.model.label_vocabulary,
                                  exclude=cfg.exclude_labels)
        self.batches = iter(self.data)
        self.gen.manual_seed(cfg.seed * 7919 + rank * 104729 + self.state["step"])
        self.last_good = self._snapshot()
        self.metrics = _Metrics(self.world, self.device)
        self.shown = ("loss", *self.objective.METRICS, "param_grad_norm", "samples_per_s")
        self.log = Progress("train", total=cfg.max_steps, unit="steps", interval_s=0,
                            done=self.state["step"]) if rank == 0 else None
        self.gauges = TrainingGauges(self.shown + ("step", "lr", "rollbacks")) if rank == 0 else None
        self.started = time.monotonic()
        self.seconds_before = self.state.get("loop_seconds", 0.0)  # the training time of the runs this one resumes

    # ------------------------------------------------------------------------------------------- a step

    def step(self) -> None:
        cfg, state = self.cfg, self.state
        tick = time.perf_counter()
        pos, labels = next(self.batches)
        pos, labels = pos.to(self.device), None if labels is None else labels.to(self.device)
        loss, values, healthy = self.objective.loss(self.ddp_model, self.model, pos, labels)
        if cfg.fault_nan_at_step == state["step"] and not state["fault_injected"]:
            state["fault_injected"] = True
            loss, healthy = loss * float("nan"), False
        if _diverged(healthy, self.world, self.device):
            self._roll_back()
            return
        set_learning_rate(self.optimizer, learning_rate(state["step"], state["lr"], cfg.warmup_steps,
                                                        cfg.max_steps if cfg.lr_schedule == "cosine" else None))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.param_grad_clip)
        self.optimizer.step()
        _update_ema(self.ema, self.model, self.ema_decay(state["step"]))
        state["step"] += 1
        self.metrics.add(values | {"loss": loss.item(), "param_grad_norm": grad_norm.item()}, len(pos),
                         time.perf_counter() - tick)
        self._report()

    def ema_decay(self, step: int) -> float:
        """EDM2's power-function decay with `ema_length`, else `ema_decay` with a warm-up (step 0-based)."""
        if self.cfg.ema_length is not None:
            return power_ema_decay(step + 1, self.ema_gamma)
        return min(self.cfg.ema_decay, (1 + step) / (10 + step))

    def _roll_back(self) -> None:
        """Every worker back to the last good snapshot, with a lower learning rate."""
        cfg, state = self.cfg, self.state
        state["rollbacks"] += 1
        if state["rollbacks"] > cfg.max_rollbacks:
            raise EbdError(f"training diverged {state['rollbacks']} times (non-finite or out-of-bounds loss or "
                           f"energies); last good step {self.last_good['state']['step']}: lower lr (cd: or raise "
                           "alpha) and re-run with a new --run-name")
        lr = state["lr"] * cfg.rollback_lr_factor
        self._restore(self.last_good)
        state["lr"] = lr
        if self.log:
            self.log.log(f"divergence at step {state['step']}: rolled back to step {self.last_good['state']['step']}, "
                         f"lr -> {lr:g} (rollback {state['rollbacks']}/{cfg.max_rollbacks})")

    def _report(self) -> None:
        """Every `log_every` steps every worker reports (`ray.train.report` is a barrier) and rank 0 logs; every
        `checkpoint_every` steps (and at the end) rank 0 also saves a checkpoint."""
        import ray.train

        cfg, step = self.cfg, self.state["step"]
        save = step % cfg.checkpoint_every == 0 or step == cfg.max_steps
        if not (step % cfg.log_every == 0 or save):
            return
        lr = self.optimizer.param_groups[0]["lr"]  # the rate in use: warm-up and schedule applied
        values = self.metrics.reduce() | {"step": step, "lr": lr, "rollbacks": self.state["rollbacks"],
                                          "epoch": self.data.epoch}
        if self.log:
            self.log.done = step
            self.log.log(self.log.line(" ".join(f"{k}={values[k]:.4g}" for k in self.shown if k in values)))
            self.gauges.set(values)
        if not save:
            ray.train.report(values)
            return
        with tempfile.TemporaryDirectory() as folder:
            if self.rank == 0:
                self._save(Path(folder))
            ray.train.report(values, checkpoint=ray.train.Checkpoint.from_directory(folder) if self.rank == 0 else None,
                             checkpoint_dir_name=f"step-{step:08d}")
        self.last_good = self._snapshot()

    # ------------------------------------------------------------------------------------------- the end

    def finish(self) -> None:
        """Every worker records a digest of its final weights (equal digests show the gradients were synchronised);
        rank 0 exports the EMA weights with the training facts."""
        cfg, state = self.cfg, self.state
        atomic_write_json(self.record_path, self.record | {"step": state["step"], "weights_sha256": _digest(self.model),
                                                           "excluded_per_epoch": self.data.excluded})
        if self.rank == 0:
            export = type(self.model)(self.model.config, dict(self.model.metadata))
            loop_seconds = round(time.monotonic() - self.started, 1)  # before the count below, which is no training
            # a real batch's share of a step's FLOPs, counted (training.cost), x the steps kept (rolled-back ones
            # are not counted)
            pos, labels = next(self.batches)
            per_sample = training_flops_per_sample(self.objective, self.model, pos[:2].to(self.device),
                                                   None if labels is None else labels[:2].to(self.device))
            flops = per_sample * cfg.batch_size * self.world * state["step"]
            training = {"objective": cfg.objective.name, "steps": state["step"], "flops": float(f"{flops:.4g}"),
                        "rollbacks": state["rollbacks"], "final_lr": state["lr"], "num_workers": self.world,
                        "run_name": cfg.run_name, "loop_seconds": round(self.seconds_before + loop_seconds, 1),
                        "loop_seconds_this_run": loop_seconds}
            init = state.get("init_from")
            if init:  # where its weights started, and the totals over it and the runs it started from
                before = init["training"].get("total", init["training"])
                training["init_from"] = init
                total = {key: before[key] + training[key] for key in ("steps", "loop_seconds", "flops")
                         if key in before}  # those the start recorded
                if "loop_seconds" in total:
                    total["loop_seconds"] = round(total["loop_seconds"], 1)
                if "flops" in total:
                    total["flops"] = float(f"{total['flops']:.4g}")
                training["total"] = total
            export.metadata["training"] = training
            export.save_pretrained(storage.join(cfg.output, "model"), state_dict=self.ema)

    # ------------------------------------------------------------------- snapshots and checkpoints

    def _snapshot(self) -> dict:
        return {"model": copy.deepcopy(self.model.state_dict()),
                "optimizer": copy.deepcopy(self.optimizer.state_dict()), "ema": copy.deepcopy(self.ema),
                "objective": copy.deepcopy(self.objective.state_tensors()), "state": dict(self.state)}

    def _restore(self, snapshot: dict) -> None:
        """Back to the snapshot, including the objective's own state (cd's replay buffer must not keep the negatives
        of the steps that diverged); the run's history (rollbacks, the injected fault) survives."""
        self.model.load_state_dict(snapshot["model"])
        self.objective.load_state_tensors(copy.deepcopy(snapshot["objective"]))
        self.optimizer.load_state_dict(copy.deepcopy(snapshot["optimizer"]))
        for k, v in snapshot["ema"].items():
            self.ema[k].copy_(v)
        history = {k: self.state[k] for k in ("rollbacks", "fault_injected")}
        self.state.update(snapshot["state"])
        self.state.update(history)

    def _save(self, folder: Path) -> None:
        # to the millisecond: a few quick steps before a checkpoint take less than the 0.1 s the export rounds to
        self.state["loop_seconds"] = round(self.seconds_before + time.monotonic() - self.started, 3)
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors |= {f"ema.{k}": v for k, v in self.ema.items()}
        tensors |= {f"objective.{k}": v for k, v in self.objective.state_tensors().items()}
        save_training_state(folder, self.state["step"], tensors, {"state": self.state, "config": asdict(self.cfg)},
                            self.optimizer)

    def _load(self, folder: Path) -> None:
        tensors, meta = load_training_state(folder, self.optimizer, self.device)
        saved = meta["config"].get("objective", "cd")  # checkpoints from before objectives existed are cd's
        saved = saved.get("name", "dsm") if isinstance(saved, dict) else saved
        if saved != self.cfg.objective.name:
            raise EbdError(f"the checkpoint in {folder} was trained with objective {saved}, this run asks for "
                           f"{self.cfg.objective.name}: use another --run-name (or the same objective)")
        if "buffer" in tensors:  # cd's replay buffer, as checkpoints stored it before objectives had their own state
            tensors["objective.buffer"] = tensors.pop("buffer")
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        for k, v in tensors.items():
            if k.startswith("ema."):
                self.ema[k[4:]].copy_(v)
        self.objective.load_state_tensors({k[10:]: v for k, v in tensors.items() if k.startswith("objective.")})
        self.state.update(meta["state"])


def _sampler_of(metadata: dict):
    from ..sampling.settings import sampler_settings
    return sampler_settings(metadata["sampler"])


def _load_prepared(prepared: dict) -> dict:
    """The objective's prepared values, with its tensors read back (the driver wrote them beside the output)."""
    from safetensors.torch import load

    path = prepared.get("tensors_path")
    return prepared | {"tensors": load(storage.read_bytes(path)) if path else {}}


def _digest(model) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode() + value.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def _diverged(healthy: bool, world: int, device) -> bool:
    """True on every worker if any worker's objective saw an unhealthy step."""
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


