"""The generation job's driver: checks everything that can fail on user input, claims the output folder, sizes the
batches, runs the DAG with progress and metrics, and writes the summary and manifest. `ebd generate` calls
`run_generation`."""

from __future__ import annotations

import json
import math
import time

from ..common import migrations
from ..common.logs import Progress, log_line
from ..common.plugins import import_plugins
from ..distributed.cluster import connect
from ..io import image_shards, storage
from ..io.files import atomic_write_json, file_sha256, read_json
from ..sampling.conditions import check_condition, load_plan, parse_condition
from .config import GenerateConfig, with_plan
from .dag import build_dag, place_stages
from .manifest import RUN_FILE, claim_output, finish
from .probes import choose_batch_sizes, recorded_batch_sizes, sampler_precision
from .stages import ProgressCounter, stage_error


def run_generation(cfg: GenerateConfig, address: str | None = None, dashboard: bool = False) -> dict:
    """Runs (or resumes) generation; returns the summary."""

    from ..common.metrics import DriverMetrics
    from ..models import load_model
    from ..vae.autoencoder import resolve_decoder, resolve_vae

    import_plugins(cfg.plugins)  # (load_config did too; a config built in Python did not)
    cfg = with_plan(cfg)  # a conditions file read once, here; num_images settled

    model = load_model(cfg.model)
    spec = resolve_vae(cfg.vae)
    model.check_vae(spec, cfg.vae)
    decoder = resolve_decoder(cfg.decoder, spec)  # the VAE itself, or a tiny decoder made for its latents
    latent_shape = list(model.config.latent_shape)
    vae_identity = spec.identity()
    sampler = model.resolve_sampler(cfg.sampler)  # validated once, here (one line if not); stages take it as it is
    plan = run_plan(cfg, model)  # conditions checked against the model's labels: one line, before any work
    model_dir = storage.canonical(cfg.model)
    weights = storage.local_copy(model_dir) / "model.safetensors"  # load_model's cached copy: not fetched twice
    model_id = f"{storage.name(model_dir)}-{file_sha256(weights)[:12]}"
    out = storage.canonical(cfg.output)
    storage.check_writable(out)  # one line before any work: no such bucket, no permission
    num_shards = math.ceil(cfg.num_images / cfg.images_per_shard)

    run = claim_output(out, cfg, sampler, model_id, vae_identity, decoder, plan)  # refusals before Ray starts
    connect(address, dashboard=dashboard)
    formats = tuple(cfg.formats)
    done = {j: s for j in range(num_shards) if (s := image_shards.completed_shard(out, j, formats)) is not None}
    pending = [j for j in range(num_shards) if j not in done]
    placement = place_stages(cfg, model, sampler, decoder, max(1, len(pending)), run.get("sampler_device"))
    precision = sampler_precision(cfg, placement, migrations.sampler_precision(run))  # a resume keeps its recorded one
    batch_sizes = recorded_batch_sizes(run) or choose_batch_sizes(cfg, sampler, decoder, latent_shape, placement,
                                                                  plan, precision=precision)
    if "batch_sizes" not in run:
        atomic_write_json(storage.join(out, RUN_FILE),
                          run | {"batch_sizes": batch_sizes, "sampler_device": placement.sampler_device,
                                 "sampler_precision": precision})
    # A shard remade (cut short or changed after its marker) is cut into the chunks it was first made with.
    shard_chunks = {str(j): c for j in pending if (c := image_shards.recorded_chunks(out, j)) is not None}
    asked = cfg.batch_size or cfg.sampler_batch_size or cfg.decode_batch_size
    if "batch_sizes" in run and asked and asked not in (batch_sizes["sampler"], batch_sizes["decode"]):
        log_line("generate", f"resuming with this folder's batch sizes {batch_sizes['sampler']}/"
                 f"{batch_sizes['decode']}, not {asked}: shards stay byte-identical that way")

    metrics = DriverMetrics()
    port = metrics.serve(cfg.metrics_port, cfg.metrics_host) if cfg.metrics_port is not None else None
    log = Progress("generate", total=cfg.num_images, unit="images", interval_s=cfg.progress_interval_s,
                   done=sum(s["count"] for s in done.values()))
    log.log(f"{cfg.num_images} images in {num_shards} shards -> {out}; {len(done)} complete, {len(pending)} to make; "
            f"batch sizes sampler={batch_sizes['sampler']} decode={batch_sizes['decode']}; {placement.describe()} "
            f"({placement.reason})"
            + (f"; metrics on http://{cfg.metrics_host}:{port}/metrics" if port is not None else ""))
    start = time.monotonic()
    watcher = None
    try:
        if pending:
            import ray

            counter = ray.remote(num_cpus=0)(ProgressCounter).remote()
            watcher = _ProgressWatcher(counter, metrics, log, lambda: f"shards {len(done)}/{num_shards}",
                                       cfg.num_images - sum(s["count"] for s in done.values()))
            dataset = build_dag(cfg, pending, sampler, decoder, placement, batch_sizes, model_id, precision=precision,
                                plan=plan, progress=counter, shard_chunks=shard_chunks)
            _record_written(dataset, len(pending), done, metrics)
            watcher.finish(made=sum(done[j]["count"] for j in pending))
        seconds = time.monotonic() - start
        finished = storage.join(out, "summary.json")
        if not pending and storage.is_file(finished) and storage.is_file(storage.join(out, "manifest.json")):
            log.log("every shard is complete: nothing to do (summary.json keeps the run that made them)")
            return read_json(finished) | {"images_this_run": 0}
        summary = finish(out, cfg, done, num_shards, settings=sampler, model_id=model_id, vae_identity=vae_identity,
                         decoder=decoder, latent_shape=latent_shape, plan=plan, placement=placement,
                         batch_sizes=batch_sizes, precision=precision, seconds=seconds,
                         made=sum(done[j]["count"] for j in pending))
        log.log(f"done: {summary['images']} images in {len(done)} shards; {summary['images_per_second']:.2f} images/s "
                f"this run; preview {storage.join(out, 'preview.png')}")
        if cfg.pushgateway:
            _push_final(metrics, cfg.pushgateway, log)
        if port is not None and cfg.metrics_linger_s > 0:
            time.sleep(cfg.metrics_linger_s)  # lets a scraper read the final values before the endpoint closes
        return summary
    finally:
        if watcher is not None:
            watcher.stop()
        metrics.shutdown()


