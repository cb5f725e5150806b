"""Batch sizes scaled to memory, and out-of-memory recovery that loses no item.

`probe_batch_size` runs a stage's work on growing probe batches, measures peak memory per sample (CUDA's peak
allocator statistics on a GPU, the process's peak RSS on a CPU, its high-water mark reset before each probe) and
returns the largest power of two that fits the budget and a cap: no timing enters the choice, so the same command
on the same machine picks the same size whatever else runs. A GPU stage's budget is its share of the GPU's memory
(`gpu_budget_bytes`: total x share x fraction, never what happens to be free), which the stage's process also
enforces on itself (`limit_gpu_memory`). A run sizes each stage once, before any shard, and records the sizes:
shards are then chunked the same way on every run, which keeps regenerated shards byte-identical.

`run_in_chunks` processes items in chunks of that size; on an out-of-memory error it frees the failed chunk's
memory, halves the chunk and retries it, so every item is still processed exactly once; the caller keeps the
smaller size for later work and records the chunks, so a shard regenerated later is cut the same way.
"""

from __future__ import annotations

import gc
import resource
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


# What CUDA libraries say when an allocation fails inside them rather than in PyTorch's allocator.
_OOM_MESSAGES = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed",
                 "cudnn_status_not_enough_workspace", "cudaerrormemoryallocation", "cufft_alloc_failed")


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(m in text for m in _OOM_MESSAGES)


class ProbeOutOfMemory(RuntimeError):
    """Even one item does not fit a stage's memory budget."""


class SimulatedOutOfMemory(RuntimeError):
    """Raised by a stage configured with `simulate_oom_above`: a GPU out-of-memory we cannot cause on a CPU box."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"CUDA out of memory (simulated): batch {size} > {limit}")


def run_in_chunks(items: int, batch_size: int, work: Callable[[int, int], T],
                  on_oom: Callable[[int], None] | None = None,
                  chunks: list[int] | None = None) -> tuple[list[T], list[int]]:
    """Calls work(start, end) over [0, items) in chunks of at most `batch_size`, or exactly the sizes `chunks` lists
    (a shard's recorded cut, so it is remade the same way); returns (results, chunk sizes).

    On an out-of-memory error the failing chunk's memory is freed (after the error and its frames are released) and
    the chunk is retried at half the size (down to 1, then the error stands); the smaller size is kept for the rest
    of the items.
    """
    results, sizes, start = [], [], 0
    size = max(1, batch_size)
    planned = list(chunks) if chunks and sum(chunks) == items and min(chunks) >= 1 else None
    while start < items:
        end = min(items, start + (planned[len(sizes)] if planned else size))
        failed = False
        try:
            results.append(work(start, end))
        except BaseException as e:  # noqa: BLE001 - only out-of-memory is handled, the rest is re-raised
            if not is_out_of_memory(e) or end - start == 1:
                raise
            failed = True
        if failed:  # outside the handler: the traceback no longer pins the failed chunk's tensors and graph
            _free_memory()
            size, planned = max(1, (end - start) // 2), None
            if on_oom is not None:
                on_oom(size)
            continue
        sizes.append(end - start)
        start = end
    return results, sizes


# On a CPU an image network is fastest on a few images at a time: the activations of 32 images of 64 x 64 stay in
# the caches, while in chunks of 256 the demo's decoder runs 2.9x slower and its evaluator 2.1x (bench/cpu_batch.md).
# A GPU wants the whole batch.
CPU_CHUNK_PIXELS = 32 * 64 * 64


def cache_sized_chunk(device: torch.device | str, batch: int, pixels_per_item: int) -> int:
    """How many of `batch` items an image network runs at once on `device`: all on an accelerator; on a CPU those
    that make up CPU_CHUNK_PIXELS pixels (at least one)."""
    if torch.device(device).type != "cpu":
        return max(1, batch)
    return max(1, min(batch, CPU_CHUNK_PIXELS // max(1, pixels_per_item)))


def gpu_budget_bytes(total_bytes: int, share: float, fraction: float, stages: int = 1) -> int:
    """A GPU stage's memory budget: its actor's share of the GPU's total memory x `fraction`, split evenly among the
    `stages` one actor runs (a fused actor samples and decodes). Actors holding shares that sum to one GPU together
    size for at most `fraction` of it, whatever each sees free when it probes."""
    return int(total_bytes * min(1.0, share) * fraction / stages)


def limit_gpu_memory(device: torch.device, share: float, fraction: float) -> None:
    """Caps this process's CUDA allocations at its share of the GPU x `fraction` (Ray's fractional GPUs do not limit
    memory): an actor that outgrows its share fails with out-of-memory, which `run_in_chunks` recovers from, rather
    than starving the actor beside it."""
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(min(1.0, share) * fraction, device)


def probe_batch_size(work: Callable[[int], None], device: torch.device, budget_bytes: int,
                     max_batch: int = 1024, start: int = 2) -> dict:
    """Largest power-of-two batch up to `max_batch` whose measured peak memory fits `budget_bytes`. `work(n)` runs
    one batch of n. No timing enters the choice: the same work, budget and cap give the same size under any load.
    One item that does not fit raises ProbeOutOfMemory; out of memory at a larger probe keeps the last size that ran.

    Returns {"batch_size", "bytes_per_sample", "budget_bytes", "device"}.
    """
    budget = int(budget_bytes)
    try:  # warm-up: one-time allocations (kernel caches, thread pools) are not a per-sample cost
        peak_one = _peak_during(lambda: work(1), device)
    except BaseException as e:  # noqa: BLE001
        if not is_out_of_memory(e):
            raise
        raise ProbeOutOfMemory(f"one item runs out of memory ({str(e).splitlines()[0][:160] if str(e) else e!r})")
    if peak_one > budget:
        raise ProbeOutOfMemory(f"one item needs {peak_one / 2**20:.0f} MiB, over the budget of {budget / 2**20:.0f} "
                               "MiB")
    size, per_sample, best = start, peak_one, 1
    while size <= max_batch:
        failed = False
        try:
            peak = _peak_during(lambda n=size: work(n), device)
        except BaseException as e:  # noqa: BLE001
            if not is_out_of_memory(e):
                raise
            failed = True
        if failed:
            _free_memory()
            break
        if peak > budget:
            break
        per_sample, best = peak / size, size  # the largest probe so far: fixed costs weigh least there
        if per_sample * size * 2 > budget:  # the next doubling would not fit
            break
        size *= 2
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
