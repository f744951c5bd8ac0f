"""`kivi`: KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache").

Keys are quantized per channel (groups of `group_size` tokens along the sequence), values per token
(groups of `group_size` channels). Defaults are the paper's: group 32, residual 128 (`residual_length` must be
a multiple of `group_size` so that key groups are always complete).

`schedule="reference"` (default) is the rule of the authors' implementation, token by token:
* keys: the prompt's first S - (S mod R) keys are quantized at prefill, the rest wait in full precision; a
  generated key joins them and the step attends to it in full precision; once R keys wait, all R are quantized
  together, *after* that step's attention;
* values: the most recent R values are always in full precision (R + 1 while a step attends, its own value
  included); after each step the oldest one beyond R is quantized alone. At prefill, values of all but the
  last R prompt tokens are quantized.
So a token can have a quantized key and a full-precision value; memory holds exactly that (`Segment.vpend`).

`schedule="blocks"`: values follow their keys (R at a time, the prompt's last S mod R kept), and a block is
quantized before the attention of the step that filled it.

`schedule="paged"`: as "blocks", but a block is quantized after the attention of the step that filled it, so every
token attends to its own block of R in full precision and to earlier blocks quantized: what vlmkv's vLLM pages
(`kivi-<b>` formats, R = the block size) hold at every step.
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
    schedule: str = "reference"
    #: channels per per-token value group; 0: `group_size` (capped at the head dim), the paper's single group size
    value_group_size: int = 0

    def __post_init__(self):
        if self.schedule not in ("reference", "blocks", "paged"):
            raise ValueError(f"schedule must be 'reference', 'blocks' or 'paged', got {self.schedule!r}")
        check_bits(self.bits, (2, 4, 8))
        check_positive(self.group_size, "group_size")
        check_positive(self.residual_length, "residual_length")
        check_clip(self.clip_ratio)
        if not isinstance(self.value_group_size, int) or isinstance(self.value_group_size, bool) \
                or self.value_group_size < 0:
            raise ValueError(f"value_group_size must be an int >= 0, got {self.value_group_size!r}")
        if self.residual_length % self.group_size:
            raise ValueError(
                f"residual_length must be a multiple of group_size={self.group_size}, got {self.residual_length!r}"
            )

    def bit_widths(self):
        return (self.bits,)

    def plan_prefill(self, ctx: PrefillContext) -> BitPlan:
        # KIVI quantizes the first S - (S mod R) prompt keys and keeps the rest in full precision (the values'
        # window of R comes from decode_rule's value_window)
        return BitPlan(uniform_plan(ctx, self.bits), residual=ctx.seq_len % self.residual_length)

    def decode_rule(self, layer_idx: int = 0) -> DecodeRule:
        if self.schedule == "blocks":
            return DecodeRule(bits=self.bits, keep_recent=0, flush_every=self.residual_length)
        if self.schedule == "paged":
            return DecodeRule(bits=self.bits, keep_recent=0, flush_every=self.residual_length, after_attention=True)
        return DecodeRule(bits=self.bits, keep_recent=0, flush_every=self.residual_length,
                          value_window=self.residual_length, after_attention=True)

    def spec(self, bits, kind, head_dim):
        if kind == "key":
            return QuantSpec(bits, self.group_size, self.clip_ratio, "channel")
        return QuantSpec(bits, effective_group(self.value_group_size or self.group_size, head_dim), self.clip_ratio,
                         "token")
