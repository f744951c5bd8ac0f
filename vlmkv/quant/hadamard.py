"""Fast Walsh-Hadamard transform (seed 002, equation 7), O(d log d).

Non-power-of-two sizes: the transform is block-diagonal, with blocks of the largest power of two
that divides `d` (e.g. d=80 -> five blocks of 16; d=96 -> three blocks of 32). Such a matrix is still
orthogonal, symmetric and its own inverse, so every equivalence below keeps holding; it spreads
outliers only within a block. Odd `d` (block of 1, i.e. the identity) is rejected.
"""
from __future__ import annotations

import math

import torch


def hadamard_block_size(d: int) -> int:
    """Largest power of two dividing `d`; raises ValueError when that is 1 (odd `d`)."""
    if not isinstance(d, int) or d <= 0:
        raise ValueError(f"d must be a positive int, got {d!r}")
    block = d & -d
    if block == 1:
        raise ValueError(f"Hadamard transform needs an even dimension (power-of-two blocks), got d={d!r}")
    return block


def hadamard_matrix(d: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Dense normalized (block-diagonal) Hadamard matrix `[d, d]`, Sylvester order, as eq. (7)."""
    block = hadamard_block_size(d)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0) / math.sqrt(2.0)
    return torch.block_diag(*([h] * (d // block))).to(dtype=dtype, device=device)


SMALL = 256  # rows up to which fwht multiplies by the dense matrix
_MATRICES: dict = {}


def _matrix(d: int, dtype: torch.dtype, device) -> torch.Tensor:
    key = (d, dtype, str(device))
    if key not in _MATRICES:
        _MATRICES[key] = hadamard_matrix(d, dtype, device)
    return _MATRICES[key]


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Normalized Walsh-Hadamard transform along the last dimension.

    x: float tensor `[..., d]`. Returns the same shape and dtype, equal to `x @ hadamard_matrix(d)`
    (the matrix is symmetric and orthogonal, so `fwht(fwht(x)) == x` up to float error).
    Computed by log2(block) butterfly passes in the input dtype, or for at most `SMALL` float32/float64 rows as
    that product itself.
    """
    d = x.shape[-1]
    block = hadamard_block_size(d)
    lead = x.shape[:-1]
    if x.numel() <= SMALL * d and x.dtype in (torch.float32, torch.float64):
        # few rows (a decode step's query and key): one product with the cached matrix beats 2 * log2(d) small ops
        return x @ _matrix(d, x.dtype, x.device)
    y = x.reshape(-1, d // block, block)
    h = 1
    while h < block:
        y = y.view(y.shape[0], y.shape[1], block // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).view(y.shape[0], y.shape[1], block)
        h *= 2
    return (y * (1.0 / math.sqrt(block))).reshape(*lead, d)
