"""Packed KV pages: the byte layout vlmkv's formats take inside a paged KV cache (vLLM's blocks), and the
reference write and read of it. Free of vLLM and transformers: plain torch tensors and `vlmkv.quant`.

A paged cache gives each layer `pages`: uint8 `[num_blocks, H, N, C]` (N tokens a block, H kv heads, C bytes a
token and head). One (block, head) is a region of N * C bytes that a format lays out as it likes:

* `rtn-<b>` (per-token groups, keys and values alike): row t of the region is token t,
  `[K codes | K scales fp16 | K zero points int16 | V codes | V scales | V zero points | pad]`; a token is
  quantized when it is written;
* `kivi-<b>` (KIVI: keys per channel over groups of `key_group` tokens, values per token): the whole region is
  one quantized block, `[K codes N x cb | K scales fp16 x (N / key_group) x d | K zero points int16, same |
  V codes N x cb | V scales N x G | V zero points N x G | pad]`. A block is quantized once, when its last token is
  written; until then its tokens wait in full precision in a staging slot (`Staging`), the room KIVI calls its
  residual.

With `hadamard=True`, keys and values are rotated (`vlmkv.quant.fwht`) before quantizing and rotated back on
reading: what is read is always in the model's basis. The codes, scales and zero points are exactly those of
`vlmkv.quant.quantize(x, spec)` with `key_spec` / `value_spec`, the same QuantSpecs vlmkv's transformers cache
stores (`rtn` and `kivi` policies), so one format means the same numbers in both engines.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant import QTensor, QuantSpec, dequantize, fwht, fwht_inverse, saturate
from ..quant.hadamard import hadamard_block_size

KINDS = ("rtn", "kivi")
BITS = (2, 4, 8)


@dataclass(frozen=True)
class PageFormat:
    """One packed page format for a head dim `head_dim` and `block_size` tokens a block.

    kind: "rtn" (per-token groups for keys and values) or "kivi" (per-channel keys over groups of a block's tokens,
    per-token values); bits: 2, 4 or 8; group_size: channels per per-token group (0: the whole head, one scale a
    token and head); hadamard: rotate keys and values before quantizing; key_group (kivi): tokens a per-channel key
    group spans, dividing the block (0: 64, or the block when smaller)."""

    kind: str
    bits: int
    head_dim: int
    block_size: int
    group_size: int = 0
    hadamard: bool = False
    key_group: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits!r}")
        for name in ("head_dim", "block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        g = self.group
        if not isinstance(self.group_size, int) or self.group_size < 0 or self.head_dim % g:
            raise ValueError(f"group_size must divide the head dim {self.head_dim} (0: the whole head), "
                             f"got {self.group_size!r}")
        if self.hadamard:
            hadamard_block_size(self.head_dim)  # raises for an odd head dim
        kg = self.key_group
        if not isinstance(kg, int) or isinstance(kg, bool) or kg < 0 or (kg and self.kind != "kivi") \
                or (self.kind == "kivi" and self.block_size % self.kgroup):
            raise ValueError(f"key_group must divide the block of {self.block_size} tokens (kivi formats; 0: 64 "
                             f"where it divides the block, else the block), got {kg!r}")

    @classmethod
    def parse(cls, name: str, head_dim: int, block_size: int, group_size: int = 0, hadamard: bool = False,
              key_group: int = 0):
        """`kivi-2`, `rtn-4`, ... -> PageFormat; ValueError naming the accepted names otherwise."""
        kind, _, b = str(name).partition("-")
        accepted = ", ".join(f"{k}-{x}" for k in KINDS for x in BITS)
        if kind not in KINDS or b not in {str(x) for x in BITS}:
            raise ValueError(f"format must be one of {accepted}, got {name!r}")
        return cls(kind, int(b), head_dim, block_size, group_size, hadamard, key_group)

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.bits}" + ("+hadamard" if self.hadamard else "")

    @property
    def group(self) -> int:
        """Channels per per-token group."""
        return self.group_size or self.head_dim

    @property
    def kgroup(self) -> int:
        """Tokens a per-channel key group spans (kivi): 64 by default where 64 divides the block, else the block."""
        return self.key_group or (64 if self.block_size % 64 == 0 else self.block_size)

    @property
    def staged(self) -> bool:
        """Whether a block's tokens wait in full precision until the block is full (per-channel keys)."""
        return self.kind == "kivi"

    @property
    def key_spec(self) -> QuantSpec:
        if self.kind == "kivi":
            return QuantSpec(self.bits, self.kgroup, 1.0, "channel")
        return QuantSpec(self.bits, self.group, 1.0, "token")

    @property
    def value_spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group, 1.0, "token")

    def policy(self):
        """The vlmkv cache policy that stores exactly this format in the transformers engine: `rtn` with the same
        groups, or `kivi` with key groups of a block, a residual of one block and the `paged` schedule (a block is
        quantized, values with keys, after the attention of the step that fills it); `+wht` for `hadamard`. ValueError where no policy matches (kivi's value groups are tied to its key groups)."""
        from ..policies import get_policy
        from ..policies.compose import WithHadamard

        if self.kind == "rtn":
            p = get_policy("rtn", bits=self.bits, group_size=self.group)
        else:
            p = get_policy("kivi", bits=self.bits, group_size=self.kgroup, residual_length=self.block_size,
                           schedule="paged", value_group_size=self.group)
        return WithHadamard(p) if self.hadamard else p

    # ------------------------------------------------------------------ layout
    @property
    def code_bytes(self) -> int:
        """Packed code bytes of one token's d channels."""
        return self.head_dim * self.bits // 8

    @property
    def groups(self) -> int:
        return self.head_dim // self.group

    def fields(self) -> list[tuple[str, int, int]]:
        """(name, byte offset, bytes) of each field of one (block, head) region (`rtn`: of one token's row)."""
        cb, G, d, N = self.code_bytes, self.groups, self.head_dim, self.block_size
        if self.kind == "rtn":
            sizes = [("k_codes", cb), ("k_scale", 2 * G), ("k_zero", 2 * G),
                     ("v_codes", cb), ("v_scale", 2 * G), ("v_zero", 2 * G)]
        else:
            kr = N // self.kgroup  # rows of per-channel key scales a block
            sizes = [("k_codes", N * cb), ("k_scale", 2 * kr * d), ("k_zero", 2 * kr * d),
                     ("v_codes", N * cb), ("v_scale", 2 * N * G), ("v_zero", 2 * N * G)]
        out, off = [], 0
        for name, n in sizes:
            out.append((name, off, n))
            off += n
        return out

    @property
    def used_bytes(self) -> int:
        """Bytes one (block, head) region's fields take (`rtn`: one token's row)."""
        name, off, n = self.fields()[-1]
        return off + n

    @property
    def token_bytes(self) -> int:
        """C: bytes a token and kv head take in the page, everything counted (scales, zero points, padding)."""
        u = self.used_bytes
        return u if self.kind == "rtn" else -(-u // self.block_size)

    def bits_per_element(self) -> float:
        """Page bits per stored K or V element (of the 2 * d a token and head hold)."""
        return self.token_bytes * 8 / (2 * self.head_dim)

    def staging_bytes(self, num_kv_heads: int, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of one staging slot (one not yet full block, keys and values in `dtype`), per layer."""
        if not self.staged:
            return 0
        return 2 * num_kv_heads * self.block_size * self.head_dim * torch.empty((), dtype=dtype).element_size()

    # ------------------------------------------------------------------ quantize / dequantize
    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        return fwht(x.float()) if self.hadamard else x

    def _unrotate(self, x: torch.Tensor) -> torch.Tensor:
        return fwht_inverse(x) if self.hadamard else x

    def quantize_tokens(self, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """`rtn` rows: key, value `[T, H, d]` -> uint8 `[T, H, C]`."""
        from .. import kernels

        if self.kind != "rtn":
            raise ValueError(f"quantize_tokens is for per-token (rtn) formats, got {self.name!r}")
        T, H, d = key.shape
        kq = kernels.quantize(self._rotate(key).reshape(T * H, 1, d), self.key_spec)
        vq = kernels.quantize(self._rotate(value).reshape(T * H, 1, d), self.value_spec)
        row = torch.cat([_bytes(kq.codes), _bytes(kq.scale), _bytes(kq.zero),
                         _bytes(vq.codes), _bytes(vq.scale), _bytes(vq.zero)], -1)
        return _pad(row.reshape(T, H, -1), self.token_bytes)

    def quantize_blocks(self, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """`kivi` regions: key, value `[B, H, N, d]` (B full blocks) -> uint8 `[B, H, N, C]`."""
        from .. import kernels

        if self.kind != "kivi":
            raise ValueError(f"quantize_blocks is for per-channel (kivi) formats, got {self.name!r}")
        B, H, N, d = key.shape
        kq = kernels.quantize(self._rotate(key), self.key_spec)  # channel groups: the reference
        vq = kernels.quantize(self._rotate(value), self.value_spec)
        flat = lambda t: _bytes(t).reshape(B, H, -1)  # noqa: E731
        region = torch.cat([flat(kq.codes), flat(kq.scale), flat(kq.zero),
                            flat(vq.codes), flat(vq.scale), flat(vq.zero)], -1)
        return _pad(region, N * self.token_bytes).view(B, H, N, self.token_bytes)

    def qtensors(self, regions: torch.Tensor) -> tuple[QTensor, QTensor]:
        """The pages of R requests' blocks as vlmkv's QTensors, the layout its kernels read: regions uint8
        `[R, nb, H, N, C]` (nb blocks each, in token order) -> (keys, values) `[R, H, nb * N, .]` (keys and values
        rotated where the format is; `kivi` keys: one scale a channel a block, `[R, H, nb, d]`)."""
        R, nb, H, N, C = regions.shape
        if C != self.token_bytes or N != self.block_size:
            raise ValueError(f"pages must be [.., heads, {self.block_size}, {self.token_bytes}] for {self.name}, "
                             f"got {tuple(regions.shape)!r}")
        d, G, cb = self.head_dim, self.groups, self.code_bytes
        f = {name: (off, n) for name, off, n in self.fields()}
        if self.kind == "rtn":
            rows = regions.permute(0, 2, 1, 3, 4).reshape(R, H, nb * N, C)
            get = lambda name, dt: _field(rows, f[name], dt)  # noqa: E731
            kq = QTensor(get("k_codes", torch.uint8), get("k_scale", torch.float16), get("k_zero", torch.int16),
                         self.key_spec, d, torch.float32)
            vq = QTensor(get("v_codes", torch.uint8), get("v_scale", torch.float16), get("v_zero", torch.int16),
                         self.value_spec, d, torch.float32)
            return kq, vq
        reg = regions.reshape(R, nb, H, N * C)

        def get(name, dt, shape):  # a field of every region, tokens of the nb blocks one after the other
            x = _field(reg, f[name], dt).reshape(R, nb, H, *shape).transpose(1, 2)
            return x.reshape(R, H, nb * shape[0], shape[1])

        kr = N // self.kgroup
        kq = QTensor(get("k_codes", torch.uint8, (N, cb)), get("k_scale", torch.float16, (kr, d)),
                     get("k_zero", torch.int16, (kr, d)), self.key_spec, d, torch.float32)
        vq = QTensor(get("v_codes", torch.uint8, (N, cb)), get("v_scale", torch.float16, (N, G)),
                     get("v_zero", torch.int16, (N, G)), self.value_spec, d, torch.float32)
        return kq, vq

    def dequantize_pages(self, pages: torch.Tensor, dtype: torch.dtype = torch.float32):
        """uint8 `[B, H, N, C]` (whole blocks) -> (keys, values) `[B, H, N, d]` in `dtype`, in the model's basis."""
        kq, vq = self.qtensors(pages.unsqueeze(1))  # B requests of one block each
        k, v = self._unrotate(dequantize(kq)), self._unrotate(dequantize(vq))
        return saturate(k, dtype), saturate(v, dtype)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes along its last dim: `[..., n]` of k-byte elements -> uint8 `[..., n * k]`."""
    return t.contiguous().view(torch.uint8)


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    return x if x.shape[-1] == width else torch.nn.functional.pad(x, (0, width - x.shape[-1]))


def _field(x: torch.Tensor, where: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    off, n = where
    return x[..., off:off + n].contiguous().view(dtype)


__all__ = ["PageFormat", "KINDS", "BITS"]
