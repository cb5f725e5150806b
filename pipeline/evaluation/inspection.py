"""Inspection: an x-ray of a model and its chains (or of a latent folder alone), as one page of pictures.

    python -m jobs.inspect --model models/demo/ebm --vae models/demo --latents build/demo/latents-<id> --output DIR

Writes DIR/index.html (every picture embedded: it opens from disk, no server), the same pictures as PNGs beside it,
and DIR/inspect.json with the numbers behind them. Sections, each answering a question a user debugging blobs asks:

    chains         a few chains decoded at chosen evaluations, start to final sample, and for noise-level samplers
                   the clean estimate at each (Tweedie's z - sigma^2 grad E, or DDIM's predicted x0): what the
                   chain believes it is making, and when it commits
    curves         energy, gradient norm and step length along the chains (median and 10-90% band), against the noise
                   level where the sampler anneals one; Metropolis acceptance per level where it corrects
    energies       E on generated samples, held-out real latents, training latents and the chain starts: are samples
                   lower in energy than real data?
    channels       per latent channel: value histograms and mean / std maps, generated against real
    interpolation  spherical interpolation between pairs of held-out real latents, decoded, with E along the path
    neighbours     samples beside their nearest training latents (L2 in latent space), decoded: copies show here

Without --model the page is an x-ray of the data: channels, interpolation, and each latent's nearest other latents
(near-duplicates in the folder). Generation runs the same sampler code, so what the page shows is what a run makes.
"""

from __future__ import annotations

import base64
import html
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..common.config import EbdError, JobConfig, require
from ..io import latent_shards as sh
from ..io.files import atomic_write, atomic_write_json
from ..io.pictures import labelled_rows, save_png
from ..sampling.conditions import canonical, check_condition, parse_condition
from ..sampling.core import chain_starts, sample_latents
from ..sampling.settings import sampler_overrides
from ..vae.autoencoder import decode_images, load_vae, resolve_vae
from .inspection_figures import channels_figure, curves_figure, energy_figure, interpolation_energy_figure

PAGE = "index.html"


@dataclass(frozen=True)
class InspectConfig(JobConfig):
    output: str = ""                  # folder for index.html, the PNGs and inspect.json
    vae: str = ""                     # the VAE folder (Stable Diffusion layout) that decodes the latents
    model: str | None = None          # a model folder; without it, an x-ray of --latents alone
    latents: str | None = None        # a latents folder (jobs.precompute output): the real data to compare with
    sampler: dict[str, Any] = field(default_factory=dict,  # overrides of the model's sampler, as in jobs.generate
                                    metadata={"parse": sampler_overrides})
    condition: str | None = None      # a conditional model: what every chain asks for, e.g. "shape=ring"
    chains: int = 64                  # chains behind the curves, histograms and neighbours
    filmstrips: int = 4               # of those, chains decoded along the way
    frames: int = 8                   # evaluations shown per filmstrip (first and last included), then the sample
    interpolations: int = 4           # pairs of held-out real latents
    interpolation_steps: int = 9
    neighbours: int = 6               # samples shown beside their nearest training latents
    neighbours_k: int = 4
    max_latents: int = 4096           # real latents read, per split
    seed: int = 0                     # run seed of the chains shown

    def validate(self) -> None:
        require(bool(self.output), "--output is required")
        require(bool(self.vae), "--vae is required: the VAE folder that decodes the latents")
        require(bool(self.model or self.latents), "give --model DIR, --latents DIR or both")
        require(self.chains >= 2 and 1 <= self.filmstrips <= self.chains, "chains must be >= 2 and filmstrips in "
                "[1, chains]")
        require(self.frames >= 2 and self.interpolation_steps >= 2, "frames and interpolation_steps must be >= 2")
        require(self.interpolations >= 0 and self.neighbours >= 0 and self.neighbours_k >= 1,
                "interpolations, neighbours >= 0 and neighbours_k >= 1")
        require(self.max_latents >= 2, "max_latents must be >= 2")


# ------------------------------------------------------------------------------------------------- chains

