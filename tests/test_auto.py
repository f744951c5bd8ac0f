"""The budgeted `auto` policy: bits per element counted from bytes stay within 2% of the budget, at prefill and
through decoding, on text-only models and VLMs, at several lengths."""
from __future__ import annotations

import pytest
import torch

from vlmkv import QuantizedKVCache, cache_kwargs, get_policy
from vlmkv.policies import IMAGE, PAD


def _run(model, inputs, bits, steps, evict=False):
    """Prefill and `steps` greedy decode steps through generate(); the cache's bits per element after the prefill
    and after every step."""
    from transformers import LogitsProcessor, LogitsProcessorList

    with QuantizedKVCache(model, "auto", bits=bits, evict=evict, inspect=True) as cache:
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
@pytest.mark.parametrize("bits,evict", [(3.5, False), (6.0, False), (2.0, True), (3.5, True)])
def test_auto_holds_its_budget_on_a_text_model(tiny_llama, length, bits, evict):
    ids = torch.randint(5, 250, (2, length), generator=torch.Generator().manual_seed(length))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # padding counts like any slot
    seen, plan, rule = _run(tiny_llama, {"input_ids": ids, "attention_mask": mask}, bits, 24, evict)
    assert max(seen) <= bits * 1.02, seen
    if length >= 300:  # short prompts spend less: the window's flush block and whole windows are indivisible
        assert seen[0] >= bits * 0.94, seen
    assert rule.keep_recent == plan["residual"]


@torch.no_grad()
@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("evict", [False, True])
def test_auto_holds_its_budget_on_a_vlm(family, name, evict):
    model, inputs, types, _ = family(name)
    seen, plan, _ = _run(model, inputs, 6.0, 12, evict)
    assert max(seen) <= 6.0 * 1.02, seen


def test_auto_refuses_a_budget_it_cannot_hold(tiny_llama):
    with pytest.raises(ValueError, match="bits must be at least"):
        QuantizedKVCache(tiny_llama, "auto", bits=2.6)  # head_dim 32: 2-bit codes and scales alone cost 2.75 bits
    for bad in (0, -1.0, 17.0, True, "3"):
        with pytest.raises(ValueError, match="bits"):
            get_policy("auto", bits=bad)
    assert get_policy("auto", bits=4).bits == 4.0


def test_auto_stores_2_and_4_bit_tokens_as_codebooks():
    """2- and 4-bit tokens: Lloyd-Max codes with one norm per head vector (groups of at most 128 channels); 8-bit
    tokens: symmetric groups of 32."""
    pol = get_policy("auto", bits=3.0)
    for bits in (2, 4):
        for d, g in ((64, 64), (128, 128), (256, 128)):
            spec = pol.spec(bits, "key", d)
            assert spec.codebook == "lloyd-max" and spec.group_size == g and spec.zero_point == "none"
    assert pol.spec(8, "value", 64).codebook == "" and pol.spec(8, "value", 64).group_size == 32


def _ctx(S=400, B=1, seed=0, W=32):
    from vlmkv.policies import PrefillContext

    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, 2, S, 64, generator=g)
    return PrefillContext(keys, torch.randn(B, 2, S, 64, generator=g), queries=torch.randn(B, 4, W, 64, generator=g))


def test_auto_gives_the_tokens_the_question_reads_the_most_bits():
    """Widths never decrease with the attention the observation window pays a token, and evicted tokens are the
    least read; without evict the floor is 2 bits."""
    from vlmkv.policies.auto import attention_received

    ctx = _ctx()
    ctx.keys[0, :, 50:60] += 12 * ctx.queries[0, :2].mean(1, keepdim=True)  # tokens 50..59: what the queries read
    score = attention_received(ctx.queries, ctx.keys, None)[0]
    for evict, bits in ((False, 3.0), (True, 3.0), (True, 1.5)):
        plan = get_policy("auto", bits=bits, evict=evict).plan_prefill(ctx)
        body = torch.arange(ctx.seq_len) < ctx.seq_len - plan.residual
        w, s = plan.bits[0][body], score[body]
        order = torch.argsort(s, descending=True)
        assert bool((w[order][1:] <= w[order][:-1]).all()), "a less-read token got more bits"
        assert int(w.min()) == (0 if evict else 2) and bool((w[50:60] >= (4 if bits >= 3 else 2)).all()), w[45:65]
        if evict:
            assert float(s[w == 0].max()) <= float(s[w > 0].min())


