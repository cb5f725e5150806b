"""Precompute's grouping pass: which inputs are twins (io/twins.py), found before the split so that the held-out
shards never share a group with training.

`twins` (PrecomputeConfig) says where groups come from:
    auto     the inputs' own group keys (GROUP~... names, a parquet group column) joined with near-twins found in the
             pixels: the default, for any folder of images
    names    the inputs' group keys alone
    images   near-twins found in the pixels alone
    none     every image its own group (the split of earlier versions)

The pixel pass is one Ray task per `TASK_ITEMS` inputs: each reads and decodes its inputs under the job's byte and
time budgets (a reject has no signature and stays alone) and returns 512 bytes an image; the driver compares them all
(`twins.twin_pairs`). Its result is kept in OUT/twins.json, so a resumed run plans the same split without decoding
again.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np

from ..io import storage
from ..io.files import read_json
from ..io.images import Rejected, decode_image
from ..io.reading import read_items
from ..io.sources import Item
from ..io.twins import SIGNATURE_SIDE, edge_signature, group_labels, name_pairs, twin_pairs

TWINS_FILE = "twins.json"
TASK_ITEMS = 512


def signatures(items: tuple[Item, ...], budgets: dict) -> list[bytes | None]:
    """Each item's packed edge map (None for an input that does not decode within the budgets)."""
    out: list[bytes | None] = []
    for loaded in read_items(list(items), budgets["max_file_bytes"]):
        try:
            if loaded.reject:
                raise Rejected(*loaded.reject)
            pixels, _ = decode_image(loaded.data, SIGNATURE_SIDE, budgets["max_pixels"], budgets["min_side"],
                                     budgets["image_formats"], budgets["max_decode_bytes"],
                                     budgets["max_decode_seconds"])
        except Rejected:
            out.append(None)
            continue
        out.append(edge_signature(pixels).tobytes())
    return out


def find_groups(items: list[Item], source: str, threshold: float, budgets: dict, out: str,
                num_cpus: float = 1.0) -> tuple[dict[str, str], dict, dict | None]:
    """(key -> group for every item in a group of two or more, a summary for the manifest, and what to keep in
    OUT/twins.json once the folder is claimed: None when it already holds this pass's result)."""
    names = name_pairs([item.group for item in items]) if source in ("auto", "names") else []
    pairs, record = [], None
    if source in ("auto", "images"):
        pairs, record = _pixel_pairs(items, threshold, budgets, out, num_cpus)
    index = {item.key: i for i, item in enumerate(items)}
    labels = group_labels(len(items), [*names, *((index[a], index[b]) for a, b in pairs)])
    sizes = Counter(labels.tolist())
    group_of = {item.key: items[labels[i]].key for i, item in enumerate(items) if sizes[labels[i]] > 1}
    summary = {"source": source, "threshold": threshold if source in ("auto", "images") else None,
               "pairs_by_name": len(names), "pairs_by_pixels": len(pairs),
               "groups": sum(1 for n in sizes.values() if n > 1), "images_in_groups": len(group_of),
               "largest_group": max(sizes.values(), default=0)}
    return group_of, summary, record


def _pixel_pairs(items: list[Item], threshold: float, budgets: dict, out: str,
                 num_cpus: float) -> tuple[list[list[str]], dict | None]:
    """Near-twin pairs (as keys), from OUT/twins.json when it was made for these inputs and settings, and the record
    to keep there (None when it came from there)."""
    identity = hashlib.sha256("\n".join(f"{it.source}\t{it.key}" for it in items).encode()).hexdigest()
    settings = {"inputs_sha256": identity, "threshold": threshold, "signature_side": SIGNATURE_SIDE,
                "budgets": {k: list(v) if isinstance(v, tuple) else v for k, v in budgets.items()}}
    path = storage.join(out, TWINS_FILE)
    if storage.is_file(path):
        try:
            kept = read_json(path)
        except ValueError:
            kept = None
        if isinstance(kept, dict) and kept.get("settings") == settings and isinstance(kept.get("pairs"), list):
            known = {item.key for item in items}
            if all(isinstance(p, list) and len(p) == 2 and p[0] in known and p[1] in known for p in kept["pairs"]):
                return kept["pairs"], None
    import ray
    task = ray.remote(signatures).options(num_cpus=num_cpus, max_retries=3)
    chunks = [tuple(items[i:i + TASK_ITEMS]) for i in range(0, len(items), TASK_ITEMS)]
    found = [s for part in ray.get([task.remote(chunk, budgets) for chunk in chunks]) for s in part]
    decoded = [i for i, s in enumerate(found) if s is not None]
    bits = np.frombuffer(b"".join(found[i] for i in decoded), dtype=np.uint8).reshape(len(decoded), -1) \
        if decoded else np.zeros((0, SIGNATURE_SIDE ** 2 // 8), dtype=np.uint8)
    pairs = [[items[decoded[a]].key, items[decoded[b]].key] for a, b in twin_pairs(bits, threshold).tolist()]
    return pairs, {"settings": settings, "pairs": pairs}


def held_out_with_a_training_twin(chunks: list[tuple[Item, ...]], held_out_shards: int) -> int:
    """Held-out inputs whose group has a member in training (0 unless one group is larger than a side)."""
    cut = len(chunks) - held_out_shards
    training = {item.group for chunk in chunks[:cut] for item in chunk if item.group is not None}
    return sum(item.group in training for chunk in chunks[cut:] for item in chunk if item.group is not None)


def decode_budgets(cfg) -> dict:
    """What one input may cost to read and decode (the grouping pass decodes under the same bounds)."""
    return {"max_file_bytes": cfg.max_file_bytes, "max_pixels": cfg.max_pixels, "min_side": cfg.min_side,
            "image_formats": tuple(f.upper() for f in cfg.image_formats), "max_decode_bytes": cfg.max_decode_bytes,
            "max_decode_seconds": cfg.max_decode_seconds}
