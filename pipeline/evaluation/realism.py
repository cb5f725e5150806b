"""The realism test: can a small network tell a set of images from held-out real ones? A classifier two-sample test
(Lopez-Paz and Oquab, ICLR 2017) on pixels, so it reads no feature space a generator could please without looking
real: a CNN is trained on `folds - 1` folds of real and the set to say which is which, and scored on the fold it never
saw. Each set gets networks of its own, trained on balanced batches (half real, half the set) for a number of epochs:
a row reads the same whatever other rows the report has, and neither side is seen more often than the other (one
network with a head per set, its batches half real, memorised the real side and read held-out real as fake).

    accuracy      on the held-out folds; 0.5 means it cannot tell them apart (the control row must read that)
    auc           the same, threshold-free
    taken_for_real        the share of the set's images its held-out fold scores as real (p > 0.5)
    real_taken_for_real   the same for the real images it was tested against
    realism_ratio         taken_for_real / real_taken_for_real: 1 for a set as real as real (the verdict's check)

Every image gets the score of the fold that held it out, so the images most and least often taken for real can be
shown (realism.png). Seeded: the folds, the weights and the batches follow `seed`; each set is tested against the same
real images, split into the same folds. A set that is real's own images in another form (`paired`: the raw images
of the decoded reference) takes real's folds, or the network would learn an image on one side and meet its twin on
the other.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn
from torch.nn import functional as F

SIDE = 32               # images are compared at 32 x 32: enough for shape and texture, small enough for a CPU
SEPARATED_LOSS = 0.01   # an epoch's mean loss under this: the training folds are apart, training stops


def _network(width: int = 16) -> nn.Module:
    """Three stages, each halving the side (32 -> 4); the first reads the image with a stride of 2, so no
    convolution runs at full size: the test trains a network per set and fold, and this is where its time goes."""
    def stage(c_in: int, c_out: int, first: bool) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, stride=2 if first else 1, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
                nn.Conv2d(c_out, c_out, 3, stride=1 if first else 2, padding=1), nn.GroupNorm(8, c_out), nn.SiLU()]
    return nn.Sequential(*stage(3, width, True), *stage(width, 2 * width, False),
                         *stage(2 * width, 4 * width, False), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4 * width, 1))


def _inputs(images: torch.Tensor) -> torch.Tensor:
    x = images.float() / 127.5 - 1.0
    return F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", antialias=True, align_corners=False) \
        if x.shape[-1] != SIDE or x.shape[-2] != SIDE else x


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve: the chance a random positive scores above a random negative (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().mean()
    ties = (pos[:, None] == neg[None, :]).double().mean()
    return float(greater + 0.5 * ties)


def group_folds(groups: list, folds: int, seed: int) -> torch.Tensor:
    """A fold per image, whole groups in one fold (twins in two folds would let the test recognise the design it
    trained on instead of telling real from generated); None: a group of its own. Groups are dealt to folds in a
    seeded order, largest first, each to the fold with the fewest images."""
    members: dict = {}
    for i, group in enumerate(groups):
        members.setdefault(("image", i) if group is None else ("group", group), []).append(i)
    order = torch.randperm(len(members), generator=torch.Generator().manual_seed(seed)).tolist()
    units = sorted((list(members.values())[j] for j in order), key=len, reverse=True)
    fold, sizes = torch.empty(len(groups), dtype=torch.long), [0] * folds
    for unit in units:
        k = sizes.index(min(sizes))
        fold[unit] = k
        sizes[k] += len(unit)
    return fold


def _shifted(batch: torch.Tensor, generator: torch.Generator, pixels: int = 2) -> torch.Tensor:
    """The batch moved by up to `pixels` in each direction (edges repeated): the network must learn what images look
    like, not where each training image's pixels sit."""
    padded = F.pad(batch, (pixels,) * 4, mode="replicate")
    dx, dy = torch.randint(0, 2 * pixels + 1, (2,), generator=generator).tolist()
    return padded[..., dy:dy + batch.shape[-2], dx:dx + batch.shape[-1]]


