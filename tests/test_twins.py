"""Twins stay on one side of the held-out split: the name rule, a group column, near-twins found in the pixels
(io/twins.py), the planned order and cut (io/shard_plan.py), and the precompute job on a real Ray cluster."""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from pipeline.common.config import from_dict
from pipeline.io.latent_shards import iter_latents, shard_paths
from pipeline.io.shard_plan import held_out_count, plan_shards, shard_order
from pipeline.io.sources import Item, plan_items
from pipeline.io.twins import edge_signature, group_labels, twin_pairs
from pipeline.vae.precompute import PrecomputeConfig, run_precompute


def drawing(design: int, colour: int, side: int = 64) -> Image.Image:
    """Design `design` (a few shapes at seeded places) filled with palette `colour`: recolours of one design are
    twins, other designs are not."""
    shapes, palette = random.Random(design), random.Random(1000 + colour)
    img = Image.new("RGB", (side, side), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x, y = shapes.randrange(4, side - 28), shapes.randrange(4, side - 28)
        w, h = shapes.randrange(10, 24), shapes.randrange(10, 24)
        fill = tuple(palette.randrange(0, 200) for _ in range(3))
        (draw.ellipse if shapes.random() < 0.5 else draw.rectangle)((x, y, x + w, y + h), fill=fill, outline=(0, 0, 0))
    return img


def png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def signature(img: Image.Image) -> np.ndarray:
    return edge_signature(np.asarray(img.convert("RGB").resize((64, 64))))


def test_recoloured_and_re_encoded_copies_are_twins_and_other_designs_are_not():
    designs = [[signature(drawing(d, c)) for c in range(3)] for d in range(20)]
    designs[0].append(signature(Image.open(io.BytesIO(png(drawing(0, 7), "JPEG")))))  # recoloured and re-encoded
    bits = np.stack([s for design in designs for s in design])
    owner = np.array([d for d, design in enumerate(designs) for _ in design])
    pairs = twin_pairs(bits)
    assert len(pairs) and all(owner[a] == owner[b] for a, b in pairs)  # never two designs
    labels = group_labels(len(bits), pairs)
    assert all(len(set(labels[owner == d])) == 1 for d in range(20))  # every design's copies found
    assert len(set(labels.tolist())) == 20


def test_group_labels_are_connected_components():
    assert group_labels(6, [(4, 5), (0, 2), (2, 4)]).tolist() == [0, 1, 0, 3, 0, 0]
    assert group_labels(3, []).tolist() == [0, 1, 2]


def test_the_name_rule_and_a_parquet_group_column(tmp_path):
    root = tmp_path / "folder"
    for name in ("cats/a.png", "cats/a~1.png", "dogs/a~2.png", "dogs/b.png", "cats/~x.png", "c~.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(png(drawing(0, 0)))
    _, items = plan_items(root)
    groups = {it.source: it.group for it in items}
    assert groups == {"cats/a.png": "a", "cats/a~1.png": "a", "dogs/a~2.png": "a", "dogs/b.png": None,
                      "cats/~x.png": None, "c~.png": "c"}  # no name before the ~: no group
    table = pa.table({"image": [png(drawing(i, 0)) for i in range(4)], "group": ["x", None, "x", "../../etc"]})
    pq.write_table(table, tmp_path / "rows.parquet")
    _, rows = plan_items(tmp_path / "rows.parquet")
    assert [it.group for it in rows] == ["x", None, "x", "../../etc"]  # a string, never a path


def test_groups_stay_on_one_side_of_the_split_and_the_split_stays_stratified():
    rng = random.Random(0)
    items, group_of = [], {}
    for g in range(300):
        label = "rare" if g % 10 == 0 else "common"
        for i in range(rng.choice([1, 1, 1, 2, 5, 25])):
            items.append(Item(f"{label}/{g}-{i}.png", f"g{g}i{i}", label, ("file", "x")))
            group_of[f"g{g}i{i}"] = f"g{g}"
    held = held_out_count(0.1, 10_000, len(items))
    order = shard_order(items, 0, True, group_of)
    assert sorted(it.key for it in order) == sorted(it.key for it in items)
    chunks, held_shards = plan_shards(order, held, 50, group_of)
    train = [it for c in chunks[:len(chunks) - held_shards] for it in c]
    held_out = [it for c in chunks[len(chunks) - held_shards:] for it in c]
    assert not {group_of[it.key] for it in train} & {group_of[it.key] for it in held_out}
    assert abs(len(held_out) - held) <= 25  # moved to the nearest group boundary
    share = Counter(it.label for it in held_out)["rare"] / len(held_out)
    assert abs(share - Counter(it.label for it in items)["rare"] / len(items)) < 0.06
    # without groups the same items are split by image, and groups straddle the cut
    plain, plain_held = plan_shards(shard_order(items, 0, True), held, 50)
    before = {group_of[it.key] for c in plain[:len(plain) - plain_held] for it in c}
    assert before & {group_of[it.key] for c in plain[len(plain) - plain_held:] for it in c}


def test_large_groups_are_held_out_as_often_as_small_ones_and_labels_keep_their_share_of_images():
    """As Google's emoji by design: one label of large groups (skin-tone families of up to 26), the others mostly
    single images. The held-out 10% holds each label's share of the images, and of the large groups' images as many as
    they make of the set; ranked by their first member, large groups fell early and were never held out."""
    rng = random.Random(3)
    items, group_of = [], {}
    for g in range(700):
        label, size = ("people", rng.choice([1, 6, 26])) if g < 200 else (rng.choice(["flags", "food"]), 1)
        for i in range(size):
            items.append(Item(f"{label}/{g}-{i}.png", f"g{g}i{i}", label, ("file", "x")))
            group_of[f"g{g}i{i}"] = f"g{g}"
    sizes = Counter(group_of.values())
    held = held_out_count(0.1, 10_000, len(items))
    for seed in range(4):
        chunks, held_shards = plan_shards(shard_order(items, seed, True, group_of), held, 100, group_of)
        held_out = [it for c in chunks[len(chunks) - held_shards:] for it in c]
        for label in ("people", "flags", "food"):
            share = sum(it.label == label for it in held_out) / len(held_out)
            assert abs(share - sum(it.label == label for it in items) / len(items)) < 0.08, (seed, label, share)
        in_large = sum(sizes[group_of[it.key]] == 26 for it in held_out) / len(held_out)
        assert abs(in_large - sum(sizes[group_of[it.key]] == 26 for it in items) / len(items)) < 0.2, (seed, in_large)


@pytest.fixture(scope="module")
def recoloured_folder(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """40 designs, each drawn in 1-4 colours, under names that say nothing: only the pixels tell twins apart."""
    root = tmp_path_factory.mktemp("twins")
    design_of, rng = {}, random.Random(1)
    for d in range(40):
        for c in range(rng.choice([1, 2, 4])):
            name = f"{rng.getrandbits(40):010x}"
            (root / f"{name}.png").write_bytes(png(drawing(d, c)))
            design_of[name] = d
    return root, design_of


def _precompute(folder: Path, vae: Path, out: Path, **overrides) -> dict:
    cfg = from_dict(PrecomputeConfig, dict(input=str(folder), vae=str(vae), output=str(out), resolution=16,
                                           shard_size=16, batch_size=8, min_side=8, progress_interval_s=0.0,
                                           holdout=0.25) | overrides)
    return run_precompute(cfg)


def _sides(out: Path, manifest: dict) -> tuple[list[dict], list[dict]]:
    held = set(manifest["held_out"]["files"])
    rows = {Path(p).name: [r["meta"] for r in iter_latents([p])] for p in shard_paths(out)}
    return ([m for f, r in rows.items() if f not in held for m in r], [m for f, r in rows.items() if f in held
                                                                      for m in r])


def test_precompute_holds_out_whole_groups_it_found_in_the_pixels(ray_cluster, sd_checkpoint, recoloured_folder,
                                                                   tmp_path):
    folder, design_of = recoloured_folder
    manifest = _precompute(folder, sd_checkpoint, tmp_path / "grouped")
    train, held = _sides(tmp_path / "grouped", manifest)
    design = lambda meta: design_of[Path(meta["source"]).stem]  # noqa: E731
    assert held and not {design(m) for m in train} & {design(m) for m in held}
    assert manifest["twins"]["held_out_with_a_training_twin"] == 0 and manifest["twins"]["source"] == "auto"
    for meta in train + held:  # every latent with a twin records its group; groups are the designs
        twins = [m for m in train + held if design(m) == design(meta) and m is not meta]
        assert ("group" in meta) == bool(twins)
        assert all(m["group"] == meta["group"] for m in twins)
    kept = json.loads((tmp_path / "grouped" / "twins.json").read_text())
    assert kept["pairs"] and kept["settings"]["threshold"] == 0.1

    again = _precompute(folder, sd_checkpoint, tmp_path / "grouped")  # a resume plans the same split
    assert again["shards"] == manifest["shards"]

    off = _precompute(folder, sd_checkpoint, tmp_path / "by-image", twins="none")  # the split of old: twins leak
    train, held = _sides(tmp_path / "by-image", off)
    assert {design(m) for m in train} & {design(m) for m in held} and "twins" not in off
