"""Triton kernels over vlmkv's packed KV layout (see `vlmkv/kernels/__init__.py`; `pip install 'vlmkv[gpu]'`).

Layout (as `vlmkv.quant.quantize` writes it, per-token groups): codes uint8 `[B, H, n, D * bits / 8]` with
code j of a byte at bits [j*bits, (j+1)*bits); scale fp16 and zero int16 `[B, H, n, D / G]`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant.uniform import QTensor, QuantSpec
from . import check_quantize, check_rows, fits_decode


@triton.jit
def _rint(x):
    """Round half to even, as torch.round (exact for |x| < 2^22, which codes and zero points are)."""
    r = tl.floor(x + 0.5)
    tie = (r - x) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _quantize_pack_kernel(X, C, S, Z, D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, clip, QMAX: tl.constexpr):
    # one program per (row, group): G values -> G * BITS / 8 bytes, one scale, one zero point
    row = tl.program_id(0)
    g = tl.program_id(1)
    PER: tl.constexpr = 8 // BITS
    NB: tl.constexpr = G // PER
    x = tl.load(X + row * D + g * G + tl.arange(0, G)).to(tl.float32)
    nan = tl.sum((x != x).to(tl.int32), 0) > 0  # tl.max / tl.min may skip NaN: count them apart
    mx = tl.max(x, 0) * clip
    mn = tl.min(x, 0) * clip
    scale = (mx - mn) / QMAX
    scale = tl.where(scale <= 0.0, tl.maximum(tl.abs(mn), 1e-8) / QMAX, scale)
    scale = tl.maximum(scale, tl.math.div_rn(tl.abs(mn), 32767.0))  # the zero point fits int16
    bad = nan | (scale != scale) | (scale == float("inf"))  # NaN or inf in the group: it reads back NaN
    # stored scale: fp16 rounded up (the next fp16 above when round-to-nearest went below), saturating at 65504
    scale = tl.where(bad, float("nan"), tl.minimum(scale, 65504.0))
    s16 = scale.to(tl.float16)
    up = (s16.to(tl.int16, bitcast=True) + 1).to(tl.float16, bitcast=True)
    s16 = tl.where(s16.to(tl.float32) < scale, up, s16)
    s = s16.to(tl.float32)
    zero = tl.where(bad, 0.0, tl.minimum(tl.maximum(-_rint(tl.math.div_rn(mn, s)), -32768.0), 32767.0))
    q = tl.where(bad, 0.0, tl.minimum(tl.maximum(_rint(tl.math.div_rn(x, s)) + zero, 0.0), QMAX)).to(tl.int32)
    shifts = (tl.arange(0, G) % PER) * BITS
    packed = tl.sum(tl.reshape(q << shifts, (NB, PER)), 1)
    tl.store(C + row * (D // PER) + g * NB + tl.arange(0, NB), packed.to(tl.uint8))
    tl.store(S + row * (D // G) + g, s16)
    tl.store(Z + row * (D // G) + g, zero.to(tl.int16))


def quantize_pack(x: torch.Tensor, spec: QuantSpec) -> QTensor:
    """Triton twin of `vlmkv.quant.quantize` for per-token groups: same codes, fp16 scales rounded up and
    int16 zero points (codes may differ where x / scale lands within float error of a rounding tie).

    x: float `[..., n, D]` with D % G == 0, G a power of two and a multiple of 8 / bits.
    """
    *lead, n, D = x.shape
    check_quantize(spec, D)
    G = spec.group_size
    rows = x.reshape(-1, D).contiguous()
    N = rows.shape[0]
    codes = torch.empty(N, D * spec.bits // 8, dtype=torch.uint8, device=x.device)
    scale = torch.empty(N, D // G, dtype=torch.float16, device=x.device)
    zero = torch.empty(N, D // G, dtype=torch.int16, device=x.device)
    if N:
        _quantize_pack_kernel[(N, D // G)](rows, codes, scale, zero, D=D, G=G, BITS=spec.bits,
                                           clip=float(spec.clip_ratio), QMAX=(1 << spec.bits) - 1)
    return QTensor(codes.view(*lead, n, -1), scale.view(*lead, n, -1), zero.view(*lead, n, -1), spec, D, x.dtype)


@triton.jit
def _dequant_tile(Cp, Sp, Zp, t, tmask, d, D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr,
                  c_row, s_row):
    """[BLOCK_N, D] float32 values of tokens `t` from packed codes: (c - z) * s per group."""
    PER: tl.constexpr = 8 // BITS
    byte = tl.load(Cp + t[:, None] * c_row + (d[None, :] // PER), mask=tmask[:, None], other=0).to(tl.int32)
    c = ((byte >> ((d[None, :] % PER) * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
    s = tl.load(Sp + t[:, None] * s_row + d[None, :] // G, mask=tmask[:, None], other=0.0).to(tl.float32)
    z = tl.load(Zp + t[:, None] * s_row + d[None, :] // G, mask=tmask[:, None], other=0).to(tl.float32)
    return (c - z) * s


@triton.jit
def _decode_partial_kernel(Q, KC, KS, KZ, VC, VS, VZ, OK, M, L, O,
                           n, per_split, scaling, Hkv,
                           kc_b, kc_h, kc_t, ks_b, ks_h, ks_t, vc_b, vc_h, vc_t, vs_b, vs_h, vs_t,
                           R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, KB: tl.constexpr,
                           VB: tl.constexpr, KG: tl.constexpr, VG: tl.constexpr, BLOCK_N: tl.constexpr):
    # one program per (batch row, kv head, split of the tokens): the R query heads of the kv head (GQA)
    # read each packed K/V tile once; online softmax over the split's tiles
    pid = tl.program_id(0)
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    b = pid // Hkv
    h = pid % Hkv
    r = tl.arange(0, RP)
    rmask = r < R
    d = tl.arange(0, D)
    q = tl.load(Q + ((b * Hkv + h) * R + r[:, None]) * D + d[None, :], mask=rmask[:, None], other=0.0)
    m_i = tl.full((RP,), -1e30, tl.float32)
    l_i = tl.zeros((RP,), tl.float32)
    acc = tl.zeros((RP, D), tl.float32)
    start = split * per_split
    end = tl.minimum(start + per_split, n)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        tmask = t < end
        k = _dequant_tile(KC + b * kc_b + h * kc_h, KS + b * ks_b + h * ks_h, KZ + b * ks_b + h * ks_h,
                          t, tmask, d, D, KG, KB, kc_t, ks_t)
        s = tl.sum(q[:, None, :] * k[None, :, :], 2) * scaling
        ok = tl.load(OK + b * n + t, mask=tmask, other=0) != 0
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        v = _dequant_tile(VC + b * vc_b + h * vc_h, VS + b * vs_b + h * vs_h, VZ + b * vs_b + h * vs_h,
                          t, tmask, d, D, VG, VB, vc_t, vs_t)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], 1)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    out = ((b * Hkv + h) * R + r) * nsplit + split
    tl.store(M + out, m_i, mask=rmask)
    tl.store(L + out, l_i, mask=rmask)
    tl.store(O + out[:, None] * D + d[None, :], acc, mask=rmask[:, None])


def _check(qt: QTensor, name: str) -> None:
    if not fits_decode(qt, qt.d):
        raise ValueError(f"{name} must hold per-token 2/4/8-bit codes in power-of-two groups, got {qt.spec!r}")
    check_rows(qt, name)


def decode_partial(q: torch.Tensor, kq: QTensor, vq: QTensor, ok: torch.Tensor, scaling: float,
                   block_n: int = 64, splits: int | None = None):
    """Partial attention of one-token queries over a packed segment (flash-decoding).

    q: float32 `[B, Hkv, R, D]` (R query heads per kv head, GQA); kq, vq: per-token QTensors `[B, Hkv, n, .]`
    (views into a segment's buffers are fine); ok: bool `[B, n]` (False: masked, e.g. padding or filler).
    Returns (m, l, o) as `[B, Hkv, R, 1]`, `[B, Hkv, R, 1]`, `[B, Hkv, R, D]` with m the running max of the
    scaled scores, l = sum exp(s - m) and o = sum exp(s - m) v: the same triple `segment_attention` merges,
    equal to it up to float summation order.
    """
    _check(kq, "kq")
    _check(vq, "vq")
    B, Hkv, R, D = q.shape
    n = kq.codes.shape[-2]
    if D & (D - 1) or kq.d != D or vq.d != D:
        raise ValueError(f"head dim must be a power of two matching the codes, got {D!r}")
    if splits is None:  # enough programs to fill the GPU at batch 1, tiles of block_n tokens each
        splits = max(1, min(64, triton.cdiv(n, 4 * block_n)))
    per_split = triton.cdiv(triton.cdiv(n, splits), block_n) * block_n
    splits = max(1, triton.cdiv(n, per_split))
    m = torch.empty(B, Hkv, R, splits, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    o = torch.empty(B, Hkv, R, splits, D, device=q.device, dtype=torch.float32)
    okb = ok.to(torch.int8).contiguous()
    qc = q.float().contiguous()
    kc, ks, kz, vc, vs, vz = kq.codes, kq.scale, kq.zero, vq.codes, vq.scale, vq.zero
    _decode_partial_kernel[(B * Hkv, splits)](
        qc, kc, ks, kz, vc, vs, vz, okb, m, l, o, n, per_split, float(scaling), Hkv,
        kc.stride(0), kc.stride(1), kc.stride(2), ks.stride(0), ks.stride(1), ks.stride(2),
        vc.stride(0), vc.stride(1), vc.stride(2), vs.stride(0), vs.stride(1), vs.stride(2),
        R=R, RP=max(2, triton.next_power_of_2(R)), D=D, KB=kq.spec.bits, VB=vq.spec.bits,
        KG=kq.spec.group_size, VG=vq.spec.group_size, BLOCK_N=block_n)
    # merge the splits (log-sum-exp)
    mm = m.amax(-1, keepdim=True)
    w = torch.exp(m - mm)
    return mm, (l * w).sum(-1, keepdim=True), (o * w[..., None]).sum(-2)
