"""Pictures: image grids (generation previews, reconstructions, report figures), written atomically as PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .files import atomic_write


def save_png(path: Path, image) -> None:
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def side_by_side(generated: torch.Tensor, real: torch.Tensor):
    """Two 8-column grids, generated on the left and real on the right, with a white gap between."""
    from PIL import Image

    left = preview_grid([x.permute(1, 2, 0).numpy() for x in generated])
    right = preview_grid([x.permute(1, 2, 0).numpy() for x in real])
    gap = max(4, left.width // 32)
    canvas = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + gap, 0))
    return canvas


def labelled_rows(rows: list[tuple[str, torch.Tensor]], columns: int = 8):
    """One row of up to `columns` images per (title, images), each row titled on its left; images smaller than
    48 px are enlarged (nearest) so they stay readable."""
    from PIL import Image, ImageDraw

    sides = [imgs.shape[-1] for _, imgs in rows if len(imgs)]
    side = max(sides) if sides else 8
    side *= max(1, min(8, 48 // side))
    title_width = 8 * max(len(title) for title, _ in rows) + 12
    canvas = Image.new("RGB", (title_width + columns * (side + 2), len(rows) * (side + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (title, imgs) in enumerate(rows):
        y = r * (side + 4)
        draw.text((4, y + side // 2 - 6), title, fill="black")
        for c, img in enumerate(imgs[:columns]):
            tile = Image.fromarray(img.permute(1, 2, 0).numpy(), "RGB").resize((side, side), Image.NEAREST)
            canvas.paste(tile, (title_width + c * (side + 2), y + 2))
    return canvas


def preview_grid(images: list[np.ndarray], columns: int = 8):
    """A grid of up to 64 images (H x W x 3 uint8), row-major, on black."""
    from PIL import Image

    images = images[:64]
    h, w = images[0].shape[:2]
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, img in enumerate(images):
        grid.paste(Image.fromarray(img, "RGB"), ((i % columns) * w, (i // columns) * h))
    return grid
