"""`kivi`: KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache").

Keys are quantized per channel (groups of `group_size` tokens along the sequence), values per token
(groups of `group_size` channels). The most recent tokens wait in a full-precision residual buffer of
up to `residual_length` tokens; when it fills, all of it is quantized at once (KIVI's Algorithm 1).
Defaults are the paper's: group 32, residual 128 (`residual_length` must be a multiple of `group_size`
so that key groups are always complete).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..quant import QuantSpec
from .base import (BitPlan, DecodeRule, Policy, PrefillContext, check_bits, check_clip, check_positive,
                   effective_group, register_policy, uniform_plan)


@register_policy
@dataclass
class KIVIPolicy(Policy):
    name = "kivi"
    bits: int = 2
    group_size: int = 32
    residual_length: int = 128
    clip_ratio: float = 1.0

    def __post_init__(self):
        check_bits(self.bits, (2, 4, 8))
        check_positive(self.group_size, "group_size")
        check_positive(self.residual_length, "residual_length")
        check_clip(self.clip_ratio)
        if self.residual_length % self.group_size:
            raise ValueError(
                f"residual_length must be a multiple of group_size={self.group_size}, got {self.residual_length!r}"
            )

    def bit_widths(self):
        return (self.bits,)

    def plan_prefill(self, ctx: PrefillContext) -> BitPlan:
        # KIVI quantizes the first S - (S mod R) prompt tokens and keeps the rest in full precision.
        return BitPlan(uniform_plan(ctx, self.bits), residual=ctx.seq_len % self.residual_length)

    def decode_rule(self, layer_idx: int = 0) -> DecodeRule:
        return DecodeRule(bits=self.bits, keep_recent=0, flush_every=self.residual_length)

    def spec(self, bits, kind, head_dim):
        if kind == "key":
            return QuantSpec(bits, self.group_size, self.clip_ratio, "channel")
        return QuantSpec(bits, effective_group(self.group_size, head_dim), self.clip_ratio, "token")
