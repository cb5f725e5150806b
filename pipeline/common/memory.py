"""Batch sizes scaled to memory, and out-of-memory recovery that loses no item.

`probe_batch_size` runs a stage's work on growing probe batches, measures peak memory per sample (CUDA's peak
allocator statistics on a GPU, the process's peak RSS on a CPU, its high-water mark reset before each probe) and
returns the largest power of two that fits the
budget: free GPU memory x a fraction, or a RAM budget. A run sizes each stage once, before any shard, and records
the sizes: shards are then chunked the same way on every run, which keeps regenerated shards byte-identical.

`run_in_chunks` processes items in chunks of that size; on an out-of-memory error it halves the chunk and
retries it, so every item is still processed exactly once.
"""

from __future__ import annotations

import gc
import resource
import time
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


class SimulatedOutOfMemory(RuntimeError):
    """Raised by a stage configured with `simulate_oom_above`: a GPU out-of-memory we cannot cause on a CPU box."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"CUDA out of memory (simulated): batch {size} > {limit}")


def run_in_chunks(items: int, batch_size: int, work: Callable[[int, int], T],
                  on_oom: Callable[[int], None] | None = None) -> tuple[list[T], list[int]]:
    """Calls work(start, end) over [0, items) in chunks of at most `batch_size`; returns (results, chunk sizes).

    On an out-of-memory error the failing chunk is retried at half the size (down to 1, then the error stands);
    the smaller size is kept for the rest of the items.
    """
    results, sizes, start = [], [], 0
    size = max(1, batch_size)
    while start < items:
        end = min(items, start + size)
        try:
            results.append(work(start, end))
        except BaseException as e:  # noqa: BLE001 - only out-of-memory is handled, the rest is re-raised
            if not is_out_of_memory(e) or end - start == 1:
                raise
            _free_memory()
            size = max(1, (end - start) // 2)
            if on_oom is not None:
                on_oom(size)
            continue
        sizes.append(end - start)
        start = end
    return results, sizes


def probe_batch_size(work: Callable[[int], None], device: torch.device, budget_bytes: int | None = None,
                     gpu_memory_fraction: float = 0.8, start: int = 2, max_batch: int = 1024,
                     min_gain: float | None = 0.05) -> dict:
    """Largest power-of-two batch whose measured peak memory fits the budget, grown only while each doubling
    still cuts the time per sample by `min_gain` (None: memory alone decides). `work(n)` runs one batch of n.

    Returns {"batch_size", "bytes_per_sample", "budget_bytes", "device"}.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * gpu_memory_fraction)
    else:
        budget = int(budget_bytes or 2 * 1024**3)
    work(1)  # warm-up: one-time allocations (kernel caches, thread pools) are not a per-sample cost
    size, per_sample, best, best_time = start, 0.0, 0, float("inf")
    while size <= max_batch:
        try:
            tick = time.perf_counter()
            peak = _peak_during(lambda n=size: work(n), device)
            time_per_sample = (time.perf_counter() - tick) / size
        except BaseException as e:  # noqa: BLE001
            if not is_out_of_memory(e):
                raise
            _free_memory()
            break
        per_sample = peak / size  # the largest probe so far: fixed costs weigh least there
        if peak > budget:
            break
        if min_gain is not None and best and time_per_sample > best_time * (1 - min_gain):
            break  # a bigger batch no longer pays (CPUs saturate long before memory runs out)
        best, best_time = size, time_per_sample
        if per_sample * size * 2 > budget:  # the next doubling would not fit
            break
        size *= 2
    if best == 0:  # even the smallest probe did not fit: fall back to what the budget allows, at least 1
        best = max(1, int(budget // max(per_sample, 1.0)))
    return {"batch_size": min(best, max_batch), "bytes_per_sample": int(per_sample), "budget_bytes": budget,
            "device": device.type}


def _peak_during(fn: Callable[[], None], device: torch.device) -> float:
    """Peak memory (bytes) used by fn beyond what was in use before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    # On a CPU: reset the kernel's high-water RSS mark to the current RSS (Linux: write 5 to clear_refs), run, and
    # read the new mark. Where that is not allowed, compare the old mark with the current RSS instead: a mark left
    # by earlier work (loading the model) then inflates the estimate, which errs on the safe side.
    before = _proc_status_bytes("VmRSS:")
    reset = _reset_peak_rss()
    fn()
    peak = _proc_status_bytes("VmHWM:") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return float(max(0, peak - before))


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status_bytes(field: str) -> int:
    """VmRSS / VmHWM of this process (Linux); elsewhere the high-water mark from getrusage (a smaller estimate)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
