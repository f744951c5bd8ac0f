"""Walsh-Hadamard rotation (seed 002, equation 7) for any even head dimension.

* d a power of two: the Sylvester matrix of eq. (7), applied by the fast transform (O(d log d) butterflies);
* d = m * 2^k with m in {12, 20, 28} (80, 96, 112, 160, 192, ...): a full Hadamard matrix H_m (x) H_{2^k} (Paley's
  constructions for H_m, as QuaRot uses for such orders), every entry +-1/sqrt(d): it spreads an outlier over all
  d channels;
* any other even d (36, 44, 72, ...): block-diagonal, blocks of the largest power of two dividing d (36 -> nine
  blocks of 4), still orthogonal, spreading outliers only within a block.
Odd d is rejected.

Every matrix here is orthogonal (H H^T = I), so rotating both sides of a dot product keeps it: (q H) . (k H) = q . k.
The Sylvester and block-diagonal ones are also symmetric (their own inverse); the Paley-based ones are not, so the
inverse rotation is `fwht_inverse` (x @ H^T).
"""
from __future__ import annotations

import math

import torch

PALEY_ORDERS = (12, 20, 28)


def hadamard_block_size(d: int) -> int:
    """Largest power of two dividing `d`; raises ValueError when that is 1 (odd `d`)."""
    if not isinstance(d, int) or isinstance(d, bool) or d <= 0:
        raise ValueError(f"d must be a positive int, got {d!r}")
    block = d & -d
    if block == 1:
        raise ValueError(f"Hadamard transform needs an even dimension (power-of-two blocks), got d={d!r}")
    return block


def _sylvester(n: int) -> torch.Tensor:
    """The +-1 Sylvester matrix of order n (a power of two), float64."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _chi(q: int) -> torch.Tensor:
    """Quadratic character of the integers mod a prime q: chi[a] = 0, 1 or -1."""
    squares = {(x * x) % q for x in range(1, q)}
    return torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) over GF(q), q prime."""
    chi = _chi(q)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley(m: int) -> torch.Tensor:
    """A +-1 Hadamard matrix of order m in {12, 20, 28}: Paley I (q = m - 1 prime, q = 3 mod 4) for 12 and 20,
    Paley II (q = m / 2 - 1 = 13, q = 1 mod 4) for 28."""
    if m in (12, 20):
        q = m - 1
        Q = _jacobsthal(q)
        S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        S[0, 1:], S[1:, 0], S[1:, 1:] = 1.0, -1.0, Q
        return S + torch.eye(q + 1, dtype=torch.float64)
    if m == 28:
        q = 13
        Q = _jacobsthal(q)
        S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        S[0, 1:], S[1:, 0], S[1:, 1:] = 1.0, 1.0, Q
        a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        # each 0 of S becomes a, each +-1 becomes +-b
        return torch.kron((S == 0).double(), a) + torch.kron(S, b)
    raise ValueError(f"m must be one of {PALEY_ORDERS}, got {m!r}")


def full_order(d: int) -> int | None:
    """m when d = m * 2^k with m in {1, 12, 20, 28} (a full Hadamard matrix of order d is built), else None."""
    block = hadamard_block_size(d)
    if block == d:
        return 1
    for p in PALEY_ORDERS:
        if d % p == 0 and (d // p) & (d // p - 1) == 0:
            return p
    return None


def hadamard_matrix(d: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Normalized orthogonal Hadamard matrix `[d, d]`: full (every entry +-1/sqrt(d)) for powers of two and for
    12, 20 or 28 times a power of two; block-diagonal with the largest power-of-two block otherwise."""
    m = full_order(d)
    if m is None:
        block = hadamard_block_size(d)
        h = torch.block_diag(*([_sylvester(block) / math.sqrt(block)] * (d // block)))
    elif m == 1:
        h = _sylvester(d) / math.sqrt(d)
    else:
        h = torch.kron(_paley(m), _sylvester(d // m)) / math.sqrt(d)
    return h.to(dtype=dtype, device=device)


SMALL = 256  # rows up to which fwht multiplies by the dense matrix
_MATRICES: dict = {}


def _matrix(d: int, dtype: torch.dtype, device, transpose: bool = False) -> torch.Tensor:
    key = (d, dtype, str(device), transpose)
    if key not in _MATRICES:
        h = hadamard_matrix(d, torch.float64)
        _MATRICES[key] = (h.T if transpose else h).contiguous().to(dtype=dtype, device=device)
    return _MATRICES[key]


def _butterflies(x: torch.Tensor, block: int) -> torch.Tensor:
    """x @ blockdiag(H_block, ...) by log2(block) butterfly passes: in float32 for float16 / bfloat16 inputs (the
    unnormalized sums grow by up to sqrt(block) over the result: 65504 + 65504 would overflow float16), cast back
    once at the end."""
    d = x.shape[-1]
    lead = x.shape[:-1]
    dtype = x.dtype
    if dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    y = x.reshape(-1, d // block, block)
    h = 1
    while h < block:
        y = y.view(y.shape[0], y.shape[1], block // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).view(y.shape[0], y.shape[1], block)
        h *= 2
    return (y * (1.0 / math.sqrt(block))).reshape(*lead, d).to(dtype)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Walsh-Hadamard rotation along the last dimension: x `[..., d]` -> `x @ hadamard_matrix(d)`, same shape and
    dtype. Powers of two and block-diagonal sizes: butterfly passes (or, for at most `SMALL` float32/float64 rows,
    one product with the cached matrix); full Paley-based sizes: that product. Inverse: `fwht_inverse`."""
    d = x.shape[-1]
    block = hadamard_block_size(d)
    m = full_order(d)
    if (m is not None and m > 1) or (x.numel() <= SMALL * d and x.dtype in (torch.float32, torch.float64)):
        if x.dtype in (torch.float32, torch.float64):
            return x @ _matrix(d, x.dtype, x.device)
        return (x.float() @ _matrix(d, torch.float32, x.device)).to(x.dtype)
    return _butterflies(x, block)


def fwht_inverse(x: torch.Tensor) -> torch.Tensor:
    """The inverse rotation, `x @ hadamard_matrix(d)^T` (equal to `fwht(x)` where the matrix is symmetric)."""
    d = x.shape[-1]
    m = full_order(d)
    if m is None or m == 1:
        return fwht(x)  # Sylvester and block-diagonal matrices are symmetric: their own inverse
    if x.dtype in (torch.float32, torch.float64):
        return x @ _matrix(d, x.dtype, x.device, transpose=True)
    return (x.float() @ _matrix(d, torch.float32, x.device, transpose=True)).to(x.dtype)
