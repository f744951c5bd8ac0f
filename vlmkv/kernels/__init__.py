"""Fused kernels and the one place that picks a backend for them.

Two kernels, each with a pure PyTorch reference in `reference.py` (the definition the backends are tested
against, and the fallback):

* `quantize` (reference `quantize_pack_ref`, i.e. `vlmkv.quant.quantize`): per-token groups quantized and
  bit-packed in one pass;
* `decode_partial` (reference `decode_partial_ref`): flash-decoding attention of one-token queries over a packed
  2/4/8-bit segment, GQA-aware, returned as a partial softmax that the caller merges by log-sum-exp.

Backends: `triton_kv.py` (GPU, `pip install 'vlmkv[gpu]'`) and `cpu.py` + `cpu_kv.cpp` (CPU, a C++ torch op built
on first use). `VLMKV_KERNELS` picks: `auto` (default: Triton for CUDA tensors, the C++ kernels for CPU tensors),
`torch` (the references everywhere), `triton` (Triton also for CPU tensors when its interpreter is on,
`TRITON_INTERPRET=1`: how CI checks the Triton kernels without a GPU) or `cpu`. `quantize_backend` and
`decode_backend` are the only functions that choose; storage and attention call `quantize`, `quantize_into` and
`decode_partial` here and never a backend directly.
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


def _fits_token_groups(spec, d: int) -> bool:
    """Per-token groups of 2/4/8-bit or ternary codes with fp16 scales covering d channels: even groups dividing
    d, or uneven ones (`bounds`); any zero point (int16, int8, none) and clips."""
    import torch

    if spec.axis != "token" or spec.bits not in (2, 4, 8) or spec.meta_dtype != torch.float16 or d <= 0:
        return False
    return int(spec.bounds[-1]) == d if spec.bounds is not None else d % spec.group_size == 0


def fits_quantize(spec, d: int) -> bool:
    """Whether the Triton `quantize_pack` takes this spec: every per-token format (`_fits_token_groups`) but codebooks,
    which the reference quantizes (decode kernels read them: their levels are a table)."""
    return _fits_token_groups(spec, d) and not spec.codebook


def fits_decode(qt, d: int, key: bool = True) -> bool:
    """Whether the Triton `decode_partial` reads this QTensor: a power-of-two head dim and every per-token format, or
    per-channel groups of tokens (KIVI) for keys (with fp16 scales, int16 zero points)."""
    import torch

    if not _pow2(d) or qt.d != d or qt.codes.dim() != 4:
        return False
    if qt.spec.axis == "channel":
        return key and qt.spec.bits in (2, 4, 8) and qt.spec.meta_dtype == torch.float16
    return _fits_token_groups(qt.spec, d)


def check_rows(qt, name: str) -> None:
    """Raise ValueError unless a QTensor's rows are contiguous with scale and zero (where stored) strided alike (both
    backends' `decode_partial` walk codes, scales and zero points with one set of strides)."""
    if qt.codes.stride(-1) != 1 or qt.scale.stride(-1) != 1 or (qt.zero is not None and qt.zero.stride() != qt.scale.stride()):
        raise ValueError(f"{name} must have contiguous rows and matching scale/zero strides")


def describe_format(kq, vq=None, why: str = "") -> str:
    """A stored format in words, for warnings and reports: bits, group layout and zero point of keys (and values)."""
    def one(qt) -> str:
        sp = qt.spec
        groups = (f"uneven groups {list(sp.bounds)}" if sp.bounds is not None
                  else f"{sp.axis} groups of {sp.group_size}")
        extra = (", ternary" if sp.levels == 3 else "") + (", per-group clips" if sp.clips is not None else "") + \
            (f", {sp.codebook} codebook" if sp.codebook else "")
        return f"{sp.bits}-bit {groups}, zero point {sp.zero_point}, {str(sp.meta_dtype).split('.')[-1]} scales" \
               f"{extra}, head dim {qt.d}"
    text = f"keys {one(kq)}" + (f"; values {one(vq)}" if vq is not None else "")
    return text + (f" ({why})" if why else "")


_WARNED: set = set()


def warn_reference_once(fmt: str) -> None:
    """Warn once per process and format that decode attention read it through the slow reference path."""
    if fmt in _WARNED:
        return
    _WARNED.add(fmt)
    import warnings

    warnings.warn(f"vlmkv: decode attention reads a quantized segment through the PyTorch reference (slow): {fmt}",
                  RuntimeWarning, stacklevel=3)


