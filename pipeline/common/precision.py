"""What arithmetic a sampler really runs in, on which device: one rule for autocast, the sampler stage and its probe.

    resolve_precision("cpu", "auto")   # "bfloat16" on a CPU with native bfloat16 (AVX512-BF16 or AMX), else "float32"
    with exact_float32("cuda", "float32"): ...   # TF32 off on CUDA unless "tf32" asks for it

Precisions: float32 (exact: CUDA's TF32 shortcut off), tf32 (CUDA matmuls and convolutions in TF32, float32
elsewhere), bfloat16 and float16 (autocast; float16 runs as float32 on a CPU, whose float16 kernels are slow), and
auto: bfloat16 where the hardware has it natively (CUDA with bf16 support, a CPU with AVX512-BF16 or AMX), else
float32. The chains themselves stay float32 in every case.

`resolve_precision` is the one rule that turns a setting into what runs; generation applies it once per placement,
where its samplers run (`generation.probes.sampler_precision`), and everything downstream (`precision_context`,
`sampling.core.sample_latents`, the stages) takes the resolved value.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache

import torch

PRECISIONS = ("auto", "float32", "tf32", "bfloat16", "float16")


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bfloat16(device: torch.device | str) -> bool:
    """Whether `device` computes bfloat16 natively (else autocast to it only emulates, and costs time)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def resolve_precision(device: torch.device | str, precision: str, native_bf16: bool | None = None) -> str:
    """The precision chains on `device` really run in (see the module's docstring). `native_bf16` answers for a
    device this process cannot ask (the capacity model's assumed GPU); by default the device is asked."""
    device = torch.device(device)
    if precision == "auto":
        native = native_bfloat16(device) if native_bf16 is None else native_bf16
        return "bfloat16" if native else "float32"
    if device.type != "cuda" and precision in ("float16", "tf32"):
        return "float32"
    return precision


@contextlib.contextmanager
def exact_float32(device: torch.device | str, precision: str):
    """On CUDA, TF32 matmuls and convolutions only when `precision` is tf32 (PyTorch lets cuDNN use TF32 by default,
    so "float32" would not be float32); the flags are restored afterwards."""
    if torch.device(device).type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def precision_context(device: torch.device | str, precision: str):
    """Autocast to `precision` (bfloat16, float16), or exact float32 / TF32 on CUDA. `precision` is resolved for
    `device` already (`resolve_precision`): "auto" means nothing here."""
    if precision == "auto":
        raise ValueError("precision_context takes a resolved precision: resolve_precision(device, 'auto') first")
    stack = contextlib.ExitStack()
    stack.enter_context(exact_float32(device, precision))
    if precision in ("bfloat16", "float16"):
        stack.enter_context(torch.autocast(torch.device(device).type, dtype=getattr(torch, precision)))
    return stack
