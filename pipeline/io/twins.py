"""Which inputs are twins: images that must land on the same side of the train/held-out split, so that a held-out
image never has a near-copy in training (Barz and Denzler 2020: a test set with twins in training measures recall,
not generalisation).

Two sources of groups, joined (an image is in one group with everything either source ties it to):
- **the inputs' own group key**: a file or tar member named `GROUP~ANYTHING.ext` is in group GROUP, and so is a file
  named `GROUP.ext` (`1f385.png` and `1f385~1f3fb.png`, wherever they sit); parquet rows carry it in a column
  (`group_column`, or `group` when the file has one). Nothing else in a name means anything.
- **near-twins found in the pixels**: each image's edge maps (where any colour channel steps by more than
  EDGE_STEP between neighbouring pixels, at SIGNATURE_SIDE px), of the image as it is and of it smoothed by a 3 x 3
  box; two images whose maps, either one, have a Jaccard distance under `threshold` are twins. Edges sit where the
  drawing's lines are and not what colour fills them, so a recoloured copy (another skin tone, a colour jitter) keeps
  its edge map while another design moves it; the smoothed map ignores the ringing a lossy re-encode (JPEG) adds.
  Measured on Google's emoji (bench/twins.md): threshold 0.1 puts 99.8% of the skin-tone twin pairs together and
  leaves no held-out image with a twin in training (0.06: 95% and 12%); what it merges beyond them is mostly the same
  drawing in another gender or colour. For the split a false merge only makes a bigger unit; a missed twin leaks.

Everything here is pure (numpy and torch): the precompute driver runs `edge_signature` in its Ray tasks and
`group_labels` on what they return.
"""

from __future__ import annotations

import numpy as np

SIGNATURE_SIDE = 64          # images are compared at 64 x 64 (two maps of 4,096 edge bits: 1 KB an image)
EDGE_STEP = 0.05             # a step of more than 5% of the range between neighbours, in any channel, is an edge
MAX_EDGE_SHARE = 0.4         # ... among the image's 40% strongest steps (nine emoji in ten have fewer edges)
TWIN_THRESHOLD = 0.1         # Jaccard distance of edge maps under which two images are twins (bench/twins.md)
GROUP_SEPARATOR = "~"        # GROUP~ANYTHING.ext
_BLOCK = 2048                # images compared at once: a block is BLOCK x N distances


def name_group(stem: str) -> str | None:
    """GROUP for a file or tar member named GROUP~ANYTHING (`stem`: no extension, no folder), else None."""
    return stem.split(GROUP_SEPARATOR, 1)[0] if GROUP_SEPARATOR in stem else None


def files_joining_groups(stems: list[str], groups: list[str | None]) -> list[str | None]:
    """The name rule's second half: a file named GROUP.ext (its stem GROUP) joins group GROUP when some GROUP~... file
    names it (`1f385.png` beside `1f385~1f3fb.png`); `groups` are the GROUP~ names' groups (None elsewhere)."""
    named = {group for group in groups if group is not None}
    return [stem if group is None and stem in named else group for stem, group in zip(stems, groups)]


def edge_map(x: np.ndarray) -> np.ndarray:
    """float H x W x 3 in [0, 1] -> bool H x W: a step of more than EDGE_STEP to the right or below, and among the
    image's MAX_EDGE_SHARE strongest: a textured image (grass, noise) marks its strongest edges, not every pixel, so
    two textures are not twins for being all edge."""
    step = np.zeros(x.shape[:2], dtype=np.float32)
    step[:, :-1] = np.abs(x[:, 1:] - x[:, :-1]).max(-1)
    step[:-1, :] = np.maximum(step[:-1, :], np.abs(x[1:, :] - x[:-1, :]).max(-1))
    return step > max(EDGE_STEP, float(np.quantile(step, 1 - MAX_EDGE_SHARE)))


def edge_signature(pixels: np.ndarray) -> np.ndarray:
    """uint8 H x W x 3 (H = W = SIGNATURE_SIDE) -> its two edge maps (as it is, smoothed), packed: 2 x side^2 / 8."""
    x = pixels.astype(np.float32) / 255.0
    padded = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[:2]
    smooth = sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9
    return np.packbits(np.concatenate([edge_map(x).reshape(-1), edge_map(smooth).reshape(-1)]))


def twin_pairs(signatures: np.ndarray, threshold: float = TWIN_THRESHOLD) -> np.ndarray:
    """(P, 2) index pairs i < j of images whose edge maps, either one, are within `threshold` Jaccard distance.
    Exact, in blocks of rows (memory BLOCK x N floats; time 2 N^2 x SIGNATURE_SIDE^2 multiply-adds, a few seconds
    for 4,000 images)."""
    import torch

    bits = torch.from_numpy(np.unpackbits(signatures, axis=1).astype(np.float32))
    views = bits.reshape(len(bits), 2, -1).unbind(1)
    counts = [view.sum(1) for view in views]
    pairs = []
    for start in range(0, len(bits), _BLOCK):
        rows = slice(start, start + _BLOCK)
        close = torch.zeros(len(bits[rows]), len(bits), dtype=torch.bool)
        for view, count in zip(views, counts):
            inter = view[rows] @ view.T
            close |= 1 - inter / (count[rows, None] + count[None, :] - inter).clamp(min=1) <= threshold
        close &= torch.arange(len(bits))[None, :] > torch.arange(start, start + len(close))[:, None]  # i < j once
        i, j = torch.nonzero(close, as_tuple=True)
        pairs.append(torch.stack([i + start, j], 1))
    return torch.cat(pairs).numpy() if pairs else np.zeros((0, 2), dtype=np.int64)


def name_pairs(groups: list[str | None]) -> list[tuple[int, int]]:
    """Pairs chaining the members of each named group (its first member with each other one); None: no group."""
    first: dict[str, int] = {}
    pairs = [(first.setdefault(group, i), i) for i, group in enumerate(groups) if group is not None]
    return [(a, b) for a, b in pairs if a != b]


def group_labels(count: int, pairs: np.ndarray | list) -> np.ndarray:
    """Connected components of `count` items joined by `pairs`: each item's group, the smallest index in it."""
    parent = np.arange(count)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = root(int(a)), root(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([root(i) for i in range(count)])
