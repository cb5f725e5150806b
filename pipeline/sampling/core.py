"""The one sampling core: (model, image indices, run seed, sampler settings, conditions) -> latents.

    samples = sample_latents(model, range(0, 16), seed=0, settings=model.sampler)
    samples.latents, samples.energies, samples.evaluations_per_chain

Generation's sampler actors, `EBDPipeline`, evaluation's baselines and the x-ray all call it, so image i of seed s
is the same chain everywhere (`noise.chain_seed`), conditions work everywhere, and nothing outside this package
knows which sampler or model kind it runs. Chains are processed in chunks of `batch_size`: a chunk that runs out of
memory is retried at half the size (`common.memory.run_in_chunks`), and a fixed batch size gives byte-identical
results on a re-run (float rounding depends on the batch's shape, not on the other chains' values).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..common.config import EbdError
from ..common.memory import run_in_chunks
from ..common.precision import exact_float32, precision_context
from .noise import chain_generators, chain_seed
from .samplers import SAMPLERS


@dataclass
class Samples:
    latents: torch.Tensor               # (N, C, h, w) float32, in the order of the indices asked for
    energies: torch.Tensor              # (N,) the energy each image is recorded with (NaN for a model without one)
    seeds: list[int]                    # each chain's seed
    evaluations: int = 0                # network evaluations, summed over chains
    accepted: int = 0                   # Metropolis acceptances (MALA corrector), summed over chains
    proposed: int = 0
    chunk_sizes: list[int] = field(default_factory=list)
    chunk_seconds: list[float] = field(default_factory=list)

    @property
    def evaluations_per_chain(self) -> float:
        return self.evaluations / max(1, len(self.latents))


class SamplerStats:
    """A callback that counts network evaluations and Metropolis acceptances (of one batch of chains)."""

    def __init__(self, then: Callable[[dict], None] | None = None):
        self.evaluations, self.chains, self.accepted, self.proposed = 0, 0, 0, 0
        self.then = then

    def __call__(self, info: dict) -> None:
        self.chains = max(self.chains, len(info["z"]))
        self.evaluations += 1
        if "accepted" in info:
            self.accepted += int(info["accepted"].sum())
            self.proposed += len(info["accepted"])
        if self.then is not None:
            self.then(info)

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None


def sample_latents(model, indices: Sequence[int], seed: int | Sequence[int], settings,
                   conditions: Sequence[str] | None = None,
                   batch_size: int | None = None, callback: Callable[[dict], None] | None = None, *,
                   device: torch.device | str = "cpu",
                   on_chunk: Callable[[int, float], None] | None = None, precision: str = "float32",
                   chunks: list[int] | None = None, on_oom: Callable[[int], None] | None = None) -> Samples:
    """The latents of images `indices` of run `seed`: the model's own chain starts, then the sampler `settings`
    names, on the model's energy or, with `conditions` (one per image), on the energy it composes for them.
    `callback` sees every evaluation; `on_chunk(size, seconds)` every finished chunk; `on_oom(size)` every halving
    after an out-of-memory. `seed` may also be one run seed per image. `precision`, already resolved for `device`
    (`common.precision.resolve_precision`; "auto" is refused): "bfloat16" / "float16" run the network under
    autocast (the chains stay float32, and the recorded energies are computed in float32 afterwards); "float32" is
    exact on CUDA too (no TF32). Chains on one device type, precision and cut into chunks (`batch_size`, or exactly
    the sizes `chunks` lists) are reproducible; across them they differ by floating-point rounding. Chains that end
    non-finite raise EbdError: they never reach a decoder."""
    indices = list(indices)
    run_seeds = [seed] * len(indices) if isinstance(seed, int) else list(seed)
    if len(run_seeds) != len(indices):
        raise ValueError(f"{len(run_seeds)} run seeds for {len(indices)} images")
    seeds = [chain_seed(s, i) for s, i in zip(run_seeds, indices)]
    totals = {"evaluations": 0, "accepted": 0, "proposed": 0}
    seconds: list[float] = []

    def work(a: int, b: int):
        tick = time.perf_counter()
        chunk = list(conditions[a:b]) if conditions is not None else None
        gens = [torch.Generator().manual_seed(s) for s in seeds[a:b]]  # fresh: a chunk retried after OOM starts over
        stats = SamplerStats(callback)
        with precision_context(device, precision):
            z = sample(model, b - a, settings, gens, stats, chunk, device)
        bad = int((~torch.isfinite(z.flatten(1)).all(1)).sum())
        if bad:
            raise EbdError(f"{bad} of {b - a} chains (images {indices[a]}..{indices[b - 1]}) ended non-finite under "
                           f"{precision} on {torch.device(device).type}: nothing of them "
                           "is decoded; sample in float32 (sampler_precision), with more levels, or check the model")
        with torch.no_grad(), exact_float32(device, "float32"):  # the recorded energy: float32, whatever sampled
            energy = model.energy(z.float())
        seconds.append(time.perf_counter() - tick)
        if on_chunk is not None:
            on_chunk(b - a, seconds[-1])
        return z, energy, stats

    results, sizes = run_in_chunks(len(indices), batch_size or max(1, len(indices)), work, on_oom, chunks)
    for (_, _, stats), n in zip(results, sizes):
        totals["evaluations"] += stats.evaluations * n
        totals["accepted"] += stats.accepted
        totals["proposed"] += stats.proposed
    latents = torch.cat([c[0] for c in results]) if results else torch.empty(0)
    energies = torch.cat([c[1] for c in results]) if results else torch.empty(0)
    return Samples(latents.float(), energies.float(), seeds, chunk_sizes=sizes, chunk_seconds=seconds, **totals)


def sample(model, num: int, settings, generator=None, callback: Callable[[dict], None] | None = None,
           conditions: Sequence[str] | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """`num` latents from fresh chains drawn from `generator` (one, or one per chain): the model's own starts, then
    the sampler `settings` names on the model (or on the energy it composes for `conditions`, one per chain)."""
    z0 = model.initial_latents(num, settings, generator, device)
    wrapped = model.sampling_model(settings, list(conditions) if conditions is not None else None)
    return SAMPLERS[settings.name](wrapped, z0, settings, generator, callback)


def chain_starts(model, indices: Sequence[int], seed: int, settings, device: torch.device | str = "cpu"):
    """Where images `indices` of run `seed` start (the model's starts, from the chains' own generators), no step
    taken: what evaluation compares the samples with to show what the sampler added."""
    indices = list(indices)
    return model.initial_latents(len(indices), settings, chain_generators(seed, indices), device)