class ChainRecorder:
    """A sampler callback: per evaluation, every chain's energy and gradient norm and the noise level; per level,
    the step length from the previous level's state and the Metropolis acceptance; and the states (and clean
    estimates) of the first `keep` chains, for the filmstrips."""

    def __init__(self, keep: int):
        self.keep = keep
        self.sigmas, self.energy, self.grad_norm, self.states, self.denoised = [], [], [], [], []
        self.level_sigmas, self.step, self.acceptance = [], [], {}
        self._level, self._level_state = None, None

    def __call__(self, info: dict) -> None:
        z = info["z"].detach().float().cpu()
        if "accepted" in info:
            self.acceptance.setdefault(info["i"], []).append(info["accepted"].float().mean().item())
        if info["i"] != self._level:  # a new level (a step for langevin): how far the chains moved since the last
            if self._level_state is not None:
                self.step.append((z - self._level_state).flatten(1).norm(dim=1) / math.sqrt(z[0].numel()))
                self.level_sigmas.append(info["sigma"])
            self._level, self._level_state = info["i"], z
        self.sigmas.append(info["sigma"])
        self.energy.append(info["energy"].detach().float().cpu())
        self.grad_norm.append(info["grad_norm"].detach().float().cpu())
        self.states.append(z[:self.keep].clone())
        if "denoised" in info:
            self.denoised.append(info["denoised"].detach().float().cpu()[:self.keep])


def record_chains(model, settings, n: int, keep: int, seed: int,
                  condition: str | None = None) -> tuple[torch.Tensor, torch.Tensor, ChainRecorder]:
    """(chain starts, final samples, the recorder) of images 0 .. n-1 of run seed `seed`: the chains generation
    makes for them (the same sampling core), each asking for `condition` when given."""
    recorder = ChainRecorder(keep)
    conditions = None if condition is None else [condition] * n
    final = sample_latents(model, range(n), seed, settings, conditions, callback=recorder).latents
    return chain_starts(model, range(n), seed, settings), final, recorder


def band(values: list[torch.Tensor]) -> dict[str, list[float]]:
    """Median and 10% / 90% quantiles over chains, per evaluation."""
    if not values:
        return {"q10": [], "median": [], "q90": []}
    stacked = torch.stack(values).double()  # (evaluations, chains)
    q = torch.nanquantile(stacked, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), dim=1)
    return {"q10": finite_or_none(q[0]), "median": finite_or_none(q[1]), "q90": finite_or_none(q[2])}


def finite_or_none(values: torch.Tensor) -> list[float | None]:
    """A JSON-safe list: NaN (a model without an energy) becomes null."""
    return [x if math.isfinite(x) else None for x in values.tolist()]


def frame_indices(evaluations: int, frames: int) -> list[int]:
    return sorted({round(x) for x in np.linspace(0, evaluations - 1, min(frames, evaluations))})


# ------------------------------------------------------------------------------------------------ latents

def read_real(folder: Path, model, spec, limit: int) -> dict:
    """Held-out real latents (the shards the model never trained on, else all of them) and training latents, at most
    `limit` each, in shard order; refuses latents of another VAE than the one that decodes them."""
    manifest = sh.read_manifest(folder)
    recorded = (manifest.get("vae") or {}).get("weights_sha256")
    if recorded and recorded != spec.weights_sha256():
        raise EbdError(f"{folder} holds latents of another VAE (weights sha256 {recorded[:12]}...) than the one given")
    files = [s["file"] for s in manifest["shards"] if s["count"] > 0]
    require(bool(files), f"{folder} holds no latents")
    held = [s["file"] for s in ((model.metadata.get("latents") or {}).get("held_out") or [] if model else [])
            if s["file"] in files]
    trained = [f for f in files if f not in held]

    def read(names: list[str]) -> dict:
        keys, latents = [], []
        for row in sh.iter_latents([str(folder / f) for f in names]):
            if len(keys) == limit:
                break
            keys.append(row["key"])
            latents.append(torch.from_numpy(np.asarray(row["latent"], dtype=np.float32)))
        return {"keys": keys, "latents": torch.stack(latents) if latents else None}

    return {"held_out": read(held or files), "train": read(trained) if held else None,
            "held_out_is_unseen": bool(held)}


