"""Training objectives: what the training loop in `train.py` optimises, one class per `objective:` config value.

An objective builds its model, turns a batch of latents into (loss, metrics, healthy), carries any state of its
own across checkpoints, and names the sampler generation will run. The loop knows nothing else about it.

    cd   contrastive divergence with short-run Langevin negatives (Nijkamp et al. 2019) on a clean-data energy
         U(z) (`ebm.EnergyModel`); samples come from its fitted chain starts plus K Langevin steps.
    dsm  denoising score matching across noise levels (Vincent 2011; Song & Ermon 2019) on a noise-conditional
         energy E(z, sigma) (`diffusion_ebm.NoiseConditionalEnergy`); no MCMC while training, samples come from
         plain Gaussian noise along a Karras schedule (`langevin.heun` / `langevin.ancestral`).
    ddpm the baseline, not an energy: a noise-predicting UNet (Ho et al. 2020; `diffusion_unet.DiffusionUNet`),
         sampled by DDIM (`langevin.ddim`), to compare the energy models with a working peer.
"""

from __future__ import annotations

import math

import torch

from .diffusion_ebm import NoiseConditionalEnergy, NoiseConditionalEnergyConfig, denoising_score_matching
from .diffusion_unet import DiffusionUNet, DiffusionUNetConfig, noise_prediction_loss
from .ebm import EnergyModel, EnergyModelConfig
from .langevin import AnnealedSettings, DDIMSettings, LangevinSettings, langevin


class ContrastiveDivergence:
    """loss = mean U(z+) - mean U(z-) + alpha mean(E(z+)^2 + E(z-)^2), z- = Langevin(U, z0, K) with z0 from a
    replay buffer (prob 1 - reinit_prob) or the model's chain starts."""

    NAME = "cd"
    METRICS = ("energy_pos", "energy_neg", "energy_gap", "chain_grad_norm")
    KEYS = ("spectral_norm", "sigma0", "init_rank", "init_components", "alpha", "langevin_steps", "langevin_step_size",
            "langevin_noise_scale", "langevin_grad_clip", "langevin_init_std", "buffer_size", "reinit_prob",
            "energy_bound_per_dim")   # TrainConfig keys only this objective reads

    def __init__(self, cfg, latent_shape, generator: torch.Generator):
        self.cfg, self.latent_shape, self.gen = cfg, tuple(latent_shape), generator
        self.settings = self.sampler_settings(cfg, {})
        self.energy_bound = cfg.energy_bound_per_dim * math.prod(latent_shape)
        self.buffer = torch.empty((0, *latent_shape))

    # driver side ------------------------------------------------------------------------------------------
    @staticmethod
    def prepare_samples(cfg) -> int:
        return cfg.init_fit_samples if cfg.init_rank else 0

    @staticmethod
    def prepare(cfg, latents: torch.Tensor) -> dict:
        """The chain-start Gaussian (mixture) fitted to training latents, when init_rank asks for one."""
        if not cfg.init_rank:
            return {}
        model = EnergyModel(ContrastiveDivergence.model_config(cfg, latents.shape[1:], {}))
        model.fit_initializer(latents, seed=cfg.seed)
        return {"tensors": {k: v.contiguous() for k, v in model.state_dict().items() if k.startswith("init_")}}

    @staticmethod
    def model_config(cfg, latent_shape, prepared: dict) -> EnergyModelConfig:
        return EnergyModelConfig(list(latent_shape), cfg.channels, cfg.spectral_norm, cfg.sigma0, cfg.init_rank,
                                 cfg.init_components)

    @staticmethod
    def sampler_settings(cfg, prepared: dict) -> LangevinSettings:
        return LangevinSettings("langevin", cfg.langevin_steps, cfg.langevin_step_size, cfg.langevin_noise_scale,
                                cfg.langevin_grad_clip, cfg.langevin_init_std)

    @classmethod
    def build_model(cls, cfg, latent_shape, prepared: dict, metadata: dict) -> EnergyModel:
        model = EnergyModel(cls.model_config(cfg, latent_shape, prepared), metadata)
        model.load_state_dict(prepared.get("tensors", {}), strict=False)
        return model

    # worker side ------------------------------------------------------------------------------------------
    def loss(self, forward, model: EnergyModel, pos: torch.Tensor, labels=None) -> tuple[torch.Tensor, dict, bool]:
        cfg, n = self.cfg, len(pos)
        chain_grad_norms: list[float] = []
        start = model.initial_latents(n, self.settings, self.gen).to(pos.device)
        if cfg.buffer_size and len(self.buffer):
            reuse = torch.rand(n, generator=self.gen) >= cfg.reinit_prob
            picks = torch.randint(len(self.buffer), (n,), generator=self.gen)
            start[reuse] = self.buffer[picks[reuse]].to(pos.device)
        neg = langevin(model, start, self.settings, self.gen,
                       callback=lambda info: chain_grad_norms.append(info["grad_norm"].mean().item()))
        if cfg.buffer_size:
            self.buffer = torch.cat([neg.detach().cpu(), self.buffer])[: cfg.buffer_size]
        both = torch.cat([pos, neg])
        u = forward(both)
        e = u - model.base_energy(both)  # the network's part: the L2 penalty leaves the fixed base term alone
        u_pos, u_neg, e_pos, e_neg = u[:n], u[n:], e[:n], e[n:]
        loss = u_pos.mean() - u_neg.mean() + cfg.alpha * (e_pos.pow(2).mean() + e_neg.pow(2).mean())
        metrics = {"energy_pos": u_pos.mean().item(), "energy_neg": u_neg.mean().item(),
                   "energy_gap": (u_pos.mean() - u_neg.mean()).item(),
                   "chain_grad_norm": sum(chain_grad_norms) / len(chain_grad_norms)}
        healthy = bool(torch.isfinite(loss)) and e.abs().max().item() <= self.energy_bound
        return loss, metrics, healthy

    def state_tensors(self) -> dict:
        return {"buffer": self.buffer.to(torch.float16)}

    def load_state_tensors(self, tensors: dict) -> None:
        self.buffer = tensors["buffer"].float() if "buffer" in tensors else self.buffer


