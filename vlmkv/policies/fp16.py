"""`fp16`: no quantization. Every token stays in the model's own dtype; logits equal DynamicCache's."""
from __future__ import annotations

from dataclasses import dataclass

from .base import BitPlan, DecodeRule, Policy, PrefillContext, register_policy


@register_policy
@dataclass
class FP16Policy(Policy):
    """Reference: keys and values kept as the model produced them (all in the residual buffer)."""

    name = "fp16"
    keep_model_dtype = True

    def plan_prefill(self, ctx: PrefillContext) -> BitPlan:
        from .base import uniform_plan

        return BitPlan(uniform_plan(ctx, 16), residual=ctx.seq_len)

    def decode_rule(self, layer_idx: int = 0) -> DecodeRule:
        return DecodeRule(bits=16, keep_recent=0, flush_every=None)

    def spec(self, bits, kind, head_dim):
        raise ValueError(f"fp16 stores nothing quantized, got a request for bits={bits!r}")