def _record_written(dataset, pending: int, done: dict, metrics) -> None:
    """Streams the DAG: each written shard's done marker into `done` and the metrics, as the writers finish."""
    metrics.set_in_flight(pending)
    try:
        for batch in dataset.iter_batches(batch_size=1, batch_format="numpy"):
            for text in batch["stats"]:
                stats = json.loads(text)
                done[stats["shard"]] = stats
                metrics.record_shard(stats)
                pending -= 1
                metrics.set_in_flight(pending)
    except Exception as e:  # a stage's own EbdError (e.g. non-finite chains) as its one line
        raise stage_error(e) or e


def _push_final(metrics, pushgateway: str, log: Progress) -> None:
    """The final values to a pushgateway; a monitoring fault costs one warning line, never the (written) run."""
    try:
        metrics.push(pushgateway)
    except Exception as e:  # noqa: BLE001 - the images are safe: a monitoring fault does not fail the job
        log.log(f"warning: the final metrics were not pushed to {pushgateway} ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200] if str(e) else ''}); the images are written and complete")


class _ProgressWatcher:
    """A driver thread that reads the ProgressCounter every second into the progress lines and the metrics."""

    def __init__(self, counter, metrics, log: Progress, extra, to_make: int):
        import threading

        self.counter, self.metrics, self.log, self.extra, self.seen = counter, metrics, log, extra, 0
        self.to_make, self.sampled = to_make, 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ebd-progress", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.wait(1.0):
            self._poll()

    def _poll(self, floor: int = 0, force: bool = False) -> None:
        import ray

        totals = ray.get(self.counter.totals.remote())
        total = max(int(totals["decoded"]), floor)
        if total > self.seen or totals["sampled"] > self.sampled or force:
            self.sampled = totals["sampled"]
            self.metrics.record_decoded(total - self.seen)
            sampling = f"sampled {self.sampled}/{self.to_make}; " if total < self.to_make else ""
            self.log.update(total - self.seen, extra=sampling + self.extra(), force=force)
            self.seen = total

    def finish(self, made: int) -> None:
        """The last reading, at least the images written this run (an increment still in flight counts too)."""
        self.stop()
        self._poll(floor=made, force=True)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)

def run_plan(cfg: GenerateConfig, model) -> list[list] | None:
    """[[condition, count], ...] in image order for a conditional run (None otherwise), each condition checked
    against the labels `model` was trained on."""
    plan = load_plan(cfg.condition, cfg.conditions)
    if plan is None:
        return None
    if cfg.condition is not None:
        plan[0][1] = cfg.num_images
    for text, _ in plan:
        check_condition(parse_condition(text), model.label_vocabulary, storage.name(storage.canonical(cfg.model)))
    return plan

