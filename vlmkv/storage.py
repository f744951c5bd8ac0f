"""Per-layer KV storage: precision segments plus a full-precision residual buffer.

Free of `transformers`: `cache.py` wraps a `LayerStore` into a transformers cache layer.

Layout of one layer (B batch rows, H kv heads, D head channels, L cached slots):

* one `Segment` per bit-width. All tokens stored at that width sit contiguously in it, bit-packed
  (`QTensor`) with their scales and zero points, or as-is for 16 bits. A token's slot (its column in
  the attention's key sequence) is kept in an int32 index map `[B, n]`; a segment whose tokens are the
  consecutive slots `start .. start+n-1` in every row keeps no map at all (the common case for
  single-precision policies).
* Rows of a batch may plan different numbers of tokens per width. A segment is as long as its longest
  row; shorter rows are filled with copies of one of their own tokens whose slot is -1 ("filler": never
  read, and it cannot widen a per-channel group's range). Filler bytes are counted like any others.
* the residual buffer: the most recent tokens, unquantized `[B, H, r, D]` with the bit-width
  each will be stored at when it is flushed (int16 `[B, r]`).
* deferred values (KIVI's reference rule): a segment's last tokens may have quantized keys but values still in
  full precision (`Segment.vpend`), until they leave the value window and are quantized one token at a time.
* evicted slots (width 0): a token planned at 0 bits is stored nowhere. Its slot keeps its place (positions,
  masks and `length` count it), no segment's slot map names it, so segment attention never reads it; a read of
  the whole cache (`materialize`) returns zeros there and `live()` tells attention which slots to mask.

"16 bits" (16-bit segments, the residual buffer and deferred values) is stored in `full_dtype`: the model's
dtype when that is fp16/bf16, float16 for a float32 model (so 16 means 16 bits of memory); the `fp16` reference
policy keeps the model's dtype whatever it is, so that it stays bit-identical to `DynamicCache`. A finite value
that `full_dtype` cannot hold (a float32 model's 7e4 in float16, or a rotated float16 token whose Hadamard
rotation exceeds 65504) is never turned into inf: the first write that holds one switches that layer's
full-precision storage to float32 for good (what it held is converted, exactly), and `nbytes()` counts the
4 bytes an element from then on. NaN and inf are stored as they are.

Segments grow by writing packed codes into spare capacity (grown by a small margin when full); nothing
already quantized is ever dequantized and quantized again, and a decode step never copies a segment.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from . import kernels
from .quant import QTensor, QuantSpec, dequantize

GROW_MIN = 4  # the least room (tokens) a full segment grows by: small against short caches, 1/64 takes over later
SpecFn = Callable[[int, str, int], QuantSpec]  # (bits, "key" | "value", channels per quantized row)


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _flatten(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """`[B, H, n, D]` -> `[B, 1, n, H * D]` with the channels permuted by `perm` (channel c of head h is h*D + c)."""
    B, H, n, D = x.shape
    return x.permute(0, 2, 1, 3).reshape(B, n, H * D).index_select(-1, perm.long().to(x.device)).unsqueeze(1)


def _unflatten(x: torch.Tensor, perm: torch.Tensor, heads: int, inverse: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of `_flatten`: `[B, 1, n, H * D]` -> `[B, H, n, D]` (`inverse`: argsort(perm), if known)."""
    B, _, n, HD = x.shape
    inv = inverse if inverse is not None else torch.argsort(perm.long().to(x.device))
    y = x.squeeze(1).index_select(-1, inv.to(x.device))
    return y.view(B, n, heads, HD // heads).permute(0, 2, 1, 3)


@dataclass
class Plain:
    """A 16-bit segment's tokens `[B, H, n, D]`, kept as they are, behind QTensor's interface (the codes are the
    values themselves, with no scales), so that segments of every width are handled alike."""

    codes: torch.Tensor
    spec = None

    @property
    def d(self) -> int:
        return self.codes.shape[-1]

    def slice_tokens(self, start: int, stop: int) -> "Plain":
        return Plain(self.codes[..., start:stop, :])

    def map(self, fn) -> "Plain":
        return Plain(fn(self.codes))

    def nbytes(self) -> int:
        return _nbytes(self.codes)


Stored = QTensor | Plain


def _per_channel(t: Stored) -> bool:
    return t.spec is not None and t.spec.axis == "channel"


def _rows(t: Stored, tokens: int, part: str) -> int:
    """Rows along dim -2 that `tokens` tokens occupy in `part` ('codes' or 'meta') of a stored tensor."""
    return tokens // t.spec.group_size if part == "meta" and _per_channel(t) else tokens


def _parts(t: Stored) -> list[tuple[str, torch.Tensor]]:
    if isinstance(t, Plain):
        return [("codes", t.codes)]
    return [("codes", t.codes), ("meta", t.scale)] + ([] if t.zero is None else [("meta", t.zero)])


def _like(buf: Stored, parts: list[torch.Tensor]) -> Stored:
    """A stored tensor of `buf`'s kind over new part tensors (as `_parts` lists them)."""
    if isinstance(buf, Plain):
        return Plain(parts[0])
    return QTensor(parts[0], parts[1], parts[2] if len(parts) > 2 else None, buf.spec, buf.d, buf.dtype)


def _grown(buf: Stored, used: int, cap: int) -> Stored:
    """A copy of `buf` with room for `cap` tokens, its first `used` tokens kept."""
    out = []
    for part, x in _parts(buf):
        y = x.new_empty(*x.shape[:-2], _rows(buf, cap, part), x.shape[-1])
        r = _rows(buf, used, part)
        y[..., :r, :] = x[..., :r, :]
        out.append(y)
    return _like(buf, out)


def _shifted(buf: Stored, drop: int, used: int) -> Stored:
    """A copy of `buf` holding exactly its tokens [drop, used) (`drop` a whole number of groups)."""
    return _like(buf, [x[..., _rows(buf, drop, part):_rows(buf, used, part), :].clone() for part, x in _parts(buf)])


def _write(buf: Stored, src: Stored, at: int) -> None:
    """Copy all of `src` into `buf` starting at token `at`."""
    for (part, x), (_, y) in zip(_parts(buf), _parts(src)):
        r = _rows(buf, at, part)
        x[..., r:r + y.shape[-2], :] = y


def _capacity(buf: Stored) -> int:
    if _per_channel(buf):
        return buf.scale.shape[-2] * buf.spec.group_size
    return buf.codes.shape[-2]


@dataclass
class Segment:
    """Tokens of one bit-width of one layer.

    kb, vb: storage buffers, QTensor (bits < 16) or Plain (16 bits) `[B, H, capacity, .]`, of which the first
    `count` tokens are used (`k`, `v` are views of them). Appends write in place and grow the buffers by a
    margin (max(GROW_MIN = 4 tokens, 1/64 of the segment)) only when full, so decode steps never copy the segment;
    the spare capacity is counted in `nbytes()` (at most ~1.6% of a long segment).
    """

    bits: int
    kb: QTensor | torch.Tensor
    vb: QTensor | torch.Tensor
    index: torch.Tensor | None  # int32 [B, n] slot of each stored token, -1 for filler; None: contiguous
    start: int = 0  # first slot when index is None
    count: int = -1
    #: values of the last p tokens `[B, H, p, D]` (full precision) whose keys are quantized but whose values are
    #: not yet (KIVI's value window); vb then holds the values of the first `coded` = count - p tokens only
    vpend: torch.Tensor | None = None

    def __post_init__(self):
        if self.count < 0:
            self.count = _capacity(self.kb)

    @property
    def n(self) -> int:
        return self.count

    @property
    def coded(self) -> int:
        """Tokens whose values are quantized (all of them unless some are deferred in `vpend`)."""
        return self.count - (0 if self.vpend is None else self.vpend.shape[-2])

    @property
    def split(self) -> int:
        """The last group boundary at or before `coded`: tokens [0, split) can be read straight from the codes."""
        return self.coded // self._unit() * self._unit()

    def head(self, n: int) -> tuple[Stored, Stored]:
        """Views of the keys and values of tokens [0, n) (n <= `split`: values all coded), built once per call."""
        return (self.k, self.v) if n == self.n else (self.kb.slice_tokens(0, n), self.vb.slice_tokens(0, n))

    @property
    def k(self) -> Stored:
        return self.kb.slice_tokens(0, self.count)

    @property
    def v(self) -> Stored:
        """The quantized values (of the first `coded` tokens)."""
        return self.vb.slice_tokens(0, self.coded)

    @property
    def capacity(self) -> int:
        return _capacity(self.kb)

    def nbytes(self) -> int:
        total = _nbytes(self.index if self._ibuf is None else self._ibuf) + _nbytes(self.vpend)
        return total + self.kb.nbytes() + self.vb.nbytes()

    def __setattr__(self, name, value):
        if name == "index":  # a new slot map: whether it holds filler is worked out again when asked, and any
            object.__setattr__(self, "_filler", None)  # spare room behind the old one is let go
            object.__setattr__(self, "_ibuf", None)
        object.__setattr__(self, name, value)

    def _append_index(self, new: torch.Tensor) -> None:
        """Append slots int32 `[B, m]` to the index map, into spare room behind it where there is some (grown as the
        codes are: max(GROW_MIN, 1/64) at a time), so that a decode step's flush does not copy the whole map."""
        B, n, m = self.index.shape[0], self.index.shape[1], new.shape[1]
        buf, filler = self._ibuf, self._filler
        if buf is None or buf.shape[1] < n + m:
            buf = self.index.new_empty(B, n + m + max(GROW_MIN, (n + m) // 64))
            buf[:, :n] = self.index
        buf[:, n:n + m] = new
        self.index = buf[:, :n + m]
        self._ibuf = buf
        if filler is not None:  # known for the old part: only the new slots need a look
            self._filler = filler or bool((new < 0).any())

    def has_filler(self) -> bool:
        """Whether any stored slot is filler (index -1), which attention must mask; worked out once per index map
        (every change assigns `index` anew)."""
        if self.index is None:
            return False
        if self._filler is None:
            self._filler = bool((self.index < 0).any())
        return self._filler

    def astype(self, dtype: torch.dtype) -> None:
        """Hold full-precision parts (16-bit tokens, deferred values) in `dtype` from now on (widening: exact)."""
        if isinstance(self.kb, Plain):
            self.kb, self.vb = Plain(self.kb.codes.to(dtype)), Plain(self.vb.codes.to(dtype))
        if self.vpend is not None:
            self.vpend = self.vpend.to(dtype)

    def slot_index(self, batch: int, device) -> torch.Tensor:
        """The index map, materialized if the segment is contiguous."""
        if self.index is not None:
            return self.index
        return (torch.arange(self.start, self.start + self.n, dtype=torch.int32, device=device)
                .expand(batch, -1).contiguous())

    def map(self, fn) -> None:
        """Apply a batch-dimension op (index_select, repeat_interleave, ...) to everything."""
        self.kb, self.vb = self.kb.map(fn), self.vb.map(fn)
        if self.index is not None:
            self.index = fn(self.index)
        if self.vpend is not None:
            self.vpend = fn(self.vpend)

    def _reserve(self, need: int, need_v: int | None = None) -> None:
        """Room for `need` keys and `need_v` values (default `need`): each buffer is grown by a margin only when
        full, so most appends copy nothing (deferred values are not given room before they are quantized)."""
        for attr, used, want in (("kb", self.count, need), ("vb", self.coded, need if need_v is None else need_v)):
            buf = getattr(self, attr)
            if want > _capacity(buf):
                cap = want + max(GROW_MIN, used // 64)
                if _per_channel(buf):
                    g = buf.spec.group_size
                    cap = -(-cap // g) * g
                setattr(self, attr, _grown(buf, used, cap))

    def quantize_values(self, m: int) -> None:
        """Quantize the m oldest deferred values (they left the value window) into the value codes."""
        if m <= 0 or self.vpend is None:
            return
        p = self.vpend.shape[-2]
        if m > p:
            raise ValueError(f"m must be at most the {p} deferred values, got {m!r}")
        coded = self.coded
        q = kernels.quantize(self.vpend[:, :, :m], self.vb.spec)
        self._reserve(self.count, coded + m)
        _write(self.vb, q, coded)
        # a copy, so that the bytes held are exactly the p - m values left (KIVI's reference copies likewise)
        self.vpend = self.vpend[:, :, m:].clone() if m < p else None

    def deferred_slots(self, batch: int, device) -> torch.Tensor | None:
        """int32 `[B, p]`: the slots of the deferred values (-1 for filler), None when there are none."""
        if self.vpend is None:
            return None
        return self.slot_index(batch, device)[:, self.coded:]

    def _unit(self) -> int:
        """Tokens that are stored together: a per-channel group (KIVI keys), else one."""
        return max([t.spec.group_size for t in (self.kb, self.vb) if _per_channel(t)] or [1])

    def drop_front(self, n: int) -> bool:
        """Forget slots < n and renumber the rest from 0 (a sliding window moved on). Whole leading columns that
        no row needs any more are released; a partly needed per-channel group stays, its gone tokens as filler.
        Returns False when nothing of the segment is left."""
        if self.index is None:
            if self.start >= n:
                self.start -= n
                return True
            d = n - self.start  # leading columns gone
            if d >= self.count:
                return False
            index = None
            if d % self._unit():
                b = self.kb.codes.shape[0]
                dev = self.kb.codes.device
                index = self.slot_index(b, dev) - n
                index = torch.where(index >= 0, index, -1).to(torch.int32)
            self.start = 0
        else:
            index = torch.where(self.index >= n, self.index - n, -1).to(torch.int32)
            if bool((index < 0).all()):
                return False
            gone = (index < 0).all(0).to(torch.int32)
            d = int(gone.cumprod(0).sum())  # leading columns no row needs
        drop = d // self._unit() * self._unit()
        if drop:
            coded = self.coded
            self.kb, self.vb = _shifted(self.kb, drop, self.count), _shifted(self.vb, min(drop, coded), coded)
            if drop > coded:  # the window also passed some deferred values
                self.vpend = self.vpend[:, :, drop - coded:].clone() if drop - coded < self.vpend.shape[-2] else None
            self.count -= drop
            if index is not None:
                index = index[:, drop:].clone()
        self.index = index
        return True

    def append(self, other: "Segment") -> None:
        contiguous = self.index is None and other.index is None and other.start == self.start + self.n
        if not contiguous:
            b = self.kb.codes.shape[0]
            dev = self.kb.codes.device
            if self.index is None:
                self.index = self.slot_index(b, dev)
            self._append_index(other.slot_index(b, dev))
        if self.vpend is not None and other.coded:
            raise RuntimeError("values are quantized in slot order: a block with quantized values cannot follow "
                               f"{self.vpend.shape[-2]} deferred ones")
        need, coded = self.count + other.n, self.coded
        self._reserve(need, coded + other.coded)
        _write(self.kb, other.kb, self.count)
        _write(self.vb, other.v, coded)
        if other.vpend is not None:
            self.vpend = other.vpend if self.vpend is None else torch.cat([self.vpend, other.vpend], -2)
        self.count = need

    def append_float(self, k: torch.Tensor, v: torch.Tensor, start: int) -> bool:
        """Quantize float tokens `[B, H, n, D]` of slots `start .. start+n-1` straight into this segment's spare
        capacity with the CPU kernel (`kernels.quantize_into`): one call per tensor, no temporary QTensor. The slots
        must follow on from a contiguous segment, or go into its slot map (which grows in place). False (nothing
        done) where that kernel does not apply; the caller then quantizes and appends."""
        if isinstance(self.kb, Plain) or self.kb.codes.dim() != 4 or self.vpend is not None:
            return False
        if self.index is None and self.start + self.n != start:
            return False
        if not all(kernels.quantize_backend(x, t.spec) == "cpu" for x, t in ((k, self.kb), (v, self.vb))):
            return False
        n = k.shape[-2]
        self._reserve(self.count + n)
        for src, buf in ((k, self.kb), (v, self.vb)):
            kernels.quantize_into(src, buf.slice_tokens(self.count, self.count + n))
        if self.index is not None:
            self._append_index(torch.arange(start, start + n, dtype=torch.int32, device=self.index.device)
                               .expand(self.index.shape[0], n))
        self.count += n
        return True



class Residual:
    """The full-precision recent tokens of one layer, in an append-only buffer.

    Buffers k, v `[B, H, capacity, D]`, and the width each token will be stored at: one int while every live
    token shares it (decode-time tokens all do), else an int16 map `[B, capacity]`. The live tokens are [r0, r1).
    A push writes after r1 and a flush of the oldest tokens only moves r0, so most decode steps copy nothing. When
    the end is reached, the live tokens move to the front of a new buffer with room for live / 16 more, but never
    more than the caller's `limit`: the most its decode rule ever keeps (a window of W tokens flushed F at a time
    holds W + F, or W + W / 16 when F is smaller, so that copies come every W / 16 steps and not every step). A
    buffer that never flushes (limit 0) grows by exactly what arrives; one that empties is released. Bytes are
    counted for the whole buffer, so the spare room (and the width map, where there is one) is part of `nbytes()`.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, bits: torch.Tensor | int):
        self._reset(k, v, bits, k.shape[-2])

    @staticmethod
    def _uniform(bits):
        """bits as one int when every entry is the same, else the int16 tensor."""
        if isinstance(bits, int):
            return bits
        if bits.numel() == 0:
            return None
        lo, hi = torch.aminmax(bits)
        return int(lo) if int(lo) == int(hi) else bits.to(torch.int16)

    def _reset(self, k, v, bits, capacity: int) -> None:
        """Hold exactly these tokens at the front of a new buffer of `capacity` (>= their count) tokens."""
        B, H, n, D = k.shape
        self.kb = k.new_empty(B, H, capacity, D)
        self.vb = v.new_empty(B, H, capacity, D)
        self.kb[:, :, :n], self.vb[:, :, :n] = k, v
        bits = self._uniform(bits)
        self.width = bits if not torch.is_tensor(bits) else None  # the shared width (None: see bb, or empty)
        self.bb = None
        if torch.is_tensor(bits):
            self.bb = bits.new_empty(B, capacity)
            self.bb[:, :n] = bits
        self.r0, self.r1 = 0, n

    def __len__(self) -> int:
        return self.r1 - self.r0

    def astype(self, dtype: torch.dtype) -> None:
        """Hold the tokens in `dtype` from now on (a widening conversion: exact)."""
        self.kb, self.vb = self.kb.to(dtype), self.vb.to(dtype)

    @property
    def k(self) -> torch.Tensor:
        return self.kb[:, :, self.r0:self.r1]

    @property
    def v(self) -> torch.Tensor:
        return self.vb[:, :, self.r0:self.r1]

    def block_bits(self, f: int):
        """Widths of the f oldest live tokens: one int when they share it, else int16 `[B, f]`."""
        if self.bb is None:
            return self.width
        return self._uniform(self.bb[:, self.r0:self.r0 + f])

    @property
    def bits(self) -> torch.Tensor:
        """int16 `[B, r]`: the width each live token will be stored at."""
        if self.bb is not None:
            return self.bb[:, self.r0:self.r1]
        return torch.full((self.kb.shape[0], len(self)), self.width or 16, dtype=torch.int16, device=self.kb.device)

    def nbytes(self) -> int:
        return _nbytes(self.kb) + _nbytes(self.vb) + _nbytes(self.bb)

    def push(self, k: torch.Tensor, v: torch.Tensor, bits: int, limit: int = 0) -> None:
        """Append tokens that will all be stored at `bits`; when the buffer's end is reached, move to a new one
        (see the class docstring)."""
        n = k.shape[-2]
        if self.bb is None and self.width is not None and self.width != bits and len(self):
            self.bb = torch.full((self.kb.shape[0], self.kb.shape[-2]), self.width, dtype=torch.int16,
                                 device=self.kb.device)  # widths now differ: keep a map from here on
        if self.r1 + n > self.kb.shape[-2]:
            live = len(self) + n
            cap = max(live, min(limit, live + len(self) // 16))
            new = torch.full((k.shape[0], n), bits, dtype=torch.int16, device=k.device)
            widths = bits if self.bb is None and self.width in (None, bits) else torch.cat([self.bits, new], 1)
            self._reset(torch.cat([self.k, k], -2), torch.cat([self.v, v], -2), widths, cap)
            return
        self.kb[:, :, self.r1:self.r1 + n] = k
        self.vb[:, :, self.r1:self.r1 + n] = v
        if self.bb is not None:
            self.bb[:, self.r1:self.r1 + n] = bits
        elif self.width is None:
            self.width = bits
        self.r1 += n

    def pop(self, f: int) -> None:
        """Drop the f oldest tokens (once they are committed to segments)."""
        self.r0 += f
        if self.r0 == self.r1:  # empty (a whole block flushed): hold no bytes until the next push
            self._reset(self.kb[:, :, :0], self.vb[:, :, :0], 0, 0)
            self.width = None

    def compact(self) -> None:
        """Release the room before the live tokens (after a sliding window dropped some)."""
        if self.r0:
            self._reset(self.k, self.v, self.bits if self.bb is not None else self.width, len(self))

    def keep(self, n: int) -> None:
        """Keep the n oldest tokens (crop)."""
        self.r1 = self.r0 + n

    def map(self, fn) -> None:
        self.kb, self.vb = fn(self.kb), fn(self.vb)
        if self.bb is not None:
            self.bb = fn(self.bb)


class LayerStore:
    """One layer's quantized KV storage.

    spec_fn(bits, kind, d) gives the quantizer for `kind` in {"key", "value"} at `bits` < 16, for rows of d
    channels (the head dimension, or H * D when a channel permutation flattens the heads).
    """

    def __init__(self, spec_fn: SpecFn, dtype: torch.dtype, device, full_dtype: torch.dtype | None = None):
        self.spec_fn = spec_fn
        self.dtype = dtype  # the model's: what materialize() returns
        self.full_dtype = full_dtype or dtype  # what "16 bits" and the residual buffer are stored in
        self.device = device
        self.segments: dict[int, Segment] = {}
        self.residual: Residual | None = None
        self.length = 0  # slots held (quantized + residual)
        self.channel_scales: tuple | None = None  # (k, v) divisors [B, H, 1, D] applied to quantized tokens
        self.channel_perm: tuple | None = None  # (k, v) int16 [H * D] permutations of quantized tokens' channels
        self.num_heads: int | None = None
        self._inverse_perm: tuple | None = None
        self._specs: dict = {}
        #: the last decode write's rule (bits, keep_recent, flush_every, value_window), for `settle`
        self.rule: tuple | None = None
        self.spec_fields: tuple | None = None  # (k, v) QuantSpec fields of this layer (uneven groups, clips)
        #: quantized key + value elements decode attention read, by path: "fused" (a kernel read the codes) or
        #: "reference" (the pure PyTorch path); see `count_read`
        self.reads = {"fused": 0, "reference": 0}
        #: slots evicted (planned at 0 bits) in the most affected row: none of them is stored anywhere
        self.evicted = 0

    # ------------------------------------------------------------------ sizes
    @property
    def residual_len(self) -> int:
        return 0 if self.residual is None else len(self.residual)

    @property
    def res_k(self) -> torch.Tensor | None:
        """The residual tokens' keys `[B, H, r, D]` (a view), None before the first write."""
        return None if self.residual is None else self.residual.k

    @property
    def res_v(self) -> torch.Tensor | None:
        return None if self.residual is None else self.residual.v

    @property
    def res_bits(self) -> torch.Tensor | None:
        """int16 `[B, r]`: the width each residual token will be stored at."""
        return None if self.residual is None else self.residual.bits

    def nbytes(self) -> int:
        """Every byte held: packed codes, scales, zero points, index maps, residual buffer and its bit map."""
        cs = sum(_nbytes(t) for t in self.channel_scales) if self.channel_scales else 0
        cs += sum(_nbytes(t) for t in self.channel_perm) if self.channel_perm else 0
        for fields in self.spec_fields or ():  # group bounds and clips: one 16-bit number each
            cs += 2 * sum(len(v) for v in fields.values())
        return (sum(s.nbytes() for s in self.segments.values())
                + (self.residual.nbytes() if self.residual is not None else 0) + cs)

    def num_elements(self) -> int:
        """Key + value elements of the cached slots (what FP16 would store at 2 bytes each)."""
        if self.res_k is not None:
            b, h, _, d = self.res_k.shape
        elif self.segments:
            s = next(iter(self.segments.values()))
            b, h, d = s.kb.codes.shape[0], s.kb.codes.shape[1], s.kb.d  # h * d is per token
        else:
            return 0
        return 2 * b * h * self.length * d

    def bits_histogram(self) -> dict[int, int]:
        """Valid (non-filler) tokens per bit-width, residual counted as 16 (summed over rows)."""
        hist: dict[int, int] = {}
        for bits, s in self.segments.items():
            n = int((s.index >= 0).sum()) if s.index is not None else s.n * s.kb.codes.shape[0]
            hist[bits] = hist.get(bits, 0) + n
        if self.res_k is not None:
            hist[16] = hist.get(16, 0) + self.res_k.shape[0] * self.residual_len
        if self.evicted:  # slots no row stores: every slot of every row, less those held
            hist[0] = self.batch_size() * self.length - sum(hist.values())
        return hist

    def batch_size(self) -> int:
        """Rows held (from the residual buffer, else any segment)."""
        if self.res_k is not None:
            return self.res_k.shape[0]
        return next(iter(self.segments.values())).kb.codes.shape[0]

    def live(self) -> torch.Tensor:
        """bool `[B, L]`: the slots that hold a token (False where it was evicted, planned at 0 bits)."""
        B, L = self.batch_size(), self.length
        out = torch.zeros(B, L + 1, dtype=torch.bool, device=self.device)  # column L takes filler
        for seg in self.segments.values():
            if seg.index is None:
                out[:, seg.start:seg.start + seg.n] = True
            else:
                out.scatter_(1, torch.where(seg.index >= 0, seg.index, L).long(), True)
        out[:, L - self.residual_len:L] = True
        return out[:, :L]

    def count_read(self, elements: int, backend: str, fmt: str | None = None) -> None:
        """Record that decode attention read `elements` quantized key + value elements on `backend` ("cpu" /
        "triton": fused, "torch": the reference); a reference read warns once per process and format `fmt`."""
        self.reads["reference" if backend == "torch" else "fused"] += elements
        if backend == "torch" and fmt is not None:
            kernels.warn_reference_once(fmt)

    def count_materialized(self, why: str) -> None:
        """Record a decode step that read every quantized segment dequantized (the reference path)."""
        n = sum(seg.n * seg.kb.codes.shape[1] * seg.kb.d * 2 for seg in self.segments.values()
                if not isinstance(seg.kb, Plain))
        if n:
            self.count_read(n, "torch", None if kernels.mode() == "torch" else why)

    # ------------------------------------------------------------------ writing
    def _full(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`xs` in the full-precision storage dtype, contiguous. Where a finite value would overflow `full_dtype`
        (see the module docstring), the layer's full-precision storage first moves to float32 for good."""
        out = tuple(x.to(self.full_dtype).contiguous() for x in xs)
        if self.full_dtype != torch.float32:
            big = torch.finfo(self.full_dtype).max
            for x, y in zip(xs, out):
                # inf after the cast, where the value was finite: it did not fit (checked only when an inf appears)
                if torch.finfo(x.dtype).max > big and bool(torch.isinf(y).any()) and \
                        bool((torch.isinf(y) & torch.isfinite(x)).any()):
                    self._widen(torch.float32)
                    return tuple(x.to(torch.float32).contiguous() for x in xs)
        return out

    def _widen(self, dtype: torch.dtype) -> None:
        """Store full-precision tokens in `dtype` from now on, converting what is held (exact: a wider dtype)."""
        self.full_dtype = dtype
        for seg in self.segments.values():
            seg.astype(dtype)
        if self.residual is not None:
            self.residual.astype(dtype)

    def _spec(self, bits: int, kind: str, d: int) -> QuantSpec:
        """spec_fn's answer, asked once per (bits, kind, d): decode steps ask it every token."""
        key = (bits, kind, d)
        if key not in self._specs:
            spec = self.spec_fn(bits, kind, d)
            if self.spec_fields is not None:
                spec = dataclasses.replace(spec, **self.spec_fields[0 if kind == "key" else 1])
            self._specs[key] = spec
        return self._specs[key]

    def commit(self, k: torch.Tensor, v: torch.Tensor, bits: torch.Tensor, start: int, defer: int = 0) -> None:
        """Store tokens at slots `start .. start+n-1` into precision segments, one width at a time: select the
        width's tokens (`_select`), bring them to the quantized layout (`_to_quantized_layout`), then store them
        (`_store`).

        k, v: `[B, H, n, D]`; bits: int `[B, n]` with values in {2, 4, 8, 16}, or one int for every token
        (decode steps: no per-token bookkeeping). defer: the values of the last `defer` tokens stay in full
        precision (`Segment.vpend`) while their keys are quantized (one quantized width only).
        """
        B, H, n, D = k.shape
        if self.num_heads is None:
            self.num_heads = H
        if n == 0:
            return
        if defer:
            self._commit_deferred(k, v, bits, start, defer)
            return
        uniform = isinstance(bits, int)
        if not uniform and bool((bits == 0).any()):  # evicted: stored nowhere, their slots stay (see the module doc)
            self.evicted = max(self.evicted, int((bits == 0).sum(1).max()))
        elif uniform and bits == 0:
            self.evicted += n
        for b in [bits] if uniform else sorted({int(x) for x in bits.unique().tolist()}, reverse=True):
            if b == 0:
                continue
            d_q = H * D if self.channel_perm is not None else D  # channels a quantized token carries
            specs = (self._spec(b, "key", d_q), self._spec(b, "value", d_q)) if b != 16 else (None, None)
            # per-channel groups (KIVI keys) take whole groups of tokens: a segment grows by multiples of them
            mult = max([s.group_size for s in specs if s is not None and s.axis == "channel"] or [1])
            picked = self._select(k, v, None if uniform else bits == b, mult, start)
            if picked is None:
                continue
            kk, vv, index = picked
            if b == 16:
                fk, fv = self._full(kk, vv)
                seg = Segment(16, Plain(fk), Plain(fv), index, start)
            else:
                seg = self._store(b, *self._to_quantized_layout(kk, vv), index, start, specs)
                if seg is None:
                    continue  # written in place into the existing segment
            self._add(seg)

    def _commit_deferred(self, k, v, bits, start: int, defer: int) -> None:
        """commit() for a block whose last `defer` values stay in full precision: keys quantized now, the values
        before them too; the block must be one quantized width and follow the segment's slots."""
        n = k.shape[-2]
        b = bits if isinstance(bits, int) else Residual._uniform(bits)
        if not isinstance(b, int) or b == 16 or not 0 < defer <= n:
            raise ValueError(f"defer needs one quantized width over the block and 0 < defer <= {n}, got bits {b!r}, "
                             f"defer {defer!r}")
        if self.channel_perm is not None or self.channel_scales is not None:
            raise ValueError("defer cannot keep values of a permuted or smoothed layout, got a layer with "
                             f"channel_perm={self.channel_perm is not None}, channel_scales={self.channel_scales is not None}")
        sk, sv = self._spec(b, "key", k.shape[-1]), self._spec(b, "value", v.shape[-1])
        # per-channel keys take whole groups: filler (slot -1) pads the block, its values deferred with the last
        k, v, index = self._select(k, v, None, sk.group_size if sk.axis == "channel" else 1, start)
        coded = n - defer
        self._add(Segment(b, kernels.quantize(k, sk), kernels.quantize(v[:, :, :coded], sv), index, start, k.shape[-2],
                          vpend=self._full(v[:, :, coded:])[0]))

    def _add(self, seg: Segment) -> None:
        """Append `seg` to the segment of its width, or make it that segment."""
        if seg.bits in self.segments:
            self.segments[seg.bits].append(seg)
        else:
            self.segments[seg.bits] = seg

    @staticmethod
    def _select(k, v, sel, mult: int, start: int):
        """The tokens of one width: (k, v, index), index None when they are all of `k`, `v` in slot order, else
        the selected tokens first (stable), padded to a multiple of `mult` with filler (a copy of the row's first
        token, slot -1); None when no row selects any."""
        B, H, n, D = k.shape
        if (sel is None or bool(sel.all())) and n % mult == 0:
            return k, v, None
        if sel is None:
            sel = torch.ones(B, n, dtype=torch.bool, device=k.device)
        counts = sel.sum(dim=1)
        m = int(counts.max())
        if m == 0:
            return None
        m_pad = -(-m // mult) * mult
        order = torch.argsort((~sel).to(torch.int8), dim=1, stable=True)
        if m_pad > n:
            order = torch.cat([order, order[:, :1].expand(B, m_pad - n)], dim=1)
        order = order[:, :m_pad]
        valid = torch.arange(m_pad, device=k.device)[None, :] < counts[:, None]
        order = torch.where(valid, order, order[:, :1])
        gather = order[:, None, :, None].expand(B, H, m_pad, D)
        return k.gather(2, gather), v.gather(2, gather), torch.where(valid, order + start, -1).to(torch.int32)

    def _to_quantized_layout(self, k, v):
        """Float tokens as they are quantized: divided by the channel scales (SmoothQuant), flattened across kv
        heads with permuted channels (SKVQ); `read` undoes both."""
        if self.channel_scales is not None:
            sk, sv = self.channel_scales
            # in float32: a divisor below 1 would overflow a float16 key near 65504
            k, v = k.float() / sk.float(), v.float() / sv.float()
        if self.channel_perm is not None:
            k, v = _flatten(k, self.channel_perm[0]), _flatten(v, self.channel_perm[1])
        return k, v

    def _store(self, b: int, k, v, index, start: int, specs) -> Segment | None:
        """Quantize tokens of width b: straight into the end of the existing segment where the slots follow on and
        a kernel can write in place (returns None), else as a new Segment to append."""
        old = self.segments.get(b)
        if index is None and old is not None and old.append_float(k, v, start):
            return None
        return Segment(b, kernels.quantize(k, specs[0]), kernels.quantize(v, specs[1]), index, start)

    def prefill(self, k: torch.Tensor, v: torch.Tensor, bits: torch.Tensor, residual: int,
                channel_scales: tuple | None = None, channel_perm: tuple | None = None,
                value_window: int | None = None, spec_fields: tuple | None = None) -> None:
        """First write: commit all but the last `residual` tokens, keep those in the buffer. value_window: the values
        of the last `value_window` tokens stay in full precision, also where their keys are quantized (KIVI).
        spec_fields: (keys, values) QuantSpec fields this layer adds to `spec_fn`'s (BitPlan.spec_fields)."""
        self.channel_scales = channel_scales
        self.spec_fields = spec_fields
        self._specs = {}
        self.num_heads = k.shape[1]
        self.channel_perm = None if channel_perm is None else tuple(p.to(torch.int16) for p in channel_perm)
        n = k.shape[-2]
        if not 0 <= residual <= n:
            raise ValueError(f"residual must be in [0, {n}], got {residual!r}")
        cut = n - residual
        defer = 0 if value_window is None else min(cut, max(0, value_window - residual))
        self.commit(k[:, :, :cut], v[:, :, :cut], bits[:, :cut], self.length, defer)
        self.length += cut
        self._push_residual(k[:, :, cut:], v[:, :, cut:], bits[:, cut:])

    def _push_residual(self, k, v, bits, limit: int = 0) -> None:
        """bits: int16 `[B, n]` (prefill: the first write) or one int for every token (decode)."""
        if k.shape[-2] == 0 and self.residual is not None:
            return
        k, v = self._full(k, v)
        if self.residual is None:
            self.residual = Residual(k, v, bits)
        else:
            self.residual.push(k, v, bits, limit)
        self.length += k.shape[-2]

    def append(self, k: torch.Tensor, v: torch.Tensor, bits: int, keep_recent: int, flush_every: int | None,
               value_window: int | None = None, after_attention: bool = False) -> None:
        """Decode-time write: new tokens enter the residual buffer, full blocks are flushed.

        value_window: values of the last `value_window` slots stay in full precision after their keys are
        quantized; older ones are quantized one token at a time (KIVI's reference rule).
        after_attention: flush (and quantize values) after the step's attention read the cache, not before, so
        that the step attends to its own tokens in full precision (KIVI's reference); the attention calls
        `settle()`, and the next write does if it did not.
        """
        B, _, n, _ = k.shape
        self.rule = (int(bits), keep_recent, flush_every, value_window)
        if after_attention:
            self.settle()  # what the previous step left, if its attention did not settle it
            limit = 0 if flush_every is None else keep_recent + flush_every + n
            self._push_residual(k, v, int(bits), limit)
            return
        if flush_every == 1 and keep_recent == 0 and self.residual_len == 0 and bits != 16 and value_window is None:
            # quantized on arrival (rtn, smoothquant): straight into the segment, no residual round trip
            self.commit(k, v, bits, self.length)
            self.length += n
            return
        # the most the buffer ever holds: keep_recent + flush_every tokens (keep_recent / 16 of room where the
        # window slides by fewer, so that it is copied every keep_recent / 16 steps); never flushed: no spare room
        limit = 0 if flush_every is None else keep_recent + max(flush_every, keep_recent // 16)
        self._push_residual(k, v, int(bits), limit)
        self.settle()

    def settle(self) -> None:
        """Apply the decode rule to what is held: flush full blocks of the residual buffer into segments, then
        quantize the deferred values that left the value window. Idempotent."""
        if self.rule is None:
            return
        _, keep_recent, flush_every, window = self.rule
        if flush_every is not None:
            while self.residual_len >= keep_recent + flush_every:
                start = self.length - self.residual_len
                f = flush_every
                # one width for the whole block (every decode-time token): no per-token bookkeeping in commit
                fbits = self.residual.block_bits(f)
                if window is not None:  # deferred values older than this block's coded ones first: values are
                    self._age_values(self.length - window)  # quantized in slot order (a multi-token append)
                defer = 0 if window is None else min(f, max(0, start + f - (self.length - window)))
                self.commit(self.res_k[:, :, :f], self.res_v[:, :, :f], fbits, start, defer)
                self.residual.pop(f)
        if window is not None:
            self._age_values(self.length - window)

    def _age_values(self, before: int) -> None:
        """Quantize the deferred values of slots < `before` (and of filler), oldest first."""
        for seg in self.segments.values():
            if seg.vpend is None:
                continue
            if seg.index is None:
                m = before - (seg.start + seg.coded)
            else:
                old = (seg.deferred_slots(seg.index.shape[0], self.device) < before).all(0)
                m = int(old.to(torch.int32).cumprod(0).sum())
            seg.quantize_values(min(max(m, 0), seg.vpend.shape[-2]))

    # ------------------------------------------------------------------ reading
    def materialize(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All cached keys and values `[B, H, L, D]` in slot order, dequantized to `dtype` (default: the model's;
        float32 where they are still to be rotated back, whose intermediate values may exceed float16's range)."""
        dtype = dtype or self.dtype
        if not self.segments and not self.evicted:
            return self.res_k.to(dtype), self.res_v.to(dtype)
        L = self.length
        if self.segments:
            seg0 = next(iter(self.segments.values()))
            ref = seg0.kb.codes
            B, H = ref.shape[0], self.num_heads
            D = seg0.kb.d * ref.shape[1] // H
        else:
            B, H, _, D = self.res_k.shape
        dev = self.device
        # column L takes filler; evicted slots (stored nowhere) read as zeros, and attention masks them (`live`)
        kbuf = (torch.zeros if self.evicted else torch.empty)(B, H, L + 1, D, dtype=dtype, device=dev)
        vbuf = torch.zeros_like(kbuf) if self.evicted else torch.empty_like(kbuf)
        for seg in self.segments.values():
            dk, dv = self.read(seg, dtype=dtype)
            if seg.index is None:
                kbuf[:, :, seg.start:seg.start + seg.n] = dk
                vbuf[:, :, seg.start:seg.start + seg.n] = dv
            else:
                idx = torch.where(seg.index >= 0, seg.index, L).long()
                idx = idx[:, None, :, None].expand(B, H, idx.shape[1], D)
                kbuf.scatter_(2, idx, dk)
                vbuf.scatter_(2, idx, dv)
        r = self.residual_len
        if r:
            kbuf[:, :, L - r:L] = self.res_k.to(dtype)
            vbuf[:, :, L - r:L] = self.res_v.to(dtype)
        return kbuf[:, :, :L], vbuf[:, :, :L]

    def read(self, seg: Segment, start: int = 0, stop: int | None = None,
             dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [start, stop) of a segment as float `[B, H, n, D]` in `dtype` (default: the model's), every
        transform undone."""
        stop = seg.n if stop is None else stop
        dtype = dtype or self.dtype
        if isinstance(seg.kb, Plain):
            return seg.kb.codes[:, :, start:stop].to(dtype), seg.vb.codes[:, :, start:stop].to(dtype)
        dk = dequantize(seg.k.slice_tokens(start, stop), dtype)
        coded = seg.coded
        if stop <= coded:
            dv = dequantize(seg.v.slice_tokens(start, stop), dtype)
        else:  # deferred values (only where no permutation or scales apply: see commit's defer)
            tail = seg.vpend[:, :, max(start, coded) - coded:stop - coded].to(dtype)
            dv = tail if start >= coded else torch.cat([dequantize(seg.v.slice_tokens(start, coded), dtype), tail], -2)
            return dk, dv
        if self.channel_perm is not None:
            if self._inverse_perm is None:  # derived, not stored: computed once per layer
                self._inverse_perm = tuple(torch.argsort(p.long()) for p in self.channel_perm)
            h, (ik, iv) = self.num_heads, self._inverse_perm
            dk, dv = _unflatten(dk, self.channel_perm[0], h, ik), _unflatten(dv, self.channel_perm[1], h, iv)
        if self.channel_scales is not None:
            dk, dv = dk * self.channel_scales[0].to(dtype), dv * self.channel_scales[1].to(dtype)
        return dk, dv

    # ------------------------------------------------------------------ editing
    def crop(self, new_length: int) -> None:
        """Keep slots `< new_length` (assisted decoding, rollbacks)."""
        if new_length >= self.length:
            return
        res_start = self.length - self.residual_len
        if new_length >= res_start:
            self.residual.keep(new_length - res_start)
        else:
            if self.residual is not None:
                self.residual.keep(0)
            for bits in list(self.segments):
                seg = self.segments[bits]
                b = seg.kb.codes.shape[0]
                idx = seg.slot_index(b, self.device)
                idx = torch.where(idx >= new_length, -1, idx).to(torch.int32)
                if bool((idx < 0).all()):
                    del self.segments[bits]
                else:
                    seg.index = idx
        self.length = new_length

    def drop_front(self, n: int) -> None:
        """Forget slots 0 .. n-1 (a sliding window moved past them) and renumber the rest from 0; their bytes are
        released (whole per-channel groups; a partly needed one stays with its gone tokens as filler)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"n must be in [0, {self.length}], got {n!r}")
        if n == 0:
            return
        res_start = self.length - self.residual_len
        if n > res_start:
            self.residual.pop(n - res_start)
            self.residual.compact()
        for bits in list(self.segments):
            if not self.segments[bits].drop_front(n):
                del self.segments[bits]
        self.length -= n

    def map_batch(self, fn) -> None:
        """Apply a batch-dimension op to every stored tensor (beam reorder, repeat, select)."""
        for seg in self.segments.values():
            seg.map(fn)
        if self.channel_scales is not None:
            self.channel_scales = tuple(fn(t) for t in self.channel_scales)
        if self.residual is not None:
            self.residual.map(fn)
