"""Position ids for hand-written decode loops (teacher forcing, benchmarks), as `generate()` makes them.

Left padding: positions count real tokens only (cumsum of the attention mask - 1). M-RoPE models
(Qwen2-VL / Qwen2.5-VL) need 3 x [B, T] ids: after the prefill the model keeps `rope_deltas` (the offset
the vision tokens' 3-D positions leave), and a decode step's ids are the text positions plus it; without
them transformers rebuilds ids from the whole mask and the step fails.
"""
from __future__ import annotations

import torch


def _rope_deltas(model):
    for m in (getattr(model, "model", None), model):
        d = getattr(m, "rope_deltas", None) if m is not None else None
        if d is not None:
            return d
    return None


def prefill_position_ids(model, attention_mask: torch.Tensor) -> torch.Tensor | None:
    """`[B, S]` ids for a padded prefill of a plain model; None for M-RoPE models (they compute their own)."""
    if hasattr(getattr(model, "model", None), "rope_deltas") or hasattr(model, "rope_deltas"):
        return None
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def decode_position_ids(model, attention_mask: torch.Tensor, new_tokens: int = 1) -> torch.Tensor:
    """Ids of the last `new_tokens` tokens given the full mask `[B, L]`: `[B, T]`, or `[3, B, T]` for M-RoPE."""
    pos = (attention_mask.long().cumsum(-1) - 1)[:, -new_tokens:]
    deltas = _rope_deltas(model)
    if deltas is not None:
        pos = pos + deltas.to(pos.device).view(-1, 1).repeat_interleave(pos.shape[0] // deltas.shape[0], 0)
        return pos.unsqueeze(0).expand(3, -1, -1)
    return pos
