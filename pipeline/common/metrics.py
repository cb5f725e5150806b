"""Prometheus metrics for generation. All names start with `ebd_`.

Two paths, because many actors on many nodes cannot each open an HTTP port:
- The driver serves `DriverMetrics` on one endpoint (`--metrics-port`, bound to 127.0.0.1 unless told otherwise)
  from what finished shards report: images, Langevin steps, per-batch stage seconds, batch sizes, throughput.
  With a pushgateway URL the final values are pushed when the job ends (runs shorter than a scrape interval).
- Actors record their own live values with `ray.util.metrics` (`StageMetrics`); each node's Ray metrics agent
  exports them with Ray's `ray_` prefix (`ray_ebd_stage_batch_seconds`, ...), so a Prometheus that scrapes the
  Ray cluster sees them.
"""

from __future__ import annotations

import collections
import functools
import math
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, push_to_gateway, start_http_server

SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STAGES = ("sampler", "decode", "write")


class DriverMetrics:
    def __init__(self, window_s: float = 30.0):
        self.registry = CollectorRegistry()
        r = self.registry
        self.images = Counter("ebd_images_generated", "Images decoded, counted per decoded batch", registry=r)
        self.gradient_evaluations = Counter("ebd_gradient_evaluations", "Energy-gradient evaluations by the sampler, "
                                            "summed over chains", registry=r)
        self.shards = Counter("ebd_shards_written", "Output shards completed", registry=r)
        self.images_per_second = Gauge("ebd_images_per_second", "Images/s over the recent window", registry=r)
        self.batch_seconds = Histogram("ebd_batch_seconds", "Seconds per batch, by stage", ["stage"],
                                       buckets=SECONDS_BUCKETS, registry=r)
        self.batch_size = Gauge("ebd_batch_size", "Batch size chosen, by stage", ["stage"], registry=r)
        self.in_flight = Gauge("ebd_batches_in_flight", "Shards handed to the pipeline and not yet written",
                               ["stage"], registry=r)
        self.window_s = window_s
        self._recent: collections.deque = collections.deque()
        self._server = None

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Starts the HTTP endpoint; port 0 picks a free one. Returns the port."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_port

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def record_decoded(self, count: int) -> None:
        """Images the decoders finished since the last call (the images counter and the recent rate move per batch,
        not per written shard)."""
        self.images.inc(count)
        now = time.monotonic()
        self._recent.append((now, count))
        while self._recent and now - self._recent[0][0] > self.window_s:
            self._recent.popleft()
        span = max(now - self._recent[0][0], 1e-9) if len(self._recent) > 1 else None
        if span:
            self.images_per_second.set(sum(c for _, c in list(self._recent)[1:]) / span)

    def record_shard(self, stats: dict) -> None:
        """Folds one finished shard's report into the metrics."""
        self.shards.inc()
        if stats.get("gradient_evaluations"):
            self.gradient_evaluations.inc(stats["gradient_evaluations"])
        for stage in STAGES:
            for seconds in stats.get(f"{stage}_batch_seconds", []):
                self.batch_seconds.labels(stage).observe(seconds)
            if f"{stage}_batch_size" in stats:
                self.batch_size.labels(stage).set(stats[f"{stage}_batch_size"])

    def set_in_flight(self, shards: int) -> None:
        self.in_flight.labels("pipeline").set(shards)

    def push(self, url: str, job: str = "ebd_generate") -> None:
        push_to_gateway(url, job=job, registry=self.registry)


# Names the Ray metrics agent exports for the ray.util.metrics below (with its `ray_` prefix), for dashboards
# and their test; histograms also export _bucket, _count and _sum series.
RAY_EXPORTED = ("ray_ebd_stage_batch_seconds", "ray_ebd_stage_batch_size", "ray_ebd_stage_batches_in_flight",
                "ray_ebd_stage_items_total", "ray_ebd_precompute_images_total", "ray_ebd_precompute_rejects_total",
                # training: every objective's loss, its own metrics (training/objectives METRICS), and the loop's
                *(f"ray_ebd_train_{n}" for n in ("loss", "energy_pos", "energy_neg", "energy_gap", "chain_grad_norm",
                                                 "loss_small_sigma", "loss_large_sigma", "param_grad_norm",
                                                 "samples_per_s", "step", "lr", "rollbacks")))


@functools.lru_cache(maxsize=1)
def _precompute_counters():
    try:
        from ray.util.metrics import Counter as RayCounter
        return (RayCounter("ebd_precompute_images", "Images encoded into latent shards"),
                RayCounter("ebd_precompute_rejects", "Inputs rejected, by reason", tag_keys=("reason",)))
    except Exception:  # noqa: BLE001 - metrics are best-effort
        return None


def record_precompute_shard(encoded: int, rejects: list[dict]) -> None:
    """Counts one precompute shard's images and rejects (by reason) through Ray's metrics export."""
    counters = _precompute_counters()
    if counters is None:
        return
    images, rejected = counters
    if encoded:  # Ray's Counter refuses 0, and a shard of nothing but bad inputs encodes none
        images.inc(encoded)
    for r in rejects:
        rejected.inc(1, tags={"reason": r["reason"]})


class StageMetrics:
    """Live per-actor metrics through Ray's metrics export (seen as ray_ebd_stage_*). No-ops without it."""

    def __init__(self, stage: str):
        self.tags = {"stage": stage}
        try:
            from ray.util.metrics import Counter as RayCounter
            from ray.util.metrics import Gauge as RayGauge
            from ray.util.metrics import Histogram as RayHistogram
            self.seconds = RayHistogram("ebd_stage_batch_seconds", "Seconds per batch", list(SECONDS_BUCKETS),
                                        tag_keys=("stage",))
            self.size = RayGauge("ebd_stage_batch_size", "Batch size in use", tag_keys=("stage",))
            self.in_flight = RayGauge("ebd_stage_batches_in_flight", "Batches being processed", tag_keys=("stage",))
            self.items = RayCounter("ebd_stage_items", "Items processed", tag_keys=("stage",))
        except Exception:  # noqa: BLE001 - metrics are best-effort
            self.seconds = self.size = self.in_flight = self.items = None

    def batch(self, size: int, seconds: float) -> None:
        if self.seconds is not None:
            self.seconds.observe(seconds, tags=self.tags)
            self.size.set(size, tags=self.tags)
            self.items.inc(size, tags=self.tags)

    def busy(self, n: int) -> None:
        if self.in_flight is not None:
            self.in_flight.set(n, tags=self.tags)


class TrainingGauges:
    """Training metrics through Ray's metrics export (scraped as ray_ebd_train_*), set by rank 0 only."""

    def __init__(self, names: tuple[str, ...]):
        try:
            from ray.util.metrics import Gauge
            self.gauges = {n: Gauge(f"ebd_train_{n}", description=f"EBM training: {n.replace('_', ' ')}")
                           for n in names}
        except Exception:  # metrics export is optional (ray without [default])  # noqa: BLE001
            self.gauges = {}

    def set(self, values: dict) -> None:
        for name, gauge in self.gauges.items():
            if name in values and math.isfinite(values[name]):
                gauge.set(float(values[name]))