# ------------------------------------------------------------------------------------- the dispatcher
_DECISIONS: dict = {}  # backend decisions, keyed by everything they depend on
def quantize_backend(x, spec) -> str:
    """"triton", "cpu" or "torch": which backend `quantize(x, spec)` runs. Decided once per (format, row width,
    device, VLMKV_KERNELS): every decode flush asks it."""
    from . import cpu

    if x.numel() == 0:  # nothing to compute: the reference's shapes
        return "torch"
    key = ("quantize", spec, x.shape[-1], x.device.type, os.environ.get("VLMKV_KERNELS"),
           os.environ.get("TRITON_INTERPRET"), cpu._STATE["loaded"])
    hit = _DECISIONS.get(key)
    if hit is None:
        if available(x) and fits_quantize(spec, x.shape[-1]):
            hit = "triton"
        else:
            hit = "cpu" if cpu.fits_quantize(spec, x.shape[-1]) and cpu.available(x) else "torch"
        _DECISIONS[key] = hit
    return hit


def quantize(x, spec):
    """Quantize float `x` `[..., n, d]` with `spec` on the backend `quantize_backend` picks; the same QTensor as
    `reference.quantize_pack_ref(x, spec)` (bit for bit on the CPU; on the GPU codes may differ where x / scale
    lands within float error of a rounding tie)."""
    be = quantize_backend(x, spec)
    if be == "triton":
        from .triton_kv import quantize_pack

        return quantize_pack(x, spec)
    if be == "cpu":
        from .cpu import quantize_pack

        return quantize_pack(x, spec)
    from .reference import quantize_pack_ref

    return quantize_pack_ref(x, spec)


def quantize_into(x, out) -> bool:
    """Quantize `x` `[B, H, n, D]` straight into `out`'s buffers (a QTensor view of a segment's spare room) where a
    backend can; False (nothing written) where none can: the caller then quantizes and appends."""
    from . import cpu

    if out.codes.dim() != 4 or quantize_backend(x, out.spec) != "cpu":
        return False
    cpu.quantize_into(x, out)
    return True


def decode_backend(q, kq, vq, d: int, allow=("triton", "cpu")) -> str:
    """"triton", "cpu" or "torch": which backend `decode_partial` runs for these operands (rows of d channels).
    Decided once per (formats, layout, device, VLMKV_KERNELS): a decode step asks it for every segment of every
    layer."""
    from . import cpu

    key = (kq.spec, vq.spec, kq.d, vq.d, d, kq.codes.dim(), vq.codes.dim(), q.device.type, allow,
           os.environ.get("VLMKV_KERNELS"), os.environ.get("TRITON_INTERPRET"), cpu._STATE["loaded"])
    hit = _DECISIONS.get(key)
    if hit is not None:
        return hit
    be = "torch"
    if "triton" in allow and available(q) and fits_decode(kq, d, key=True) and fits_decode(vq, d, key=False):
        be = "triton"
    elif "cpu" in allow and cpu.available(q) and cpu.fits_decode(kq, d, key=True) and cpu.fits_decode(vq, d, key=False):
        be = "cpu"
    _DECISIONS[key] = be
    return be


def decode_partial(q, kq, vq, ok, scaling: float, backend: str | None = None):
    """Partial attention of one-token queries over a packed segment on `backend` (default: `decode_backend`'s
    choice). Arguments and result as `reference.decode_partial_ref`."""
    be = backend or decode_backend(q, kq, vq, kq.d)
    if be == "cpu":
        from . import cpu

        return cpu.decode_partial(q, kq, vq, ok, scaling, checked=backend is not None)
    if be == "triton":
        import torch

        from .triton_kv import decode_partial as triton_decode

        if ok is None:
            ok = torch.ones(q.shape[0], kq.codes.shape[-2], dtype=torch.bool, device=q.device)
        return triton_decode(q, kq, vq, ok, scaling)
    from .reference import decode_partial_ref

    return decode_partial_ref(q, kq, vq, ok, scaling)


def decode_layer_available(q) -> bool:
    """Whether `decode_layer` runs for queries `q`: CPU tensors with the C++ kernels built and `VLMKV_KERNELS`
    auto or cpu (it loads them on first use)."""
    from . import cpu

    return q.device.type == "cpu" and cpu.available(q)


def decode_layer(q, parts: list, scaling: float):
    """Attention of one-token queries over every segment of a layer in one call of the CPU kernel, merged: (m, l, o)
    as `decode_partial`'s over all of them. q float32 `[B, Hkv, R, D]`; parts: (keys, values, ok) with keys and
    values QTensors (formats `cpu.fits_decode` takes) or float tensors `[B, Hkv, n, D]` (fp16, bf16 or float32, the
    same dtype for both), ok bool `[B, n]` or None. Equal to merging `decode_partial_ref` over the parts."""
    from . import cpu

    return cpu.decode_layer(q, parts, scaling)


__all__ = ["MODES", "available", "check_rows", "decode_backend", "decode_layer", "decode_layer_available",
           "decode_partial", "describe_format",
           "fits_decode", "warn_reference_once",
           "fits_quantize", "mode", "quantize", "quantize_backend", "quantize_into", "triton_installed"]
