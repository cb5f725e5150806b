"""Conditions and composition: parsing and refusals, the summed energy, and sampling in the intersection of two
conditional supports on a low-dimensional mixture whose every conditional energy is known exactly."""

from __future__ import annotations

import pytest
import torch

from pipeline.common.config import ConfigError, EbdError
from pipeline.models.noise_energy import NoiseConditionalEnergy, NoiseConditionalEnergyConfig
from pipeline.sampling.conditions import canonical, conditioned_energy, conditions_for, load_plan, parse_condition
from pipeline.sampling.core import SamplerStats, sample
from pipeline.sampling.denoisers import EnergyGradient
from pipeline.sampling.noise import initial_noise
from pipeline.sampling.settings import NoiseLevelSettings

LABELS = {"x": ["left", "right"], "y": ["down", "up"]}


class MixtureEnergy(torch.nn.Module):
    """Four Gaussians at (+-3, +-3) (std 0.3) in 2-D latents (2 x 1 x 1); label x says which side, y which half.
    E(z, sigma, labels) is the exact energy of the mixture of the components the labels allow, noised by sigma:
    what a perfectly trained conditional energy would be."""

    label_vocabulary = LABELS
    STD = 0.3

    def __init__(self):
        super().__init__()
        signs = torch.tensor([[-1, -1], [-1, 1], [1, -1], [1, 1]], dtype=torch.float32)
        self.means = 3.0 * signs
        # component c has x label index (1 + (sign_x > 0)), y label index (1 + (sign_y > 0)); 0 = not given
        self.component_labels = torch.stack([1 + (signs[:, 0] > 0).long(), 1 + (signs[:, 1] > 0).long()], 1)

    def forward(self, z, sigma, labels=None):
        var = self.STD ** 2 + float(sigma) ** 2
        d2 = (z.flatten(1)[:, None, :] - self.means[None]).pow(2).sum(-1)          # B x 4
        log_p = -d2 / (2 * var)
        if labels is not None:
            allowed = ((labels[:, None, :] == 0) | (labels[:, None, :] == self.component_labels[None])).all(-1)
            log_p = log_p.masked_fill(~allowed, float("-inf"))
        return -torch.logsumexp(log_p, 1)

    def sampling_model(self, settings, conditions=None):
        return EnergyGradient(self if conditions is None else conditioned_energy(self, conditions, settings.guidance))

    def initial_latents(self, num, settings, generator=None, device="cpu"):
        return initial_noise((num, 2, 1, 1), (1 + settings.sigma_max ** 2) ** 0.5, generator, device)


def quadrants(z: torch.Tensor) -> dict[str, float]:
    x, y = z.flatten(1).T
    near = (z.flatten(1).abs() - 3).abs().max(1).values < 1.0   # within 1 of a component's mean
    return {f"{'left' if sx < 0 else 'right'}-{'down' if sy < 0 else 'up'}":
            float(((x * sx > 0) & (y * sy > 0) & near).float().mean()) for sx in (-1, 1) for sy in (-1, 1)}


@pytest.mark.parametrize("mala_levels", [0, 4])
def test_two_conditions_added_put_the_samples_in_the_intersection_of_their_supports(mala_levels):
    model, n = MixtureEnergy(), 400
    settings = NoiseLevelSettings(levels=25, sigma_max=10.0, mala_levels=mala_levels, mala_steps=2)
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    stats = SamplerStats()
    both = sample(model, n, settings, gens, callback=stats, conditions=["x=left AND y=up"] * n)
    assert quadrants(both)["left-up"] >= 0.95          # chance: 1/4
    one = quadrants(sample(model, n, settings, gens, conditions=["x=left"] * n))
    assert one["left-up"] + one["left-down"] >= 0.95 and min(one["left-up"], one["left-down"]) >= 0.3
    # NOT pushes away from what it names: with exact Gaussian energies p(right) p(none) / p(up) peaks at y = -9, not
    # -3 (the energy difference grows without bound), and the flow from noise still leaves some chains in the
    # excluded half's local mode. So: the right side always, the excluded half far less often than without NOT.
    right = sample(model, n, settings, gens, conditions=["x=right"] * n).flatten(1)
    x, y = sample(model, n, settings, gens, conditions=["x=right AND NOT y=up"] * n).flatten(1).T
    assert float(((x - 3).abs() < 1).float().mean()) >= 0.95
    assert float((y > 0).float().mean()) <= 0.6 * float((right[:, 1] > 0).float().mean())
    if mala_levels:
        assert 0 < stats.acceptance <= 1


