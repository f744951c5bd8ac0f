"""Asymmetric uniform quantization with clipping, equations (3)-(6) of seed 002 (AKVQ-VL).

    scale = (clipped_max(X) - clipped_min(X)) / (2^n - 1)                       (5)
    zero  = -round(clipped_min(X) / scale)                                       (6)
    Q(X)  = clamp(round(X / scale) + zero, 0, 2^n - 1)                           (3)
    X'    = scale * (Q(X) - zero)                                                (4)

with clipped_max = clip_ratio * max and clipped_min = clip_ratio * min over each group.

Groups run along one axis of a `[..., n, d]` tensor (n tokens, d head channels):
  * axis="token":   per-token groups of `group_size` consecutive channels (d % group_size == 0);
  * axis="channel": per-channel groups of `group_size` consecutive tokens (n % group_size == 0),
                    as KIVI quantizes keys. Only complete groups are ever quantized.

Per-token groups may also be uneven (`bounds`, SKVQ's clustered channels) and carry a clip ratio each (`clips`,
SKVQ's calibrated clipping); `levels=3` stores 3 levels per code (SKVQ's "1.5-bit" values), packed five to a
byte (1.6 bits). The fused C++ and Triton kernels (vlmkv/kernels/) read and write every one of these formats.

Storage: codes are bit-packed along d into uint8; the scale is kept in `meta_dtype` (float16 by
default), rounded *up* to it so that the clipped range always fits in 2^n - 1 steps; the zero point
is an integer kept as int16 (exact for |zero| < 32768, i.e. unless a group's range is under 1/16384
of its distance from zero at 2 bits).
A group whose clipped range is zero (min == max) gets scale |min| / (2^n - 1), which reconstructs the
constant exactly instead of dividing by zero.

Edges, the same in every backend (this reference, the C++ and the Triton kernels):
* the step is at least |clipped_min| / 32767, so the int16 zero point never saturates (values near 1e5 with a
  tiny range come back within |x| / 65534 instead of off by 1e5);
* the step saturates at the largest finite `meta_dtype` value (65504 for float16): a group spanning more than
  (2^n - 1) * 65504 is clipped to that range, finite, never inf or NaN;
* a group holding NaN or +-inf is stored with a NaN step, zero point 0 and codes 0: the whole group reads back
  NaN, so a non-finite input is never turned into a finite value;
* `dequantize` to float16 / bfloat16 saturates at that dtype's largest finite value (65504 stays 65504).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .packing import TRITS_PER_BYTE, pack_bits, pack_trits, packed_length

SUPPORTED_BITS = (2, 4, 8, 16)
AXES = ("token", "channel")
ZERO_POINTS = ("int16", "int8", "none")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized. `bits=16` means "kept as is" (no quantization)."""

    bits: int
    group_size: int = 128
    clip_ratio: float = 1.0
    axis: str = "token"
    meta_dtype: torch.dtype = torch.float16
    #: uneven per-token groups: the channel offsets where groups start, then d (0 = b_0 < b_1 < ... < b_G = d);
    #: None: groups of `group_size`
    bounds: tuple | None = None
    #: one clip ratio per per-token group (replacing `clip_ratio`); None: `clip_ratio` for all
    clips: tuple | None = None
    #: levels per code: 0 means 2^bits; 3 (with bits=2) is a ternary code, packed five to a byte
    levels: int = 0
    #: the zero point's storage: "int16" (default), "int8" (the step is then at least |min| / 127), or "none":
    #: symmetric groups as llama.cpp's q4_0, no zero point stored (x = (q - 2^(bits-1)) * scale, where the
    #: group's largest-magnitude value maps to code 0 exactly and the scale carries its sign)
    zero_point: str = "int16"
    #: "lloyd-max": a codebook format (TurboQuant's scalar quantizer): each per-token group is stored as its fp16
    #: L2 norm (the scale) and, per channel, the code of the nearest of 2^bits Lloyd-Max levels for a coordinate of
    #: a unit vector of `group_size` channels (`quant.codebook.levels`): x = scale * levels[q]. For rotated tokens;
    #: no zero point ("none"), even groups, no clipping. "": uniform levels (the equations above)
    codebook: str = ""

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if not isinstance(self.group_size, int) or self.group_size <= 0:
            raise ValueError(f"group_size must be a positive int, got {self.group_size!r}")
        if not (0.0 < float(self.clip_ratio) <= 1.0):
            raise ValueError(f"clip_ratio must be in (0, 1], got {self.clip_ratio!r}")
        if self.axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {self.axis!r}")
        if self.bounds is not None:
            b = self.bounds
            if self.axis != "token" or len(b) < 2 or b[0] != 0 or any(int(y) <= int(x) for x, y in zip(b, b[1:])):
                raise ValueError(f"bounds must be increasing per-token group offsets from 0, got {b!r}")
        if self.clips is not None and (self.axis != "token" or not all(0.0 < float(c) <= 1.0 for c in self.clips)):
            raise ValueError(f"clips must be per-token group ratios in (0, 1], got {self.clips!r}")
        if self.zero_point not in ZERO_POINTS or (self.zero_point != "int16" and self.axis != "token"):
            raise ValueError(f"zero_point must be one of {ZERO_POINTS} (per-token groups for the last two), "
                             f"got {self.zero_point!r} with axis={self.axis!r}")
        if self.zero_point == "none" and self.levels:
            raise ValueError(f"symmetric groups need 2^bits levels, got levels={self.levels!r}")
        if self.levels not in (0, 3) or (self.levels == 3 and self.bits != 2):
            raise ValueError(f"levels must be 0 (2^bits) or 3 with bits=2, got {self.levels!r} with bits={self.bits!r}")
        if self.codebook not in ("", "lloyd-max"):
            raise ValueError(f"codebook must be '' or 'lloyd-max', got {self.codebook!r}")
        if self.codebook and (self.axis != "token" or self.zero_point != "none" or self.bounds is not None
                              or self.clips is not None or self.levels or self.clip_ratio != 1.0):
            raise ValueError(f"a codebook format takes even per-token groups with no zero point, clipping or uneven "
                             f"bounds, got {self!r}")

    @property
    def qmax(self) -> int:
        """The largest code."""
        return (self.levels or (1 << self.bits)) - 1

    @property
    def even(self) -> bool:
        """Even groups, 2^bits levels, int16 zero points: what the fused decode kernels read (clips only matter
        when quantizing)."""
        return self.bounds is None and self.levels == 0 and self.zero_point == "int16" and not self.codebook

    @property
    def plain(self) -> bool:
        """Even groups, one clip ratio, 2^bits levels, int16 zero points: what the fused kernels take."""
        return (self.bounds is None and self.clips is None and self.levels == 0 and self.zero_point == "int16"
                and not self.codebook)

    def code_levels(self, device=None) -> torch.Tensor | None:
        """float32 `[2^bits]`: the value of each code before scaling, for a codebook format (None: uniform)."""
        if not self.codebook:
            return None
        from .codebook import levels

        return levels(self.bits, self.group_size).to(device)

    def code_bytes(self, d: int) -> int:
        """Bytes the packed codes of one row of d channels take: ceil(d * bits / 8), or ceil(d / 5) for ternary codes."""
        return -(-d // TRITS_PER_BYTE) if self.levels == 3 else packed_length(d, self.bits)

    def group_bounds(self, d: int) -> list[int]:
        """The channel offsets where a row's d channels split into per-token groups, then d (`[0, d]`: one group, for
        per-channel groups, whose groups run along tokens)."""
        if self.axis == "channel":
            return [0, d]
        if self.bounds is not None:
            return [int(b) for b in self.bounds]
        return list(range(0, d + 1, self.group_size))

    def group_clips(self, d: int) -> list[float]:
        """The clip ratio of each per-token group over d channels."""
        n = len(self.group_bounds(d)) - 1
        return [float(c) for c in self.clips] if self.clips is not None else [float(self.clip_ratio)] * n

    def group_ids(self, d: int, device=None) -> torch.Tensor:
        """long `[d]`: the per-token group of each channel."""
        if self.bounds is None:
            return torch.arange(d, device=device) // self.group_size
        b = torch.tensor([int(x) for x in self.bounds], device=device)
        return torch.bucketize(torch.arange(d, device=device), b[1:], right=True)

    def check_shape(self, n: int, d: int) -> None:
        """Raise ValueError unless a `[.., n, d]` tensor splits into complete groups."""
        if self.bounds is not None:
            if int(self.bounds[-1]) != d:
                raise ValueError(f"bounds must end at the row's {d} channels, got {self.bounds!r}")
            groups = len(self.bounds) - 1
        else:
            groups = d // self.group_size if self.axis == "token" else None
        if self.clips is not None and len(self.clips) != groups:
            raise ValueError(f"clips must give one ratio per group ({groups}), got {len(self.clips)!r}")
        if self.axis == "token" and self.bounds is None and d % self.group_size:
            raise ValueError(f"group_size must divide the head dimension {d}, got {self.group_size!r}")
        if self.axis == "channel" and n % self.group_size:
            raise ValueError(
                f"per-channel groups need a token count that is a multiple of group_size={self.group_size}, got n={n!r}"
            )


@dataclass
class QTensor:
    """A quantized `[..., n, d]` tensor.

    codes: uint8 `[..., n, ceil(d * bits / 8)]` packed codes.
    scale: `meta_dtype` `[..., n, d // G]` (token axis) or `[..., n // G, d]` (channel axis).
    zero:  int16, same shape as `scale`.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None  # None: symmetric groups (spec.zero_point == "none"), the zero point is implied
    spec: QuantSpec
    d: int
    dtype: torch.dtype = field(default=torch.float32)

    @property
    def n(self) -> int:
        return self.codes.shape[-2]

    def nbytes(self) -> int:
        """Bytes held: packed codes + scales + zero points."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero) if t is not None)

    def zeros(self) -> torch.Tensor:
        """float32 zero points, shaped as `scale` (the implied 2^(bits-1) of symmetric groups, 0 of a codebook)."""
        if self.spec.codebook:
            return torch.zeros(self.scale.shape, device=self.scale.device)
        if self.zero is None:
            return torch.full(self.scale.shape, float(1 << (self.spec.bits - 1)), device=self.scale.device)
        return self.zero.float()

    def dequantize(self) -> torch.Tensor:
        return dequantize(self)

    def map(self, fn) -> "QTensor":
        """Apply `fn` (an index/cat op along the leading dims) to every stored tensor."""
        return QTensor(fn(self.codes), fn(self.scale), None if self.zero is None else fn(self.zero), self.spec, self.d,
                       self.dtype)

    def slice_tokens(self, start: int, stop: int) -> "QTensor":
        """Tokens [start, stop) as a QTensor sharing storage; for per-channel groups both ends must fall on
        group boundaries (the scales then slice by group)."""
        if self.spec.axis == "channel":
            g = self.spec.group_size
            if start % g or (stop % g and stop != self.n):
                raise ValueError(f"start/stop must be multiples of group_size={g} for per-channel groups, got {(start, stop)!r}")
            gs, ge = start // g, -(-stop // g)
            return QTensor(self.codes[..., start:stop, :], self.scale[..., gs:ge, :], self.zero[..., gs:ge, :],
                           self.spec, self.d, self.dtype)
        zero = None if self.zero is None else self.zero[..., start:stop, :]
        return QTensor(self.codes[..., start:stop, :], self.scale[..., start:stop, :], zero, self.spec, self.d, self.dtype)

    @staticmethod
    def cat(parts: list["QTensor"], dim: int = -2) -> "QTensor":
        """Concatenate along the token dimension without touching the codes (no requantization)."""
        p0 = parts[0]
        return QTensor(
            torch.cat([p.codes for p in parts], dim),
            torch.cat([p.scale for p in parts], dim),
            None if p0.zero is None else torch.cat([p.zero for p in parts], dim),
            p0.spec, p0.d, p0.dtype,
        )


def _grouped(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, int]:
    """View `[..., n, d]` as groups; returns (view, reduce_dim)."""
    *lead, n, d = x.shape
    spec.check_shape(n, d)
    g = spec.group_size
    if spec.axis == "token":
        return x.reshape(*lead, n, d // g, g), -1
    return x.reshape(*lead, n // g, g, d), -2


def _round_up_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast to `dtype`, rounding up so that the result is never below `x` (x >= 0), saturating at the largest
    finite value of `dtype` (NaN stays NaN)."""
    x = x.clamp_max(torch.finfo(dtype).max)
    y = x.to(dtype)
    low = y.to(x.dtype) < x
    if low.any():
        y = torch.where(low, torch.nextafter(y, torch.full_like(y, float("inf"))), y)
    return y


def quantize(x: torch.Tensor, spec: QuantSpec) -> QTensor:
    """Quantize a float tensor `[..., n, d]` (fp32, fp16 or bf16) as equations (3)-(6), in plain PyTorch.

    This is the reference the fused kernels are tested against (`vlmkv.kernels.quantize` picks a backend)."""
    if spec.bits == 16:
        raise ValueError(f"bits=16 means 'keep as is': store the tensor itself, got spec {spec!r}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a float tensor, got dtype {x.dtype!r}")
    *lead, n, d = x.shape
    if spec.codebook:
        return _quantize_codebook(x, spec)
    if not spec.plain:
        return _quantize_general(x, spec)
    xg, rdim = _grouped(x.float(), spec)
    qmax = (1 << spec.bits) - 1
    mx = xg.amax(dim=rdim, keepdim=True) * spec.clip_ratio
    mn = xg.amin(dim=rdim, keepdim=True) * spec.clip_ratio
    scale_s, scale, zero, bad = _scale_zero(mn, mx, qmax, spec.meta_dtype)
    q = torch.where(bad, 0.0, (torch.round(xg / scale) + zero).clamp_(0, qmax))
    codes = pack_bits(q.to(torch.uint8).reshape(*lead, n, d), spec.bits)
    return QTensor(codes, scale_s.squeeze(rdim), zero.to(torch.int16).squeeze(rdim), spec, d, x.dtype)


def _scale_zero(mn: torch.Tensor, mx: torch.Tensor, qmax: int, meta_dtype, zlim: float = 32767.0) -> tuple:
    """Equations (5)-(6) with the module's edges, for group minima / maxima of any shape: (stored scale,
    float32 scale, float32 zero point, bool non-finite groups). The step is at least |min| / zlim, so that the
    zero point fits its storage (32767: int16, 127: int8)."""
    scale = (mx - mn) / qmax
    # min == max: a step of |min| / qmax reconstructs the constant exactly (q = 0) instead of 0/0.
    flat = scale <= 0
    if flat.any():
        scale = torch.where(flat, mn.abs().clamp_min(1e-8) / qmax, scale)
    scale = torch.maximum(scale, mn.abs() / zlim)  # the zero point fits its storage (see the module docstring)
    bad = ~torch.isfinite(scale)  # NaN or inf in the group: it reads back NaN
    scale_s = _round_up_to(torch.where(bad, float("nan"), scale), meta_dtype)
    scale = scale_s.float()
    zero = torch.where(bad, 0.0, (-torch.round(mn / scale)).clamp(-zlim - 1, zlim))
    return scale_s, scale, zero, bad


def _quantize_general(x: torch.Tensor, spec: QuantSpec) -> QTensor:
    """quantize() for per-token groups given by `bounds` and/or `clips`, or 3 levels: the same equations with each
    channel's group found by its id (groups may differ in size)."""
    if spec.axis != "token":
        raise ValueError(f"uneven groups, clips and levels are per-token only, got {spec!r}")
    *lead, n, d = x.shape
    spec.check_shape(n, d)
    xf = x.float()
    gid = spec.group_ids(d, x.device)
    G = int(gid[-1]) + 1 if d else 0
    idx = gid.expand_as(xf)
    mx = xf.new_full((*lead, n, G), float("-inf")).scatter_reduce(-1, idx, xf, "amax")
    mn = xf.new_full((*lead, n, G), float("inf")).scatter_reduce(-1, idx, xf, "amin")
    clip = torch.tensor([float(c) for c in spec.clips], device=x.device) if spec.clips is not None else spec.clip_ratio
    mx, mn = mx * clip, mn * clip
    # a NaN anywhere in a group: amax/amin may skip it, so flag the group as the plain path does
    nan = torch.zeros_like(mx, dtype=torch.bool).scatter_reduce(-1, idx, torch.isnan(xf), "amax")
    mn = torch.where(nan, float("nan"), mn)
    qmax = spec.qmax
    if spec.zero_point == "none":
        scale_s, scale, zero, bad = _symmetric_scale(mn, mx, spec.bits, spec.meta_dtype)
    else:
        zlim = 127.0 if spec.zero_point == "int8" else 32767.0
        scale_s, scale, zero, bad = _scale_zero(mn, mx, qmax, spec.meta_dtype, zlim)
    se, ze, be = scale.index_select(-1, gid), zero.index_select(-1, gid), bad.index_select(-1, gid)
    q = torch.where(be, 0.0, (torch.round(xf / se) + ze).clamp_(0, qmax))
    codes = pack_trits(q.to(torch.uint8)) if spec.levels == 3 else pack_bits(q.to(torch.uint8), spec.bits)
    stored = {"int16": zero.to(torch.int16), "int8": zero.to(torch.int8), "none": None}[spec.zero_point]
    return QTensor(codes, scale_s, stored, spec, d, x.dtype)


def _quantize_codebook(x: torch.Tensor, spec: QuantSpec) -> QTensor:
    """quantize() for a codebook format: per group of g channels, the fp16 L2 norm (rounded to nearest, saturating at
    the largest finite fp16) and the nearest level of x / norm (ties to the lower level). An all-zero group has norm
    0 and reads back 0; a group holding NaN or inf gets a NaN norm and codes 0 (it reads back NaN)."""
    *lead, n, d = x.shape
    spec.check_shape(n, d)
    g = spec.group_size
    xg = x.float().reshape(*lead, n, d // g, g)
    norm = xg.square().sum(-1, keepdim=True).sqrt()
    bad = ~torch.isfinite(norm)
    scale_s = torch.where(bad, float("nan"), norm.clamp_max(torch.finfo(spec.meta_dtype).max)).to(spec.meta_dtype)
    s = scale_s.float()
    u = torch.where(bad | (s == 0), 0.0, xg / torch.where(s == 0, 1.0, s))
    lv = spec.code_levels(x.device)
    q = torch.bucketize(u, (lv[1:] + lv[:-1]) / 2)
    q = torch.where(bad, 0, q)
    codes = pack_bits(q.to(torch.uint8).reshape(*lead, n, d), spec.bits)
    return QTensor(codes, scale_s.squeeze(-1), None, spec, d, x.dtype)


def _symmetric_scale(mn: torch.Tensor, mx: torch.Tensor, bits: int, meta_dtype) -> tuple:
    """Symmetric groups (llama.cpp's q4_0 rule): the value of largest magnitude m maps to code 0, so the scale is
    m / -2^(bits-1) (signed) and the implied zero point 2^(bits-1); the opposite end may clip by one step.
    Returns (stored scale, float32 scale, float32 zero points, bool non-finite groups), as `_scale_zero`."""
    half = float(1 << (bits - 1))
    m = torch.where(mx.abs() > mn.abs(), mx, mn)
    mag = (m.abs() / half).clamp_min(1e-8)  # all-zero group: any step reconstructs it
    bad = ~torch.isfinite(mag)
    mag_s = _round_up_to(torch.where(bad, float("nan"), mag), meta_dtype)
    scale_s = torch.where(m > 0, -mag_s, mag_s)  # x = (q - half) * scale: m -> q = 0
    return scale_s, scale_s.float(), torch.full_like(mag, half), bad


_LUTS: dict = {}


def _code_lut(bits: int, device, levels: int = 0) -> torch.Tensor:
    """float32 `[256, codes per byte]`: the codes packed in each possible byte (unpacking by table lookup is one
    gather instead of shift, mask and convert passes); levels=3: five base-3 digits per byte."""
    key = (bits, str(device), levels)
    if key not in _LUTS:
        byte = torch.arange(256)
        if levels == 3:
            _LUTS[key] = torch.stack([(byte // 3 ** j) % 3 for j in range(TRITS_PER_BYTE)], -1).float().to(device)
        else:
            per = 8 // bits
            _LUTS[key] = torch.stack([(byte >> (bits * j)) & ((1 << bits) - 1) for j in range(per)], -1).float().to(device)
    return _LUTS[key]


def dequantize(qt: QTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Equation (4): `scale * (Q - zero)`, returned as `[..., n, d]` in `dtype` (default: the input's).

    Computed as `Q * scale + (-zero * scale)` with the codes unpacked by table lookup; equal to
    `(unpack_bits(codes) - zero) * scale` up to float rounding of the fused multiply-add.
    """
    spec = qt.spec
    g = spec.group_size
    lead, n, d = qt.codes.shape[:-2], qt.codes.shape[-2], qt.d
    lut = _code_lut(spec.bits, qt.codes.device, spec.levels)
    if spec.codebook:  # each code's level: x = scale * levels[q], no zero point
        lut = spec.code_levels(qt.codes.device)[lut.long()]
    # index_select on flat indices: ~3x faster on CPU than advanced indexing lut[codes]
    q = lut.index_select(0, qt.codes.reshape(-1).long()).view(*lead, n, qt.codes.shape[-1] * lut.shape[-1])  # [..., n, bytes * per]
    if q.shape[-1] != d:
        q = q[..., :d]
    scale = qt.scale.float()
    bias = -qt.zeros() * scale
    if spec.bounds is not None:
        gid = spec.group_ids(d, q.device)
        out = torch.addcmul(bias.index_select(-1, gid), q, scale.index_select(-1, gid))
    elif spec.axis == "token":
        out = torch.addcmul(bias.unsqueeze(-1), q.reshape(*lead, n, d // g, g), scale.unsqueeze(-1))
    else:
        out = torch.addcmul(bias.unsqueeze(-2), q.reshape(*lead, n // g, g, d), scale.unsqueeze(-2))
    out = out.reshape(*lead, n, d)
    dtype = dtype or qt.dtype
    if dtype in (torch.float16, torch.bfloat16):  # saturate, as the input could not have been beyond it
        big = torch.finfo(dtype).max
        out = out.clamp(-big, big)
    return out.to(dtype)


def saturate(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` cast to `dtype`, finite values beyond its range clamped to its largest finite value instead of
    becoming inf (NaN and +-inf stay as they are). For results that cannot exceed the range of the values they
    came from but may by float rounding: an attention output is a convex combination of stored values."""
    if x.dtype == dtype or not dtype.is_floating_point or torch.finfo(dtype).max >= torch.finfo(x.dtype).max:
        return x.to(dtype)
    big = torch.finfo(dtype).max
    return torch.where(torch.isfinite(x), x.clamp(-big, big), x).to(dtype)


def quantization_step(qt: QTensor) -> torch.Tensor:
    """The step (stored scale) broadcast to `[..., n, d]`, for error-bound checks."""
    g = qt.spec.group_size
    s = qt.scale.float().abs()  # symmetric groups carry the sign in the scale
    if qt.spec.bounds is not None:
        return s.index_select(-1, qt.spec.group_ids(qt.d, s.device))
    if qt.spec.axis == "token":
        return s.repeat_interleave(g, dim=-1)
    return s.repeat_interleave(g, dim=-2)


__all__ = ["QuantSpec", "QTensor", "quantize", "dequantize", "quantization_step", "saturate", "packed_length", "SUPPORTED_BITS"]
