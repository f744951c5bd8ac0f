"""`windowquant`: WindowQuant (Li et al., 2026, "WindowQuant: Mixed-Precision KV Cache Quantization based
on Window-Level Similarity for VLMs Inference Optimization", seed 000; only its abstract survives, so
the details below are ours and are argued and measured in docs/WINDOWQUANT.md).

Per layer, at prefill:
  1. windows: the visual tokens of each image/frame form one window (`window_size=None`), or runs of
     `window_size` tokens that never cross an image boundary;
  2. similarity: each window's mean token score against the text prompt that follows the visual tokens
     (`scorer`: "key_attention", the default, "key_cosine", or "random" as a control; `windows.token_scores`);
  3. bit search: widths from `candidates` (default 8/4/2) assigned window by window, highest score first,
     monotone in score, so that the visual tokens average at most `budget` bits per element counted
     from bytes (codes, scales, zero points and the slot map);
  4. reorder: the cache stores each width as one contiguous segment (a stable partition of the windows
     by width), with a slot map so that decode attention and masks see the original order.
Text tokens are stored at `text_bits` (8), the last `recent` tokens stay full precision, and generated
tokens join the recent window and then go to `text_bits`.

`granularity="token"` runs the same search on per-token scores (the token-level baseline the paper
compares against).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant import QuantSpec
from .base import (IMAGE, PAD, BitPlan, DecodeRule, Policy, PrefillContext, check_bits, check_clip, check_nonneg,
                   check_positive, effective_group, register_policy)
from .windows import SCORERS, bits_cost, greedy_search, prompt_mask, token_scores, window_ids, window_scores


@register_policy
@dataclass
class WindowQuantPolicy(Policy):
    name = "windowquant"
    needs_modality = True
    budget: float = 3.0
    candidates: tuple | list | str = (8, 4, 2)
    window_size: int | None = None
    scorer: str = "key_attention"
    text_bits: int = 8
    recent: int = 32
    group_size: int = 128
    clip_ratio: float = 1.0
    low_clip: float = 0.8
    granularity: str = "window"
    flush_every: int = 32

    def __post_init__(self):
        if isinstance(self.candidates, str):
            self.candidates = tuple(int(c) for c in self.candidates.replace("/", ",").split(","))
        self.candidates = tuple(self.candidates)
        if not self.candidates:
            raise ValueError(f"candidates must name at least one width, got {self.candidates!r}")
        for c in self.candidates:
            check_bits(c, (2, 4, 8, 16), "candidates")
        check_bits(self.text_bits, (2, 4, 8, 16), "text_bits")
        check_positive(self.group_size, "group_size")
        check_positive(self.flush_every, "flush_every")
        check_clip(self.clip_ratio)
        check_clip(self.low_clip, "low_clip")
        if self.window_size is not None:
            check_positive(self.window_size, "window_size")
        if self.scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {self.scorer!r}")
        if self.granularity not in ("window", "token"):
            raise ValueError(f"granularity must be 'window' or 'token', got {self.granularity!r}")
        check_nonneg(self.recent, "recent")
        if not isinstance(self.budget, (int, float)) or isinstance(self.budget, bool) or not 0 < self.budget <= 32:
            # no plan costs more than 16 bits plus its slot map: a larger budget is a typo, not a request
            raise ValueError(f"budget must be a number of bits per element in (0, 32], got {self.budget!r}")

    def validate(self, head_dim: int, num_kv_heads: int = 1) -> None:
        super().validate(head_dim, num_kv_heads)
        low = min(self.candidates)
        # the narrowest width with its scales, zero points and its share of the slot map (as the search counts it)
        need = bits_cost(low, effective_group(self.group_size, head_dim), 32.0 / (2 * num_kv_heads * head_dim))
        if self.budget < need:
            raise ValueError(f"budget must be at least {need:.3f} bits per element (the narrowest candidate {low} "
                             f"with its scales and zero points), got {self.budget!r}")

    def bit_widths(self):
        return tuple(sorted(set(self.candidates) | {self.text_bits}))

    def plan_prefill(self, ctx: PrefillContext) -> BitPlan:
        B, H, S, D = ctx.keys.shape
        types = ctx.token_types
        group = effective_group(self.group_size, D)
        index_bits = 32.0 / (2 * H * D)  # an int32 slot per token, shared by K and V of all kv heads
        bits = torch.full((B, S), self.text_bits, dtype=torch.int16, device=ctx.keys.device)
        low = min(self.candidates)
        bits[types == PAD] = low
        vis = types == IMAGE
        if vis.any():
            prompt = prompt_mask(types)
            scores = token_scores(ctx.keys, prompt, vis, self.scorer)
            if self.granularity == "window":
                win = window_ids(types, ctx.frame_ids, self.window_size)
                per_win = window_scores(scores, win)
                for b in range(B):
                    if len(per_win[b]) == 0:
                        continue
                    sizes = torch.bincount(win[b][win[b] >= 0], minlength=len(per_win[b]))
                    wbits = greedy_search(per_win[b], sizes, self.candidates, self.budget, group, index_bits)
                    m = win[b] >= 0
                    bits[b, m] = wbits.to(bits.device)[win[b, m]]
            else:
                for b in range(B):
                    if not vis[b].any():
                        continue
                    s = scores[b, vis[b]]
                    tbits = greedy_search(s, torch.ones_like(s), self.candidates, self.budget, group, index_bits)
                    bits[b, vis[b]] = tbits.to(bits.device)
        return BitPlan(bits, residual=min(self.recent, S))

    def decode_rule(self, layer_idx: int = 0) -> DecodeRule:
        return DecodeRule(bits=self.text_bits, keep_recent=self.recent, flush_every=self.flush_every)

    def spec(self, bits, kind, head_dim):
        clip = self.low_clip if bits == 2 else self.clip_ratio
        return QuantSpec(bits, effective_group(self.group_size, head_dim), clip, "token")
