"""Fused Triton kernels for the GPU path, each with its plain PyTorch twin as CPU path and test oracle:

* `quantize_pack` (twin: `vlmkv.quant.quantize`): per-token groups quantized and bit-packed in one pass;
* `decode_partial` (twin: `vlmkv.attention.qk_from_codes` / `pv_from_codes`): flash-decoding attention of a
  one-token query over a packed 2/4/8-bit segment, GQA-aware, partial softmaxes merged by log-sum-exp.

`available(x)` says whether a tensor takes the Triton path: `triton` installed (`pip install 'vlmkv[gpu]'`)
and `x` on CUDA, or the Triton interpreter on (`TRITON_INTERPRET=1`, how CI checks the kernels on a CPU).
`VLMKV_KERNELS=torch` turns the kernels off.
"""
from __future__ import annotations

import os


def triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available(x) -> bool:
    if os.environ.get("VLMKV_KERNELS", "").lower() == "torch" or not triton_installed():
        return False
    return bool(x.is_cuda) or os.environ.get("TRITON_INTERPRET") == "1"


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


__all__ = ["available", "fits_decode", "fits_quantize", "triton_installed"]
