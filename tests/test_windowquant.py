import pytest
import torch
from transformers import DynamicCache

from vlmkv import QuantizedKVCache, get_policy
from vlmkv.models.modality import IMAGE, PAD, TEXT
from vlmkv.policies.base import PrefillContext
from vlmkv.policies.windows import bits_cost, greedy_search, prompt_mask, window_ids
from vlmkv.quant import dequantize, quantize

from tiny_vlms import FAMILIES, expected_bytes


def test_windows_frame_aligned_and_fixed_size_never_cross_frames():
    T, I = TEXT, IMAGE
    types = torch.tensor([[T, I, I, I, I, I, T, I, I, I, T]], dtype=torch.int8)
    frames = torch.tensor([[-1, 0, 0, 0, 0, 0, -1, 1, 1, 1, -1]])
    assert window_ids(types, frames, None).tolist() == [[-1, 0, 0, 0, 0, 0, -1, 1, 1, 1, -1]]
    assert window_ids(types, frames, 2).tolist() == [[-1, 0, 0, 1, 1, 2, -1, 3, 3, 4, -1]]
    # adjacent frames with no text between them still split
    types2 = torch.tensor([[I, I, I, I]], dtype=torch.int8)
    assert window_ids(types2, torch.tensor([[0, 0, 1, 1]]), 3).tolist() == [[0, 0, 1, 1]]


def test_prompt_is_text_after_last_visual_token():
    T, I, P = TEXT, IMAGE, PAD
    types = torch.tensor([[P, T, I, I, T, I, T, T], [T, T, T, T, I, I, I, I]], dtype=torch.int8)
    m = prompt_mask(types)
    assert m[0].tolist() == [False] * 6 + [True, True]
    assert m[1].tolist() == [True] * 4 + [False] * 4  # nothing after: all text


def _planted_ctx(order=(2, 0, 3, 1), n_win=4, win=8, D=64):
    """Keys where window w's similarity to the prompt key ranks as `order` (first = most similar)."""
    torch.manual_seed(0)
    S = n_win * win + 4
    keys = torch.randn(1, 2, S, D) * 0.1
    prompt_dir = torch.randn(D)
    keys[0, :, n_win * win:] += prompt_dir  # prompt tokens
    for rank, w in enumerate(order):
        keys[0, :, w * win:(w + 1) * win] += prompt_dir * (1.0 - 0.3 * rank)
    types = torch.full((1, S), IMAGE, dtype=torch.int8)
    types[0, n_win * win:] = TEXT
    frames = torch.full((1, S), -1)
    for w in range(n_win):
        frames[0, w * win:(w + 1) * win] = w
    return PrefillContext(keys=keys, values=keys.clone(), token_types=types, frame_ids=frames)


@pytest.mark.parametrize("scorer", ["key_cosine", "key_attention"])
def test_search_gives_most_bits_to_most_similar_windows(scorer):
    ctx = _planted_ctx()
    pol = get_policy("windowquant", budget=5.0, recent=0, scorer=scorer, group_size=64)
    bits = pol.plan_prefill(ctx).bits[0]
    per_window = [int(bits[w * 8]) for w in range(4)]
    assert per_window[2] == max(per_window) and per_window[1] == min(per_window)
    assert per_window[2] > per_window[1]
    order = [2, 0, 3, 1]
    assert [per_window[w] for w in order] == sorted(per_window, reverse=True)  # monotone in similarity
    assert all(int(bits[w * 8 + i]) == per_window[w] for w in range(4) for i in range(8))  # whole windows


def test_greedy_search_budget_and_infeasible(family):
    scores = torch.tensor([0.9, 0.1, 0.5, 0.7])
    sizes = torch.tensor([10, 10, 10, 10])
    for budget in (3.0, 4.0, 5.5, 9.0):
        w = greedy_search(scores, sizes, (8, 4, 2), budget, 128, 0.25)
        mean = sum(bits_cost(int(b), 128, 0.25) * int(n) for b, n in zip(w, sizes)) / int(sizes.sum())
        assert mean <= budget + 1e-9
    assert greedy_search(scores, sizes, (8, 4, 2), 100.0, 128, 0.0).tolist() == [8, 8, 8, 8]
    with pytest.raises(ValueError, match="budget"):
        greedy_search(scores, sizes, (8, 4, 2), 2.2, 128, 0.25)
    with pytest.raises(ValueError, match="budget"):
        get_policy("windowquant", budget=2.1)  # below 2 bits + metadata, caught when the cache is built
        QuantizedKVCache(*family("llava")[:1], get_policy("windowquant", budget=2.1))


def test_infeasible_budget_rejected_at_cache_build(family):
    model = family("llava")[0]
    with pytest.raises(ValueError, match="budget"):
        QuantizedKVCache(model, get_policy("windowquant", budget=2.2))  # head_dim 16: 2 bits + 2 of metadata


