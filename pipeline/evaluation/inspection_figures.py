"""The x-ray page's plots (matplotlib, Agg): chain curves, energy histograms, latent channels and the energy along
interpolation paths, each returned as PNG bytes."""

from __future__ import annotations

import io

import numpy as np
import torch


def _figure(rows: int, cols: int, width: float = 4.2, height: float = 3.0):
    # The object API, not pyplot: no global state, no display backend, safe inside any process.
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def curves_figure(curves: dict, sigmas: list | None, level_sigmas: list | None, acceptance: dict) -> bytes:
    panels = [("energy", "energy E (at the chain's own noise level)", sigmas),
              ("grad_norm", "gradient norm |grad E|", sigmas),
              ("step", "step length per level (RMS change per dimension)", level_sigmas)]
    fig, axes = _figure(1, len(panels) + bool(acceptance))
    for ax, (key, title, along) in zip(axes[0], panels):
        c = {k: np.asarray(v, dtype=float) for k, v in curves[key].items()}  # null (no energy) -> NaN
        x = np.asarray(along, dtype=float) if along else np.arange(len(c["median"]))
        ax.fill_between(x, c["q10"], c["q90"], alpha=0.3, label="10-90% of chains")
        ax.plot(x, c["median"], label="median")
        ax.set_title(title, fontsize=9)
        if key == "grad_norm" or (key == "energy" and sigmas):  # noise-conditional energies span decades
            ax.set_yscale("log" if key == "grad_norm" else "symlog")
        if along:
            ax.set_xscale("log")
            ax.invert_xaxis()  # the chain runs from the top noise level down to data: left to right
            ax.set_xlabel("noise level sigma")
        else:
            ax.set_xlabel("evaluation" if key != "step" else "step")
    axes[0][0].legend(fontsize=7)
    if acceptance:
        ax = axes[0][-1]
        levels = sorted(acceptance)
        ax.plot(levels, [float(np.mean(acceptance[i])) for i in levels], marker="o")
        ax.set_ylim(0, 1.05)
        ax.set_xticks(levels)
        ax.set_title("Metropolis acceptance per level", fontsize=9)
        ax.set_xlabel("level")
    return _png(fig)


def energy_figure(sets: dict[str, torch.Tensor]) -> bytes:
    """Left: the data sets and the samples on a linear axis; right: with the chain starts too, on a symmetric log
    axis (noise starts sit far out in the energy's quadratic tail)."""
    fig, axes = _figure(1, 2, width=5.5)
    values = {k: v[torch.isfinite(v)].numpy() for k, v in sets.items()}
    for ax, names, scale in ((axes[0][0], [k for k in values if k != "chain starts"], "linear"),
                             (axes[0][1], list(values), "symlog")):
        for name in names:
            if len(values[name]):
                ax.hist(values[name], bins=60, histtype="step", density=True, label=name)
        ax.set_xscale(scale)
        ax.set_xlabel("energy E (low = data-like)" + (", symmetric log axis" if scale == "symlog" else ""))
        ax.legend(fontsize=8)
    return _png(fig)


def channels_figure(generated: torch.Tensor | None, real: torch.Tensor) -> bytes:
    sets = {"real": real} | ({"generated": generated} if generated is not None else {})
    channels = real.shape[1]
    fig, axes = _figure(1 + 2 * len(sets), channels, width=2.6, height=2.2)
    for c in range(channels):
        ax = axes[0][c]
        for name, z in sets.items():
            ax.hist(z[:, c].flatten().numpy(), bins=60, histtype="step", density=True, label=name)
        ax.set_title(f"channel {c}", fontsize=9)
        row = 1
        for name, z in sets.items():
            for stat, fn in (("mean", torch.mean), ("std", torch.std)):
                ref_map = fn(real[:, c], dim=0)
                vmin, vmax = (float(ref_map.min()), float(ref_map.max())) if stat == "std" else \
                    (-float(ref_map.abs().max()), float(ref_map.abs().max()))
                im = axes[row][c].imshow(fn(z[:, c], dim=0).numpy(), vmin=vmin, vmax=vmax,
                                         cmap="viridis" if stat == "std" else "coolwarm")
                axes[row][c].set_title(f"{name}: {stat}", fontsize=8)
                axes[row][c].set_xticks([]), axes[row][c].set_yticks([])
                row += 1
            fig.colorbar(im, ax=axes[row - 1][c], shrink=0.8)
    axes[0][0].legend(fontsize=7)
    return _png(fig)


def interpolation_energy_figure(paths: list[dict]) -> bytes:
    fig, axes = _figure(1, 1, width=6.5)
    ax = axes[0][0]
    for i, path in enumerate(paths):
        ax.plot(np.linspace(0, 1, len(path["energy"])), path["energy"], marker=".", label=f"pair {i + 1}")
    ax.set_xlabel("t (0: first latent, 1: second)")
    ax.set_ylabel("energy E")
    ax.legend(fontsize=8)
    return _png(fig)
