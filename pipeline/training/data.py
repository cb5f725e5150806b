"""Training data: each worker's disjoint share of the latent shards, as endless shuffled batches of positives (and
their labels), with the combinations a config leaves out skipped."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from ..io import latent_shards as sh


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

    def __init__(self, paths: list[str], batch_size: int, seed: int, *, use_moments: bool, data_noise: float,
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
