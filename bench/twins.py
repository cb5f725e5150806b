"""How well precompute's automatic twin grouping (pipeline/io/twins.py) finds twins, and what each `twins` setting
does to the held-out split, on a folder whose file names carry the true groups (GROUP~... names, as
`make data-emoji` writes Google's emoji: a design and its skin-tone variants).

    .venv/bin/python bench/twins.py --images build/emoji/images            # writes bench/twins.md and bench/twins.json

For each edge-map threshold: the share of true twin pairs the pixels alone put in one group (recall), the share of
the pairs they put together that are true twins, and the share of images put with an image of another true group.
For each setting of `twins` (none, names, images, auto): the split precompute plans (same seed, holdout 0.1, stratified
by folder) and the share of held-out images whose true group has an image in training. Decoding is precompute's own
(`decode_image` at 64 px); no Ray, no VAE.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.io.images import decode_image
from pipeline.io.shard_plan import held_out_count, plan_shards, shard_order
from pipeline.io.sources import plan_items
from pipeline.io.twins import SIGNATURE_SIDE, TWIN_THRESHOLD, edge_signature, group_labels, name_pairs, twin_pairs

THRESHOLDS = (0.03, 0.045, 0.06, 0.08, 0.1, 0.12, 0.15)


def agreement(found: np.ndarray, truth: np.ndarray) -> dict:
    """Pair recall, pair precision and the share of images grouped with another true group."""
    same_found, same_truth = found[:, None] == found[None, :], truth[:, None] == truth[None, :]
    upper = np.triu(np.ones_like(same_found), 1)
    twins, together = (same_truth & upper).sum(), (same_found & upper).sum()
    hits = (same_found & same_truth & upper).sum()
    return {"true_twin_pairs": int(twins), "recall": round(float(hits / max(twins, 1)), 4),
            "pair_precision": round(float(hits / max(together, 1)), 4),
            "images_merged_with_another_group": round(float((same_found & ~same_truth).any(1).mean()), 4),
            "largest_group": int(Counter(found.tolist()).most_common(1)[0][1])}


def held_out_leak(items, group_of: dict, truth_of: dict, seed: int = 0, holdout: float = 0.1) -> dict:
    """The split precompute plans with these groups: how many held-out images have a true twin in training, and how
    far the held-out images' label mix is from the whole set's (total variation)."""
    ordered = shard_order(items, seed, True, group_of)
    chunks, held_shards = plan_shards(ordered, held_out_count(holdout, 10_000, len(ordered)), 1000, group_of)
    train = [it for c in chunks[:len(chunks) - held_shards] for it in c]
    held = [it for c in chunks[len(chunks) - held_shards:] for it in c]
    train_groups = {truth_of[it.key] for it in train}
    leaked = sum(truth_of[it.key] in train_groups for it in held)
    mix, whole = Counter(it.label for it in held), Counter(it.label for it in items)
    tv = sum(abs(mix[k] / max(len(held), 1) - whole[k] / len(items)) for k in whole) / 2
    return {"held_out": len(held), "with_a_training_twin": leaked, "share": round(leaked / max(len(held), 1), 4),
            "label_tv": round(tv, 4)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default="build/emoji/images")
    p.add_argument("--output", default="bench/twins")
    p.add_argument("--also", nargs="*", default=["build/demo/images"],
                   help="image sets with no true groups: how many images the pixels put in groups")
    args = p.parse_args(argv)
    _, items = plan_items(args.images)
    items = [it for it in items if it.reject is None]
    truth_of = {it.key: it.group or it.key for it in items}
    truth = np.array([truth_of[it.key] for it in items])
    tick = time.monotonic()
    bits = np.stack([edge_signature(decode_image(Path(it.locator[1]).read_bytes(), SIGNATURE_SIDE, 10 ** 8, 1)[0])
                     for it in items])
    seconds_signatures = time.monotonic() - tick
    rows, pairs_at = [], {}
    for threshold in THRESHOLDS:
        tick = time.monotonic()
        pairs = pairs_at[threshold] = twin_pairs(bits, threshold)
        labels = group_labels(len(items), pairs)
        seconds = round(time.monotonic() - tick, 2)
        split = held_out_leak(items, {it.key: items[int(r)].key for it, r in zip(items, labels)}, truth_of)
        rows.append({"threshold": threshold, "seconds": seconds, "held_out_with_a_true_twin_in_training":
                     split["share"]} | agreement(labels, truth))
    by_name = {it.key: it.group for it in items if it.group is not None}
    by_pixels = {items[i].key: items[int(r)].key for i, r in enumerate(group_labels(len(items),
                                                                                    pairs_at[TWIN_THRESHOLD]))}
    both = group_labels(len(items), [*pairs_at[TWIN_THRESHOLD].tolist(), *name_pairs([it.group for it in items])])
    false_pairs = what_false_merges_are(items, pairs_at[TWIN_THRESHOLD], truth)
    settings = {"none": {}, "names": by_name, "images": by_pixels,
                "auto": {items[i].key: items[int(r)].key for i, r in enumerate(both)}}
    splits = {name: held_out_leak(items, group_of, truth_of) for name, group_of in settings.items()}
    result = {"images": len(items), "true_groups": len(set(truth.tolist())),
              "images_with_a_true_twin": int(sum(c for c in Counter(truth.tolist()).values() if c > 1)),
              "signature_seconds": round(seconds_signatures, 1), "default_threshold": TWIN_THRESHOLD,
              "thresholds": rows, "splits": splits, "false_pairs_at_default": false_pairs,
              "other_sets": {path: found_in(path) for path in args.also if Path(path).exists()}}
    Path(f"{args.output}.json").write_text(json.dumps(result, indent=1) + "\n")
    Path(f"{args.output}.md").write_text(render(result, args.images))
    print(render(result, args.images))


def what_false_merges_are(items, pairs: np.ndarray, truth: np.ndarray) -> dict:
    """The pairs the pixels join across two true groups, at the default threshold: how many, in which folders, and
    how many are one design in two genders (the groups' names equal once Unicode's gender signs, ZWJ + U+2640 or
    U+2642, and the man/woman/person bases U+1F468, U+1F469, U+1F9D1 are set aside)."""
    import re

    def design(group: str) -> str:
        code = group.split("_", 1)[1] if "_" in group else group
        code = re.sub(r"-200d-264[02](-fe0f)?", "", code)
        return re.sub(r"^(1f468|1f469|1f9d1)(?=-|$)", "person", code)

    false = [(int(a), int(b)) for a, b in pairs if truth[a] != truth[b]]
    folders = Counter(" / ".join(sorted({items[a].label, items[b].label})) for a, b in false)
    gendered = sum(design(truth[a]) == design(truth[b]) for a, b in false)
    return {"pairs": len(pairs), "false": len(false), "one_design_in_two_genders": int(gendered),
            "by_folder": dict(folders.most_common(6))}


def found_in(path: str) -> dict:
    """What the pixels alone group in a set with no true groups (read with precompute's own readers)."""
    from pipeline.io.reading import read_items

    _, items = plan_items(path)
    bits = np.stack([edge_signature(decode_image(loaded.data, SIGNATURE_SIDE, 10 ** 8, 1)[0])
                     for loaded in read_items([it for it in items if it.reject is None], 1 << 26)])
    sizes = Counter(group_labels(len(bits), twin_pairs(bits, TWIN_THRESHOLD)).tolist())
    grouped = sum(n for n in sizes.values() if n > 1)
    return {"images": len(bits), "images_in_groups": grouped, "share": round(grouped / len(bits), 4),
            "groups": sum(1 for n in sizes.values() if n > 1), "largest_group": max(sizes.values())}


def render(r: dict, images: str) -> str:
    lines = ["# Twins: what precompute's grouping finds, and what it does to the split", "",
             f"`.venv/bin/python bench/twins.py --images {images}` (numbers: bench/twins.json). "
             f"{r['images']} images in {r['true_groups']} true groups (the names' GROUP~... rule); "
             f"{r['images_with_a_true_twin']} images have a true twin. Edge maps of all images: "
             f"{r['signature_seconds']} s on this machine.", "",
             "## Near-twins found in the pixels alone (`twins: images`)", "",
             "| edge-map Jaccard threshold | true twin pairs found (recall) | found pairs that are true twins | "
             "images put with another true group | largest group | held-out images with a true twin in training | "
             "seconds |", "|---|---|---|---|---|---|---|"]
    for row in r["thresholds"]:
        mark = " (default)" if row["threshold"] == r["default_threshold"] else ""
        lines.append(f"| {row['threshold']}{mark} | {row['recall']:.3f} | {row['pair_precision']:.3f} | "
                     f"{row['images_merged_with_another_group']:.3f} | {row['largest_group']} | "
                     f"{row['held_out_with_a_true_twin_in_training']:.3f} | {row['seconds']} |")
    f = r["false_pairs_at_default"]
    lines += ["", f"At the default threshold {f['false']} of the {f['pairs']} pairs the pixels join are not "
              "true twins; "
              f"{f['one_design_in_two_genders']} of those are one design in two genders (the names equal but for "
              "the gender sign and the man / woman / person base: drawings that differ in the hair), and by folder: "
              + ", ".join(f"{k} {v}" for k, v in f["by_folder"].items()) + "."]
    lines += ["", "## The held-out split under each setting (seed 0, holdout 0.1, stratified by folder)", "",
              "| twins | held-out images | with a true twin in training | share | label mix: TV from the whole set's |",
              "|---|---|---|---|---|"]
    for name, split in r["splits"].items():
        lines.append(f"| {name} | {split['held_out']} | {split['with_a_training_twin']} | {split['share']:.3f} | "
                     f"{split['label_tv']:.3f} |")
    if r.get("other_sets"):
        lines += ["", f"## Other sets, no true groups known (`twins: images`, threshold {r['default_threshold']})", "",
                  "| set | images | in a group of twins | share | groups | largest |", "|---|---|---|---|---|---|"]
        for path, o in r["other_sets"].items():
            lines.append(f"| {path} | {o['images']} | {o['images_in_groups']} | {o['share']:.3f} | {o['groups']} | "
                         f"{o['largest_group']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
