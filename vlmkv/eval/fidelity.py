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

# `vlmkv eval`'s reference answer is fp16's greedy answer of at least this many tokens, through its
# end-of-sequence token (runner.FIDELITY names it). 2 would bar the stop at the second token too: a one-token
# answer ("3", "red") would be forced on into a made-up next turn.
REFERENCE_MIN_NEW_TOKENS = 1


def next_token_kl(ref: torch.Tensor, got: torch.Tensor) -> torch.Tensor:
    """KL(p_ref || p_got) at each position: `[...]` float32 from logits or log-probabilities `[..., V]` (either:
    log_softmax is idempotent). Equals sum_v p_ref(v) * (log p_ref(v) - log p_got(v)), p = softmax(x, -1)."""
    lp, lq = ref.float().log_softmax(-1), got.float().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def top1_agreement(ref: torch.Tensor, got: torch.Tensor) -> torch.Tensor:
    """1.0 where `ref` and `got` `[..., V]` put their largest value on the same token, else 0.0: `[...]` float32."""
    return (ref.argmax(-1) == got.argmax(-1)).float()


@torch.no_grad()
def prefill_logits(model, input_ids, attention_mask, cache, **inputs) -> torch.Tensor:
    """Prefill the prompt into `cache`; the logits `[B, V]` (float32) at its last position.

    `inputs` go to the prefill (pixel_values, image_grid_thw, mm_token_type_ids...). Position ids follow
    `generate()`'s (padding-aware; M-RoPE models compute their own)."""
    pos = prefill_position_ids(model, attention_mask)
    extra = {} if pos is None else {"position_ids": pos}
    out = model(input_ids=input_ids, attention_mask=attention_mask, **cache_kwargs(cache), use_cache=True,
                **inputs, **extra)
    return out.logits[:, -1].float()


def _step(model, cache, attention_mask, tokens):
    """Feed one token per row `[B]` to a cache holding `attention_mask`'s tokens: (logits `[B, V]`, longer mask)."""
    am = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
    out = model(input_ids=tokens.view(-1, 1), attention_mask=am, **cache_kwargs(cache), use_cache=True,
                position_ids=decode_position_ids(model, am))
    return out.logits[:, -1].float(), am


@torch.no_grad()
def forced_continuation(model, attention_mask, cache, continuation, first) -> torch.Tensor:
    """Logits `[B, T, V]` (float32): `first` (the prompt's last logits), then those after feeding each of the T-1
    first tokens of `continuation` `[B, T]` to `cache`, which already holds the prompt (mask `attention_mask`)."""
    logits, am = [first], attention_mask
    for t in range(continuation.shape[1] - 1):
        lg, am = _step(model, cache, am, continuation[:, t])
        logits.append(lg)
    return torch.stack(logits, dim=1)


@torch.no_grad()
def teacher_forced_logits(model, input_ids, attention_mask, cache, continuation, **inputs):
    """Logits `[B, T, V]` (float32) of prefill-last + each of the T-1 fed continuation tokens.

    `inputs` go to the prefill only (pixel_values, image_grid_thw, mm_token_type_ids...). Position ids
    follow `generate()`'s (padding-aware; M-RoPE deltas for Qwen2-VL)."""
    first = prefill_logits(model, input_ids, attention_mask, cache, **inputs)
    return forced_continuation(model, attention_mask, cache, continuation, first)


