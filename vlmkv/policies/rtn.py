"""`rtn`: round-to-nearest, per-token asymmetric groups along the head dimension (seed 002's RTN INT4/INT2).

Every token, prompt or generated, is quantized at once to `bits`; group 128 as in the seed, or the
head dimension when smaller. `clip_ratio` scales the group max/min before quantization (eq. 5).
`zero_point` picks the storage format of each group's offset: "int16" (default), "int8" (one byte), or "none"
for symmetric groups with no zero point stored (llama.cpp's q4_0 is `rtn-4` with group_size=32, zero_point="none":
4.5 bits an element).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..quant import QuantSpec
from ..quant.uniform import ZERO_POINTS
from .base import (BitPlan, DecodeRule, Policy, PrefillContext, check_bits, check_clip, check_positive,
                   effective_group, register_policy, uniform_plan)


@register_policy
@dataclass
class RTNPolicy(Policy):
    name = "rtn"
    bits: int = 4
    group_size: int = 128
    clip_ratio: float = 1.0
    zero_point: str = "int16"

    def __post_init__(self):
        check_bits(self.bits, (2, 4, 8))
        if self.zero_point not in ZERO_POINTS:
            raise ValueError(f"zero_point must be one of {ZERO_POINTS}, got {self.zero_point!r}")
        check_positive(self.group_size, "group_size")
        check_clip(self.clip_ratio)

    def bit_widths(self):
        return (self.bits,)

    def plan_prefill(self, ctx: PrefillContext) -> BitPlan:
        return BitPlan(uniform_plan(ctx, self.bits), residual=0)

    def decode_rule(self, layer_idx: int = 0) -> DecodeRule:
        return DecodeRule(bits=self.bits, keep_recent=0, flush_every=1)

    def spec(self, bits, kind, head_dim):
        return QuantSpec(bits, effective_group(self.group_size, head_dim), self.clip_ratio, "token",
                         zero_point=self.zero_point)
