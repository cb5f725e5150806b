"""Batch sizing against real memory use, and out-of-memory recovery that keeps every item."""

import numpy as np
import pytest
import torch

from pipeline.common.memory import (
    ProbeOutOfMemory,
    SimulatedOutOfMemory,
    gpu_budget_bytes,
    is_out_of_memory,
    probe_batch_size,
    run_in_chunks,
)

MIB = 1024 * 1024


def allocate(n: int) -> None:
    """Work whose peak memory is n MiB (pages really touched)."""
    block = np.ones(n * MIB // 8)
    assert block.sum() == len(block)


@pytest.mark.parametrize("budget_mib, low, high", [(64, 16, 64), (256, 64, 256)])
def test_probe_picks_the_largest_batch_that_fits_the_ram_budget(budget_mib, low, high):
    found = probe_batch_size(allocate, torch.device("cpu"), budget_mib * MIB, max_batch=4096)
    assert low <= found["batch_size"] <= high
    assert found["batch_size"] * found["bytes_per_sample"] <= budget_mib * MIB
    assert 0.5 * MIB < found["bytes_per_sample"] < 2 * MIB


def test_probe_uses_no_timing_slow_work_grows_to_the_cap():
    """The size depends on memory and the cap alone: work whose time per sample never improves still grows to the
    cap (a timing rule stopped it early, and at a size that moved with the machine's load)."""
    import time

    def work(n):
        time.sleep(0.0005 * n)
    assert probe_batch_size(work, torch.device("cpu"), 1 << 40, max_batch=64)["batch_size"] == 64


def test_probe_stops_at_the_first_out_of_memory():
    def work(n):
        if n > 8:
            raise SimulatedOutOfMemory(n, 8)
    assert probe_batch_size(work, torch.device("cpu"), 1 << 40)["batch_size"] == 8


def test_out_of_memory_at_the_first_doubling_gives_one_not_the_largest_batch():
    def work(n):
        if n > 1:
            raise SimulatedOutOfMemory(n, 1)
    assert probe_batch_size(work, torch.device("cpu"), 1 << 40, max_batch=512)["batch_size"] == 1
    with pytest.raises(ProbeOutOfMemory, match="one item"):
        probe_batch_size(lambda n: (_ for _ in ()).throw(SimulatedOutOfMemory(n, 0)), torch.device("cpu"), 1 << 40)
    with pytest.raises(ProbeOutOfMemory, match="over the budget"):
        probe_batch_size(lambda n: allocate(64 * n), torch.device("cpu"), 16 * MIB)


def test_gpu_shares_split_one_budget_and_library_allocation_failures_count_as_out_of_memory():
    total = 80 * 1024**3
    fused_half = gpu_budget_bytes(total, 0.5, 0.8, stages=2)   # two fused actors of half a GPU, two stages each
    assert 2 * 2 * fused_half <= 0.8 * total
    assert gpu_budget_bytes(total, 0.5, 0.8) + gpu_budget_bytes(total, 0.5, 0.8) <= 0.8 * total  # separate stages
    assert gpu_budget_bytes(total, 2.0, 0.8) == int(0.8 * total)  # more than one GPU's share: one GPU's memory
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert not is_out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))


def test_recorded_chunks_cut_a_shard_the_same_way_even_when_memory_would_now_allow_more():
    seen = []
    results, sizes = run_in_chunks(10, 16, lambda a, b: seen.append((a, b)) or b - a, chunks=[4, 4, 2])
    assert sizes == [4, 4, 2] and seen == [(0, 4), (4, 8), (8, 10)]
    _, sizes = run_in_chunks(10, 16, lambda a, b: b - a, chunks=[4, 4])  # a record that does not add up: ignored
    assert sizes == [10]


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


def test_an_image_network_runs_a_cpu_batch_in_cache_sized_chunks_and_a_gpu_batch_whole():
    from pipeline.common.memory import cache_sized_chunk

    assert cache_sized_chunk("cpu", 256, 64 * 64) == 32          # 32 images of 64 px at a time
    assert cache_sized_chunk("cpu", 10, 64 * 64) == 10           # never more than the batch
    assert cache_sized_chunk("cpu", 256, 512 * 512) == 1         # one large image at a time
    assert cache_sized_chunk("cuda", 256, 512 * 512) == 256      # an accelerator takes the whole batch


def test_decoding_in_chunks_gives_each_image_what_decoding_it_alone_gives(vae_only_dir):
    """decode() cuts a CPU batch into chunks (this tiny VAE's 16 x 16 latents: 8 images at a time, the last chunk
    6): 70 images decode as each does on its own, to within float rounding, and as many come out as went in."""
    from pipeline.vae.autoencoder import decode, load_vae, resolve_vae

    vae = load_vae(resolve_vae(str(vae_only_dir)), torch.device("cpu"), torch.float32)
    side = vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)
    latents = torch.randn(70, vae.config.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    batch = decode(vae, latents)
    alone = torch.cat([decode(vae, z[None]) for z in latents])
    assert batch.shape[0] == 70
    assert torch.allclose(batch, alone, atol=1e-5)
