"""`smoothquant`: SmoothQuant applied to the KV cache, as seed 002's baseline (Xiao et al., 2023,
"SmoothQuant"; seed 002, Section IV-A: "we apply SmoothQuant to scale the Keys and Values, with the
parameter alpha set to 0.5").

Per layer, kv head and channel c, from the prefill keys (and values): s_c = max_t |X_{t,c}|^alpha, kept as the
formula gives it (default, stored in fp16: SmoothQuant's own rule) or, with `exact_scales=False`, rounded to a
power of two (vlmkv's earlier default: it can leave a channel up to sqrt(2) off its smoothing target, and on
SmolLM2's real keys and values it did worse: attention error 0.99 vs 0.91, next-token KL 1.96 vs 1.75,
`benchmarks/baseline_fidelity.py`). Quantized tokens are stored as X / s (per-token asymmetric groups, as `rtn`)
and read back as X' * s, so channel outliers are flattened before quantization (with powers of two the division
and multiplication lose nothing; exact scales cost one float32 rounding each way). The partner side of SmoothQuant's formula
(max |W|^(1-alpha); for keys that would be the query) is taken as 1: the cache sees keys and values only.
The divisors cost 2 x H x D fp16 values per row and layer, counted in `nbytes()`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import BitPlan, PrefillContext, register_policy
from .rtn import RTNPolicy


def smoothing_scales(x: torch.Tensor, alpha: float, mask: torch.Tensor | None = None, exact: bool = False) -> torch.Tensor:
    """`[B, H, 1, D]` float16 divisors max_t |x| ^ alpha over the unmasked tokens, rounded to the nearest power of
    two unless `exact`.

    x: `[B, H, S, D]`; mask: bool `[B, S]` (False on padding) or None.
    """
    a = x.detach().abs().float()
    if mask is not None:
        a = a * mask[:, None, :, None].to(a.dtype)
    m = a.amax(dim=2, keepdim=True).clamp_min(1e-4) ** alpha
    if not exact:
        m = torch.exp2(torch.round(torch.log2(m)))
    return m.clamp(2.0 ** -14, 2.0 ** 14).to(torch.float16)


@register_policy
@dataclass
class SmoothQuantPolicy(RTNPolicy):
    """RTN (per-token groups, quantized at once) on smoothed keys and values."""

    name = "smoothquant"
    bits: int = 2
    alpha: float = 0.5
    exact_scales: bool = True

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.alpha, (int, float)) or not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")

    def plan_prefill(self, ctx: PrefillContext) -> BitPlan:
        plan = super().plan_prefill(ctx)
        plan.channel_scales = (smoothing_scales(ctx.keys, self.alpha, ctx.attention_mask, self.exact_scales),
                               smoothing_scales(ctx.values, self.alpha, ctx.attention_mask, self.exact_scales))
        return plan