class DenoisingScoreMatching:
    """loss = mean (sigma grad_z E(z + sigma eps, sigma) - eps)^2 with log sigma ~ N(ln s + p_mean, p_std^2)
    (Karras et al. 2022's log-normal, relative to the data's std s) or log-uniform on [sigma_min, sigma_max]."""

    NAME = "dsm"
    METRICS = ("loss_small_sigma", "loss_large_sigma")
    KEYS = ("layers_per_block", "norm_groups", "sigma_data", "sigma_min", "sigma_max", "sigma_sampling",
            "sigma_p_mean", "sigma_p_std", "sampler", "sampler_levels", "sampler_rho", "mala_levels", "mala_steps",
            "mala_step_scale", "condition_on", "label_dropout", "guidance")
    MAX_HEALTHY_LOSS = 10.0   # a per-dimension epsilon error; the untrained (Gaussian) energy scores <= about 1

    def __init__(self, cfg, latent_shape, generator: torch.Generator):
        self.cfg, self.gen = cfg, generator

    # driver side ------------------------------------------------------------------------------------------
    @staticmethod
    def prepare_samples(cfg) -> int:
        return min(cfg.init_fit_samples, 4096)

    @staticmethod
    def prepare(cfg, latents: torch.Tensor) -> dict:
        """The data's std s and, unless set, sigma_max = the largest distance between two training latents (of up
        to 4,096), so the modes merge at the top level and the start N(0, s^2 + sigma_max^2) covers them all."""
        flat = latents.flatten(1).double()
        sigma_data = cfg.sigma_data or float(flat.std())
        sigma_max = cfg.sigma_max or float(torch.cdist(flat, flat).max())
        return {"sigma_data": float(f"{sigma_data:.5g}"), "sigma_max": float(f"{sigma_max:.4g}")}

    @staticmethod
    def model_config(cfg, latent_shape, prepared: dict) -> NoiseConditionalEnergyConfig:
        return NoiseConditionalEnergyConfig(list(latent_shape), cfg.channels, cfg.layers_per_block, cfg.norm_groups,
                                            prepared["sigma_data"], cfg.sigma_min, prepared["sigma_max"],
                                            prepared.get("labels"))

    @staticmethod
    def sampler_settings(cfg, prepared: dict) -> AnnealedSettings:
        return AnnealedSettings(cfg.sampler, cfg.sampler_levels, cfg.sigma_min, prepared["sigma_max"],
                                cfg.sampler_rho, cfg.mala_levels, cfg.mala_steps, cfg.mala_step_scale, cfg.guidance)

    @classmethod
    def build_model(cls, cfg, latent_shape, prepared: dict, metadata: dict) -> NoiseConditionalEnergy:
        return NoiseConditionalEnergy(cls.model_config(cfg, latent_shape, prepared), metadata)

    # worker side ------------------------------------------------------------------------------------------
    def sigmas(self, n: int, model: NoiseConditionalEnergy) -> torch.Tensor:
        c = model.config
        if self.cfg.sigma_sampling == "log_uniform":
            log_sigma = math.log(c.sigma_min) + torch.rand(n, generator=self.gen) * math.log(c.sigma_max / c.sigma_min)
        else:
            log_sigma = math.log(c.sigma_data) + self.cfg.sigma_p_mean + self.cfg.sigma_p_std * torch.randn(
                n, generator=self.gen)
        return log_sigma.exp().clamp(c.sigma_min, c.sigma_max)

    def loss(self, forward, model: NoiseConditionalEnergy, pos: torch.Tensor,
             labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict, bool]:
        sigma = self.sigmas(len(pos), model).to(pos.device)
        eps = torch.randn(pos.shape, generator=self.gen).to(pos.device)
        if labels is not None:  # each field dropped on its own: the unconditional and single-field energies too
            dropped = torch.rand(labels.shape, generator=self.gen).to(labels.device) < self.cfg.label_dropout
            labels = labels.masked_fill(dropped, 0)
        per_sample = denoising_score_matching(forward, pos, sigma, eps, labels)
        loss = per_sample.mean()
        small = sigma < model.config.sigma_data   # the levels where detail forms vs where layout does
        metrics = {"loss_small_sigma": per_sample[small].mean().item() if small.any() else float("nan"),
                   "loss_large_sigma": per_sample[~small].mean().item() if (~small).any() else float("nan")}
        healthy = bool(torch.isfinite(loss)) and loss.item() <= self.MAX_HEALTHY_LOSS
        return loss, metrics, healthy

    def state_tensors(self) -> dict:
        return {}

    def load_state_tensors(self, tensors: dict) -> None:
        pass


