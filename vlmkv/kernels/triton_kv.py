"""Triton kernels over vlmkv's packed KV layout (see `vlmkv/kernels/__init__.py`; `pip install 'vlmkv[gpu]'`).

One kernel a direction for every stored format, as the C++ kernels (`cpu_kv.cpp`): the code (2/4/8 bits, or
ternary: five 3-level codes a byte), the zero point (int16, int8, or none: symmetric groups with the implied zero
2^(bits-1)) and the axis (per-channel key groups, KIVI) are compile-time constants; per-token groups, even or
uneven (SKVQ), are a group id per channel (runtime data). codes uint8 `[B, H, n, bytes]`; scale fp16 and zero
`[B, H, n, groups]` (per-channel: `[B, H, n / G, D]`); value = scale * (code - zero), or scale * levels[code] for a
codebook format (the zero-point kind 3: a float32 table of 2^bits levels, runtime data).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant.uniform import QTensor, QuantSpec
from . import check_rows, fits_decode, fits_quantize


@triton.jit
def _rint(x):
    """Round half to even, as torch.round (exact for |x| < 2^22, which codes and zero points are)."""
    r = tl.floor(x + 0.5)
    tie = (r - x) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _pow3(j):
    """3^j for j in 0..4 (the weight of a ternary code in its byte)."""
    return tl.where(j == 0, 1, tl.where(j == 1, 3, tl.where(j == 2, 9, tl.where(j == 3, 27, 81))))


@triton.jit
def _group_stats_kernel(X, Q, S, Z, BOUNDS, CLIPS, D: tl.constexpr, BLOCK: tl.constexpr, QMAX: tl.constexpr,
                        HALF: tl.constexpr, ZK: tl.constexpr, NG: tl.constexpr):
    # one program per (row, group): the group's scale and zero point, and its codes (unpacked, into Q [rows, D])
    row = tl.program_id(0)
    g = tl.program_id(1)
    a = tl.load(BOUNDS + g)
    e = tl.load(BOUNDS + g + 1)
    i = tl.arange(0, BLOCK)
    inside = i < e - a
    x = tl.load(X + row * D + a + i, mask=inside, other=0.0).to(tl.float32)
    nan = tl.sum(((x != x) & inside).to(tl.int32), 0) > 0  # tl.max / tl.min may skip NaN: count them apart
    clip = tl.load(CLIPS + g)
    mx = tl.max(tl.where(inside, x, float("-inf")), 0) * clip
    mn = tl.min(tl.where(inside, x, float("inf")), 0) * clip
    if ZK == 2:  # symmetric: the value of largest magnitude maps to code 0, the scale carries its sign
        m = tl.where(tl.abs(mx) > tl.abs(mn), mx, mn)
        m = tl.where(nan, float("nan"), m)
        mag = tl.maximum(tl.math.div_rn(tl.abs(m), HALF), 1e-8)
        mag = tl.where(m != m, float("nan"), mag)  # tl.maximum may drop the NaN
        bad = (mag != mag) | (mag == float("inf"))
        mag = tl.where(bad, float("nan"), tl.minimum(mag, 65504.0))
        m16 = mag.to(tl.float16)
        up = (m16.to(tl.int16, bitcast=True) + 1).to(tl.float16, bitcast=True)
        m16 = tl.where(m16.to(tl.float32) < mag, up, m16)
        s16 = tl.where(m > 0.0, -m16, m16)
        s = s16.to(tl.float32)
        zero = HALF + 0.0
    else:
        ZLIM: tl.constexpr = 127.0 if ZK == 1 else 32767.0
        scale = (mx - mn) / QMAX
        scale = tl.where(scale <= 0.0, tl.maximum(tl.abs(mn), 1e-8) / QMAX, scale)
        scale = tl.maximum(scale, tl.math.div_rn(tl.abs(mn), ZLIM))  # the zero point fits its storage
        bad = nan | (scale != scale) | (scale == float("inf"))  # NaN or inf in the group: it reads back NaN
        # stored scale: fp16 rounded up (the next fp16 above when round-to-nearest went below), saturating at 65504
        scale = tl.where(bad, float("nan"), tl.minimum(scale, 65504.0))
        s16 = scale.to(tl.float16)
        up = (s16.to(tl.int16, bitcast=True) + 1).to(tl.float16, bitcast=True)
        s16 = tl.where(s16.to(tl.float32) < scale, up, s16)
        s = s16.to(tl.float32)
        zero = tl.where(bad, 0.0, tl.minimum(tl.maximum(-_rint(tl.math.div_rn(mn, s)), -ZLIM - 1.0), ZLIM))
    q = tl.where(bad, 0.0, tl.minimum(tl.maximum(_rint(tl.math.div_rn(x, s)) + zero, 0.0), QMAX)).to(tl.uint8)
    tl.store(Q + row * D + a + i, q, mask=inside)
    tl.store(S + row * NG + g, s16)
    if ZK != 2:
        tl.store(Z + row * NG + g, zero.to(Z.dtype.element_ty))


@triton.jit
def _pack_kernel(Q, C, D: tl.constexpr, NB: tl.constexpr, NBP: tl.constexpr, FMT: tl.constexpr):
    # one program per row: its D codes packed into NB bytes (FMT 3: five base-3 digits a byte)
    row = tl.program_id(0)
    j = tl.arange(0, NBP)
    if FMT == 3:
        k = tl.arange(0, 8)
        idx = j[:, None] * 5 + k[None, :]
        ok = (k[None, :] < 5) & (idx < D)
        q = tl.load(Q + row * D + idx, mask=ok, other=0).to(tl.int32)
        byte = tl.sum(q * _pow3(k)[None, :], 1)
    else:
        PER: tl.constexpr = 8 // FMT
        k = tl.arange(0, PER)
        idx = j[:, None] * PER + k[None, :]
        q = tl.load(Q + row * D + idx, mask=idx < D, other=0).to(tl.int32)
        byte = tl.sum(q << (k * FMT)[None, :], 1)
    tl.store(C + row * NB + j, byte.to(tl.uint8), mask=j < NB)


_TABLES: dict = {}


def _tables(spec: QuantSpec, d: int, device) -> tuple:
    """(int32 group bounds `[ng + 1]`, float32 clips `[ng]`, int32 group id of each channel `[d]`) on `device`."""
    key = (spec, d, str(device))
    if key not in _TABLES:
        gid = spec.group_ids(d).to(torch.int32) if spec.axis == "token" else torch.zeros(d, dtype=torch.int32)
        _TABLES[key] = (torch.tensor(spec.group_bounds(d), dtype=torch.int32, device=device),
                        torch.tensor(spec.group_clips(d), dtype=torch.float32, device=device), gid.to(device))
    return _TABLES[key]


def _fmt(spec: QuantSpec) -> int:
    return 3 if spec.levels == 3 else spec.bits


_ZERO = {"int16": (0, torch.int16), "int8": (1, torch.int8), "none": (2, None)}


def quantize_pack(x: torch.Tensor, spec: QuantSpec) -> QTensor:
    """Triton twin of `vlmkv.quant.quantize` for per-token groups (even or uneven), 2/4/8-bit or ternary codes and
    any zero point: the same fp16 scales and zero points, and the same codes (a code may differ where x / scale
    lands within float error of a rounding tie).

    x: float `[..., n, D]`.
    """
    *lead, n, D = x.shape
    if not fits_quantize(spec, D):
        raise ValueError(f"spec must be per-token 2/4/8-bit or ternary groups over {D} channels with fp16 scales, "
                         f"got {spec!r}")
    bounds, clips, _ = _tables(spec, D, x.device)
    ng = bounds.numel() - 1
    widths = spec.group_bounds(D)
    block = triton.next_power_of_2(max(e - a for a, e in zip(widths, widths[1:])))
    fmt = _fmt(spec)
    nb = spec.code_bytes(D)
    zk, zdt = _ZERO[spec.zero_point]
    rows = x.reshape(-1, D).contiguous()
    N = rows.shape[0]
    codes = torch.empty(N, nb, dtype=torch.uint8, device=x.device)
    scale = torch.empty(N, ng, dtype=torch.float16, device=x.device)
    zero = None if zdt is None else torch.empty(N, ng, dtype=zdt, device=x.device)
    if N:
        qbuf = torch.empty(N, D, dtype=torch.uint8, device=x.device)
        _group_stats_kernel[(N, ng)](rows, qbuf, scale, scale if zero is None else zero, bounds, clips, D=D,
                                     BLOCK=block, QMAX=spec.qmax, HALF=float(1 << (spec.bits - 1)), ZK=zk, NG=ng)
        _pack_kernel[(N,)](qbuf, codes, D=D, NB=nb, NBP=triton.next_power_of_2(nb), FMT=fmt)
    zero = None if zero is None else zero.view(*lead, n, -1)
    return QTensor(codes.view(*lead, n, -1), scale.view(*lead, n, -1), zero, spec, D, x.dtype)


@triton.jit
def _dequant_tile(Cp, Sp, Zp, GID, LV, t, tmask, d, FMT: tl.constexpr, ZK: tl.constexpr, HALF: tl.constexpr,
                  CHAN: tl.constexpr, G: tl.constexpr, c_row, s_row):
    """[BLOCK_N, D] float32 values of tokens `t` from packed codes: (c - z) * s per group (per-token groups through
    the channels' group ids; per-channel groups of G tokens when CHAN)."""
    if FMT == 3:
        byte = tl.load(Cp + t[:, None] * c_row + (d[None, :] // 5), mask=tmask[:, None], other=0).to(tl.int32)
        c = ((byte // _pow3(d[None, :] % 5)) % 3).to(tl.float32)
    else:
        PER: tl.constexpr = 8 // FMT
        byte = tl.load(Cp + t[:, None] * c_row + (d[None, :] // PER), mask=tmask[:, None], other=0).to(tl.int32)
        c = ((byte >> ((d[None, :] % PER) * FMT)) & ((1 << FMT) - 1)).to(tl.float32)
    if CHAN:
        off = (t[:, None] // G) * s_row + d[None, :]
    else:
        off = t[:, None] * s_row + tl.load(GID + d)[None, :]
    s = tl.load(Sp + off, mask=tmask[:, None], other=0.0).to(tl.float32)
    if ZK == 3:  # a codebook: the code's level times the group's norm
        return tl.load(LV + c.to(tl.int32)) * s
    if ZK == 2:
        z = HALF + 0.0
    else:
        z = tl.load(Zp + off, mask=tmask[:, None], other=0).to(tl.float32)
    return (c - z) * s


@triton.jit
def _decode_partial_kernel(Q, KC, KS, KZ, KGID, KLV, VC, VS, VZ, VGID, VLV, OK, M, L, O,
                           n, per_split, scaling, Hkv,
                           kc_b, kc_h, kc_t, ks_b, ks_h, ks_t, vc_b, vc_h, vc_t, vs_b, vs_h, vs_t,
                           R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, KF: tl.constexpr,
                           VF: tl.constexpr, KZK: tl.constexpr, VZK: tl.constexpr, KHALF: tl.constexpr,
                           VHALF: tl.constexpr, KCHAN: tl.constexpr, KG: tl.constexpr, BLOCK_N: tl.constexpr):
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
        k = _dequant_tile(KC + b * kc_b + h * kc_h, KS + b * ks_b + h * ks_h, KZ + b * ks_b + h * ks_h, KGID, KLV,
                          t, tmask, d, KF, KZK, KHALF, KCHAN, KG, kc_t, ks_t)
        s = tl.sum(q[:, None, :] * k[None, :, :], 2) * scaling
        ok = tl.load(OK + b * n + t, mask=tmask, other=0) != 0
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        v = _dequant_tile(VC + b * vc_b + h * vc_h, VS + b * vs_b + h * vs_h, VZ + b * vs_b + h * vs_h, VGID, VLV,
                          t, tmask, d, VF, VZK, VHALF, False, 1, vc_t, vs_t)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], 1)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    out = ((b * Hkv + h) * R + r) * nsplit + split
    tl.store(M + out, m_i, mask=rmask)
    tl.store(L + out, l_i, mask=rmask)
    tl.store(O + out[:, None] * D + d[None, :], acc, mask=rmask[:, None])


def _zero_kind(spec: QuantSpec) -> int:
    """The kernel's zero-point kind: 0 int16, 1 int8, 2 none (symmetric groups), 3 a codebook (levels, no zero)."""
    return 3 if spec.codebook else _ZERO[spec.zero_point][0]


_LEVELS: dict = {}


def _levels(spec: QuantSpec, device) -> torch.Tensor:
    """A codebook's float32 levels on `device` (a one-element placeholder, never read, for uniform codes)."""
    key = (spec.bits, spec.group_size, spec.codebook, str(device))
    if key not in _LEVELS:
        lv = spec.code_levels(device)
        _LEVELS[key] = lv.contiguous() if lv is not None else torch.zeros(1, device=device)
    return _LEVELS[key]


def _check(qt: QTensor, name: str) -> None:
    if not fits_decode(qt, qt.d, key=name == "kq"):
        raise ValueError(f"{name} must hold 2/4/8-bit or ternary codes with fp16 scales over a power-of-two head dim "
                         f"(per-channel groups for keys only), got {qt.spec!r}")
    check_rows(qt, name)


def decode_partial(q: torch.Tensor, kq: QTensor, vq: QTensor, ok: torch.Tensor, scaling: float,
                   block_n: int = 64, splits: int | None = None):
    """Partial attention of one-token queries over a packed segment (flash-decoding).

    q: float32 `[B, Hkv, R, D]` (R query heads per kv head, GQA); kq, vq: QTensors `[B, Hkv, n, .]` of any format
    `kernels.fits_decode` takes (views into a segment's buffers are fine); ok: bool `[B, n]` (False: masked, e.g.
    padding or filler). Returns (m, l, o) as `[B, Hkv, R, 1]`, `[B, Hkv, R, 1]`, `[B, Hkv, R, D]` with m the running
    max of the scaled scores, l = sum exp(s - m) and o = sum exp(s - m) v: the same triple `segment_attention`
    merges, equal to it up to float summation order.
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
    ks_, vs_ = kq.spec, vq.spec
    kc, ks, vc, vs = kq.codes, kq.scale, vq.codes, vq.scale
    kz = ks if kq.zero is None else kq.zero  # symmetric groups: never read
    vz = vs if vq.zero is None else vq.zero
    kgid, vgid = _tables(ks_, D, q.device)[2], _tables(vs_, D, q.device)[2]
    klv, vlv = _levels(ks_, q.device), _levels(vs_, q.device)
    _decode_partial_kernel[(B * Hkv, splits)](
        qc, kc, ks, kz, kgid, klv, vc, vs, vz, vgid, vlv, okb, m, l, o, n, per_split, float(scaling), Hkv,
        kc.stride(0), kc.stride(1), kc.stride(2), ks.stride(0), ks.stride(1), ks.stride(2),
        vc.stride(0), vc.stride(1), vc.stride(2), vs.stride(0), vs.stride(1), vs.stride(2),
        R=R, RP=max(2, triton.next_power_of_2(R)), D=D, KF=_fmt(ks_), VF=_fmt(vs_), KZK=_zero_kind(ks_),
        VZK=_zero_kind(vs_), KHALF=float(1 << (ks_.bits - 1)), VHALF=float(1 << (vs_.bits - 1)),
        KCHAN=ks_.axis == "channel", KG=ks_.group_size if ks_.axis == "channel" else 1, BLOCK_N=block_n)
    # merge the splits (log-sum-exp)
    mm = m.amax(-1, keepdim=True)
    w = torch.exp(m - mm)
    return mm, (l * w).sum(-1, keepdim=True), (o * w[..., None]).sum(-2)