def slerp(a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` points on the great circle from a to b (Shoemake 1985), lengths interpolated linearly; the ends are
    a and b exactly."""
    fa, fb = a.flatten().double(), b.flatten().double()
    cos = torch.dot(fa, fb) / (fa.norm() * fb.norm())
    omega = torch.arccos(cos.clamp(-1, 1))
    out = []
    for t in torch.linspace(0, 1, steps, dtype=torch.float64).tolist():
        if omega < 1e-6:
            out.append((1 - t) * fa + t * fb)
        else:
            out.append((torch.sin((1 - t) * omega) * fa + torch.sin(t * omega) * fb) / torch.sin(omega))
    return torch.stack(out).float().reshape(steps, *a.shape)


def nearest(queries: torch.Tensor, pool: torch.Tensor, k: int, exclude_self: bool = False) -> tuple[torch.Tensor,
                                                                                                     torch.Tensor]:
    """(distances, indices) of each query's k nearest latents in `pool` (L2 over all latent dimensions)."""
    d = torch.cdist(queries.flatten(1).double(), pool.flatten(1).double())
    if exclude_self:  # queries are pool[:len(queries)]
        d[torch.arange(len(queries)), torch.arange(len(queries))] = float("inf")
    distances, indices = d.topk(min(k, pool.shape[0] - int(exclude_self)), dim=1, largest=False)
    return distances.float(), indices


def energies(model, z: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The energy generation records per image (NaN for a model without one)."""
    with torch.no_grad():
        return torch.cat([model.energy(z[a:a + batch]).float() for a in range(0, len(z), batch)])


# ------------------------------------------------------------------------------------------------ the page

def run_inspection(cfg: InspectConfig) -> dict:
    """Builds the page; returns what inspect.json holds."""
    from ..models import load_model

    tick = time.monotonic()
    torch.manual_seed(cfg.seed)
    spec = resolve_vae(cfg.vae)
    model = load_model(cfg.model) if cfg.model else None
    if model is not None:
        model.check_vae(spec, cfg.vae)
    settings = model.resolve_sampler(cfg.sampler) if model is not None else None
    if cfg.condition is not None:
        require(model is not None, "a condition needs --model")
        cfg = replace(cfg, condition=canonical(cfg.condition))
        check_condition(parse_condition(cfg.condition), model.label_vocabulary, cfg.model)
    real = read_real(Path(cfg.latents), model, spec, cfg.max_latents) if cfg.latents else None
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    vae = load_vae(spec, torch.device("cpu"), torch.float32)
    decode = lambda z: decode_images(vae, z)  # noqa: E731
    sections, data = [], {"model": cfg.model, "vae": cfg.vae, "latents": cfg.latents, "config": asdict(cfg)}

    generated = None
    if model is not None:
        starts, generated, rec = record_chains(model, settings, cfg.chains, cfg.filmstrips, cfg.seed, cfg.condition)
        sections += chain_sections(out, data, model, settings, rec, generated, decode, cfg)
        sets = {"generated": energies(model, generated), "chain starts": energies(model, starts)}
        if real is not None:
            name = "held-out real" if real["held_out_is_unseen"] else "real"
            sets[name] = energies(model, real["held_out"]["latents"])
            if real["train"] is not None:
                sets["training"] = energies(model, real["train"]["latents"])
        sections.append(energy_section(out, data, sets))
    if real is not None:
        sections.append(channel_section(out, data, generated, real["held_out"]["latents"]))
        sections.append(interpolation_section(out, data, model, real["held_out"], decode, cfg))
    sections.append(neighbour_section(out, data, generated, real, decode, cfg))
    data["seconds"] = round(time.monotonic() - tick, 1)
    atomic_write_json(out / "inspect.json", data)
    write_page(out / PAGE, cfg, model, settings, sections, data["seconds"])
    return data


def chain_sections(out: Path, data: dict, model, settings, rec: ChainRecorder, final: torch.Tensor, decode,
                   cfg: InspectConfig) -> list[dict]:
    evaluations = len(rec.energy)
    sigmas = rec.sigmas if all(s is not None for s in rec.sigmas) else None
    frames = frame_indices(evaluations, cfg.frames)
    rows = []
    for c in range(cfg.filmstrips):
        states = torch.stack([rec.states[f][c] for f in frames] + [final[c]])
        rows.append((f"chain {c + 1}: state", decode(states)))
        if rec.denoised:
            rows.append((f"chain {c + 1}: clean estimate", decode(torch.stack([rec.denoised[f][c] for f in frames]))))
    save_png(out / "chains.png", labelled_rows(rows, columns=len(frames) + 1))
    at = ", ".join(f"{f}" + (f" (sigma {sigmas[f]:.3g})" if sigmas else "") for f in frames)
    level_sigmas = rec.level_sigmas if sigmas else None
    curves = {"energy": band(rec.energy), "grad_norm": band(rec.grad_norm), "step": band(rec.step)}
    acceptance = {i: float(np.mean(v)) for i, v in sorted(rec.acceptance.items())}
    data["chains"] = {"sampler": asdict(settings), "chains": len(final), "evaluations": evaluations,
                      "frames": frames, "sigmas": sigmas, "step_sigmas": level_sigmas, "curves": curves,
                      "acceptance": acceptance}
    (out / "curves.png").write_bytes(curves_figure(curves, sigmas, level_sigmas, rec.acceptance))
    has_energy = bool(torch.isfinite(torch.stack(rec.energy)).any())
    return [
        {"title": "Chains", "image": "chains.png",
         "text": f"{cfg.filmstrips} of {len(final)} chains of the model's sampler ({settings.name}, {evaluations} "
                 f"network evaluations per chain), decoded at evaluations {at}; the last column is the final "
                 "sample." + (" The clean-estimate rows decode what the chain would end at if it stopped there "
                              "(Tweedie's z - sigma^2 grad E, or DDIM's predicted x0): the noise removed."
                              if rec.denoised else "")},
        {"title": "Along the chains", "image": "curves.png",
         "text": ("Median and 10-90% band over " f"{len(final)} chains. " +
                  ("Energies at different noise levels are not comparable: each point is E(z, sigma) at the "
                   "chain's own level. " if sigmas and has_energy else "") +
                  ("This model predicts noise and has no energy: its curve is empty; the gradient-norm panel shows "
                   "the predicted noise's norm. " if not has_energy else "") +
                  "A gradient that vanishes or explodes, or steps that stop shrinking near the data, show here."),
         "table": [("Metropolis acceptance, level " + str(i), f"{a:.2f}") for i, a in acceptance.items()]},
    ]


def energy_section(out: Path, data: dict, sets: dict[str, torch.Tensor]) -> dict:
    finite = {k: v for k, v in sets.items() if torch.isfinite(v).any()}
    medians = {k: float(v[torch.isfinite(v)].median()) for k, v in finite.items()}
    data["energies"] = {"median": medians, "count": {k: len(v) for k, v in sets.items()}}
    if not finite:
        return {"title": "Energies", "text": "This model has no energy (a noise predictor): nothing to show."}
    (out / "energies.png").write_bytes(energy_figure(finite))
    return {"title": "Energies", "image": "energies.png",
            "text": "The energy generation records per image (at the smallest noise level for noise-conditional "
                    "models). Samples far above held-out real data have not reached the data; far below, the "
                    "energy has holes that the sampler found.",
            "table": [(f"median E, {k}", f"{v:.4g}") for k, v in medians.items()]}


def channel_section(out: Path, data: dict, generated: torch.Tensor | None, real: torch.Tensor) -> dict:
    (out / "channels.png").write_bytes(channels_figure(generated, real))
    stats = {"real": {"mean": real.mean((0, 2, 3)).tolist(), "std": real.std((0, 2, 3)).tolist()}}
    if generated is not None:
        stats["generated"] = {"mean": generated.mean((0, 2, 3)).tolist(), "std": generated.std((0, 2, 3)).tolist()}
    data["channels"] = stats
    return {"title": "Latent channels", "image": "channels.png",
            "text": "Per channel: the distribution of latent values, and the mean and std of each position (colour "
                    "scales set by the real data)." + (" Generated against real: a narrow histogram or a flat std "
                                                       "map is a sampler that stops short of the data's spread."
                                                       if generated is not None else ""),
            "table": [(f"channel {c} mean / std, {name}", f"{s['mean'][c]:.3f} / {s['std'][c]:.3f}")
                      for name, s in stats.items() for c in range(len(s["mean"]))]}


def interpolation_section(out: Path, data: dict, model, held: dict, decode, cfg: InspectConfig) -> dict:
    latents, keys = held["latents"], held["keys"]
    pairs = min(cfg.interpolations, len(latents) // 2)
    picks = torch.randperm(len(latents), generator=torch.Generator().manual_seed(cfg.seed))[:2 * pairs].tolist()
    rows, paths = [], []
    for p in range(pairs):
        a, b = picks[2 * p], picks[2 * p + 1]
        path = slerp(latents[a], latents[b], cfg.interpolation_steps)
        e = energies(model, path) if model is not None else torch.full((len(path),), float("nan"))
        rows.append((f"pair {p + 1}", decode(path)))
        paths.append({"from": keys[a], "to": keys[b], "energy": finite_or_none(e)})
    data["interpolation"] = paths
    if not paths:
        return {"title": "Interpolation", "text": "Fewer than two real latents: nothing to interpolate."}
    save_png(out / "interpolation.png", labelled_rows(rows, columns=cfg.interpolation_steps))
    section = {"title": "Interpolation", "image": "interpolation.png",
               "text": "Spherical interpolation between pairs of real latents, decoded (first and last columns are "
                       "the real latents). A smooth path through plausible images means a smooth latent space.",
               "table": [(f"pair {i + 1}", f"{p['from']} to {p['to']}")
                         for i, p in enumerate(paths)]}
    if all(x is not None for p in paths for x in p["energy"]):
        (out / "interpolation-energy.png").write_bytes(interpolation_energy_figure(paths))
        section["image2"] = "interpolation-energy.png"
        section["text"] += " Below: the energy along each path; a hump is a barrier between two modes."
    return section


def neighbour_section(out: Path, data: dict, generated: torch.Tensor | None, real: dict | None, decode,
                      cfg: InspectConfig) -> dict:
    title = "Nearest neighbours"
    if generated is not None and real is not None:
        pool = real["train"] if real["train"] is not None else real["held_out"]
        queries, exclude, what = generated[:cfg.neighbours], False, "sample"
        held = real["held_out"]["latents"]
        reference, _ = nearest(held[:256], pool["latents"], 1, exclude_self=pool is real["held_out"])
        data_floor = float(reference[:, 0].median())
    elif real is not None:  # the data alone: each latent's nearest other latents in the folder
        pool, what = real["held_out"], "latent"
        queries, exclude = pool["latents"][:cfg.neighbours], True
        data_floor = None
    else:
        return {"title": title, "text": "No --latents given: nothing to compare samples with."}
    if not len(queries):
        return {"title": title, "text": "No samples to show."}
    distances, indices = nearest(queries, pool["latents"], cfg.neighbours_k, exclude)
    rows = [(f"{what} {q + 1}", decode(torch.cat([queries[q:q + 1], pool["latents"][indices[q]]])))
            for q in range(len(queries))]
    save_png(out / "neighbours.png", labelled_rows(rows, columns=1 + indices.shape[1]))
    data["neighbours"] = {"queries": what, "pool": "training" if real["train"] is not None else "folder",
                          "distances": distances.tolist(),
                          "keys": [[pool["keys"][j] for j in row] for row in indices.tolist()],
                          "held_out_to_pool_median": data_floor}
    if exclude:
        data["neighbours"]["query_keys"] = pool["keys"][:len(queries)]
    floor = (f" For scale: the median distance from a held-out real latent to its nearest training latent is "
             f"{data_floor:.3g}; a sample much closer than that to a training latent is a copy." if data_floor else "")
    return {"title": title, "image": "neighbours.png",
            "text": f"Each row: a {what} (first column), then its {indices.shape[1]} nearest "
                    f"{'training latents' if real['train'] is not None else 'other latents of the folder'} "
                    f"(L2 in latent space), decoded.{floor}",
            "table": [(f"{what} {q + 1}", ", ".join(f"{d:.3g}" for d in row)) for q, row in
                      enumerate(distances.tolist())]}


def write_page(path: Path, cfg: InspectConfig, model, settings, sections: list[dict], seconds: float) -> None:
    def img(name: str) -> str:
        encoded = base64.b64encode((path.parent / name).read_bytes()).decode()
        return f'<img alt="{html.escape(name)}" src="data:image/png;base64,{encoded}">'

    subject = (f"model <code>{html.escape(str(cfg.model))}</code> ({type(model).__name__}, sampler "
               f"{html.escape(settings.name)}; {html.escape(cfg.condition or 'unconditional')})" if model is not None
               else "the data alone")
    body = [f"<h1>ebd x-ray</h1><p>{subject}; latents <code>{html.escape(str(cfg.latents))}</code>; VAE "
            f"<code>{html.escape(cfg.vae)}</code>. Built in {seconds:.0f} s by <code>python -m jobs.inspect</code>."
            "</p>"]
    for s in sections:
        body.append(f"<section><h2>{html.escape(s['title'])}</h2><p>{html.escape(s['text'])}</p>")
        body += [img(s[k]) for k in ("image", "image2") if k in s]
        if s.get("table"):
            body.append("<table>" + "".join(f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td></tr>"
                                            for a, b in s["table"]) + "</table>")
        body.append("</section>")
    page = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>ebd x-ray</title>"
            "<link rel=\"icon\" href=\"data:,\"><style>body{font:14px sans-serif;max-width:1400px;margin:1em auto;"
            "padding:0 1em}img{max-width:100%;image-rendering:pixelated;display:block;margin:.5em 0}"
            "td{padding:1px 8px}section{border-top:1px solid #ccc}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")
    atomic_write(path, lambda f: f.write(page.encode()))
