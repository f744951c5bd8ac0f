"""Pure PyTorch references of the two fused kernels: the definition each backend (C++ `cpu_kv.cpp`, Triton
`triton_kv.py`) is tested against, and the fallback where no backend applies.

* `quantize_pack_ref(x, spec)`: equations (3)-(6) of seed 002 with bit packing, `vlmkv.quant.quantize` itself;
* `decode_partial_ref(q, kq, vq, ok, scaling)`: attention of one-token queries over a packed segment, scores and
  weighted values computed from the codes (`qk_from_codes`, `pv_from_codes`), returned as the partial-softmax
  triple (m, l, o) that `vlmkv.attention.segment_attention` merges by log-sum-exp.
"""
from __future__ import annotations

import torch

from ..quant import QTensor, QuantSpec, quantize
from ..quant.uniform import _code_lut


def quantize_pack_ref(x: torch.Tensor, spec: QuantSpec) -> QTensor:
    """The reference quantizer (`vlmkv.quant.quantize`): x float `[..., n, d]` -> QTensor."""
    return quantize(x, spec)


def _codes(qt: QTensor) -> torch.Tensor:
    """float32 codes `[..., n, d]` of a QTensor (table lookup, no scale applied; a codebook's codes as their levels)."""
    lut = _code_lut(qt.spec.bits, qt.codes.device, qt.spec.levels)
    if qt.spec.codebook:
        lut = qt.spec.code_levels(qt.codes.device)[lut.long()]
    c = lut.index_select(0, qt.codes.reshape(-1).long()).view(*qt.codes.shape[:-1], -1)
    return c if c.shape[-1] == qt.d else c[..., :qt.d]


def qk_from_codes(q: torch.Tensor, qt: QTensor) -> torch.Tensor:
    """Scores q . k without dequantizing. Per-token groups: with k = s (c - z) per group g,
    q . k = sum_g s_g (q_g . c_g) - s_g z_g sum(q_g); per-channel groups (KIVI keys): see below.
    q: float `[B, H, r, D]`; returns float32 `[B, H, r, n]`, equal to q @ dequantize(qt)^T up to float rounding."""
    c = _codes(qt)
    B, H, n, D = c.shape
    s = qt.scale.float()
    b = -qt.zeros() * s
    if qt.spec.axis == "channel":
        # per-channel groups of G tokens: k_td = c_td s_gd + b_gd, so q . k_t = (q * s_g) . c_t + q . b_g
        G = qt.spec.group_size
        ng = n // G
        qs = q[:, :, :, None, :] * s[:, :, None]  # [B, H, r, ng, D]
        sc = torch.einsum("bhrkd,bhkgd->bhrkg", qs, c.view(B, H, ng, G, D))
        sc = sc + torch.einsum("bhrd,bhkd->bhrk", q, b)[..., None]
        return sc.reshape(B, H, q.shape[2], n)
    ng = qt.scale.shape[-1]  # per-token groups: s, b are [B, H, n, ng]
    if qt.spec.bounds is not None:  # uneven groups: one product per group's channel range
        bd = [int(x) for x in qt.spec.bounds]
        return sum(torch.einsum("bhrd,bhnd->bhrn", q[..., a:e], c[..., a:e]) * s[:, :, None, :, g]
                   + q[..., a:e].sum(-1, keepdim=True) * b[:, :, None, :, g] for g, (a, e) in enumerate(zip(bd, bd[1:])))
    qg = q.view(B, H, q.shape[2], ng, D // ng)
    qc = torch.einsum("bhrkg,bhnkg->bhrnk", qg, c.view(B, H, n, ng, D // ng))
    return (qc * s[:, :, None]).sum(-1) + torch.einsum("bhrk,bhnk->bhrn", qg.sum(-1), b)


def pv_from_codes(p: torch.Tensor, qt: QTensor) -> torch.Tensor:
    """sum_n p_n v_n for per-token-group values without dequantizing (v = s (c - z) per group).
    p: float `[B, H, r, n]`; returns float32 `[B, H, r, D]`, equal to p @ dequantize(qt) up to float rounding."""
    c = _codes(qt)
    B, H, n, D = c.shape
    ng = qt.scale.shape[-1]
    s = qt.scale.float()
    b = -qt.zeros() * s
    if qt.spec.bounds is not None:  # uneven groups: each group's channels from its own scale
        bd = [int(x) for x in qt.spec.bounds]
        return torch.cat([torch.einsum("bhrn,bhnd->bhrd", p * s[:, :, None, :, g], c[..., a:e])
                          + torch.einsum("bhrn,bhn->bhr", p, b[..., g])[..., None]
                          for g, (a, e) in enumerate(zip(bd, bd[1:]))], -1)
    w = p[..., None] * s[:, :, None]  # [B, H, r, n, ng]
    out = torch.einsum("bhrnk,bhnkg->bhrkg", w, c.view(B, H, n, ng, D // ng))
    out = out + torch.einsum("bhrn,bhnk->bhrk", p, b)[..., None]
    return out.reshape(B, H, p.shape[2], D)


def masked(s: torch.Tensor, ok: torch.Tensor | None) -> torch.Tensor:
    """Scores `[B, H, r, n]` with -inf where ok `[B, n]` is False; ok None: nothing to mask."""
    return s if ok is None else s.masked_fill(~ok[:, None, None, :], float("-inf"))


def partial_softmax(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(m, l, e) of scores `[..., n]`: m = max (at least -1e30, so an all-masked part weighs 0), e = exp(s - m),
    l = sum e: softmax(s) = e / l, and parts merge by log-sum-exp."""
    m = s.amax(-1, keepdim=True).clamp_min(-1e30)
    e = torch.exp(s - m)
    return m, e.sum(-1, keepdim=True), e


def decode_partial_ref(q: torch.Tensor, kq: QTensor, vq: QTensor, ok: torch.Tensor | None, scaling: float):
    """Reference of `decode_partial`: q float `[B, Hkv, R, D]`, kq / vq QTensors `[B, Hkv, n, .]` (values in
    per-token groups), ok bool `[B, n]` or None. Returns float32 (m `[B, Hkv, R, 1]`, l `[B, Hkv, R, 1]`,
    o `[B, Hkv, R, D]`) with o / l = softmax(q k^T * scaling over the allowed tokens) v."""
    m, den, e = partial_softmax(masked(qk_from_codes(q.float(), kq) * scaling, ok))
    return m, den, pv_from_codes(e, vq)


__all__ = ["decode_partial_ref", "masked", "partial_softmax", "pv_from_codes", "qk_from_codes", "quantize_pack_ref"]