def test_auto_keeps_every_token_for_a_later_question_unless_it_evicts():
    """Without eviction a uniform prior (`prior`, in units of the mean attention) stands for questions not yet asked:
    it never leaves more tokens at 2 bits than the question alone does (`prior=0`, the default with evict=True), the
    tokens the question reads keep 4 bits or more, and a large prior makes every token rise to 4 bits, most read
    first, before a read token goes wider."""
    ctx = _ctx()
    ctx.keys[0, :, 50:60] += 12 * ctx.queries[0, :2].mean(1, keepdim=True)
    assert get_policy("auto").prior == 1.0 and get_policy("auto", evict=True).prior == 0.0
    for bits in (3.0, 5.0, 6.0):
        alone = get_policy("auto", bits=bits, prior=0).plan_prefill(ctx)
        body = torch.arange(ctx.seq_len) < ctx.seq_len - alone.residual
        w0 = alone.bits[0][body]
        assert int(w0.max()) > 4
        if bits == 5.0:  # the question alone leaves tokens at 2 bits while the ones it reads go wider than 4
            assert bool((w0 <= 2).any()) and bool((w0 > 4).any())
        for prior in (1.0, 10.0):
            plan = get_policy("auto", bits=bits, prior=prior).plan_prefill(ctx)
            assert plan.residual == alone.residual
            w = plan.bits[0][body]
            assert int((w <= 2).sum()) <= int((w0 <= 2).sum()) and bool((w[50:60] >= 4).all()), w[45:65]
            if prior == 10.0:
                assert not (bool((w <= 2).any()) and bool((w > 4).any())), w.unique(return_counts=True)
                assert bool((w0[50:60] >= w[50:60]).all())
                if bits == 6.0:  # the budget affords 4 bits for every token: none is left at 2 for a later question
                    assert int(w.min()) >= 4
    with pytest.raises(ValueError, match="prior must be"):
        get_policy("auto", prior=-1.0)


def test_auto_evicts_only_when_asked():
    with pytest.raises(ValueError, match="evict=True goes lower"):
        get_policy("auto", bits=1.5).validate(64, 2)
    get_policy("auto", bits=1.5, evict=True).validate(64, 2)
    assert 0 not in get_policy("auto", bits=3.0).bit_widths() and 0 in get_policy("auto", evict=True).bit_widths()
    with pytest.raises(ValueError, match="evict must be bool"):
        get_policy("auto", evict=1)


@torch.no_grad()
def test_evicted_positions_are_masked_and_rope_positions_unchanged(tiny_llama):
    """A cache that evicts slots keeps the prompt's length: the next tokens take positions 300, 301, ... and the
    evicted slots are masked. A multi-token continuation (a second question) and the decode steps after it give the
    logits of a DynamicCache holding every token with the evicted ones' attention-mask entries at 0."""
    from dataclasses import dataclass

    from transformers import DynamicCache

    from vlmkv.policies import BitPlan, Policy

    holes = torch.zeros(300, dtype=torch.bool)
    holes[10:200:3] = True
    holes[250:260] = True

    @dataclass
    class Holes(Policy):  # the same slots evicted in every layer, the rest kept as they are
        name = "holes"

        def bit_widths(self):
            return (0, 16)

        def plan_prefill(self, ctx):
            bits = torch.full((ctx.batch_size, ctx.seq_len), 16, dtype=torch.int16)
            bits[:, holes] = 0
            return BitPlan(bits)

    ids = torch.randint(5, 250, (1, 300), generator=torch.Generator().manual_seed(3))
    follow = torch.randint(5, 250, (1, 7), generator=torch.Generator().manual_seed(4))
    steps = torch.randint(5, 250, (1, 3), generator=torch.Generator().manual_seed(5))
    ref = DynamicCache(config=tiny_llama.config)
    tiny_llama(input_ids=ids, **cache_kwargs(ref), use_cache=True)
    mask = torch.cat([(~holes).long(), torch.ones(10, dtype=torch.long)])[None]
    with QuantizedKVCache(tiny_llama, Holes(), residual_dtype=torch.float32) as cache:
        tiny_llama(input_ids=ids, **cache_kwargs(cache), use_cache=True)
        assert cache.get_seq_length() == 300 and cache.bits_histogram()[0] == int(holes.sum()) * 2  # 2 layers
        assert torch.equal(cache.layers[0].store.live()[0], ~holes)
        got = [tiny_llama(input_ids=follow, **cache_kwargs(cache), use_cache=True).logits]
        want = [tiny_llama(input_ids=follow, attention_mask=mask[:, :307], **cache_kwargs(ref), use_cache=True).logits]
        for t in range(3):  # decode steps: segment attention over the evicting store
            n = 308 + t
            got.append(tiny_llama(input_ids=steps[:, t:t + 1], **cache_kwargs(cache), use_cache=True).logits)
            want.append(tiny_llama(input_ids=steps[:, t:t + 1], attention_mask=mask[:, :n], **cache_kwargs(ref),
                                   use_cache=True).logits)
        assert cache.get_seq_length() == 310
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_auto_evicts_per_layer_what_its_plan_gives_0_bits(tiny_llama):
    ids = torch.randint(5, 250, (1, 300), generator=torch.Generator().manual_seed(3))
    with QuantizedKVCache(tiny_llama, "auto", bits=2.0, evict=True, inspect=True) as cache:
        tiny_llama(input_ids=ids, **cache_kwargs(cache), use_cache=True)
        assert cache.get_seq_length() == 300 and cache.bits_histogram().get(0, 0) > 0
        for i, layer in enumerate(cache.layers):
            assert torch.equal(~layer.store.live()[0], cache.plans[i]["bits"][0] == 0)
        out = tiny_llama(input_ids=ids[:, :5], **cache_kwargs(cache), use_cache=True).logits
        assert torch.isfinite(out).all() and cache.get_seq_length() == 305


