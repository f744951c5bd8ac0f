"""Fidelity of a quantized cache against the full-precision one, teacher-forced.

The prompt is prefilled, then the *same* continuation tokens (the full-precision greedy answer) are fed
one at a time to both caches, so every decode step compares logits on identical inputs:
next-token KL(p_fp || p_q) and top-1 agreement.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from ..cache import QuantizedKVCache
from ..models.positions import decode_position_ids, prefill_position_ids
from ..cache import cache_kwargs


@torch.no_grad()
def teacher_forced_logits(model, input_ids, attention_mask, cache, continuation, **inputs):
    """Logits `[B, T, V]` of prefill-last + each of the T-1 fed continuation tokens.

    `inputs` go to the prefill only (pixel_values, image_grid_thw, mm_token_type_ids...). Position ids
    follow `generate()`'s (padding-aware; M-RoPE deltas for Qwen2-VL)."""
    pos = prefill_position_ids(model, attention_mask)
    extra = {} if pos is None or inputs else {"position_ids": pos}
    out = model(input_ids=input_ids, attention_mask=attention_mask, **cache_kwargs(cache), use_cache=True,
                **inputs, **extra)
    logits = [out.logits[:, -1]]
    am = attention_mask
    for t in range(continuation.shape[1] - 1):
        am = torch.cat([am, am.new_ones(am.shape[0], 1)], dim=1)
        out = model(input_ids=continuation[:, t:t + 1], attention_mask=am, **cache_kwargs(cache), use_cache=True,
                    position_ids=decode_position_ids(model, am))
        logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1).float()


@torch.no_grad()
def fidelity(model, input_ids, attention_mask, policies, steps: int = 32) -> dict:
    """For each policy (name or Policy): mean KL, top-1 agreement vs full precision, bytes and bits."""
    ref_cache = DynamicCache(config=model.config)
    gen = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=steps,
                         min_new_tokens=steps, do_sample=False, **cache_kwargs(ref_cache))
    cont = gen[:, input_ids.shape[1]:]
    ref = teacher_forced_logits(model, input_ids, attention_mask, DynamicCache(config=model.config), cont)
    logp_ref = ref.log_softmax(-1)
    results = {}
    for p in policies:
        with QuantizedKVCache(model, p) as cache:
            got = teacher_forced_logits(model, input_ids, attention_mask, cache, cont)
            logp = got.log_softmax(-1)
            kl = (logp_ref.exp() * (logp_ref - logp)).sum(-1)
            results[p if isinstance(p, str) else p.describe()] = {
                "kl": float(kl.mean()),
                "top1": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
                **cache.memory_report(),
            }
    return results
