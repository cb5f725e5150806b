"""Latent precompute: images -> VAE encoder -> sampled, scaled latents -> webdataset shards, as Ray tasks.

The driver plans every input item, puts them in a seeded random order (`shuffle`, on by default; stratified by label
where labels are known, so the held-out last shards hold every label), sets the last `holdout` of it apart, cuts the
training part and then the held-out part into shards of `shard_size` items (the manifest lists the held-out ones)
and runs one Ray task per missing shard. Each task reads its own inputs, rejects bad ones (recorded, never fatal),
encodes in batches with the VAE it loaded once per worker process, and writes its tar then its done marker
atomically. The manifest is written last. Re-running the same command skips complete shards whose inputs are
unchanged; a different config or input list into the same folder is refused."""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from ..common.config import ConfigError, EbdError, JobConfig, require, to_dict
from ..common.logs import Progress
from ..common.metrics import record_precompute_shard
from ..distributed.cluster import connect
from ..io import latent_shards as sh
from ..io import storage
from ..io.files import atomic_write_json, atomic_write_lines, claim_run_folder, read_json
from ..io.images import DEFAULT_FORMATS, MAX_DECODE_BYTES, MAX_DECODE_SECONDS, Rejected, decode_image, to_model_input
from ..io.items import inputs_fingerprint
from ..io.reading import read_items
from ..io.shard_plan import held_out_count, plan_shards, shard_order
from ..io.sources import Item, count_by_field, count_by_label, plan_items, printable
from ..io.tars import write_tar
from ..io.twins import TWIN_THRESHOLD
from .autoencoder import VaeSpec, resolve_vae
from .grouping import TWINS_FILE, decode_budgets, find_groups, held_out_with_a_training_twin

RUN_FILE = "run.json"  # what this folder was started with; a resumed run must match it


