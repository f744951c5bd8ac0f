"""The budgeted `auto` policy: bits per element counted from bytes stay within 2% of the budget, at prefill and
through decoding, on text-only models and VLMs, at several lengths."""
from __future__ import annotations

import pytest
import torch

from vlmkv import QuantizedKVCache, cache_kwargs, get_policy
from vlmkv.policies import IMAGE, PAD


def _run(model, inputs, bits, steps):
    """Prefill and `steps` greedy decode steps through generate(); the cache's bits per element after the prefill
    and after every step."""
    from transformers import LogitsProcessor, LogitsProcessorList

    with QuantizedKVCache(model, "auto", bits=bits) as cache:
        seen = []

        class Record(LogitsProcessor):
            def __call__(self, input_ids, scores):
                seen.append(cache.bits_per_element())
                return scores

        model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                       logits_processor=LogitsProcessorList([Record()]), pad_token_id=0)
        seen.append(cache.bits_per_element())
        return seen, cache.plans[0], cache.layers[0].rule


@torch.no_grad()
@pytest.mark.parametrize("length", [48, 300, 1100])
@pytest.mark.parametrize("bits", [3.5, 6.0])
def test_auto_holds_its_budget_on_a_text_model(tiny_llama, length, bits):
    ids = torch.randint(5, 250, (2, length), generator=torch.Generator().manual_seed(length))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # padding counts like any slot
    seen, plan, rule = _run(tiny_llama, {"input_ids": ids, "attention_mask": mask}, bits, 24)
    assert max(seen) <= bits * 1.02, seen
    if length >= 300:  # short prompts spend less: the window's flush block and whole windows are indivisible
        assert seen[0] >= bits * 0.95, seen
    assert rule.keep_recent == plan["residual"]


@torch.no_grad()
@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_auto_holds_its_budget_on_a_vlm_and_ranks_text_first(family, name):
    model, inputs, types, _ = family(name)
    seen, plan, _ = _run(model, inputs, 6.0, 12)
    assert max(seen) <= 6.0 * 1.02, seen
    bits = plan["bits"][:, :types.shape[1] - plan["residual"]]
    t = types[:, :bits.shape[1]]
    text = bits[(t != IMAGE) & (t != PAD)].float().mean()
    image = bits[t == IMAGE].float().mean()
    assert text >= image, (text, image)  # TSA: text windows are served first


def test_auto_refuses_a_budget_it_cannot_hold(tiny_llama):
    with pytest.raises(ValueError, match="bits must be at least"):
        QuantizedKVCache(tiny_llama, "auto", bits=2.6)  # head_dim 32: 2-bit codes and scales alone cost 2.75 bits
    for bad in (0, -1.0, 17.0, True, "3"):
        with pytest.raises(ValueError, match="bits"):
            get_policy("auto", bits=bad)
    assert get_policy("auto", bits=4).bits == 4.0
