"""The DAG's stages: sampler actors, decoder actors (or one fused GPU actor of both), the shard writer task, and the
progress counter they report to. Each is constructed in its Ray worker from plain arguments."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np

from ..common.config import EbdError
from ..common.logs import log_line
from ..common.plugins import import_plugins
from ..io import image_shards, storage
from ..sampling.conditions import conditions_for
from ..sampling.noise import image_key
from ..sampling.settings import SamplerSettings


def stage_threads(cpus: float) -> int:
    return max(1, int(cpus))


def absolute_spec(spec):
    """The spec with an absolute path (or its URI): Ray workers may run in another working directory."""
    from dataclasses import replace
    return replace(spec, path=storage.canonical(spec.path))


@dataclass(frozen=True)
class SamplerSpec:
    """What a run's sampler actors make and how: built once on the driver (dag.decoded_shards), the same for every
    actor."""
    model_dir: str                    # absolute, or a URI: actors may run in another working directory
    sampler: SamplerSettings          # resolved once on the driver
    seed: int
    images_per_shard: int
    num_images: int
    batch_size: int                   # chains per chunk; an actor shrinks its own after an out-of-memory
    threads: int
    precision: str                    # resolved once per placement (probes.sampler_precision); the stats record it
    plan: list | None = None          # [[condition, count], ...] of a conditional run, else None
    plugins: list[str] | None = None
    use_gpu: bool = False
    gpu_share: float = 0.0            # of one GPU, and the fraction of that share's memory the actor may use
    gpu_fraction: float = 0.8


class SamplerStage:
    """Sampler actor: one shard's latents through the one sampling core (`sampling.core.sample_latents`), on CUDA
    when the actor got a GPU share and CUDA exists, else on CPU tensors (one log line says so)."""

    def __init__(self, spec: SamplerSpec, progress=None, shard_chunks: dict | None = None):
        import ray
        import torch

        from ..common.memory import limit_gpu_memory
        from ..common.metrics import StageMetrics
        from ..models import load_model
        from ..vae.autoencoder import pick_device

        torch.set_num_threads(spec.threads)
        import_plugins(spec.plugins or [])
        self.device = pick_device(spec.use_gpu)
        limit_gpu_memory(self.device, spec.gpu_share, spec.gpu_fraction)  # Ray's GPU shares do not limit memory
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        if spec.use_gpu and self.device.type == "cpu":
            log_line("generate", f"sampler actor on GPU {','.join(self.gpu_ids) or '?'}: torch sees no CUDA here, "
                                 "so it samples on CPU tensors")
        self.shard_chunks = shard_chunks or {}  # shard -> the chunk sizes it was made with (a remade shard's)
        self.model = load_model(spec.model_dir, self.device)
        self.progress = progress  # the run's ProgressCounter actor (None outside jobs.generate)
        self.sampler, self.precision, self.plan = spec.sampler, spec.precision, spec.plan
        self.seed, self.per_shard, self.num_images = spec.seed, spec.images_per_shard, spec.num_images
        self.batch_size = spec.batch_size
        self.metrics = StageMetrics("sampler")

    def __call__(self, batch: dict) -> dict:
        from ..sampling.core import sample_latents

        rows = {"shard": [], "latents": [], "info": []}
        for shard in batch["shard"]:
            start = int(shard) * self.per_shard
            count = min(self.per_shard, self.num_images - start)
            conditions = conditions_for(self.plan, start, count) if self.plan else None
            self.metrics.busy(1)
            shrinks: list[int] = []
            samples = sample_latents(self.model, range(start, start + count), self.seed, self.sampler, conditions,
                                     self.batch_size, device=self.device, on_chunk=self._sampled,
                                     precision=self.precision,
                                     chunks=self.shard_chunks.get(str(int(shard)), {}).get("sampler"),
                                     on_oom=shrinks.append)
            self.batch_size = min([self.batch_size, *shrinks])  # out of memory once: the smaller size from now on
            self.metrics.busy(0)
            z = samples.latents.cpu().numpy()
            rows["shard"].append(int(shard))
            rows["latents"].append(z.tobytes())
            rows["info"].append(json.dumps({
                "count": count, "latent_shape": list(z.shape[1:]), "seeds": samples.seeds,
                "energy": samples.energies.cpu().tolist(), "sampler_batch_seconds": samples.chunk_seconds,
                "sampler_chunks": samples.chunk_sizes, "sampler_batch_size": self.batch_size,
                "sampler_oom_shrinks": shrinks,
                "gradient_evaluations": samples.evaluations, "sampler_device": self.device.type,
                "sampler_gpu_ids": self.gpu_ids, "sampler_precision": self.precision,
                "mala_accepted": samples.accepted, "mala_proposed": samples.proposed}
                | ({"conditions": conditions} if conditions else {})))
        return {"shard": np.array(rows["shard"]), "latents": np.array(rows["latents"], dtype=object),
                "info": np.array(rows["info"], dtype=object)}


    def _sampled(self, size: int, seconds: float) -> None:
        self.metrics.batch(size, seconds)
        if self.progress is not None:
            self.progress.add.remote("sampled", size)


class DecodeStage:
    """Decoder actor: `vae.decode(z / scaling_factor)` on CUDA when the actor got a GPU and CUDA exists, else CPU.
    `decoder` is the VAE's spec, or a tiny decoder's (resolve_decoder checked it on the driver)."""

    def __init__(self, decoder, dtype: str, use_gpu: bool, batch_size: int, threads: int,
                 simulate_oom_above: int | None, *, progress=None, gpu_share: float = 0.0, gpu_fraction: float = 0.8,
                 shard_chunks: dict | None = None):
        import ray
        import torch

        from ..common.memory import limit_gpu_memory
        from ..common.metrics import StageMetrics
        from ..vae.autoencoder import load_vae, pick_device, resolve_dtype

        torch.set_num_threads(threads)
        self.device = pick_device(use_gpu)
        if gpu_share:  # a fused actor's sampler set the same process-wide cap already
            limit_gpu_memory(self.device, gpu_share, gpu_fraction)
        self.shard_chunks = shard_chunks or {}
        self.vae = load_vae(decoder, self.device, resolve_dtype(dtype, self.device, decoder))
        self.batch_size, self.simulate_oom_above = batch_size, simulate_oom_above
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        self.metrics = StageMetrics("decode")
        self.progress = progress  # the run's ProgressCounter actor (None outside jobs.generate)

    def __call__(self, batch: dict) -> dict:
        import torch

        from ..common.memory import SimulatedOutOfMemory, run_in_chunks
        from ..common.precision import exact_float32
        from ..vae.autoencoder import decode, to_uint8

        infos, images = [], []
        for shard, latents, info_text in zip(batch["shard"], batch["latents"], batch["info"]):
            info = json.loads(info_text)
            z = torch.from_numpy(np.frombuffer(latents, dtype=np.float32).copy()).reshape(info["count"],
                                                                                         *info["latent_shape"])
            seconds: list[float] = []
            shrinks: list[int] = []

            def work(a: int, b: int):
                if self.simulate_oom_above is not None and b - a > self.simulate_oom_above:
                    raise SimulatedOutOfMemory(b - a, self.simulate_oom_above)
                tick = time.perf_counter()
                with exact_float32(self.device, "float32"):  # a float32 VAE decodes in float32, not TF32
                    out = to_uint8(decode(self.vae, z[a:b])).permute(0, 2, 3, 1).cpu().numpy()
                seconds.append(time.perf_counter() - tick)
                self.metrics.batch(b - a, seconds[-1])
                if self.progress is not None:
                    self.progress.add.remote("decoded", b - a)  # fire and forget: progress moves per batch
                return out

            self.metrics.busy(1)
            chunks, sizes = run_in_chunks(info["count"], self.batch_size, work, on_oom=shrinks.append,
                                          chunks=self.shard_chunks.get(str(int(shard)), {}).get("decode"))
            self.batch_size = min([self.batch_size, *shrinks])  # out of memory once: the smaller size from now on
            self.metrics.busy(0)
            pixels = np.concatenate(chunks)
            info |= {"image_shape": list(pixels.shape[1:]), "decode_batch_seconds": seconds, "decode_chunks": sizes,
                     "decode_batch_size": self.batch_size, "decode_oom_shrinks": shrinks,
                     "decode_device": self.device.type, "decode_gpu_ids": self.gpu_ids}
            infos.append(json.dumps(info))
            images.append(pixels.tobytes())
        # The latents ride along to the writer, which stores them beside the images when save_latents is on.
        return {"shard": batch["shard"], "images": np.array(images, dtype=object),
                "latents": batch["latents"], "info": np.array(infos, dtype=object)}


class ProgressCounter:
    """Ray actor (no CPU): images sampled and decoded so far in this run, added to per batch by the stages, read by
    the driver every second, so progress lines and ebd_images_generated_total move per batch, not per written shard
    (a shard of 256 images can take minutes)."""

    def __init__(self):
        self.counts = {"sampled": 0, "decoded": 0}

    def add(self, stage: str, n: int) -> None:
        self.counts[stage] += n

    def totals(self) -> dict:
        return dict(self.counts)


class SampleDecodeStage:
    """GPU actor (`gpu_stage: fused`): samples a shard and decodes it on the same GPU, so its latents never leave
    the process."""

    def __init__(self, sampler: dict, decoder: dict):  # each stage's constructor keywords
        self.sample, self.decode = SamplerStage(**sampler), DecodeStage(**decoder)

    def __call__(self, batch: dict) -> dict:
        return self.decode(self.sample(batch))


def write_shard(batch: dict, output: str, formats: tuple[str, ...], seed: int, images_per_shard: int, model_id: str,
                save_latents: bool, plugins: tuple[str, ...] = ()) -> dict:
    """Writer task: PNG-encodes one shard's images and writes its files, then its done marker."""
    import_plugins(plugins)  # an output format a plugin registers is written in this worker
    stats = []
    for shard, images, latents, info_text in zip(batch["shard"], batch["images"], batch["latents"], batch["info"]):
        info = json.loads(info_text)
        pixels = np.frombuffer(images, dtype=np.uint8).reshape(info["count"], *info["image_shape"])
        z = np.frombuffer(latents, dtype=np.float32).reshape(info["count"], *info["latent_shape"]) \
            if save_latents else None
        start = int(shard) * images_per_shard
        keys = [image_key(seed, i) for i in range(start, start + info["count"])]
        extra = {k: v for k, v in info.items()
                 if k not in ("seeds", "energy", "latent_shape", "image_shape", "conditions")}
        result = image_shards.write_image_shard(output, int(shard), formats, keys, pixels, info["seeds"],
                                                np.asarray(info["energy"]), model_id, extra_stats=extra, latents=z,
                                                conditions=info.get("conditions"))
        stats.append(json.dumps(result))
    return {"stats": np.array(stats, dtype=object)}

def stage_error(error: BaseException) -> EbdError | None:
    """The EbdError a stage or probe raised, from the exception Ray ends the run with (None if there is none): its
    own one line, not the Ray traceback around it."""
    for _ in range(10):
        if error is None:
            return None
        cause = getattr(error, "cause", None)  # a RayTaskError's original exception
        if isinstance(error, EbdError) and not isinstance(cause, BaseException):  # Ray appends retry advice
            return EbdError(str(error).splitlines()[0] if str(error) else type(error).__name__)
        error = cause if isinstance(cause, BaseException) else (error.__cause__ or error.__context__)
    return None

