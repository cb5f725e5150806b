"""Benchmark: how many images at a time a CPU should run an image network on (common.memory.cache_sized_chunk).

    .venv/bin/python bench/cpu_batch.py [--images 512] [--repeats 3]

Decodes the same latents with each shipped VAE (the demo's and the emoji's, 8 x 8 latents to 64 px) and embeds the
same images with each shipped evaluator, in chunks of 4 ... 256 images, alternately, `repeats` times; the best time
of each counts (the machine's other load only ever slows a run). Reported: images/s per chunk size and the ratio to
one chunk of 256 (what the decoder and the evaluator ran in before), measured in this one run, and the chunk
cache_sized_chunk picks. Writes bench/out/cpu_batch.json and bench/cpu_batch.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import REPO, write_result

CHUNKS = (4, 8, 16, 32, 64, 256)


def rate(fn, items: int, chunk: int) -> float:
    """Images/s of one pass over `items` in chunks of `chunk`."""
    tick = time.perf_counter()
    for a in range(0, items, chunk):
        fn(a, min(items, a + chunk))
    return items / (time.perf_counter() - tick)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import torch

    from pipeline.common.memory import cache_sized_chunk
    from pipeline.evaluation.features import ImageEvaluator, to_network_input
    from pipeline.vae.autoencoder import load_vae, resolve_vae, to_uint8

    threads = torch.get_num_threads()
    generator = torch.Generator().manual_seed(0)
    networks = {}
    for name in ("demo", "emoji"):
        folder = REPO / "models" / name
        if not (folder / "vae" / "config.json").exists():
            continue
        vae = load_vae(resolve_vae(str(folder), "vae"), torch.device("cpu"), torch.float32)
        latents = torch.randn(args.images, 4, 8, 8, generator=generator)
        scale = vae.config.scaling_factor

        def decode(a, b, vae=vae, latents=latents, scale=scale):  # one vae.decode per chunk, as before the change
            with torch.inference_mode():
                return to_uint8(vae.decode(latents[a:b] / scale).sample)

        networks[f"{name} VAE decoder (8 x 8 -> 64 px)"] = (decode, 64 * 64)
        evaluator = ImageEvaluator.from_pretrained(str(folder / "evaluator")).eval()
        side = evaluator.config["resolution"]
        images = torch.randint(0, 256, (args.images, 3, side, side), dtype=torch.uint8, generator=generator)

        def embed(a, b, evaluator=evaluator, images=images, side=side):
            with torch.inference_mode():
                return evaluator.embedding(to_network_input(images[a:b], side))

        networks[f"{name} evaluator features ({side} px)"] = (embed, side * side)

    rows = {}
    for name, (fn, pixels) in networks.items():
        fn(0, 16)  # warm-up
        rates = {}
        for _ in range(args.repeats):  # interleaved: each chunk size sees the same load
            for chunk in CHUNKS:
                rates[chunk] = max(rates.get(chunk, 0.0), rate(fn, args.images, chunk))
        rows[name] = {"images_per_s": {str(c): round(r, 1) for c, r in rates.items()},
                      "ratio_to_256": {str(c): round(r / rates[256], 2) for c, r in rates.items()},
                      "picked": cache_sized_chunk("cpu", 256, pixels)}
    result = {"threads": threads, "images": args.images, "repeats": args.repeats, "networks": rows}
    write_result(REPO / "bench" / "out" / "cpu_batch.json", result)

    lines = ["# Image networks on a CPU: how many images at a time", "",
             f"`bench/cpu_batch.py` ({args.images} images, best of {args.repeats} interleaved passes, {threads} "
             "threads): images/s per chunk size, and in brackets the ratio to one chunk of 256, measured in one run. "
             "**Bold**: the chunk `common.memory.cache_sized_chunk` picks on a CPU (the decoder and the evaluator "
             "ran in chunks of 256 before it).", "",
             "| network | " + " | ".join(str(c) for c in CHUNKS) + " |", "|---|" + "---|" * len(CHUNKS)]
    for name, row in rows.items():
        cells = []
        for c in CHUNKS:
            cell = f"{row['images_per_s'][str(c)]:.0f} ({row['ratio_to_256'][str(c)]:.2f}x)"
            cells.append(f"**{cell}**" if c == row["picked"] else cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Activations of a few images of 64 px stay in the CPU's caches; a chunk of 256 streams every "
              "layer's activations through memory (and their large allocations cost page faults). A GPU keeps "
              "the whole batch: cache_sized_chunk only cuts on a CPU.", ""]
    Path(REPO / "bench" / "cpu_batch.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
