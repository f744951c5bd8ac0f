"""Fused kernels, each with its plain PyTorch twin beside it as fallback and test oracle. Two backends with the
same two kernels:

* `triton_kv.py` (GPU, `pip install 'vlmkv[gpu]'`) and `cpu.py` + `cpu_kv.cpp` (CPU, a C++ torch op built on
  first use);
* `quantize_pack` (twin: `vlmkv.quant.quantize`): per-token groups quantized and bit-packed in one pass;
* `decode_partial` (twin: `vlmkv.attention.qk_from_codes` / `pv_from_codes`): flash-decoding attention of a
  one-token query over a packed 2/4/8-bit segment, GQA-aware, partial softmaxes merged by log-sum-exp.

`VLMKV_KERNELS` picks: `auto` (default: Triton for CUDA tensors, the C++ kernels for CPU tensors), `torch` (the
twins everywhere), `triton` (Triton also for CPU tensors when its interpreter is on, `TRITON_INTERPRET=1`: how CI
checks the Triton kernels without a GPU) or `cpu`. `available(x)` says whether `x` takes the Triton path,
`cpu.available(x)` whether it takes the C++ one.
"""
from __future__ import annotations

import os


def triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


MODES = ("auto", "torch", "triton", "cpu")


def mode() -> str:
    """`VLMKV_KERNELS`, checked (default `auto`)."""
    m = os.environ.get("VLMKV_KERNELS", "auto").lower() or "auto"
    if m not in MODES:
        raise ValueError(f"VLMKV_KERNELS must be one of {MODES}, got {m!r}")
    return m


def available(x) -> bool:
    """Whether `x` takes the Triton kernels."""
    m = mode()
    if m in ("torch", "cpu") or not (x.is_cuda or (m == "triton" and os.environ.get("TRITON_INTERPRET") == "1")):
        return False
    return triton_installed()  # imported only here: CPU-only runs never pay for importing triton


def _pow2(x: int) -> bool:
    return x > 0 and not x & (x - 1)


def fits_quantize(spec, d: int) -> bool:
    """Whether `quantize_pack` takes this spec: per-token 2/4/8-bit groups, power of two, fp16 scales."""
    import torch

    return (spec.axis == "token" and spec.bits in (2, 4, 8) and _pow2(spec.group_size) and d % spec.group_size == 0
            and spec.group_size % (8 // spec.bits) == 0 and spec.meta_dtype == torch.float16)


def fits_decode(qt, d: int) -> bool:
    """Whether `decode_partial` reads this QTensor: per-token 2/4/8-bit groups and a power-of-two head dim."""
    return fits_quantize(qt.spec, d) and _pow2(d) and qt.d == d


def check_quantize(spec, d: int) -> None:
    """Raise ValueError unless both backends' `quantize_pack` take `spec` for rows of d channels."""
    if not fits_quantize(spec, d):
        raise ValueError(f"spec must be per-token 2/4/8-bit with fp16 scales and power-of-two groups dividing {d}, "
                         f"got {spec!r}")


def check_rows(qt, name: str) -> None:
    """Raise ValueError unless a QTensor's rows are contiguous with scale and zero strided alike (both backends'
    `decode_partial` walk codes, scales and zero points with one set of strides)."""
    if qt.codes.stride(-1) != 1 or qt.scale.stride(-1) != 1 or qt.zero.stride() != qt.scale.stride():
        raise ValueError(f"{name} must have contiguous rows and matching scale/zero strides")


__all__ = ["MODES", "available", "check_quantize", "check_rows", "fits_decode", "fits_quantize", "mode",
           "triton_installed"]