@torch.no_grad()
def greedy_continuation(model, attention_mask, cache, first, max_new_tokens: int, eos_token_id, pad_token_id: int,
                        min_new_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding from a cache that already holds the prompt, whose last logits are `first` `[B, V]`.

    Returns (new token ids `[B, N]` int64, the raw logits `[B, N, V]` float32 each came from), as
    `model.generate(do_sample=False, max_new_tokens=..., min_new_tokens=..., output_logits=True)` gives them
    with no other logits processor: the end-of-sequence ids are barred for the first `min_new_tokens` tokens,
    a row that ended continues with `pad_token_id`, and decoding stops when every row has ended."""
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []),
                       dtype=torch.long, device=first.device)
    B = first.shape[0]
    running = torch.ones(B, dtype=torch.bool, device=first.device)
    tokens, logits, lg, am = [], [], first, attention_mask
    for n in range(max_new_tokens):
        logits.append(lg)
        scores = lg.clone()
        if n < min_new_tokens and eos.numel():
            scores[:, eos] = float("-inf")
        nxt = scores.argmax(-1)
        nxt = torch.where(running, nxt, torch.full_like(nxt, pad_token_id))
        tokens.append(nxt)
        running &= ~torch.isin(nxt, eos)
        if not running.any() or n + 1 == max_new_tokens:
            break
        lg, am = _step(model, cache, am, nxt)
    return torch.stack(tokens, dim=1), torch.stack(logits, dim=1)


@torch.no_grad()
def fidelity(model, input_ids, attention_mask, policies, steps: int = 32) -> dict:
    """For each policy (name or Policy): mean KL, top-1 agreement vs full precision, bytes and bits."""
    ref_cache = DynamicCache(config=model.config)
    gen = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=steps,
                         min_new_tokens=steps, do_sample=False, **cache_kwargs(ref_cache))
    cont = gen[:, input_ids.shape[1]:]
    src = PromptPrefill(model, input_ids, attention_mask, shared=False)  # a prefill per cache, as before
    ref = src.reference(cont)
    results = {}
    for p in policies:
        with src.cache(p) as cache:
            got = src.forced(cache, cont)
            results[p if isinstance(p, str) else p.describe()] = {
                "kl": float(next_token_kl(ref, got).mean()),
                "top1": float(top1_agreement(ref, got).mean()),
                **cache.memory_report(),
            }
    return results


class PromptPrefill:
    """How each cache gets one prompt: one forward through the model, copied into every cache (`shared=True`,
    `QuantizedKVCache.prefill_from`), or a forward per cache (`shared=False`).

    Both give the same caches (the prompt attends to itself unquantized, so its forward does not depend on the
    cache); sharing costs one forward instead of one per method. `input_ids` / `attention_mask` `[B, N]` int64;
    `inputs` go to the prefill (pixel_values, image_grid_thw, ...).
    """

    def __init__(self, model, input_ids, attention_mask, shared: bool = True, tokenizer=None, **inputs):
        if not isinstance(shared, bool):
            raise ValueError(f"shared must be a bool, got {shared!r}")
        self.model, self.input_ids, self.attention_mask = model, input_ids, attention_mask
        self.tokenizer, self.inputs = tokenizer, inputs
        self.recorded = self.first = None
        if shared:
            rec = QuantizedKVCache(model, "fp16", tokenizer=tokenizer, record_prompt=True)
            try:
                self.first = prefill_logits(model, input_ids, attention_mask, rec, **inputs)
            finally:
                rec.close()  # its hooks leave the model now; the recorded keys and values stay on its layers
            self.recorded = rec

    @property
    def shared(self) -> bool:
        return self.recorded is not None

    def cache(self, policy) -> QuantizedKVCache:
        """A QuantizedKVCache for `policy` (name or Policy): holding the prompt when shared, else empty."""
        cache = QuantizedKVCache(self.model, policy, tokenizer=self.tokenizer)
        if self.recorded is not None:
            try:
                cache.prefill_from(self.recorded)
            except Exception:
                cache.close()  # its hooks leave the model now, not at garbage collection
                raise
        return cache

    def forced(self, cache, continuation) -> torch.Tensor:
        """Logits `[B, T, V]` (float32) teacher-forced on `continuation` `[B, T]`, from a cache `cache()` made
        (a DynamicCache too): prefilled here when not shared."""
        if self.recorded is None:
            return teacher_forced_logits(self.model, self.input_ids, self.attention_mask, cache, continuation,
                                         **self.inputs)
        return forced_continuation(self.model, self.attention_mask, cache, continuation, self.first)

    def fill(self, cache):
        """`cache` (any transformers cache, e.g. a DynamicCache) given the recorded raw keys and values of every
        layer, what a prefill through the model writes to it; returns it. Only when shared."""
        if self.recorded is None:
            raise ValueError("fill needs a shared prefill (PromptPrefill(..., shared=True)), got shared=False")
        for i, layer in enumerate(self.recorded.layers):
            cache.update(layer.recorded[0], layer.recorded[1], i)
        return cache

    def reference(self, continuation) -> torch.Tensor:
        """`forced` on a full-precision DynamicCache: when shared, one holding the recorded raw keys and values
        (what a prefill through the model stores)."""
        ref = DynamicCache(config=self.model.config)
        return self.forced(self.fill(ref) if self.recorded is not None else ref, continuation)