@dataclass(frozen=True)
class PrecomputeConfig(JobConfig):
    input: str | None = None                     # image folder, tar shard(s) or parquet file(s)
    vae: str | None = None                       # a Stable Diffusion checkpoint (with vae/) or AutoencoderKL folder
    output: str | None = None                    # folder for the latent shards and their manifest
    input_format: Literal["auto", "folder", "webdataset", "parquet"] = "auto"  # auto: by what --input holds
    vae_subfolder: str | None = "auto"           # "auto": PATH/vae if it exists (an SD checkpoint), else PATH
    resolution: int = 512                        # pixels; a multiple of the VAE's downscale factor
    shard_size: int = 1000                       # input items per output shard (rejects included)
    batch_size: int = 16                         # images per VAE forward pass
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: fp32 on CPU, fp16 on GPU
    seed: int = 0                                # run seed; image i's noise seed derives from (seed, key)
    store_moments: bool = False                  # also store posterior mean and log-variance (scaled units)
    shuffle: bool = True                         # shards hold a seeded random sample of the inputs, so any
                                                 # shard (the held-out ones) is representative of the whole set
    stratify: bool = True                        # with shuffle: every shard holds each label known at planning
                                                 # (folder, parquet column) in its share of the set
    holdout: float = 0.1                         # share of the inputs in held-out shards of their own, written
                                                 # last and listed in the manifest: training and the evaluator
                                                 # never read them (evaluation's reference); 0: none
    max_holdout_images: int = 10_000             # at most this many held out (evaluation reads a few thousand)
    num_cpus_per_task: float = 1.0
    num_gpus_per_task: float | Literal["auto"] = "auto"  # auto: 1 if the cluster has GPUs, else 0
    max_retries: int = 3                         # retries of a task whose worker died
    max_in_flight: int = 0                       # tasks submitted at once; 0: twice the cluster's task slots
    max_pixels: int = 89_478_485                 # larger images are rejected before decoding (bombs)
    min_side: int = 64                           # images whose shorter side is smaller are rejected
    max_file_bytes: int = 256 * 1024 * 1024
    max_decode_bytes: int = MAX_DECODE_BYTES     # one image's decoding memory, from its header (bench/hostile.md)
    max_decode_seconds: float = MAX_DECODE_SECONDS  # one image's decoding time, checked inside the decode
    # Image formats decoded (Pillow names, told by signature before any decoder runs); others are rejects. Widen it
    # knowingly: every decoder on the list parses untrusted bytes (TIFF, PPM, TGA, JPEG2000, ICO are safe picks).
    image_formats: list[str] = field(default_factory=lambda: list(DEFAULT_FORMATS))
    image_column: str | None = None              # parquet: column with image bytes (auto-detected if null)
    key_column: str | None = None                # parquet: column with sample keys (row number if null)
    label_column: str | None = None              # parquet: column with labels ("label" if present)
    label_fields: list[str] = field(default_factory=list)  # named labels, each kept: folder levels, KEY.json
                                                 # keys or parquet columns, e.g. [shape, background]
    # Twins (near-copies, variants of one design) land on one side of the held-out split (vae/grouping.py):
    # auto: the inputs' group keys (GROUP~... names, the group column) and near-twins found in the pixels
    twins: Literal["auto", "names", "images", "none"] = "auto"
    twin_threshold: float = TWIN_THRESHOLD       # edge-map Jaccard distance under which two images are twins
    group_column: str | None = None              # parquet: column with each row's group ("group" if present)
    progress_interval_s: float = 10.0

    def validate(self) -> None:
        for name in ("input", "vae", "output"):
            require(getattr(self, name) is not None, f"missing {name}: pass --{name} or set it in the config")
        require(8 <= self.resolution <= MAX_RESOLUTION, f"resolution must be in [8, {MAX_RESOLUTION}] (each image "
                f"reserves resolution^2 x 4 floats), got {self.resolution}")
        require(self.shard_size >= 1, f"shard_size must be >= 1, got {self.shard_size}")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        require(0.01 <= self.num_cpus_per_task <= 1024, "num_cpus_per_task must be in [0.01, 1024] (Ray counts CPU "
                f"shares in hundredths), got {self.num_cpus_per_task}")
        require(self.num_gpus_per_task == "auto" or self.num_gpus_per_task >= 0, "num_gpus_per_task must be >= 0")
        require(self.max_retries >= 0 and self.max_in_flight >= 0, "max_retries and max_in_flight must be >= 0")
        require(self.max_pixels > 0 and self.min_side >= 1 and self.max_file_bytes > 0,
                "max_pixels, min_side and max_file_bytes must be positive")
        require(self.max_decode_bytes > 0, "max_decode_bytes must be positive")
        require(0 <= self.holdout < 1 and self.max_holdout_images >= 1,
                f"holdout must be in [0, 1) and max_holdout_images >= 1, got {self.holdout}, {self.max_holdout_images}")
        require(0 < self.max_decode_seconds <= 3600, "max_decode_seconds must be in (0, 3600], got "
                f"{self.max_decode_seconds}")
        require(self.max_pixels <= MAX_PIXELS_LIMIT, f"max_pixels must be at most {MAX_PIXELS_LIMIT} (a 16k x 16k "
                f"image: decoding holds about 4 bytes a pixel), got {self.max_pixels}")
        from PIL import Image
        Image.init()
        unknown = [f for f in self.image_formats if f.upper() not in Image.OPEN]
        require("EPS" not in [f.upper() for f in self.image_formats],
                "image_formats: EPS is never decoded (Pillow hands PostScript to Ghostscript)")
        require(bool(self.image_formats) and not unknown, f"image_formats: unknown format {unknown[0]!r} (Pillow "
                f"knows {', '.join(sorted(Image.OPEN))})" if unknown else "image_formats must name a format")
        require(0 <= self.twin_threshold < 1, f"twin_threshold must be in [0, 1), got {self.twin_threshold}")
        require(all(isinstance(f, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", f) for f in self.label_fields)
                and len(set(self.label_fields)) == len(self.label_fields),
                f"label_fields must be distinct names of [A-Za-z0-9_-], got {self.label_fields!r}")


MAX_RESOLUTION = 4096           # a 4096 px image as float32 RGB is 200 MB per batch item before the VAE
MAX_PIXELS_LIMIT = 16384 ** 2


# Keys that change what lands in the shards: a resumed run must agree with the folder on all of them.
# batch_size is one: a batch's composition changes the VAE's float rounding on CPU (oneDNN), so a shard is
# byte-identical only when re-encoded with the same batching (and on the same kind of processor).
_CONTENT_KEYS = ("input_format", "vae_subfolder", "resolution", "shard_size", "batch_size", "dtype", "seed",
                 "store_moments", "shuffle",
                 "max_pixels", "min_side", "max_file_bytes", "image_column", "key_column", "label_column")


@dataclass(frozen=True)
class ShardJob:
    """Everything one shard task needs, small enough to ship with each task."""
    index: int
    items: tuple[Item, ...]
    output: str
    vae: VaeSpec
    resolution: int
    batch_size: int
    dtype: str
    seed: int
    store_moments: bool
    max_pixels: int
    min_side: int
    max_file_bytes: int
    use_gpu: bool
    num_threads: int
    label_fields: tuple[str, ...] = ()
    image_formats: tuple[str, ...] = DEFAULT_FORMATS
    max_decode_bytes: int = MAX_DECODE_BYTES
    max_decode_seconds: float = MAX_DECODE_SECONDS
    inputs_sha256: str = ""  # the items' inputs as planned (io/items.inputs_fingerprint): a resume compares it


def prepare(cfg: PrecomputeConfig) -> tuple[VaeSpec, str, list[Item]]:
    """Everything that can fail on user input, done before anything is written: VAE, resolution, inputs."""
    spec = resolve_vae(cfg.vae, cfg.vae_subfolder)
    require(cfg.resolution % spec.downscale_factor == 0,
            f"resolution {cfg.resolution} is not a multiple of the VAE's downscale factor {spec.downscale_factor}")
    fmt, items = plan_items(cfg.input, cfg.input_format, cfg.image_column, cfg.key_column, cfg.label_column,
                            cfg.label_fields, cfg.group_column, cfg.max_file_bytes)
    inside = _output_inside_input(cfg)
    if inside is not None:  # the job's own shards and markers are never its inputs (a resume plans what it planned)
        items = [it for it in items if it.source != inside and not it.source.startswith((f"{inside}/", f"{inside}::",
                                                                                         f"{inside}#"))]
    if not items:
        raise ConfigError(f"no input files under {cfg.input}")
    storage.check_writable(cfg.output)
    return spec, fmt, items


def shard_job(cfg: PrecomputeConfig, spec: VaeSpec, index: int, items: tuple[Item, ...], use_gpu: bool,
              num_threads: int) -> ShardJob:
    return ShardJob(index, items, storage.canonical(cfg.output), spec, cfg.resolution, cfg.batch_size, cfg.dtype,
                    cfg.seed, cfg.store_moments, cfg.max_pixels, cfg.min_side, cfg.max_file_bytes, use_gpu,
                    max(1, num_threads), tuple(cfg.label_fields), tuple(f.upper() for f in cfg.image_formats),
                    cfg.max_decode_bytes, cfg.max_decode_seconds, inputs_fingerprint(items))


def run_precompute(cfg: PrecomputeConfig, address: str | None = None, dashboard: bool = False) -> dict:
    """Runs (or resumes) the whole job and returns the manifest."""
    import ray

    spec, fmt, items = prepare(cfg)
    stratified = cfg.shuffle and cfg.stratify and any(item.label is not None for item in items)
    out = storage.canonical(cfg.output)
    group_of, twins, twins_record = {}, None, None
    if cfg.twins != "none" and cfg.holdout > 0:
        if cfg.twins != "names":
            connect(address, dashboard=dashboard, log_to_driver=True)
        group_of, twins, twins_record = find_groups(items, cfg.twins, cfg.twin_threshold, decode_budgets(cfg), out,
                                                    cfg.num_cpus_per_task)
        items = [replace(item, group=group_of.get(item.key)) for item in items]  # recorded with each latent
    if cfg.shuffle:
        items = shard_order(items, cfg.seed, stratified, group_of)
    vae_identity = spec.identity()
    chunks, held_out_shards = plan_shards(items, held_out_count(cfg.holdout, cfg.max_holdout_images, len(items)),
                                          cfg.shard_size, group_of)
    _claim_output(out, cfg, vae_identity, items, stratified)
    if twins_record is not None:
        atomic_write_json(storage.join(out, TWINS_FILE), twins_record)
    if twins is not None:
        twins["held_out_with_a_training_twin"] = held_out_with_a_training_twin(chunks, held_out_shards)

    done = {i: s for i in range(len(chunks)) if (s := _completed_shard(out, i, chunks[i])) is not None}
    todo = [i for i in range(len(chunks)) if i not in done]
    log = Progress("precompute", total=sum(len(chunks[i]) for i in todo), unit="images",
                   interval_s=cfg.progress_interval_s)
    log.log(f"{len(items)} inputs ({fmt}) -> {len(chunks)} shards in {out}; {len(done)} already complete, "
            f"{len(todo)} to encode")

    if todo:
        connect(address, dashboard=dashboard, log_to_driver=True)
        gpus, have = cfg.num_gpus_per_task, ray.cluster_resources().get("GPU", 0)
        if gpus == "auto":
            gpus = 1.0 if have > 0 else 0.0
        if gpus > have:  # Ray would wait for them forever
            raise EbdError(f"num_gpus_per_task is {gpus:g} but the cluster has {have:g} GPUs: use auto or 0, or add "
                           "GPU nodes")
        if cfg.num_cpus_per_task > ray.cluster_resources().get("CPU", 0):
            raise EbdError(f"num_cpus_per_task is {cfg.num_cpus_per_task:g} but the cluster has "
                           f"{ray.cluster_resources().get('CPU', 0):g} CPUs")
        task = encode_shard_task().options(num_cpus=cfg.num_cpus_per_task, num_gpus=gpus,
                                           max_retries=cfg.max_retries, retry_exceptions=False)
        slots = max(1, int(ray.cluster_resources().get("CPU", 1) // cfg.num_cpus_per_task))
        limit = cfg.max_in_flight or 2 * slots
        jobs = [shard_job(cfg, spec, i, chunks[i], use_gpu=gpus > 0, num_threads=int(cfg.num_cpus_per_task))
                for i in todo]
        in_flight: dict = {}
        while jobs or in_flight:
            while jobs and len(in_flight) < limit:
                job = jobs.pop(0)
                in_flight[task.remote(job)] = job.index
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            index = in_flight.pop(ready[0])
            try:
                stats = ray.get(ready[0])
            except ray.exceptions.RayError as e:
                raise EbdError(f"shard {index} failed: {_cause(e)} (complete shards are kept: re-run the same "
                               "command to resume)") from None
            done[index] = stats
            log.update(stats["seen"], extra=f"shards {len(done)}/{len(chunks)}", force=not (jobs or in_flight))

    manifest = _write_manifest(out, cfg, fmt, spec, vae_identity, [done[i] for i in range(len(chunks))],
                               held_out_shards=held_out_shards, stratified=stratified, twins=twins)
    totals = manifest["totals"]
    log.log(f"done: {totals['encoded']} encoded, {totals['rejected']} rejected of {totals['seen']} inputs; "
            f"manifest {storage.join(out, sh.MANIFEST)}")
    return manifest


def encode_shard_task():
    """The Ray remote wrapper of `encode_shard`, built lazily so importing this module needs no Ray."""
    import ray
    return ray.remote(encode_shard)


def encode_shard(job: ShardJob) -> dict:
    """Reads, preprocesses and encodes one shard's items; writes the tar, then its done marker. Returns stats."""
    import torch

    from . import autoencoder as vae_lib

    start = time.monotonic()
    torch.set_num_threads(job.num_threads)
    device = vae_lib.pick_device(job.use_gpu)
    vae = vae_lib.cached_vae(job.vae, device, job.dtype)

    samples, rejects, labels, fields = [], [], [], []
    batch: list[tuple[Item, np.ndarray, dict]] = []

    def flush():
        pixels = torch.from_numpy(np.stack([to_model_input(p) for _, p, _ in batch]))
        seeds = [meta["seed"] for _, _, meta in batch]
        latents, mean, logvar = vae_lib.encode(vae, pixels, seeds)
        for j, (item, _, meta) in enumerate(batch):
            moments = torch.stack([mean[j], logvar[j]]).float().cpu().numpy() if job.store_moments else None
            samples.append(sh.latent_sample(item.key, latents[j].float().cpu().numpy(), meta, moments))
        batch.clear()

    for loaded in read_items(list(job.items), job.max_file_bytes, job.label_fields):
        item = loaded.item
        try:
            if loaded.reject:
                raise Rejected(*loaded.reject)
            pixels, size = decode_image(loaded.data, job.resolution, job.max_pixels, job.min_side,
                                        job.image_formats, job.max_decode_bytes, job.max_decode_seconds)
        except Rejected as r:
            rejects.append({"source": item.source, "key": item.key, "reason": r.reason, "detail": r.detail,
                            "shard": job.index} | ({"exception": r.exception} if r.exception else {}))
            continue
        meta = {"source": item.source, "original_size": list(size), "seed": vae_lib.image_seed(job.seed, item.key)}
        if item.group is not None:
            meta["group"] = item.group  # its twins' group: they are all on this side of the split
        label = loaded.label if loaded.label is not None else next(iter(loaded.fields.values()), None)
        if label is not None:
            meta["label"] = label  # the one label tools that read one see (.cls, first folder, or first field)
        if loaded.fields:
            meta["labels"] = loaded.fields
        labels.append(label)
        fields.append(loaded.fields)
        batch.append((item, pixels, meta))
        if len(batch) == job.batch_size:
            flush()
    if batch:
        flush()

    name = sh.SHARD_NAME.format(job.index)
    written = write_tar(storage.join(job.output, name), samples)
    stats = {"shard": job.index, "file": name, "count": len(samples), "seen": len(job.items),
             "rejected": len(rejects), **written, "inputs_sha256": job.inputs_sha256,
             "labels": count_by_label(labels), "label_fields": count_by_field(fields), "rejects": rejects,
             "seconds": round(time.monotonic() - start, 3),
             "worker": {"pid": os.getpid(), "device": device.type,
                        "vae_loads_in_process": vae_lib.vae_loads_in_this_process(job.vae, device, job.dtype)}}
    atomic_write_json(_stats_path(job.output, job.index), stats)  # the done marker: written after the tar
    record_precompute_shard(len(samples), rejects)
    return stats


# --------------------------------------------------------------------------------------- driver helpers

def _output_inside_input(cfg: PrecomputeConfig) -> str | None:
    """The output folder's path relative to a local input folder that holds it (None when it is elsewhere)."""
    if storage.is_remote(cfg.input) or storage.is_remote(cfg.output) or not storage.is_dir(cfg.input):
        return None
    root, out = os.path.realpath(storage.canonical(cfg.input)), os.path.realpath(storage.canonical(cfg.output))
    if out == root or os.path.commonpath([root, out]) != root:
        return None
    return printable(Path(out).relative_to(root).as_posix())  # as item sources spell it


# A done marker as encode_shard writes it: anything else is a shard to encode again, never trusted.
_MARKER_TYPES = {"file": str, "count": int, "seen": int, "rejected": int, "bytes": int, "sha256": str,
                 "rejects": list, "labels": dict, "label_fields": dict, "inputs_sha256": str}


def _valid_marker(stats) -> bool:
    if not isinstance(stats, dict) or not all(isinstance(stats.get(k), t) and not isinstance(stats.get(k), bool)
                                              for k, t in _MARKER_TYPES.items()):
        return False
    counts_ok = min(stats["count"], stats["seen"], stats["rejected"]) >= 0 and \
        stats["seen"] == stats["count"] + stats["rejected"] == stats["count"] + len(stats["rejects"])
    return counts_ok and all(isinstance(r, dict) and isinstance(r.get("reason"), str) for r in stats["rejects"]) \
        and all(isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in stats["labels"].items()) \
        and sum(stats["labels"].values()) <= stats["count"] and all(isinstance(c, dict) and all(
            isinstance(k, str) and isinstance(v, int) for k, v in c.items()) for c in stats["label_fields"].values())


def _stats_path(out: str, index: int) -> str:
    return storage.join(out, sh.STATS_DIR, Path(sh.SHARD_NAME.format(index)).stem + ".json")


def _completed_shard(out: str, index: int, items: tuple[Item, ...]) -> dict | None:
    """A shard is complete when its done marker exists, was written from `items` as they are now (names, sizes,
    modification times), and its tar has the size and sha256 the marker records; anything else (a tar without a
    marker; a tar cut short or changed after its marker; an input edited in place) is encoded again."""
    stats_path, tar_path = _stats_path(out, index), storage.join(out, sh.SHARD_NAME.format(index))
    if not storage.is_file(stats_path) or not storage.is_file(tar_path):
        return None
    try:
        stats = read_json(stats_path)
    except ValueError:
        return None
    if not _valid_marker(stats) or stats["inputs_sha256"] != inputs_fingerprint(items):  # wrong shape, or inputs
        return None  # changed since: encoded again
    if stats["bytes"] != storage.size(tar_path) or stats["sha256"] != storage.file_sha256(tar_path):
        return None
    if stats["count"] != sh.count_samples(tar_path):  # the count is the shard's own, not the marker's word
        return None
    return stats


def _claim_output(out: str, cfg: PrecomputeConfig, vae_identity: dict, items: list[Item], stratified: bool) -> None:
    """Records what this folder is being filled with; refuses to resume a folder started differently."""
    listing = hashlib.sha256("\n".join(f"{it.source}\t{it.key}" for it in items).encode()).hexdigest()
    config = {k: getattr(cfg, k) for k in _CONTENT_KEYS}
    if stratified:  # likewise (below); an older shuffled folder of labelled inputs resumes with stratify: false
        config["stratify"] = True
    if cfg.holdout > 0:  # likewise; an older folder resumes with holdout: 0 (and stratify: false)
        config["holdout"] = [cfg.holdout, cfg.max_holdout_images]
    if cfg.twins != "none" and cfg.holdout > 0:  # likewise: an older folder resumes with twins: none; "units 2":
        config["twins"] = [cfg.twins, cfg.twin_threshold, cfg.group_column, "units 2"]  # shard_plan's order of groups
    if cfg.label_fields:  # recorded only when used, so folders started before the setting existed still resume
        config["label_fields"] = list(cfg.label_fields)
    if cfg.max_decode_bytes != MAX_DECODE_BYTES:  # likewise
        config["max_decode_bytes"] = cfg.max_decode_bytes
    if [f.upper() for f in cfg.image_formats] != list(DEFAULT_FORMATS):  # likewise
        config["image_formats"] = [f.upper() for f in cfg.image_formats]
    run = {"config": config, "vae_weights_sha256": vae_identity["weights_sha256"], "inputs": len(items),
           "inputs_sha256": listing}
    claim_run_folder(out, run, RUN_FILE)


def _write_manifest(out: str, cfg: PrecomputeConfig, fmt: str, spec: VaeSpec, vae_identity: dict,
                    stats: list[dict], *, held_out_shards: int, stratified: bool, twins: dict | None = None) -> dict:
    rejects = [r for s in stats for r in s["rejects"]]
    atomic_write_lines(storage.join(out, sh.REJECTS), rejects)
    held = stats[len(stats) - held_out_shards:] if held_out_shards else []
    labels: dict[str, int] = {}
    by_field: dict[str, dict[str, int]] = {}
    for s in stats:
        for label, n in s["labels"].items():
            labels[label] = labels.get(label, 0) + n
        for name, counts in s.get("label_fields", {}).items():  # markers from before label_fields have none
            total = by_field.setdefault(name, {})
            for value, n in counts.items():
                total[value] = total.get(value, 0) + n
    by_reason: dict[str, int] = {}
    for r in rejects:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    manifest = {
        "format": sh.LATENTS_FORMAT,
        "vae": vae_identity,
        "scaling_factor": vae_identity["scaling_factor"],
        "shift_factor": vae_identity["shift_factor"],
        "latent": {"shape": list(spec.latent_shape(cfg.resolution)), "dtype": "float16", "scaled": True,
                   "moments": cfg.store_moments, "moments_layout": "2 x C x h x w: mean, logvar (scaled units)"},
        "resolution": cfg.resolution,
        "seed": cfg.seed,
        # "shuffled": every shard is a seeded random sample of the inputs (train's holdout_shards relies on it)
        "order": "shuffled" if cfg.shuffle else "input",
        "stratified_by_label": stratified,
        # the split jobs.train and jobs.fit_evaluator keep (holdout_shards: auto): the last shards, never trained on
        "held_out": {"share": cfg.holdout, "files": [s["file"] for s in held],
                     "images": sum(s["count"] for s in held)},
        "input": {"path": str(cfg.input), "format": fmt},
        "config": {k: v for k, v in to_dict(cfg).items() if k not in ("input", "output", "vae")},
        "shards": [{"file": s["file"], "count": s["count"], "seen": s["seen"], "rejected": s["rejected"],
                    "bytes": s["bytes"], "sha256": s["sha256"]} for s in stats],
        "totals": {"seen": sum(s["seen"] for s in stats), "encoded": sum(s["count"] for s in stats),
                   "rejected": len(rejects), "shards": len(stats)},
        "rejects_by_reason": dict(sorted(by_reason.items())),
        "labels": dict(sorted(labels.items())),
    }
    if twins is not None:  # how the split kept twins together (vae/grouping.py)
        manifest["twins"] = twins
    if by_field:  # {"shape": {"ring": 1650, ...}, "background": {...}}: every named label, counted
        manifest["label_fields"] = {name: dict(sorted(c.items())) for name, c in sorted(by_field.items())}
    atomic_write_json(storage.join(out, sh.MANIFEST), manifest)  # last: its presence means the folder is complete
    return manifest


def _cause(error: Exception) -> str:
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"

