"""The precompute job on a real local Ray cluster, real files and a tiny VAE loaded with from_pretrained."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.common.config import ConfigError, EbdError, from_dict
from pipeline.io import latent_shards as sh
from pipeline.io.files import file_sha256
from pipeline.io.images import decode_image, to_model_input
from pipeline.io.latent_shards import iter_latents, read_manifest, shard_paths
from pipeline.vae.autoencoder import image_seed, load_vae, resolve_vae
from pipeline.vae.precompute import PrecomputeConfig, run_precompute
from tests.conftest import encode_image, png_header_only, rgb_image

RES = 16  # the tiny VAE downsamples by 2: latents are 4 x 8 x 8
KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def precompute(input, vae, out, **overrides) -> dict:
    cfg = from_dict(PrecomputeConfig, dict(input=str(input), vae=str(vae), output=str(out), resolution=RES,
                                           shard_size=4, batch_size=3, min_side=8, progress_interval_s=0.0,
                                           holdout=0.0)  # shard layouts below count every input; the split: its test
                    | overrides)
    return run_precompute(cfg)


def tar_digests(folder: Path) -> dict[str, str]:
    return {Path(p).name: file_sha256(p) for p in shard_paths(folder)}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Two labelled classes of good images in several formats, plus one of every kind of bad input."""
    root = tmp_path_factory.mktemp("folder")
    for label, fmt, ext in (("cats", "PNG", "png"), ("cats", "JPEG", "jpg"), ("dogs", "WEBP", "webp"),
                            ("dogs", "BMP", "bmp"), ("dogs", "GIF", "gif")):
        (root / label).mkdir(exist_ok=True)
        for i in range(2):
            (root / label / f"img.{i}.{ext}").write_bytes(encode_image(rgb_image(hash((label, ext, i)) % 1000), fmt))
    (root / "unlabelled.png").write_bytes(encode_image(rgb_image(7), "PNG"))
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.jpg").write_bytes(b"not an image at all")
    (bad / "truncated.jpg").write_bytes(encode_image(rgb_image(8, (64, 64)), "JPEG")[:300])
    (bad / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    (bad / "tiny.png").write_bytes(encode_image(rgb_image(9, (4, 4)), "PNG"))
    (bad / "notes.txt").write_text("a stray file")
    (root / ".hidden.png").write_bytes(encode_image(rgb_image(10), "PNG"))  # hidden files are not inputs
    return root


GOOD_IN_FOLDER = 11
BAD_REASONS = {"empty_file", "not_an_image", "corrupt_image", "too_many_pixels", "too_small",
               "unsupported_extension"}


@pytest.fixture(scope="module")
def folder_run(ray_cluster, image_folder, sd_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "latents"
    return out, precompute(image_folder, sd_checkpoint, out, store_moments=True)


def test_folder_tree_encodes_every_good_image_and_records_every_bad_one(folder_run):
    out, manifest = folder_run
    assert manifest["totals"] == {"seen": GOOD_IN_FOLDER + len(BAD_REASONS), "encoded": GOOD_IN_FOLDER,
                                  "rejected": len(BAD_REASONS), "shards": 5}
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert {r["reason"] for r in rejects} == BAD_REASONS
    assert all(r["source"].startswith("bad/") for r in rejects)
    assert manifest["rejects_by_reason"] == {reason: 1 for reason in BAD_REASONS}
    assert manifest["labels"] == {"cats": 4, "dogs": 6}

    samples = list(iter_latents(shard_paths(out)))
    assert len(samples) == GOOD_IN_FOLDER == sum(s["count"] for s in manifest["shards"])
    keys = [s["key"] for s in samples]
    assert len(set(keys)) == len(keys) and all(KEY_RE.match(k) for k in keys)
    assert all(s["latent"].shape == (4, RES // 2, RES // 2) for s in samples)
    assert all(s["moments"].shape == (2, 4, RES // 2, RES // 2) for s in samples)
    by_source = {s["meta"]["source"]: s["meta"] for s in samples}
    assert by_source["cats/img.0.png"]["label"] == "cats" and "label" not in by_source["unlabelled.png"]
    assert by_source["cats/img.0.png"]["original_size"] == [24, 20]


def test_manifest_describes_vae_latents_and_shards(folder_run, sd_checkpoint):
    out, _ = folder_run
    manifest = read_manifest(out)
    assert manifest["scaling_factor"] == pytest.approx(0.18215)
    assert manifest["vae"]["subfolder"] == "vae" and len(manifest["vae"]["weights_sha256"]) == 64
    assert manifest["latent"]["shape"] == [4, 8, 8] and manifest["latent"]["dtype"] == "float16"
    for shard in manifest["shards"]:
        assert file_sha256(out / shard["file"]) == shard["sha256"]


def test_latents_equal_a_direct_vae_encode_with_the_same_seed(folder_run, image_folder, sd_checkpoint):
    out, manifest = folder_run
    vae = load_vae(resolve_vae(sd_checkpoint), torch.device("cpu"), torch.float32)
    for sample in list(iter_latents(shard_paths(out)))[:4]:
        pixels, _ = decode_image((image_folder / sample["meta"]["source"]).read_bytes(), RES, 10**8, 8)
        x = torch.from_numpy(to_model_input(pixels))[None]
        dist = vae.encode(x).latent_dist
        seed = image_seed(manifest["seed"], sample["key"])
        assert sample["meta"]["seed"] == seed
        expected = dist.sample(generator=torch.Generator().manual_seed(seed)) * vae.config.scaling_factor
        np.testing.assert_allclose(sample["latent"], expected[0].numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(sample["moments"][0], (dist.mean * vae.config.scaling_factor)[0].numpy(),
                                   rtol=2e-3, atol=2e-3)


def test_each_worker_process_loads_the_vae_once(folder_run):
    out, manifest = folder_run
    stats = [json.loads(p.read_text()) for p in sorted((out / "stats").glob("*.json"))]
    assert len(stats) == manifest["totals"]["shards"] > 2  # more shards than the cluster's 2 CPUs
    assert {s["worker"]["vae_loads_in_process"] for s in stats} == {1}


def test_shards_read_back_with_webdataset_and_ray_data(folder_run):
    import ray
    import webdataset as wds

    out, manifest = folder_run
    via_wds = list(wds.WebDataset(shard_paths(out), shardshuffle=False).decode())
    assert len(via_wds) == GOOD_IN_FOLDER and via_wds[0]["latent.npy"].dtype == np.float16

    ds = ray.data.read_webdataset(str(out), file_extensions=["tar"])
    rows = ds.take_all()
    assert len(rows) == GOOD_IN_FOLDER
    assert {"__key__", "latent.npy", "json"} <= set(rows[0])
    assert np.asarray(rows[0]["latent.npy"]).shape == (4, 8, 8)


def test_rerun_after_losing_a_shard_redoes_only_that_shard_byte_identically(folder_run, image_folder,
                                                                            sd_checkpoint):
    out, _ = folder_run
    before = tar_digests(out)
    kept_marker = out / "stats" / "latents-000000.json"
    kept_mtime = kept_marker.stat().st_mtime_ns
    (out / "latents-000002.tar").unlink()
    manifest = precompute(image_folder, sd_checkpoint, out, store_moments=True)
    assert tar_digests(out) == before
    assert kept_marker.stat().st_mtime_ns == kept_mtime  # complete shards were skipped, not rewritten
    assert manifest["totals"]["encoded"] == GOOD_IN_FOLDER


def test_full_rerun_into_an_empty_folder_is_byte_identical(folder_run, image_folder, sd_checkpoint, tmp_path):
    out, _ = folder_run
    precompute(image_folder, sd_checkpoint, tmp_path / "again", store_moments=True)
    assert tar_digests(tmp_path / "again") == tar_digests(out)


def test_resuming_with_a_different_config_is_refused(folder_run, image_folder, sd_checkpoint):
    out, _ = folder_run
    before = tar_digests(out)
    for change in ({"seed": 1}, {"batch_size": 2}):
        with pytest.raises(EbdError, match="different config"):
            precompute(image_folder, sd_checkpoint, out, store_moments=True, **change)
    assert tar_digests(out) == before


def test_webdataset_tars_with_hostile_keys_labels_from_cls_and_json(ray_cluster, vae_only_dir, tmp_path):
    shards = tmp_path / "in"
    shards.mkdir()

    def add(tar, name, data: bytes):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(shards / "00000.tar", "w") as tar:
        add(tar, "000001.jpg", encode_image(rgb_image(1), "JPEG"))
        add(tar, "000001.cls", b"7")
        add(tar, "000001.txt", b"a caption")
        add(tar, "000002.png", encode_image(rgb_image(2), "PNG"))
        add(tar, "000002.json", json.dumps({"label": "dog", "url": "http://x"}).encode())
        add(tar, "../../escape.webp", encode_image(rgb_image(3), "WEBP"))
        add(tar, "only_text.txt", b"no image in this sample")
    with tarfile.open(shards / "00001.tar", "w") as tar:
        add(tar, "000001.jpg", encode_image(rgb_image(4), "JPEG"))  # same key as in the first tar
        add(tar, "000003.jpg", encode_image(rgb_image(5, (64, 64)), "JPEG")[:300])

    out = tmp_path / "out"
    manifest = precompute(shards, vae_only_dir, out)
    assert manifest["input"]["format"] == "webdataset" and manifest["vae"]["subfolder"] is None
    assert manifest["totals"] == {"seen": 6, "encoded": 3, "rejected": 3, "shards": 2}
    assert manifest["rejects_by_reason"] == {"corrupt_image": 1, "no_image_member": 1, "unsafe_member_name": 1}
    samples = {s["meta"]["source"]: s for s in iter_latents(shard_paths(out))}
    assert samples["00000.tar::000001"]["meta"]["label"] == "7"
    assert samples["00000.tar::000002"]["meta"]["label"] == "dog"
    keys = [s["key"] for s in samples.values()]
    assert len(set(keys)) == 3 and all(KEY_RE.match(k) for k in keys)
    with tarfile.open(out / "latents-000000.tar") as tar:
        assert all("/" not in n and ".." not in n.split(".")[0] for n in tar.getnames())
    assert sorted(p.name for p in out.iterdir()) == ["latents-000000.tar", "latents-000001.tar",
                                                     "manifest.json", "rejects.jsonl", "run.json", "stats"]


def test_parquet_with_binary_and_huggingface_struct_columns(ray_cluster, sd_checkpoint, tmp_path):
    images = [encode_image(rgb_image(i), "PNG") for i in range(5)]
    data = tmp_path / "in"
    data.mkdir()
    pq.write_table(pa.table({"id": ["a/1", "a.2", "a_3"], "jpg": images[:3], "label": ["x", "y", None]}),
                   data / "part-0.parquet")
    struct = pa.array([{"bytes": images[3], "path": "p.png"}, {"bytes": None, "path": "q.png"},
                       {"bytes": images[4], "path": "r.png"}],
                      type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"id": ["b1", "b2", "b3"], "jpg": struct}), data / "part-1.parquet", row_group_size=2)

    out = tmp_path / "out"
    manifest = precompute(data, sd_checkpoint, out, key_column="id", image_column="jpg", shard_size=10)
    assert manifest["input"]["format"] == "parquet"
    assert manifest["totals"] == {"seen": 6, "encoded": 5, "rejected": 1, "shards": 1}
    assert manifest["rejects_by_reason"] == {"missing_bytes": 1}
    assert manifest["labels"] == {"x": 1, "y": 1}
    keys = sorted(s["key"] for s in iter_latents(shard_paths(out)))
    assert keys == ["a_1", "a_2", "a_3", "b1", "b3"]


def test_resolution_must_divide_by_the_vae_downscale_factor(sd_checkpoint, image_folder, tmp_path):
    with pytest.raises(ConfigError, match="multiple of the VAE's downscale factor 2"):
        precompute(image_folder, sd_checkpoint, tmp_path / "out", resolution=15)
    assert not (tmp_path / "out").exists()


def test_a_folder_sorted_by_label_gives_held_out_shards_with_the_whole_sets_label_histogram(ray_cluster,
                                                                                            sd_checkpoint, tmp_path):
    """Folder trees are listed label by label; without the seeded shard order the last shard (training's held-out
    set) would hold only the last labels."""
    labels = ("ant", "bee", "cat", "dog")
    for index, label in enumerate(labels):
        (tmp_path / "in" / label).mkdir(parents=True)
        for i in range(40):
            (tmp_path / "in" / label / f"{i:03d}.png").write_bytes(encode_image(rgb_image(100 * index + i), "PNG"))
    manifest = precompute(tmp_path / "in", sd_checkpoint, tmp_path / "out", shard_size=40)
    assert manifest["order"] == "shuffled" and manifest["stratified_by_label"] and manifest["totals"]["encoded"] == 160
    for shard in shard_paths(tmp_path / "out"):  # stratified: every shard, the held-out one too, 10 of each label
        assert Counter(r["meta"]["label"] for r in iter_latents([shard])) == dict.fromkeys(labels, 10)
    keys = [r["key"] for r in iter_latents(shard_paths(tmp_path / "out"))]
    assert sorted(keys) != keys and len(set(keys)) == 160  # every input once, not in listing order

    # the default split: 10% of each label (4 of 40) in a held-out shard written last, listed in the manifest
    split = precompute(tmp_path / "in", sd_checkpoint, tmp_path / "split", shard_size=40, holdout=0.1)
    assert [s["count"] for s in split["shards"]] == [40, 40, 40, 24, 16]
    assert split["held_out"] == {"share": 0.1, "files": ["latents-000004.tar"], "images": 16}
    held = [r["meta"]["label"] for r in iter_latents(shard_paths(tmp_path / "split")[-1:])]
    assert Counter(held) == dict.fromkeys(labels, 4)
    assert sh.split_held_out(split, "auto") == ([f"latents-00000{i}.tar" for i in range(4)], ["latents-000004.tar"])
    assert sh.split_held_out(split, 2)[1] == ["latents-000003.tar", "latents-000004.tar"]
    with pytest.raises(EbdError, match="holdout_shards=5 leaves no shard to train on"):
        sh.split_held_out(split, 5)  # not the last 5 - 5 = 0 shards, nor any count from the front
    assert sh.split_held_out(manifest, "auto")[1] == []  # holdout: 0 recorded: nothing held out
    older = {k: v for k, v in manifest.items() if k != "held_out"}  # a folder from before the split was recorded
    assert sh.split_held_out(older, "auto")[1] == ["latents-000003.tar"]

    plain = precompute(tmp_path / "in", sd_checkpoint, tmp_path / "plain", shard_size=40, stratify=False)
    assert not plain["stratified_by_label"]
    last = [r["meta"]["label"] for r in iter_latents(shard_paths(tmp_path / "plain")[-1:])]
    share = {label: last.count(label) / len(last) for label in labels}
    assert 0.5 * sum(abs(share[label] - 0.25) for label in labels) < 0.25, share  # input order: 0.75
    assert share != dict.fromkeys(labels, 0.25), share  # a random sample, not the stratified one
    with pytest.raises(EbdError, match="different config"):  # and a folder is never resumed in the other order
        precompute(tmp_path / "in", sd_checkpoint, tmp_path / "plain", shard_size=40)

    in_order = precompute(tmp_path / "in", sd_checkpoint, tmp_path / "ordered", shard_size=40, shuffle=False)
    assert in_order["order"] == "input"
    assert {r["meta"]["label"] for r in iter_latents(shard_paths(tmp_path / "ordered")[-1:])} == {"dog"}


def test_shard_order_depends_on_the_inputs_not_on_how_they_were_listed():
    from pipeline.io.shard_plan import held_out_count, shard_order
    from pipeline.io.sources import Item

    items = [Item(f"img{i}.png", f"k{i}", None, ("file", f"img{i}.png")) for i in range(50)]
    assert shard_order(items, seed=0) == shard_order(items[::-1], seed=0)
    assert shard_order(items, seed=0) != shard_order(items, seed=1)
    assert shard_order(items, seed=0) == shard_order(items, seed=0, stratify=False)  # no labels: one stratum
    assert [held_out_count(0.1, 50, n) for n in (1, 2, 5, 1000, 10_000)] == [0, 1, 1, 50, 50]  # one at least, never all
    assert held_out_count(0, 50, 1000) == 0

    # a rare label: 7 of 207 items. Every run of 20 consecutive items holds each label's share to within one
    labelled = [Item(f"{label}/{i}.png", f"{label}{i}", label, ("file", "x"))
                for label, n in (("common", 150), ("middling", 50), ("rare", 7)) for i in range(n)]
    order = shard_order(labelled, seed=3)
    assert sorted(order, key=lambda it: it.key) == sorted(labelled, key=lambda it: it.key)
    for start in range(0, len(order) - 20):
        counts = Counter(it.label for it in order[start:start + 20])
        for label, n in (("common", 150), ("middling", 50), ("rare", 7)):
            assert abs(counts[label] - 20 * n / 207) < 1.01 + 1e-9, (start, counts)


def test_every_named_label_is_kept_from_sidecars_folder_levels_and_parquet_columns(tmp_path):
    from pipeline.demo import demo_labels, write_demo_images
    from pipeline.io.reading import read_items
    from pipeline.io.sources import plan_items

    both = ["shape", "background"]
    write_demo_images(tmp_path / "tars", 12, size=16, images_per_shard=5)
    loaded = list(read_items(plan_items(tmp_path / "tars", label_fields=both)[1], 1 << 20, tuple(both)))
    assert [x.fields for x in loaded] == [demo_labels(i) for i in range(12)]  # KEY.json, in input order
    assert [x.label for x in loaded] == [demo_labels(i)["shape"] for i in range(12)]  # .cls still the label

    (tmp_path / "tree" / "ring" / "checker").mkdir(parents=True)
    (tmp_path / "tree" / "ring" / "checker" / "a.png").write_bytes(encode_image(rgb_image(1), "PNG"))
    (tmp_path / "tree" / "loose.png").write_bytes(encode_image(rgb_image(2), "PNG"))
    tree = {x.item.source: x for x in read_items(plan_items(tmp_path / "tree", label_fields=both)[1], 1 << 20,
                                                 tuple(both))}
    assert tree["ring/checker/a.png"].fields == {"shape": "ring", "background": "checker"}
    assert tree["loose.png"].fields == {}

    pq.write_table(pa.table({"image": [encode_image(rgb_image(3), "PNG")] * 2, "shape": ["cross", None],
                             "background": ["flat", "stripes"]}), tmp_path / "rows.parquet")
    rows = list(read_items(plan_items(tmp_path / "rows.parquet", label_fields=both)[1], 1 << 20, tuple(both)))
    assert [x.fields for x in rows] == [{"shape": "cross", "background": "flat"}, {"background": "stripes"}]
    with pytest.raises(ConfigError, match="label field 'colour' is not a column of .*rows.parquet"):
        plan_items(tmp_path / "rows.parquet", label_fields=["shape", "colour"])


def test_precompute_stores_named_labels_per_latent_and_counts_each_field(ray_cluster, sd_checkpoint, tmp_path):
    from collections import Counter

    from pipeline.demo import demo_labels, write_demo_images

    write_demo_images(tmp_path / "images", 24, size=16, images_per_shard=10)
    manifest = precompute(tmp_path / "images", sd_checkpoint, tmp_path / "out", shard_size=8,
                          label_fields=["shape", "background"])
    truth = [demo_labels(i) for i in range(24)]
    assert manifest["label_fields"] == {name: dict(sorted(Counter(t[name] for t in truth).items()))
                                        for name in ("background", "shape")}
    by_key = {r["key"]: r["meta"] for r in iter_latents(shard_paths(tmp_path / "out"))}
    assert all(by_key[f"{t['shape']}_{i:06d}"]["labels"] == t for i, t in enumerate(truth))
    with pytest.raises(ConfigError, match="label_fields must be distinct names"):
        precompute(tmp_path / "images", sd_checkpoint, tmp_path / "bad", label_fields=["shape", "../x"])
