"""Decode attention straight from vlmkv's packed KV pages (vlmkv/vllm/pages.py), in Triton: the CUDA side of the vLLM
plugin (`pip install 'vlmkv[gpu]'`; this module imports triton). Its reference is `paged_decode_ref` below.

One kernel for every page format: where each field of a (block, head) region sits is data (`page_table`), so a
format is a table entry, not a kernel. A program takes one (request, kv head): the query heads of its group, the
request's page blocks (dequantized in registers: code, fp16 scale and int16 zero point read from the page bytes),
then its raw tokens (kivi's own block in full precision), with an online softmax.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant import fwht, fwht_inverse


def page_table(fmt) -> dict:
    """Byte offsets of a format's fields in one (block, head) region of N * C bytes, and the byte stride from one
    token to the next of each (0: the field is per channel, shared by the block's tokens)."""
    f = {name: off for name, off, _ in fmt.fields()}
    C, cb, G = fmt.token_bytes, fmt.code_bytes, fmt.groups
    if fmt.kind == "rtn":  # one row of C bytes a token
        return dict(KC=f["k_codes"], KS=f["k_scale"], KZ=f["k_zero"], VC=f["v_codes"], VS=f["v_scale"],
                    VZ=f["v_zero"], KC_T=C, KS_T=C, VC_T=C, VS_T=C, KCH=0, KG=1, KS_G=0)
    # kivi: a row of d key scales (and one of zero points) per key group of KG tokens
    return dict(KC=f["k_codes"], KS=f["k_scale"], KZ=f["k_zero"], VC=f["v_codes"], VS=f["v_scale"], VZ=f["v_zero"],
                KC_T=cb, KS_T=0, VC_T=cb, VS_T=2 * G, KCH=1, KG=fmt.kgroup, KS_G=2 * fmt.head_dim)


def paged_decode_ref(q, pages, table, page_blocks, valid, raw, raw_len, fmt, scale: float) -> torch.Tensor:
    """One query a request, in PyTorch: q `[R, Hq, d]`; pages uint8 `[B, H, N, C]`; table int32 `[R, M]` (block
    ids); page_blocks int `[R]`: how many of the table's blocks to read from the pages; valid int `[R]`: tokens of
    the last of them to read (N for every other); raw `[R, 2, H, N, d]` and raw_len int `[R]`: full-precision
    tokens read after the pages (kivi's own block). Returns float32 `[R, Hq, d]`: softmax(q k^T * scale) v over
    every token read."""
    R, Hq, d = q.shape
    H, N = pages.shape[1], pages.shape[2]
    out = torch.zeros(R, Hq, d)
    for r in range(R):
        ks, vs = [], []
        nb = int(page_blocks[r])
        if nb:
            k, v = fmt.dequantize_pages(pages[table[r, :nb].long()], torch.float32)  # [nb, H, N, d]
            n_last = int(valid[r])
            k = torch.cat([k[:-1].permute(1, 0, 2, 3).reshape(H, -1, d), k[-1, :, :n_last]], 1)
            v = torch.cat([v[:-1].permute(1, 0, 2, 3).reshape(H, -1, d), v[-1, :, :n_last]], 1)
            ks.append(k), vs.append(v)
        n_raw = int(raw_len[r])
        if n_raw:
            ks.append(raw[r, 0, :, :n_raw].float()), vs.append(raw[r, 1, :, :n_raw].float())
        K, V = torch.cat(ks, 1), torch.cat(vs, 1)  # [H, n, d]
        qq = q[r].float().view(H, Hq // H, d)
        w = torch.softmax(qq @ K.transpose(1, 2) * scale, -1)
        out[r] = (w @ V).reshape(Hq, d)
    return out


def paged_decode(q, pages, table, page_blocks, valid, raw, raw_len, fmt, scale: float) -> torch.Tensor:
    """`paged_decode_ref` on the GPU (or Triton's interpreter): the same arguments, the same result up to float
    rounding, returned in q's dtype. Hadamard formats: the query and the raw tokens are rotated here, the output
    rotated back (the pages hold rotated keys and values)."""
    R, Hq, d = q.shape
    B, H, N, C = pages.shape
    dtype = q.dtype
    if fmt.hadamard:
        q = fwht(q.float())
        raw = fwht(raw.float())
    qf = q.float().contiguous()
    rawf = raw.float().contiguous()
    out = torch.empty(R, Hq, d, dtype=torch.float32, device=q.device)
    t = page_table(fmt)
    _kernel[(R, H)](qf, pages, table.to(torch.int32).contiguous(), page_blocks.to(torch.int32).contiguous(),
                    valid.to(torch.int32).contiguous(), rawf, raw_len.to(torch.int32).contiguous(), out, float(scale),
                    table.shape[1], H=H, QPK=Hq // H, N=N, C=C, D=d, BITS=fmt.bits, G=fmt.group,
                    BLOCK_N=triton.next_power_of_2(N), **t)
    if fmt.hadamard:
        out = fwht_inverse(out)
    return out.to(dtype)



@triton.jit
def _u16(P, off):
    """The little-endian 16-bit word at byte offsets `off` of uint8 pointer P, as int32 0..65535."""
    lo = tl.load(P + off).to(tl.int32)
    hi = tl.load(P + off + 1).to(tl.int32)
    return lo | (hi << 8)


@triton.jit
def _half(P, off):
    w = _u16(P, off)
    return w.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _int16(P, off):
    w = _u16(P, off)
    return tl.where(w >= 32768, w - 65536, w).to(tl.float32)


@triton.jit
def _code(P, off_row, c, BITS: tl.constexpr):
    PER: tl.constexpr = 8 // BITS
    byte = tl.load(P + off_row + c // PER).to(tl.int32)
    return ((byte >> ((c % PER) * BITS)) & ((1 << BITS) - 1)).to(tl.float32)


@triton.jit
def _kernel(Q, PAGES, TABLE, NPAGE, VALID, RAW, NRAW, OUT, scale, M, H: tl.constexpr, QPK: tl.constexpr,
           N: tl.constexpr, C: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
           BLOCK_N: tl.constexpr, KC: tl.constexpr, KS: tl.constexpr, KZ: tl.constexpr, VC: tl.constexpr,
           VS: tl.constexpr, VZ: tl.constexpr, KC_T: tl.constexpr, KS_T: tl.constexpr, VC_T: tl.constexpr,
           VS_T: tl.constexpr, KCH: tl.constexpr, KG: tl.constexpr, KS_G: tl.constexpr):
    r = tl.program_id(0)
    h = tl.program_id(1)
    tn = tl.arange(0, BLOCK_N)  # token in block
    t = tn[:, None]
    c = tl.arange(0, D)[None, :]  # channel
    nb = tl.load(NPAGE + r)
    last = tl.load(VALID + r)
    nraw = tl.load(NRAW + r)
    for qi in tl.static_range(QPK):
        hq = h * QPK + qi
        q = tl.load(Q + (r * H * QPK + hq) * D + c)  # [1, D]
        m = tl.full((), float("-inf"), tl.float32)
        l = tl.full((), 0.0, tl.float32)
        acc = tl.zeros((1, D), tl.float32)
        for j in range(0, nb):
            blk = tl.load(TABLE + r * M + j).to(tl.int64)
            base = (blk * H + h) * N * C
            n_ok = tl.where(j == nb - 1, last, N)
            ok = t < n_ok
            tt = tl.where(ok, t, 0)
            kidx = c if KCH else c // G
            krow = (tt // KG) * KS_G  # kivi: the key group's row of scales
            ks = _half(PAGES, base + KS + tt * KS_T + krow + 2 * kidx)
            kz = _int16(PAGES, base + KZ + tt * KS_T + krow + 2 * kidx)
            k = (_code(PAGES, base + KC + tt * KC_T, c, BITS) - kz) * ks  # [BLOCK_N, D]
            s = tl.sum(k * q, 1) * scale
            s = tl.where(tn < n_ok, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 0))
            p = tl.exp(s - m_new)
            alpha = tl.exp(m - m_new)
            vs = _half(PAGES, base + VS + tt * VS_T + 2 * (c // G))
            vz = _int16(PAGES, base + VZ + tt * VS_T + 2 * (c // G))
            v = (_code(PAGES, base + VC + tt * VC_T, c, BITS) - vz) * vs
            acc = acc * alpha + tl.sum(p[:, None] * v, 0)[None, :]
            l = l * alpha + tl.sum(p, 0)
            m = m_new
        if nraw > 0:
            ok = t < nraw
            rbase = ((r * 2) * H + h) * N * D
            k = tl.load(RAW + rbase + t * D + c, mask=ok, other=0.0)
            s = tl.sum(k * q, 1) * scale
            s = tl.where(tn < nraw, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 0))
            p = tl.exp(s - m_new)
            alpha = tl.exp(m - m_new)
            v = tl.load(RAW + rbase + H * N * D + t * D + c, mask=ok, other=0.0)
            acc = acc * alpha + tl.sum(p[:, None] * v, 0)[None, :]
            l = l * alpha + tl.sum(p, 0)
            m = m_new
        tl.store(OUT + (r * H * QPK + hq) * D + c, acc / l)


__all__ = ["paged_decode", "paged_decode_ref", "page_table"]
