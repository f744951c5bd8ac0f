"""`skvq`: SKVQ (Duanmu et al., 2024, "SKVQ: Sliding-window Key and Value Cache Quantization for Large
Language Models"), as seed 002's baseline (Table II; "SKVQ employs a sliding window to store recent KV
cache in FP16 and uses a channel reordering technique"; window 128 and group 128 in the seed's setting).

* Channel reordering: per layer, a token's channels of all kv heads (H x D of them) are sorted by their
  range (max - min over the prefill tokens, padding excluded), so that each quantization group of
  `group_size` consecutive reordered channels holds channels of similar range; the permutation is undone
  exactly when tokens are read (it is one int16 map per layer for K and one for V, counted in bytes).
* Clipped per-group asymmetric quantization, K at `key_bits`, V at `value_bits` (2/2 as the seed; SKVQ's
  calibrated clip search is replaced by a fixed `clip_ratio`).
* Full precision for the first `sinks` tokens (attention sinks, 5) and a sliding window of the last
  `window` tokens (128); tokens leaving the window are quantized in blocks of `flush_every`.
Group 128 spans heads when the head dimension is smaller, which is what makes the reordering matter: with
one group per head, reordering inside it would change nothing. When 128 does not divide the H x D channels,
the largest divisor below it is used (SmolLM2: 3 heads x 64 = 192 channels, groups of 96).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant import QuantSpec
from .base import (PAD, BitPlan, DecodeRule, Policy, PrefillContext, check_bits, check_clip, check_nonneg,
                   check_positive, register_policy, uniform_plan)


def range_order(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """long `[H * D]`: the channels of `x` `[B, H, S, D]` (flattened head-major) sorted by range over tokens."""
    B, H, S, D = x.shape
    flat = x.detach().float().permute(0, 2, 1, 3).reshape(B * S, H * D)
    if mask is not None:
        flat = flat[mask.reshape(-1)]
    rng = flat.amax(0) - flat.amin(0)
    return torch.argsort(rng, stable=True)


@register_policy
@dataclass
class SKVQPolicy(Policy):
    name = "skvq"
    key_bits: int = 2
    value_bits: int = 2
    group_size: int = 128
    clip_ratio: float = 0.9
    window: int = 128
    sinks: int = 5
    flush_every: int = 32

    def __post_init__(self):
        check_bits(self.key_bits, (2, 4, 8), "key_bits")
        check_bits(self.value_bits, (2, 4, 8), "value_bits")
        check_positive(self.group_size, "group_size")
        check_positive(self.flush_every, "flush_every")
        check_clip(self.clip_ratio)
        check_nonneg(self.window, "window")
        check_nonneg(self.sinks, "sinks")

    def validate(self, head_dim: int, num_kv_heads: int = 1) -> None:
        return None  # groups run over H * D channels: checked at prefill, when H is known

    def bit_widths(self):
        return (self.key_bits,)

    def _group(self, channels: int) -> int:
        """group_size, or the largest divisor of the token's channels (H x D) not above it (192 -> 96)."""
        g = min(self.group_size, channels)
        while channels % g:
            g -= 1
        return g

    def plan_prefill(self, ctx: PrefillContext) -> BitPlan:
        B, H, S, D = ctx.keys.shape
        bits = uniform_plan(ctx, self.key_bits)
        if self.sinks:
            real = (ctx.token_types != PAD) if ctx.token_types is not None else torch.ones(B, S, dtype=torch.bool)
            first = real.long().cumsum(1) <= self.sinks
            bits[real & first] = 16
        perm = (range_order(ctx.keys, ctx.attention_mask), range_order(ctx.values, ctx.attention_mask))
        return BitPlan(bits, residual=min(self.window, S), channel_perm=perm)

    def decode_rule(self, layer_idx: int = 0) -> DecodeRule:
        return DecodeRule(bits=self.key_bits, keep_recent=self.window, flush_every=self.flush_every)

    def spec(self, bits, kind, head_dim):
        # `head_dim` here is the flattened H * D a quantized token carries
        b = self.value_bits if kind == "value" else bits
        return QuantSpec(b, self._group(head_dim), self.clip_ratio, "token")
