"""Benchmark: the Ray precompute job against a bare in-process loop over the same images, VAE and cores.

    .venv/bin/python bench/precompute.py [--images 480] [--resolution 128] [--vae DIR] [--input-path-against REV]

Both sides run the same per-shard function (`encode_shard`): the bare loop calls it shard after shard in this
process with every core as a torch thread; the Ray job runs it as tasks of one CPU each on a local cluster of the
same cores. Prints and writes bench/out/precompute.json: images/s of each and their ratio (Ray / bare).
Absolute times drift on shared machines; the ratio, measured in one run, is the figure to compare.

`--input-path-against REV` also times the input path alone (plan, read and decode every good image: PNGs in tars,
JPEG photos in a folder and the same photos as rows of a parquet file in row groups of 64) with this tree's
`pipeline/` and with REV's, alternating in fresh processes, and adds their images/s and ratio: what the
untrusted-input checks cost on good inputs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from common import REPO, write_result

# The input path, timed in a fresh process with whichever `pipeline/` is first on sys.path: argv, the input folders.
INPUT_PATH = """
import sys, time
from pipeline.io.images import decode_image
try:
    from pipeline.io.reading import read_items
except ImportError:  # a tree from before reading had its own module
    from pipeline.io.sources import read_items
from pipeline.io.sources import plan_items
start = time.perf_counter()
decoded = 0
for folder in sys.argv[1:]:
    _, items = plan_items(folder)
    for loaded in read_items(items, 256 * 2**20):
        decode_image(loaded.data, 128, 89_478_485, 16)
        decoded += 1
print(decoded, time.perf_counter() - start)
"""


def input_path_speed(folders: list[Path], rev: str, work: Path, repeats: int = 3) -> dict:
    """Images/s of plan + read + decode over `folders`, with this tree's pipeline and with `rev`'s, alternating."""
    import subprocess
    import sys

    old = work / f"pipeline-{rev}"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "pipeline"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    best = {"this": float("inf"), rev: float("inf")}
    count = 0
    for _ in range(repeats):
        for name, tree in (("this", REPO), (rev, old)):
            out = subprocess.run([sys.executable, "-c", INPUT_PATH, *map(str, folders)], cwd=tree, check=True,
                                 capture_output=True, text=True, env={"PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"})
            count, seconds = out.stdout.split()
            best[name] = min(best[name], float(seconds))
    return {"input_path_images": int(count), "input_path_images_per_s": round(int(count) / best["this"], 1),
            f"input_path_images_per_s_{rev}": round(int(count) / best[rev], 1),
            "input_path_this_over_rev": round(best[rev] / best["this"], 3), "input_path_rev": rev}


def write_photos(folder: Path, count: int, size: int) -> None:
    """JPEG photos of smooth colour and grain, in a folder: the other common input kind."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    ramp = np.linspace(0, 1, size)
    for i in range(count):
        base = rng.random(3) * 200 * ramp[:, None, None] * ramp[None, :, None]
        pixels = np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"photo-{i:05d}.jpg", quality=90)


def write_parquet(photos: Path, folder: Path) -> None:
    """The photos' bytes as rows of one parquet file, 64 rows a row group (how img2dataset-style sets arrive)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    cells = [p.read_bytes() for p in sorted(photos.iterdir())]
    pq.write_table(pa.table({"image": cells}), folder / "rows.parquet", row_group_size=64)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=480)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--shard-size", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--vae", help="VAE folder (default: a random VAE with SD 1.x's block layout at 1/4 width)")
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--output", default=str(REPO / "bench" / "out" / "precompute.json"))
    p.add_argument("--input-path-against", metavar="REV", help="also time plan + read + decode against REV's code")
    args = p.parse_args()

    import ray
    import torch

    from pipeline.common.config import from_dict
    from pipeline.demo import write_demo_images, write_sd_style_vae
    from pipeline.io.shard_plan import split_into_shards
    from pipeline.vae.precompute import PrecomputeConfig, encode_shard, prepare, run_precompute, shard_job

    work = Path(tempfile.mkdtemp(prefix="ebd-bench-"))
    try:
        write_demo_images(work / "images", args.images, size=args.resolution)
        vae_dir = args.vae or write_sd_style_vae(work / "vae", block_out_channels=(32, 64, 128, 128),
                                                 norm_num_groups=32)
        base = dict(input=str(work / "images"), vae=str(vae_dir), resolution=args.resolution,
                    shard_size=args.shard_size, batch_size=args.batch_size, min_side=16, progress_interval_s=1e9)

        # Bare loop: the same per-shard function, in this process, every core to torch.
        cfg = from_dict(PrecomputeConfig, base | {"output": str(work / "bare")})
        spec, _, items = prepare(cfg)
        chunks = split_into_shards(items, cfg.shard_size)
        torch.set_num_threads(args.cpus)
        warm = from_dict(PrecomputeConfig, base | {"output": str(work / "warm")})
        encode_shard(shard_job(warm, spec, 0, chunks[0][:2], False, args.cpus))  # load the VAE once, as Ray workers do
        start = time.perf_counter()
        for i, chunk in enumerate(chunks):
            encode_shard(shard_job(cfg, spec, i, chunk, False, args.cpus))
        bare_s = time.perf_counter() - start

        # Ray: one-CPU tasks on a local cluster of the same cores (start-up excluded, VAE loads included).
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        start = time.perf_counter()
        run_precompute(from_dict(PrecomputeConfig, base | {"output": str(work / "ray")}))
        ray_s = time.perf_counter() - start
        ray.shutdown()

        result = {"benchmark": "precompute", "images": args.images, "resolution": args.resolution,
                  "vae": "custom" if args.vae else "random, SD 1.x block layout at 1/4 width",
                  "cpus": args.cpus, "bare_images_per_s": round(args.images / bare_s, 2),
                  "ray_images_per_s": round(args.images / ray_s, 2), "ray_over_bare": round(bare_s / ray_s, 3)}
        if args.input_path_against:
            write_photos(work / "photos", args.images // 2, 2 * args.resolution)
            write_parquet(work / "photos", work / "rows")
            result |= input_path_speed([work / "images", work / "photos", work / "rows"], args.input_path_against,
                                       work)
        write_result(args.output, result)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
