"""Pivot tokens from massive activations (AKVQ-VL's PSA, after Sun et al. 2024, "Massive Activations")."""
from __future__ import annotations

import torch

from .base import PrefillContext


def pivot_mask(ctx: PrefillContext, num_pivots: int, threshold: float) -> torch.Tensor:
    """bool `[B, S]`: per row, the up-to-`num_pivots` tokens with the largest massive-activation ratio
    (max |h| / median |h| of the residual stream entering the layer) at or above `threshold`; padding
    excluded. All False when no hook collected the ratios."""
    B, S = ctx.batch_size, ctx.seq_len
    mask = torch.zeros(B, S, dtype=torch.bool, device=ctx.keys.device)
    ratio = ctx.massive_activation
    if ratio is None or num_pivots == 0:
        return mask
    ratio = ratio.to(ctx.keys.device).float().clone()
    if ctx.attention_mask is not None:
        ratio[~ctx.attention_mask] = 0
    vals, idx = ratio.topk(min(num_pivots, S), dim=1)
    mask.scatter_(1, idx, vals >= threshold)
    return mask
