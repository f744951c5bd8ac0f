"""Lloyd-Max scalar codebooks for rotated vectors (the scalar quantizer of TurboQuant, Zandieh et al. 2026).

After a random (or Hadamard) rotation, each coordinate of a vector of g channels divided by its norm follows the
law of one coordinate of a uniformly random point on the unit sphere of R^g: density proportional to
(1 - t^2)^((g - 3) / 2) on [-1, 1] (about N(0, 1/g) for large g). The Lloyd-Max quantizer of that law is the
2^bits levels minimizing the expected squared error; a group is stored as its codes (the nearest level of each
coordinate) and one fp16 norm: x' = norm * levels[code].

Free of `transformers`; float64 on the CPU, computed once per (bits, g).
"""
from __future__ import annotations

import torch

_LEVELS: dict = {}
GRID = 1 << 16  # points of the density grid on [-1, 1]
ITERATIONS = 300


def sphere_density(g: int, grid: int = GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 `[grid]` points in (-1, 1), float64 `[grid]` weights summing to 1): the law of one coordinate of a
    uniform point on the unit sphere of R^g, discretized at cell midpoints."""
    if not isinstance(g, int) or isinstance(g, bool) or g < 2:
        raise ValueError(f"g must be an int >= 2 (channels a vector), got {g!r}")
    t = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid * 2 - 1
    w = (1 - t * t).clamp_min(1e-300) ** ((g - 3) / 2)
    return t, w / w.sum()


def lloyd_max(t: torch.Tensor, w: torch.Tensor, n: int, iterations: int = ITERATIONS) -> torch.Tensor:
    """float64 `[n]` ascending levels minimizing sum_i w_i min_k (t_i - c_k)^2 by Lloyd's iteration (levels at the
    conditional means of their cells, cells split at midpoints), started from the law's quantiles."""
    cdf = w.cumsum(0)
    c = t[torch.searchsorted(cdf, (torch.arange(n, dtype=torch.float64) + 0.5) / n).clamp_max(len(t) - 1)]
    for _ in range(iterations):
        cell = torch.bucketize(t, (c[1:] + c[:-1]) / 2)
        mass = torch.zeros(n, dtype=torch.float64).index_add_(0, cell, w)
        mean = torch.zeros(n, dtype=torch.float64).index_add_(0, cell, w * t) / mass.clamp_min(1e-300)
        new = torch.where(mass > 0, mean, c)
        if torch.equal(new, c):
            break
        c = new
    return c


def levels(bits: int, g: int) -> torch.Tensor:
    """float32 `[2^bits]` ascending Lloyd-Max levels for a coordinate of a unit vector of g channels (symmetric
    about 0), cached."""
    key = (int(bits), int(g))
    if key not in _LEVELS:
        c = lloyd_max(*sphere_density(g), 1 << bits)
        c = (c - c.flip(0)) / 2  # exactly symmetric (the law is)
        _LEVELS[key] = c.float()
    return _LEVELS[key]


def expected_error(bits: int, g: int) -> float:
    """E[(t - Q(t))^2] * g: the codebook's mean squared error per coordinate, relative to the coordinates' own
    variance 1/g (Lloyd-Max on a Gaussian: 0.1175 at 2 bits, 0.0095 at 4)."""
    t, w = sphere_density(g)
    c = levels(bits, g).double()
    q = c[torch.bucketize(t, (c[1:] + c[:-1]) / 2)]
    return float((w * (t - q) ** 2).sum() * g)


__all__ = ["levels", "lloyd_max", "sphere_density", "expected_error"]
