"""Which shard each input of a precompute run lands in: a seeded order that depends only on the inputs (stratified by
label where labels are known), how many go to the held-out shards, and consecutive runs of `shard_size` items, the
held-out ones in shards of their own, written last. Twins (io/twins.py: one group) stay next to each other in the
order and the held-out cut falls between groups, so no held-out image has a twin in training."""

from __future__ import annotations

import hashlib

from .reading import reading_order
from .sources import Item


def shard_order(items: list[Item], seed: int, stratify: bool = True, group_of: dict[str, str] | None = None
                ) -> list[Item]:
    """The inputs in a seeded random order that depends only on (seed, source, key): listing order, and so a
    folder tree sorted by label, has no say in which shard an input lands in.

    Stratified (systematic sampling within each label): a label's n items, in their random order, sit at positions
    (i + u) / n on [0, 1), u a seeded offset per label, and all items are sorted by position. Any span of positions
    then holds each label's share of it to within one item, so a shard (the held-out one) holds every label in about
    its share of the set (off by a few items at most where many labels share a shard): a random 10% stratified by
    label, where a plain random order leaves a rare label's held-out count to chance. Items without a label at
    planning (tars: their .cls is read later) form one stratum, in plain order.

    `group_of` (key -> group) places each group of twins as one unit, in its first member's stratum. A unit's rank is
    its own (seed, group) hash, not its first member's: the lowest of a group's member ranks falls early in the order
    the larger the group, which put the large groups in the training shards and left the held-out ones to small
    groups and the labels they are common in (bench/twins.md's split table measures the label mix this order gives).
    And a unit sits at its stratum's share of images before it, (images before + u x its
    size) / the stratum's images, so any span of positions holds each label's share of the images to within one
    unit. Without groups every unit is one item at (i + u) / n, the order it always had."""
    def rank(item: Item) -> str:
        return hashlib.sha256(f"{seed}\t{item.source}\t{item.key}".encode()).hexdigest()

    units: dict[str, list[Item]] = {}
    for item in sorted(items, key=rank):
        units.setdefault(group_of.get(item.key, item.key) if group_of else item.key, []).append(item)

    def unit_rank(key: str, unit: list[Item]) -> str:
        return rank(unit[0]) if len(unit) == 1 else hashlib.sha256(f"{seed}\tgroup\t{key}".encode()).hexdigest()

    ordered = [units[k] for k in sorted(units, key=lambda k: unit_rank(k, units[k]))]
    if not stratify:
        return [item for unit in ordered for item in unit]
    strata: dict[str | None, list[list[Item]]] = {}
    for unit in ordered:
        strata.setdefault(unit[0].label, []).append(unit)
    placed = []
    for label, stratum in strata.items():
        offset = int(hashlib.sha256(f"{seed}\tstratum\t{label}".encode()).hexdigest()[:12], 16) / 16 ** 12
        total, before = sum(len(unit) for unit in stratum), 0
        for unit in stratum:
            placed.append(((before + offset * len(unit)) / total, rank(unit[0]), unit))
            before += len(unit)
    return [item for _, _, unit in sorted(placed, key=lambda p: p[:2]) for item in unit]


def held_out_count(holdout: float, max_images: int, inputs: int) -> int:
    """How many of `inputs` go to the held-out shards: `holdout` of them (at least one when holdout > 0, at most
    `max_images`), and never all of them."""
    if holdout <= 0 or inputs < 2:
        return 0
    return min(max(1, round(holdout * inputs)), max_images, inputs - 1)


def split_into_shards(items: list[Item], shard_size: int) -> list[tuple[Item, ...]]:
    """Consecutive runs of `shard_size` items; within a shard, parquet rows in file and row order, so a worker reads
    each row group once, front to back (a shuffled shard's rows would otherwise re-read their row group almost every
    time). Which items a shard holds is the shuffle's; only the order inside it changes."""
    return [tuple(sorted(items[i:i + shard_size], key=reading_order)) for i in range(0, len(items), shard_size)]


def plan_shards(items: list[Item], held_out: int, shard_size: int, group_of: dict[str, str] | None = None
                ) -> tuple[list[tuple[Item, ...]], int]:
    """The shards of `items` in order, the last `held_out` items (moved to the nearest place between two groups of
    `group_of`) cut into shards of their own after the training ones (so no shard mixes the two), and how many shards
    at the end are held out."""
    cut = group_boundary(items, len(items) - held_out, group_of) if held_out else len(items)
    held_out_chunks = split_into_shards(items[cut:], shard_size)
    return split_into_shards(items[:cut], shard_size) + held_out_chunks, len(held_out_chunks)


def group_boundary(items: list[Item], cut: int, group_of: dict[str, str] | None) -> int:
    """The place nearest `cut` (ties: the later one, which holds out fewer) where the items before and after it are
    in different groups, inside (0, len); `cut` itself without groups or where no such place exists."""
    if not group_of:
        return cut
    group = [group_of.get(item.key, item.key) for item in items]
    places = [i for i in range(1, len(items)) if group[i - 1] != group[i]]
    return min(places, key=lambda i: (abs(i - cut), -i)) if places else cut