class NoisePrediction:
    """The baseline's loss: mean (eps_theta(z_t, t) - eps)^2 at a uniformly drawn timestep t (DDPM)."""

    NAME = "ddpm"
    METRICS = ("loss_early_t", "loss_late_t")
    KEYS = ("layers_per_block", "norm_groups", "attention", "num_train_timesteps", "beta_schedule", "ddim_steps",
            "ddim_eta")
    MAX_HEALTHY_LOSS = 10.0

    def __init__(self, cfg, latent_shape, generator: torch.Generator):
        self.cfg, self.gen, self.scheduler = cfg, generator, None

    @staticmethod
    def prepare_samples(cfg) -> int:
        return 0

    @staticmethod
    def prepare(cfg, latents) -> dict:
        return {}

    @staticmethod
    def model_config(cfg, latent_shape, prepared: dict) -> DiffusionUNetConfig:
        return DiffusionUNetConfig(list(latent_shape), cfg.channels, cfg.layers_per_block, cfg.norm_groups,
                                   cfg.attention, cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule)

    @staticmethod
    def sampler_settings(cfg, prepared: dict) -> DDIMSettings:
        return DDIMSettings("ddim", cfg.ddim_steps, cfg.ddim_eta)

    @classmethod
    def build_model(cls, cfg, latent_shape, prepared: dict, metadata: dict) -> DiffusionUNet:
        return DiffusionUNet(cls.model_config(cfg, latent_shape, prepared), metadata)

    def loss(self, forward, model: DiffusionUNet, pos: torch.Tensor, labels=None) -> tuple[torch.Tensor, dict, bool]:
        if self.scheduler is None:
            self.scheduler = model.training_scheduler()
        steps = model.config.num_train_timesteps
        t = torch.randint(steps, (len(pos),), generator=self.gen).to(pos.device)
        eps = torch.randn(pos.shape, generator=self.gen).to(pos.device)
        per_sample = noise_prediction_loss(forward, self.scheduler, pos, t, eps)
        loss = per_sample.mean()
        early = t < steps // 2   # the less noisy half, where detail forms
        metrics = {"loss_early_t": per_sample[early].mean().item() if early.any() else float("nan"),
                   "loss_late_t": per_sample[~early].mean().item() if (~early).any() else float("nan")}
        return loss, metrics, bool(torch.isfinite(loss)) and loss.item() <= self.MAX_HEALTHY_LOSS

    def state_tensors(self) -> dict:
        return {}

    def load_state_tensors(self, tensors: dict) -> None:
        pass


OBJECTIVES = {cls.NAME: cls for cls in (ContrastiveDivergence, DenoisingScoreMatching, NoisePrediction)}
OBJECTIVE_KEYS: dict[str, set[str]] = {}   # TrainConfig key -> the objectives that read it (the rest share all)
for _cls in OBJECTIVES.values():
    for _key in _cls.KEYS:
        OBJECTIVE_KEYS.setdefault(_key, set()).add(_cls.NAME)
