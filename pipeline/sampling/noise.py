"""Randomness, one scheme for every job: image i of run seed s is chain `chain_seed(s, i)` and key `image_key(s, i)`.

A chain draws its start, every step's noise and every Metropolis test from its own torch.Generator, so chain i
depends on nothing but (s, i): whatever batch, shard, actor or job (generation, `EBDPipeline`, evaluation, the x-ray)
it runs in, it is the same chain.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch

Generators = torch.Generator | list[torch.Generator] | None  # one for the batch, or one per chain


def chain_seed(run_seed: int, index: int) -> int:
    """The seed of image `index`'s chain (its start and every step's noise) in a run seeded `run_seed`."""
    return int.from_bytes(hashlib.sha256(f"ebd-generate:{run_seed}:{index}".encode()).digest()[:8], "little") >> 1


def image_key(run_seed: int, index: int) -> str:
    """The key image `index` is written under (no dots, no separators: a safe webdataset key)."""
    return f"s{run_seed}_{index:09d}".replace("-", "m")


def chain_generators(run_seed: int, indices: Iterable[int]) -> list[torch.Generator]:
    """One CPU generator per chain (CPU generators give the same numbers whatever device the chain runs on)."""
    return [torch.Generator().manual_seed(chain_seed(run_seed, i)) for i in indices]


def randn(like: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise shaped like `like`, on its device and dtype, drawn on the generator's device (CPU
    generators keep chains reproducible on any device); with a list, row i from generator i. The same numbers as
    diffusers' `randn_tensor`, which its pipelines seed per image with (tests/test_samplers.py checks it), without
    importing diffusers (and torch._dynamo with it: 1.8 s in every Ray worker that samples)."""
    if isinstance(generator, list):
        if len(generator) == 1:
            generator = generator[0]
        else:
            return torch.cat([randn(like[i:i + 1], g) for i, g in enumerate(generator)])
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def rand(num: int, generator: Generators, device) -> torch.Tensor:
    """`num` uniforms in [0, 1), one per chain (from each chain's own generator when given a list)."""
    if isinstance(generator, list):
        return torch.cat([torch.rand(1, generator=g, device=g.device) for g in generator]).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.rand(num, generator=generator, device=gen_device).to(device)


def initial_noise(shape: tuple[int, ...], std: float, generator: Generators = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """N(0, std^2 I) of `shape`, row i from generator i when given one per chain."""
    return randn(torch.empty(shape, device=device), generator) * std