def test_the_composed_energy_is_the_guided_sum_chain_by_chain():
    model, z = MixtureEnergy(), torch.randn(3, 2, 1, 1)
    given = lambda x, y: model(z, 0.5, torch.tensor([[x, y]] * 3))  # noqa: E731
    energy = conditioned_energy(model, ["x=left", "x=left AND NOT y=up", "y=down"], guidance=2.0)(z, 0.5)
    none = given(0, 0)
    expected = [none + 2 * (given(1, 0) - none), none + 2 * (given(1, 0) - none) - 2 * (given(0, 2) - none),
                none + 2 * (given(0, 1) - none)]
    for i in range(3):
        assert torch.allclose(energy[i], expected[i][i], atol=1e-5)
    # one term at w = 1 is exactly the conditional energy
    assert torch.allclose(conditioned_energy(model, ["y=up"] * 3, 1.0)(z, 0.5), given(0, 2))


def test_a_conditional_energy_starts_as_the_unconditional_one_and_learns_per_field_embeddings(tmp_path):
    torch.manual_seed(0)
    config = NoiseConditionalEnergyConfig([4, 8, 8], [16, 32], sigma_max=20.0, labels={"shape": ["a", "b"],
                                                                                      "colour": ["red", "blue"]})
    model = NoiseConditionalEnergy(config)
    torch.nn.init.normal_(model.net.conv_out.weight, std=0.05)
    z = torch.randn(2, 4, 8, 8)
    assert torch.equal(model(z, 1.0), model(z, 1.0, torch.tensor([[1, 2], [2, 1]])))  # zero tables: no effect yet
    for table in model.label_embeddings.values():
        torch.nn.init.normal_(table.weight)
    assert not torch.allclose(model(z, 1.0), model(z, 1.0, torch.tensor([[1, 2], [2, 1]])))
    loaded = type(model).from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert loaded.label_vocabulary == config.labels
    assert torch.equal(loaded(z, 1.0, torch.tensor([[1, 0], [0, 2]])), model(z, 1.0, torch.tensor([[1, 0], [0, 2]])))


def test_conditions_parse_canonically_and_bad_ones_are_refused_in_one_line():
    assert canonical("shape=ring   and not background = stripes") == "shape=ring AND NOT background=stripes"
    assert [str(t) for t in parse_condition("NOT y=up")] == ["NOT y=up"]
    for bad in ("", "shape", "shape=", "=ring", "shape=ring AND"):
        with pytest.raises(ConfigError, match="condition"):
            parse_condition(bad)
    model = MixtureEnergy()
    with pytest.raises(EbdError, match="unknown label field 'colour'.*knows x, y"):
        conditioned_energy(model, ["colour=red"], 1.0)
    with pytest.raises(EbdError, match="unknown value 'middle' for x: .* knows left, right"):
        conditioned_energy(model, ["x=middle"], 1.0)


def test_a_plan_gives_each_condition_its_images_in_order():
    plan = load_plan(None, {"x=left": 3, "y=up AND x=right": 2})
    assert plan == [["x=left", 3], ["y=up AND x=right", 2]]
    assert conditions_for(plan, 0, 5) == ["x=left"] * 3 + ["y=up AND x=right"] * 2
    assert conditions_for(plan, 2, 2) == ["x=left", "y=up AND x=right"]
    with pytest.raises(ConfigError, match="integer >= 1"):
        load_plan(None, {"x=left": 0})
    with pytest.raises(ConfigError, match="listed twice"):
        load_plan(None, {"x=left": 1, "x = left": 2})
    with pytest.raises(ConfigError, match="not both"):
        load_plan("x=left", {"x=left": 1})