@torch.no_grad()
def test_an_evicting_cache_masks_like_a_dynamic_cache_with_the_same_holes(tiny_llama):
    """Per layer: vlmkv's attention over an evicting store (decode step and multi-token query) equals the model's own
    sdpa over the dequantized keys and values with the evicted slots masked."""
    from vlmkv.attention import mask_evicted, segment_attention
    from vlmkv.quant import fwht

    ids = torch.randint(5, 250, (1, 260), generator=torch.Generator().manual_seed(5))
    with QuantizedKVCache(tiny_llama, "auto", bits=2.0, evict=True) as cache:
        tiny_llama(input_ids=ids, **cache_kwargs(cache), use_cache=True)
        store = cache.layers[1].store
        live = store.live()
        assert not bool(live.all()) and bool(live.any())
        k, v = store.materialize(torch.float32)
        H, D = k.shape[1], k.shape[-1]
        q = torch.randn(1, H * 2, 1, D)
        out = segment_attention(fwht(q), store, None, D ** -0.5, torch.float32)  # rotated basis, as the cache stores
        kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        s = (fwht(q) @ kk.transpose(-1, -2)) * D ** -0.5
        s = s.masked_fill(~live[:, None, None, :], float("-inf"))
        want = (s.softmax(-1) @ vv).transpose(1, 2)
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
        m = mask_evicted(None, live, 3)
        assert m.shape == (1, 1, 3, live.shape[1]) and not bool(m[0, 0, :, ~live[0]].any())
        assert bool(m[0, 0, 0, -2:].logical_not().all()) and bool(m[0, 0, 2, -3:].all())  # causal over the query
        add = mask_evicted(torch.zeros(1, 1, 3, live.shape[1]), live, 3)
        assert bool((add[0, 0, :, ~live[0]] < -1e30).all()) and bool((add[0, 0, :, live[0]] == 0).all())


def test_eviction_needs_vlmkv_attention(tiny_llama):
    with pytest.raises(ValueError, match="segment_attention=False"):
        QuantizedKVCache(tiny_llama, "auto", bits=2.0, evict=True, segment_attention=False)
    with pytest.raises(ValueError, match="prompt_reads_cache"):
        QuantizedKVCache(tiny_llama, "auto", bits=2.0, evict=True, prompt_reads_cache=True)
    # auto plans from the prompt's queries, which vlmkv's attention function hands over: both options refused
    with pytest.raises(ValueError, match="segment_attention=False"):
        QuantizedKVCache(tiny_llama, "auto", bits=4.0, segment_attention=False)
    with pytest.raises(ValueError, match="prompt_reads_cache"):
        QuantizedKVCache(tiny_llama, "auto", bits=4.0, prompt_reads_cache=True)
