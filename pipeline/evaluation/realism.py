"""The realism test: can a small network tell a set of images from held-out real ones? A classifier two-sample test
(Lopez-Paz and Oquab, ICLR 2017) on pixels, so it reads no feature space a generator could please without looking
real: a CNN is trained on `folds - 1` folds of the sets to say which is which, and scored on the fold it never saw.
Every set of a report (generated, each baseline, the control) is tested in one go: one network per fold, a shared
trunk with one real-against-this-set head per set (the cost of one test, not one per row; a softmax over all the sets
at once lost power to telling the baselines from each other).

    accuracy      on the held-out folds; 0.5 means it cannot tell them apart (the control row must read that)
    auc           the same, threshold-free
    taken_for_real        the share of the set's images its held-out fold scores as real (p > 0.5)
    real_taken_for_real   the same for the real images it was tested against
    realism_ratio         taken_for_real / real_taken_for_real: 1 for a set as real as real (the verdict's check)

Every image gets the score of the fold that held it out, so the images most and least often taken for real can be
shown (realism.png). Seeded: the folds, the weights and the batches follow `seed`; each set is tested against the same
real images, split into the same folds.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

SIDE = 32          # images are compared at 32 x 32: enough for shape and texture, small enough for a CPU


def _network(width: int = 16, outputs: int = 1) -> nn.Module:
    def stage(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
                nn.Conv2d(c_out, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.SiLU()]
    return nn.Sequential(*stage(3, width), *stage(width, 2 * width), *stage(2 * width, 4 * width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, outputs))


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


def realism_test(real: torch.Tensor, sets: dict[str, torch.Tensor], folds: int = 3, steps: int = 400,
                 batch_size: int = 64, lr: float = 2e-3, seed: int = 0, real_groups: list | None = None,
                 groups: dict[str, list] | None = None) -> dict[str, dict]:
    """The classifier two-sample test of each of `sets` against `real` (uint8 N x 3 x H x W each; every set is cut to
    the same size n, the smallest), all at once: per fold, one network with a binary head per set (real against that
    set; half of every batch real, the sets sharing the other half) is trained, and a held-out image's score against
    set k is its head's probability of real. Folds keep each side's groups of twins whole (`real_groups`,
    `groups[name]`: one per image, None for none). Returns, per set, the figures of the module docstring and
    `_scores`: each of its images' held-out score of being real."""
    n = min(len(real), *(len(images) for images in sets.values()))
    if n < 2 * folds:
        raise ValueError(f"the realism test needs at least {2 * folds} images a side, got {n}")
    names = list(sets)
    groups = groups or {}
    x = torch.cat([_inputs(real[:n]), *(_inputs(sets[name][:n]) for name in names)])
    y = torch.arange(len(names) + 1).repeat_interleave(n)  # 0: real, k: the k-th set
    fold = torch.cat([group_folds((real_groups or [None] * n)[:n], folds, seed),
                      *(group_folds((groups.get(name) or [None] * n)[:n], folds, seed + 1 + k)
                        for k, name in enumerate(names))])
    probs = torch.empty(len(x), len(names))
    for k in range(folds):
        train, test = (fold != k).nonzero().flatten(), (fold == k).nonzero().flatten()
        torch.manual_seed(seed * 1000 + k)
        network = _network(outputs=len(names))
        optimiser = torch.optim.Adam(network.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(seed * 1000 + k)
        by_class = [train[y[train] == c] for c in range(len(names) + 1)]
        network.train()
        for step in range(steps):
            # half of every batch real, the rest the sets in equal shares: every pair tested involves real
            classes = torch.where(torch.rand(batch_size, generator=generator) < 0.5, 0,
                                  torch.randint(1, len(by_class), (batch_size,), generator=generator))
            pick = torch.stack([by_class[c][torch.randint(len(by_class[c]), (1,), generator=generator)[0]]
                                for c in classes.tolist()])
            batch = x[pick]
            mirror = torch.rand(len(batch), generator=generator) < 0.5
            batch = torch.where(mirror[:, None, None, None], batch.flip(-1), batch)
            for group in optimiser.param_groups:  # cosine decay: the last steps settle
                group["lr"] = lr * 0.5 * (1 + torch.cos(torch.tensor(step / steps * torch.pi)).item())
            # one binary head per set: real images are positives of every head, a set's images negatives of its own
            # head alone, weighted so each head sees as much negative as positive weight
            logits, labels = network(batch), y[pick]
            real_rows, set_rows = labels == 0, (labels > 0).nonzero().flatten()
            loss = F.binary_cross_entropy_with_logits(logits[real_rows], torch.ones_like(logits[real_rows]))
            if len(set_rows):
                own = logits[set_rows, labels[set_rows] - 1]
                loss = loss + F.binary_cross_entropy_with_logits(own, torch.zeros_like(own)) * \
                    len(set_rows) / max(1, int(real_rows.sum()))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        network.eval()
        with torch.inference_mode():
            probs[test] = torch.cat([network(x[test[i:i + 256]]).sigmoid() for i in range(0, len(test), 256)])
    out = {}
    for k, name in enumerate(names, start=1):
        pair = torch.cat([torch.arange(n), torch.arange(k * n, (k + 1) * n)])
        score = probs[pair, k - 1]
        truth = (y[pair] == 0).float()
        taken, real_taken = (score[n:] > 0.5).double().mean().item(), (score[:n] > 0.5).double().mean().item()
        out[name] = {"images": n, "folds": folds,
                     "accuracy": round(((score > 0.5).float() == truth).double().mean().item(), 4),
                     "auc": round(auc(score, truth), 4), "taken_for_real": round(taken, 4),
                     "real_taken_for_real": round(real_taken, 4),
                     "realism_ratio": round(taken / real_taken, 4) if real_taken > 0 else 0.0, "_scores": score[n:]}
    return out
