"""Bit packing of integer codes into `uint8`, along the last dimension."""
from __future__ import annotations

import torch

PACKABLE_BITS = (1, 2, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits must be one of {PACKABLE_BITS}, got {bits!r}")


def packed_length(n: int, bits: int) -> int:
    """Bytes needed for `n` codes of `bits` bits (the last group is zero-padded)."""
    _check_bits(bits)
    per = 8 // bits
    return (n + per - 1) // per


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) into bytes along the last dimension.

    codes: integer tensor `[..., n]` (any integer dtype, values < 2**bits).
    Returns `uint8 [..., ceil(n * bits / 8)]`: code `j` of a byte sits at bits `[j*bits, (j+1)*bits)`,
    i.e. four 2-bit, two 4-bit or one 8-bit code per byte. An odd `n` is zero-padded; pass `n`
    back to `unpack_bits` to drop the padding.
    """
    _check_bits(bits)
    if codes.is_floating_point():
        raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype!r}")
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    per = 8 // bits
    n = codes.shape[-1]
    pad = (-n) % per
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    codes = codes.view(*codes.shape[:-1], codes.shape[-1] // per, per)
    out = codes[..., 0].clone()
    for j in range(1, per):
        out |= codes[..., j] << (bits * j)
    return out


def unpack_bits(packed: torch.Tensor, bits: int, n: int | None = None) -> torch.Tensor:
    """Inverse of `pack_bits`: `uint8 [..., m]` to `uint8 [..., n]` codes (n defaults to m * 8 / bits)."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be uint8, got dtype {packed.dtype!r}")
    if bits == 8:
        return packed if n is None else packed[..., :n]
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    codes = codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)
    return codes if n is None else codes[..., :n]


TRITS_PER_BYTE = 5  # 3^5 = 243 <= 256: five 3-level codes in a byte, 1.6 bits each


def pack_trits(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes in {0, 1, 2} five to a byte along the last dimension: byte = sum_j c_j 3^j.

    codes: integer tensor `[..., n]`; returns `uint8 [..., ceil(n / 5)]` (the last byte zero-padded)."""
    if codes.is_floating_point():
        raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype!r}")
    n = codes.shape[-1]
    pad = (-n) % TRITS_PER_BYTE
    c = torch.nn.functional.pad(codes.to(torch.int32), (0, pad))
    c = c.view(*codes.shape[:-1], c.shape[-1] // TRITS_PER_BYTE, TRITS_PER_BYTE)
    weights = torch.tensor([3 ** j for j in range(TRITS_PER_BYTE)], dtype=torch.int32, device=codes.device)
    return (c * weights).sum(-1).to(torch.uint8)


def unpack_trits(packed: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Inverse of `pack_trits`: `uint8 [..., m]` to `uint8 [..., n]` codes (n defaults to 5 m)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be uint8, got dtype {packed.dtype!r}")
    p = packed.to(torch.int32).unsqueeze(-1)
    digits = torch.stack([(p[..., 0] // 3 ** j) % 3 for j in range(TRITS_PER_BYTE)], -1).to(torch.uint8)
    out = digits.reshape(*packed.shape[:-1], packed.shape[-1] * TRITS_PER_BYTE)
    return out if n is None else out[..., :n]
