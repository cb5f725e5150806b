"""Batch sizing against real memory use, and out-of-memory recovery that keeps every item."""

import numpy as np
import pytest
import torch

from pipeline.common.memory import SimulatedOutOfMemory, probe_batch_size, run_in_chunks

MIB = 1024 * 1024


def allocate(n: int) -> None:
    """Work whose peak memory is n MiB (pages really touched)."""
    block = np.ones(n * MIB // 8)
    assert block.sum() == len(block)


@pytest.mark.parametrize("budget_mib, low, high", [(64, 16, 64), (256, 64, 256)])
def test_probe_picks_the_largest_batch_that_fits_the_ram_budget(budget_mib, low, high):
    found = probe_batch_size(allocate, torch.device("cpu"), budget_mib * MIB, max_batch=4096, min_gain=None)
    assert low <= found["batch_size"] <= high
    assert found["batch_size"] * found["bytes_per_sample"] <= budget_mib * MIB
    assert 0.5 * MIB < found["bytes_per_sample"] < 2 * MIB


def test_probe_stops_growing_when_a_doubling_no_longer_pays():
    import time

    def work(n):  # 20 ms fixed cost + 1 ms per sample: per-sample time improves less than 5% past 256
        time.sleep(0.02 + 0.001 * n)
    found = probe_batch_size(work, torch.device("cpu"), 1 << 40, max_batch=4096)
    assert 64 <= found["batch_size"] <= 512


def test_probe_stops_at_the_first_out_of_memory():
    def work(n):
        if n > 8:
            raise SimulatedOutOfMemory(n, 8)
    # min_gain=None: memory alone decides; `work` costs nothing, so timing noise must not stop the growth first.
    assert probe_batch_size(work, torch.device("cpu"), 1 << 40, min_gain=None)["batch_size"] == 8


def test_out_of_memory_halves_the_chunk_and_processes_every_item_once():
    seen, shrinks = [], []

    def work(a, b):
        if b - a > 3:
            raise SimulatedOutOfMemory(b - a, 3)
        seen.extend(range(a, b))
        return b - a

    results, sizes = run_in_chunks(23, 16, work, on_oom=shrinks.append)
    assert seen == list(range(23)) and sum(results) == 23
    assert max(sizes) <= 3 and shrinks == [8, 4, 2]


def test_other_errors_and_a_failing_single_item_are_not_swallowed():
    with pytest.raises(ValueError):
        run_in_chunks(4, 2, lambda a, b: (_ for _ in ()).throw(ValueError("bug")))
    with pytest.raises(SimulatedOutOfMemory):
        run_in_chunks(4, 2, lambda a, b: (_ for _ in ()).throw(SimulatedOutOfMemory(b - a, 0)))
