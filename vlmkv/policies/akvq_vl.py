"""`akvq-vl`: AKVQ-VL (Su et al., 2025, "Attention-Aware KV Cache Adaptive 2-Bit Quantization for
Vision-Language Models", seed 002).

Bits per prefill token, per layer (Section III-B/C):
  * pivot tokens (PSA): tokens whose residual stream entering the layer carries a massive activation
    (max |h| >= `pivot_threshold` x the median |h|), the `num_pivots` largest -> 16 bits;
  * recent tokens: the last `recent` tokens -> kept in full precision (the residual buffer);
  * text tokens (TSA), including vision delimiters -> `text_bits` (4) with clip `text_clip` (1.0);
  * everything else (visual tokens) -> `low_bits` (2) with clip `low_clip` (0.8).
Per-token asymmetric quantization, group 128 or the head dimension if smaller (eqs. 3-6).
Generated tokens stay in the recent window and then follow the text rule (they are text).

WHT (`wht=True`): keys are stored Walsh-Hadamard-rotated after RoPE with the query rotated online, and values
rotated with the attention output rotated back (Figures 6-7; the paper folds H into W_V / W_O, which stores the
same values: see `vlmkv/attention.py`).

Ablation switches (Table III): `wht`, `text_4bit`, `pivots` (pivot tokens and the recent window);
all off is RTN INT2 with clip 0.8. `tsa_layers=k` applies the paper's TSA/PSA layer split (Table I:
layers 0-1 are TSA on LLaVA-1.5 and Qwen2-VL): text-salient treatment only in layers < k, pivot
protection only in layers >= k; None (default) applies both everywhere, as Section III-C describes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant import QuantSpec
from .pivots import pivot_mask
from .base import (IMAGE, PAD, BitPlan, DecodeRule, Policy, PrefillContext, check_bits, check_clip,
                   check_nonneg, check_positive, effective_group, register_policy)


@register_policy
@dataclass
class AKVQVLPolicy(Policy):
    name = "akvq-vl"
    needs_modality = True
    low_bits: int = 2
    text_bits: int = 4
    low_clip: float = 0.8
    text_clip: float = 1.0
    group_size: int = 128
    recent: int = 128
    num_pivots: int = 15
    pivot_threshold: float = 100.0
    wht: bool = True
    text_4bit: bool = True
    pivots: bool = True
    tsa_layers: int | None = None
    flush_every: int = 32

    def __post_init__(self):
        check_bits(self.low_bits, (2, 4, 8), "low_bits")
        check_bits(self.text_bits, (2, 4, 8, 16), "text_bits")
        check_clip(self.low_clip, "low_clip")
        check_clip(self.text_clip, "text_clip")
        check_positive(self.group_size, "group_size")
        check_positive(self.flush_every, "flush_every")
        check_nonneg(self.recent, "recent")
        check_nonneg(self.num_pivots, "num_pivots")
        if not self.pivot_threshold > 1:
            raise ValueError(f"pivot_threshold must be > 1 (a ratio to the median), got {self.pivot_threshold!r}")
        if self.tsa_layers is not None:
            check_nonneg(self.tsa_layers, "tsa_layers")

    # ------------------------------------------------------------------ switches
    @property
    def hadamard_keys(self) -> bool:
        return bool(self.wht)

    def _text_rule(self, layer_idx: int) -> bool:
        return self.text_4bit and (self.tsa_layers is None or layer_idx < self.tsa_layers)

    def _pivot_rule(self, layer_idx: int) -> bool:
        return self.pivots and (self.tsa_layers is None or layer_idx >= self.tsa_layers)

    def bit_widths(self):
        return tuple(sorted({self.low_bits, self.text_bits}))

    @property
    def needs_massive_activations(self) -> bool:
        return bool(self.pivots) and self.num_pivots > 0

    # ------------------------------------------------------------------ planning
    def pivot_mask(self, ctx: PrefillContext) -> torch.Tensor:
        """bool `[B, S]`: this layer's pivot tokens (see `pivots.pivot_mask`)."""
        return pivot_mask(ctx, self.num_pivots, self.pivot_threshold)

    def plan_prefill(self, ctx: PrefillContext) -> BitPlan:
        layer = ctx.layer_idx
        types = ctx.token_types
        bits = torch.full((ctx.batch_size, ctx.seq_len), self.low_bits, dtype=torch.int16, device=ctx.keys.device)
        if self._text_rule(layer):
            bits[(types != IMAGE) & (types != PAD)] = self.text_bits
        if self._pivot_rule(layer):
            bits[self.pivot_mask(ctx)] = 16
        recent = min(self.recent, ctx.seq_len) if self.pivots else 0
        return BitPlan(bits, residual=recent)

    def decode_rule(self, layer_idx: int = 0) -> DecodeRule:
        bits = self.text_bits if self._text_rule(layer_idx) else self.low_bits
        keep = self.recent if self.pivots else 0
        return DecodeRule(bits=bits, keep_recent=keep, flush_every=self.flush_every)

    def spec(self, bits, kind, head_dim):
        clip = self.text_clip if (bits == self.text_bits and self.text_4bit) else self.low_clip
        return QuantSpec(bits, effective_group(self.group_size, head_dim), clip, "token")