@torch.no_grad()
@pytest.mark.parametrize("budget", [5.0, 7.0])
def test_budget_met_from_bytes(budget, family):
    model, inputs, types, _ = family("llava")
    pol = get_policy("windowquant", budget=budget, recent=0)
    with QuantizedKVCache(model, pol, inspect=True) as cache:
        model(**inputs, past_key_values=cache)
        assert cache.nbytes() == expected_bytes(cache)  # the byte model below is exact
        H, D = 2, cache.head_dim
        for layer in range(cache.num_layers):
            bits = cache.plans[layer]["bits"]
            for b in range(bits.shape[0]):
                vis = bits[b][types[b] == IMAGE]
                # bytes of this row's visual tokens: codes + fp16 scale + int16 zero per group, + int32 slot
                nbytes = sum(2 * H * (D * int(x) // 8 + 4 * (D // min(128, D))) + 4 for x in vis)
                assert 8 * nbytes / (2 * H * D * len(vis)) <= budget + 1e-9


def _fake_quant_reference(model, inputs, cache, steps=6):
    """Logits of a DynamicCache holding, in position order, each prompt token quantized in place at its planned
    width (what the reordered segments must reproduce), then `steps` decode steps."""
    ref = DynamicCache(config=model.config)
    out = model(**inputs, past_key_values=ref)
    pol = cache.policy
    for l, layer in enumerate(ref.layers):
        bits = cache.plans[l]["bits"]
        k, v = layer.keys.clone(), layer.values.clone()
        for b in range(k.shape[0]):
            for t in range(k.shape[2]):
                w = int(bits[b, t])
                if w == 16:
                    continue
                d = k.shape[-1]
                k[b, :, t:t + 1] = dequantize(quantize(k[b, :, t:t + 1], pol.spec(w, "key", d)))
                v[b, :, t:t + 1] = dequantize(quantize(v[b, :, t:t + 1], pol.spec(w, "value", d)))
        layer.keys, layer.values = k, v
    return out, ref


@torch.no_grad()
@pytest.mark.parametrize("candidates", [(16,), (8, 4, 2)])
def test_reordered_segments_equal_in_place_quantization_left_padded(candidates, family):
    """Windows are stored reordered into contiguous segments; decode attention (with the left-padding mask)
    must equal attention over the same values left in position order. With candidates (16,) every window is
    exact and only the text is quantized; either way the reordering itself changes nothing."""
    model, inputs, types, _ = family("llava")
    pol = get_policy("windowquant", budget=17.0 if candidates == (16,) else 6.0, candidates=candidates, recent=0)
    mask = inputs["attention_mask"]
    with QuantizedKVCache(model, pol, residual_dtype=torch.float32, inspect=True) as cache:
        out = model(**inputs, past_key_values=cache)
        seg = cache.layers[0].store.segments
        assert seg[max(candidates)].index is not None  # stored out of position order
        _, ref = _fake_quant_reference(model, inputs, cache)
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(4):
            mask = torch.cat([mask, mask.new_ones(2, 1)], 1)
            a = model(input_ids=nxt, attention_mask=mask, past_key_values=cache).logits
            b = model(input_ids=nxt, attention_mask=mask, past_key_values=ref).logits
            assert (a - b).abs().max() < 1e-4, float((a - b).abs().max())
            nxt = a[:, -1:].argmax(-1)


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("policy", ["windowquant", "windowquant+wht+pivots"])
@torch.no_grad()
def test_windowquant_generate_on_every_family(name, policy, family):
    model, inputs, types, _ = family(name)
    pol = get_policy(policy, budget=6.0, recent=2)
    with QuantizedKVCache(model, pol, inspect=True) as cache:
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=6, do_sample=False)
        assert out.shape[0] == 2
        bits = cache.plans[0]["bits"]
        img = bits[types == IMAGE]
        assert set(img.tolist()) <= {2, 4, 8, 16}
        # 6 bits a visual element cannot hold every visual token at 8 (labels lost would put them all at 8)
        assert int(img.min()) < 8, sorted(set(img.tolist()))
        assert set(bits[types == TEXT].tolist()) <= {8, 16}
        assert cache.rotate_keys == policy.endswith("pivots")  # +wht
    assert cache.closed


def test_composition_names_and_switches():
    p = get_policy("windowquant+wht+pivots", budget=3.5)
    assert p.name == "windowquant+wht+pivots" and p.hadamard_keys and p.budget == 3.5
    assert 16 in p.bit_widths()
    with pytest.raises(ValueError, match="wrappers"):
        get_policy("windowquant+nope")


@torch.no_grad()
def test_token_granularity_runs_and_differs():
    ctx = _planted_ctx()
    w = get_policy("windowquant", budget=5.0, recent=0, group_size=64).plan_prefill(ctx).bits
    t = get_policy("windowquant", budget=5.0, recent=0, group_size=64, granularity="token").plan_prefill(ctx).bits
    assert w.shape == t.shape
    vis = ctx.token_types == IMAGE
    assert set(t[vis].tolist()) <= {2, 4, 8}
    frames = ctx.frame_ids[0]
    # window granularity: one width per window; token granularity: widths vary inside some window, so they differ
    assert all(len(set(w[0, frames == f].tolist())) == 1 for f in range(4))
    assert any(len(set(t[0, frames == f].tolist())) > 1 for f in range(4))
    assert not torch.equal(w, t)


def test_windowquant_bad_input():
    for kw, name in [({"candidates": (3,)}, "candidates"), ({"scorer": "x"}, "scorer"), ({"window_size": 0}, "window_size"),
                     ({"granularity": "frame"}, "granularity"), ({"budget": -1}, "budget"), ({"recent": -1}, "recent")]:
        with pytest.raises(ValueError, match=name):
            get_policy("windowquant", **kw)