def _trained(real: torch.Tensor, other: torch.Tensor, epochs: int, batch_size: int, lr: float,
             seed: int) -> tuple[nn.Module, int]:
    """A network trained to score `real` 1 and `other` 0: balanced batches, mirrored and shifted, cosine-decayed
    learning rate, stopped early once an epoch's mean loss says the sides are apart. Returns it and the epochs run."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    network = _network()
    optimiser = torch.optim.Adam(network.parameters(), lr=lr)
    half = batch_size // 2
    per_epoch = max(1, -(-len(real) // half))
    steps, epoch_loss = epochs * per_epoch, 0.0
    labels = torch.cat([torch.ones(half, 1), torch.zeros(half, 1)])
    network.train()
    for step in range(steps):
        batch = torch.cat([real[torch.randint(len(real), (half,), generator=generator)],
                           other[torch.randint(len(other), (half,), generator=generator)]])
        mirror = torch.rand(len(batch), generator=generator) < 0.5
        batch = _shifted(torch.where(mirror[:, None, None, None], batch.flip(-1), batch), generator)
        for group in optimiser.param_groups:  # cosine decay: the last steps settle
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = F.binary_cross_entropy_with_logits(network(batch), labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        epoch_loss += loss.item()
        if (step + 1) % per_epoch == 0:
            if epoch_loss / per_epoch < SEPARATED_LOSS:
                break  # the training folds are told apart with margin: more epochs change no held-out verdict
            epoch_loss = 0.0
    return network.eval(), -(-(step + 1) // per_epoch)


def _scores(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([network(x[i:i + 256]).sigmoid().flatten() for i in range(0, len(x), 256)])


def realism_test(real: torch.Tensor, sets: dict[str, torch.Tensor], *, folds: int = 3, epochs: int = 30,
                 max_images: int = 500, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
                 real_groups: list | None = None, groups: dict[str, list] | None = None,
                 paired: tuple[str, ...] = ()) -> dict[str, dict]:
    """The classifier two-sample test of each of `sets` against `real` (uint8 N x 3 x H x W each; every set is cut to
    the same size n, the smallest, at most `max_images`): per set and fold, a network trained on the other folds for
    `epochs` epochs, and a held-out image's score is its probability of real. Folds keep each side's groups of twins
    whole (`real_groups`, `groups[name]`: one per image, None for none); the sets named in `paired` take real's
    folds. Returns, per set, the figures of the module docstring and `_scores`: each of its images' held-out score of
    being real."""
    n = min(len(real), max_images, *(len(images) for images in sets.values()))
    if n < 2 * folds:
        raise ValueError(f"the realism test needs at least {2 * folds} images a side, got {n}")
    groups = groups or {}
    real_x, real_fold = _inputs(real[:n]), group_folds((real_groups or [None] * n)[:n], folds, seed)
    out = {}
    for name, images in sets.items():
        own = zlib.crc32(name.encode()) % 100_000  # a set's seeds follow its name, not its place in `sets`
        set_x = _inputs(images[:n])
        set_fold = real_fold if name in paired else \
            group_folds((groups.get(name) or [None] * n)[:n], folds, seed + 1 + own)
        real_score, set_score, epochs_run = torch.empty(n), torch.empty(n), 0
        for f in range(folds):
            network, ran = _trained(real_x[real_fold != f], set_x[set_fold != f], epochs, batch_size, lr,
                               seed * 1_000_000 + own * 10 + f)
            epochs_run += ran
            real_score[real_fold == f] = _scores(network, real_x[real_fold == f])
            set_score[set_fold == f] = _scores(network, set_x[set_fold == f])
        score, truth = torch.cat([real_score, set_score]), torch.cat([torch.ones(n), torch.zeros(n)])
        taken, real_taken = (set_score > 0.5).double().mean().item(), (real_score > 0.5).double().mean().item()
        out[name] = {"images": n, "folds": folds, "epochs": round(epochs_run / folds, 1),
                     "accuracy": round(((score > 0.5).float() == truth).double().mean().item(), 4),
                     "auc": round(auc(score, truth), 4), "taken_for_real": round(taken, 4),
                     "real_taken_for_real": round(real_taken, 4),
                     "realism_ratio": round(taken / real_taken, 4) if real_taken > 0 else 0.0, "_scores": set_score}
    return out
