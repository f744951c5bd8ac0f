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

    with QuantizedKVCache(model, "auto", bits=bits, inspect=True) as cache:
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


@torch.no_grad()
def test_auto_takes_wider_2_bit_groups_on_a_tight_budget():
    """At 2.5 bits on head dimension 64 (3 kv heads, as SmolLM2), 2-bit codes in groups of 32 (2.5 bits with their scale) leave nothing to
    spend: 2-bit tokens take groups of 64 (2.25) and the budget still holds, prefill and decode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=192, intermediate_size=256, num_hidden_layers=1,
                                         num_attention_heads=3, num_key_value_heads=3)).eval()
    assert get_policy("auto", bits=3.0).spec(2, "key", 64).group_size == 32
    assert get_policy("auto", bits=2.5).spec(2, "key", 64).group_size == 64
    assert get_policy("auto", bits=2.5).spec(4, "key", 64).group_size == 32
    ids = torch.randint(5, 250, (1, 600), generator=torch.Generator().manual_seed(1))
    seen, _, _ = _run(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 2.5, 12)
    assert max(seen) <= 2.5 * 1.02 and seen[0] >= 2.5 * 0.95, seen


def test_auto_serves_the_question_first():
    """The question (text after the last frame) rises to 8 bits before any other text or visual window rises; on a
    budget too tight for that, its windows are still the first to rise."""
    from vlmkv.policies import PrefillContext, TEXT
    from vlmkv.policies.windows import prompt_mask

    torch.manual_seed(0)
    frames, per, q = 48, 16, 40
    types, fids = [TEXT] * 6, [-1] * 6
    for f in range(frames):  # "Frame n:" then the frame's visual tokens
        types += [TEXT] * 4 + [IMAGE] * per
        fids += [-1] * 4 + [f] * per
    types += [TEXT] * q
    fids += [-1] * q
    types, fids = torch.tensor([types], dtype=torch.int8), torch.tensor([fids])
    S = types.shape[1]
    ctx = PrefillContext(torch.randn(1, 3, S, 64), torch.randn(1, 3, S, 64), token_types=types, frame_ids=fids)
    question = prompt_mask(types)[0]
    for bits in (3.0, 2.7):
        plan = get_policy("auto", bits=bits).plan_prefill(ctx)
        body = torch.arange(S) < S - plan.residual
        b = plan.bits[0]
        asked, other = b[question & body].float(), b[(types[0] == TEXT) & ~question & body].float()
        assert asked.numel() >= 20 and asked.mean() > other.mean(), (bits, asked, other.mean())
        if bits == 3.0:
            assert (asked == 8).all(), asked
        assert b[types[0] == IMAGE].float().mean() <= other.mean()
