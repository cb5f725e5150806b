"""The training job's config: the loop's own keys flat, the objective's and the sampler's in their own sections.

    objective: {name: dsm, channels: [64, 128], sigma_min: 0.002}   # training/objectives/<name>.py: its Settings
    sampler: {name: ipndm, levels: 12}                              # keys changed in the objective's default sampler
    max_steps: 9000
    lr: 0.0003

Configs written before the sections existed (every key flat, `objective: dsm`, `sampler: heun`, `sampler_levels:
25`, `langevin_steps: 40`, ...) load unchanged: `migrate` moves their keys into the sections (`common/migrations.py`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..common import migrations
from ..common.config import JobConfig, require, require_at_least
from ..sampling.settings import sampler_overrides
from .objectives import OBJECTIVES, objective_settings


@dataclass(frozen=True)
class TrainConfig(JobConfig):
    latents: str | None = None               # output folder of the precompute job
    output: str | None = None                # folder for the model export and worker records
    run_name: str = "ebd-train"              # Ray Train run name: the same name resumes
    storage_path: str | None = None          # Ray Train checkpoints; default OUTPUT/checkpoints (shared storage!)
    # What is trained, and how it will be sampled: training/objectives/ (dsm: a noise-conditional energy by denoising
    # score matching, the default; cd: short-run contrastive divergence; ddpm: the noise-prediction baseline).
    # A name, or {name: ..., its keys}: kept as that objective's Settings (objectives/<name>.py), typed and checked
    objective: Any = field(default="dsm", metadata={"parse": objective_settings})
    # keys of the objective's default sampler to change
    sampler: dict[str, Any] = field(default_factory=dict, metadata={"parse": sampler_overrides})
    plugins: list[str] = field(default_factory=list)       # modules to import first: they register model kinds
    # An exported model folder (a run's OUTPUT/model) whose weights this run starts from, with a fresh optimiser:
    # train a finished model on when its checkpoints are gone, or fine-tune it on other latents. The architecture
    # must be the one this config builds; a checkpoint of this run name, when there is one, wins.
    init_from: str | None = None
    # scale
    num_workers: int = 1
    use_gpu: bool = False                    # nccl on GPUs, gloo on CPUs
    cpus_per_worker: float = 1.0
    max_failures: int = 0                    # Ray Train restarts after a worker dies
    # optimisation
    max_steps: int = 2000                    # optimisation steps
    batch_size: int = 64                     # per worker
    lr: float = 1e-4
    beta1: float = 0.0                       # 0 suits CD's non-stationary negatives; 0.9 suits dsm
    beta2: float = 0.999
    warmup_steps: int = 0                    # linear learning-rate warm-up
    lr_schedule: Literal["constant", "cosine"] = "constant"   # after warm-up: constant, or cosine to 0 at max_steps
    param_grad_clip: float = 1.0             # max global norm of the parameter gradient
    ema_decay: float = 0.999                 # with warm-up: min(decay, (1 + step) / (10 + step))
    # EDM2's power-function EMA (Karras et al. 2024): its length a fixed share of the steps so far (sigma_rel, e.g.
    # 0.05-0.10) rather than a fixed number of steps; replaces ema_decay when set.
    ema_length: float | None = None
    data_noise: float = 0.01                 # std of the noise added to positives
    # data
    # Shards never trained on (evaluation's reference): auto, those precompute set apart (its manifest lists them;
    # the last shard of an older folder); N, the last N shards
    holdout_shards: int | Literal["auto"] = 0
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
    max_rollbacks: int = 3                   # a non-finite or out-of-bounds step rolls back to the last checkpoint
    rollback_lr_factor: float = 0.5
    seed: int = 0
    fault_nan_at_step: int | None = None     # testing: poison the loss once at this step to exercise rollback
    # A run name resumes only the run it names: another config or other data is refused unless this is true.
    allow_config_change: bool = False

    @classmethod
    def migrate(cls, values: dict) -> dict:
        return migrations.train_config(values)

    def validate(self) -> None:
        for name in ("latents", "output"):
            require(getattr(self, name) is not None, f"missing {name}: pass --{name} or set it in the config")
        require(self.num_workers >= 1 and self.batch_size >= 1 and self.max_steps >= 0,
                "num_workers and batch_size must be >= 1, max_steps >= 0")
        require(self.lr > 0 and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "lr must be > 0, betas in [0, 1)")
        require(0 <= self.ema_decay < 1 and self.data_noise >= 0, "ema_decay must be in [0, 1), data_noise >= 0")
        require(self.ema_length is None or 0 < self.ema_length < 0.28, "ema_length (sigma_rel) must be in (0, 0.28)")
        require(self.holdout_shards == "auto" or self.holdout_shards >= 0, "holdout_shards must be auto or >= 0")
        require(self.log_every >= 1 and self.checkpoint_every >= 1 and self.keep_checkpoints >= 1,
                "log_every, checkpoint_every and keep_checkpoints must be >= 1")
        require(self.max_rollbacks >= 0 and 0 < self.rollback_lr_factor < 1,
                "max_rollbacks >= 0, rollback_lr_factor in (0, 1)")
        require(self.run_name.replace("-", "").replace("_", "").isalnum(), "run_name may hold only [A-Za-z0-9_-]")
        require(self.warmup_steps >= 0, "warmup_steps must be >= 0")
        require_at_least(self, 0, "cpus_per_worker", "param_grad_clip", strictly=True)
        require_at_least(self, 0, "shuffle_buffer", "cache_bytes", "seed", "fault_nan_at_step")
        require_at_least(self, -1, "max_failures")  # -1: Ray Train retries forever
        require(all(rule and all(isinstance(k, str) and isinstance(v, str) for k, v in rule.items())
                    for rule in self.exclude_labels),
                "exclude_labels must be a list of non-empty {field: value} mappings, e.g. [{shape: ring}]")
        # The sampler as it will be saved (what the data decides, e.g. sigma_max, stands in as a placeholder).
        objective = OBJECTIVES[self.objective.name]
        objective.sampler_settings(self.objective, self.sampler, objective.placeholder(self.objective)).validate()

    @property
    def objective_name(self) -> str:
        return self.objective.name


def flat_record(cfg: TrainConfig) -> dict:
    """The config as `key` and `section.key` values, with the sampler resolved from the objective's default (what
    run records compare, key by key)."""
    objective = OBJECTIVES[cfg.objective.name]
    sampler = objective.sampler_settings(cfg.objective, cfg.sampler, objective.placeholder(cfg.objective))
    out = {k: v for k, v in asdict(cfg).items() if k not in ("objective", "sampler")}
    out |= {f"objective.{k}": v for k, v in asdict(cfg.objective).items()}
    return out | {f"sampler.{k}": v for k, v in asdict(sampler).items()}

