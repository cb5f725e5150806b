"""A noise-conditional score network over scaled VAE latents: the energy of `noise_energy.py` with its scalar output
replaced by a direct noise prediction, trained the same way (denoising score matching, `objective: {name: dsm,
output: score}`), so that the two differ in nothing but energy vs score.

    eps(z, sigma) = sigma z / (s^2 + sigma^2) + g_theta(u, sigma),   u = z / sqrt(s^2 + sigma^2)

The energy's sigma grad_z E is sigma z / (s^2 + sigma^2) + g(u, sigma) + J_g(u, sigma)^T u: the score network keeps
the same Gaussian term (the exact score of N(0, (s^2 + sigma^2) I), so an untrained network is that Gaussian too), the
same UNet g with its last convolution started at zero, the same noise-level embedding, labels and conditioning, and
drops the Jacobian term. One evaluation is one forward instead of a forward and a backward. Without a scalar energy
it has no Metropolis corrector and no per-image energy (NaN); conditions compose its predictions (classifier-free
guidance) rather than energies.
"""

from __future__ import annotations

import torch

from ..common.config import require
from ..sampling.conditions import conditioned_energy
from ..sampling.denoisers import ScorePrediction, no_energy
from .noise_energy import NoiseConditionalEnergy, NoiseConditionalEnergyConfig


class NoiseConditionalScore(NoiseConditionalEnergy):
    CONFIG, FORMAT = NoiseConditionalEnergyConfig, "ebd.score/1"
    EVALUATION_IS_GRADIENT = False   # one forward per evaluation
    HAS_ENERGY = False

    def forward(self, z: torch.Tensor, sigma: float | torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """eps(z, sigma[, labels]), shaped like z: the noise the network sees in z."""
        sigma = torch.as_tensor(sigma, dtype=z.dtype, device=z.device).expand(len(z))
        var = (self.config.sigma_data ** 2 + sigma ** 2).view(-1, 1, 1, 1)
        u = z / var.sqrt()
        g = self.net(u, self.noise_embedding_input(sigma), class_labels=self.context(labels, len(z), z.device)).sample
        return sigma.view(-1, 1, 1, 1) * z / var + g * self.output_scale(var)

    def energy(self, z: torch.Tensor) -> torch.Tensor:
        """A score network has no energy: NaN per sample (the energy column stays, empty)."""
        return no_energy(z)

    def evaluation_forward(self, z: torch.Tensor) -> torch.Tensor:
        return self(z, self.config.sigma_min)

    def sampling_model(self, settings, conditions: list[str] | None = None):
        """Its noise prediction for the samplers; with `conditions`, the guided combination of its predictions."""
        predict = self if conditions is None else conditioned_energy(self, conditions, settings.guidance)
        return ScorePrediction(predict)

    def check_sampler(self, settings: dict) -> None:
        super().check_sampler(settings)
        require(not settings.get("mala_levels"), "a score network has no energy for a Metropolis test: set "
                "mala_levels: 0 (the MALA corrector needs an energy model)")
