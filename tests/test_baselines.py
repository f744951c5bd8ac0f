"""Each baseline against a small reference written here from its paper's algorithm, on fixed tensors.

The references share vlmkv's quantizer primitive (`vlmkv.quant.quantize` / `dequantize`): what they check is the
rule around it (which tokens are quantized when, how channels are grouped and clipped), not the rounding.
"""
from __future__ import annotations

import pytest
import torch

from vlmkv.attention import segment_attention
from vlmkv.policies import get_policy
from vlmkv.quant import QuantSpec, dequantize, quantize
from vlmkv.storage import LayerStore


# ---------------------------------------------------------------------------------------------------- KIVI
def _fake(x, bits, group, axis):
    return dequantize(quantize(x, QuantSpec(bits, group, 1.0, axis)), x.dtype)


class KIVIReference:
    """KIVI's cache rule, token by token (Liu et al. 2024, Algorithm 1 and the authors' decode step): keys are
    quantized per channel R at a time once R wait in full precision, after the step that filled them attended;
    the last R values are always full precision and the oldest leaves one at a time, quantized per token."""

    def __init__(self, k, v, bits, group, R):
        self.bits, self.group, self.R = bits, group, R
        S = k.shape[-2]
        r = S % R if S >= R else S
        self.kq, self.kfull = _fake(k[:, :, :S - r], bits, group, "channel"), k[:, :, S - r:]
        cut = max(0, S - R)
        self.vq, self.vfull = _fake(v[:, :, :cut], bits, group, "token"), v[:, :, cut:]

    def step(self, k, v):
        """Append one token; returns the (K, V) its attention reads, then applies the post-attention rule."""
        self.kfull = torch.cat([self.kfull, k], -2)
        self.vfull = torch.cat([self.vfull, v], -2)
        seen = torch.cat([self.kq, self.kfull], -2), torch.cat([self.vq, self.vfull], -2)
        if self.kfull.shape[-2] == self.R:
            self.kq = torch.cat([self.kq, _fake(self.kfull, self.bits, self.group, "channel")], -2)
            self.kfull = self.kfull[:, :, :0]
        if self.vfull.shape[-2] > self.R:
            self.vq = torch.cat([self.vq, _fake(self.vfull[:, :, :1], self.bits, self.group, "token")], -2)
            self.vfull = self.vfull[:, :, 1:]
        return seen


@pytest.mark.parametrize("prompt", [5, 16, 37, 48])
def test_kivi_follows_the_reference_rule_token_by_token(prompt):
    torch.manual_seed(prompt)
    B, H, D, R, G, bits, steps = 1, 2, 16, 16, 4, 2, 41
    pol = get_policy("kivi", bits=bits, group_size=G, residual_length=R)
    rule = pol.decode_rule()
    k = torch.randn(B, H, prompt + steps, D, dtype=torch.float16)
    v = torch.randn(B, H, prompt + steps, D, dtype=torch.float16)
    store = LayerStore(pol.spec, torch.float16, "cpu")
    ref = KIVIReference(k[:, :, :prompt], v[:, :, :prompt], bits, G, R)
    plan = pol.plan_prefill(type("Ctx", (), {"keys": k[:, :, :prompt], "seq_len": prompt, "batch_size": B})())
    store.prefill(k[:, :, :prompt], v[:, :, :prompt], plan.bits, plan.residual, value_window=rule.value_window)
    for t in range(prompt, prompt + steps):
        store.append(k[:, :, t:t + 1], v[:, :, t:t + 1], rule.bits, rule.keep_recent, rule.flush_every,
                     rule.value_window, rule.after_attention)
        rk, rv = ref.step(k[:, :, t:t + 1], v[:, :, t:t + 1])
        sk, sv = store.materialize()  # what this step's attention reads
        assert torch.equal(sk, rk), f"keys differ at step {t}"
        assert torch.equal(sv, rv), f"values differ at step {t}"
        q = torch.randn(B, H, 1, D, dtype=torch.float16)
        want = torch.softmax((q.float() @ rk.float().transpose(-1, -2)) * D ** -0.5, -1) @ rv.float()
        got = segment_attention(q, store, None, D ** -0.5)  # [B, 1, H, D]
        torch.testing.assert_close(got.transpose(1, 2).float(), want, atol=2e-3, rtol=2e-3)
        store.settle()  # what the attention function does after reading
        # held in full precision after the step: exactly the reference's keys and values
        deferred = sum(0 if s.vpend is None else s.vpend.shape[-2] for s in store.segments.values())
        assert store.residual_len == ref.kfull.shape[-2], t
        assert store.residual_len + deferred == ref.vfull.shape[-2], t


def test_kivi_blocks_schedule_is_the_earlier_rule():
    pol = get_policy("kivi", schedule="blocks", residual_length=32)
    rule = pol.decode_rule()
    assert rule.value_window is None and not rule.after_attention and rule.flush_every == 32
    with pytest.raises(ValueError, match="schedule"):
        get_policy("kivi", schedule="paper")


@pytest.mark.parametrize("prompt", [0, 5, 16])
def test_kivi_paged_schedule_reads_its_own_block_in_full_precision(prompt):
    """`paged` (vlmkv's vLLM pages): blocks of R aligned from token 0, keys per channel and values per token quantized
    together after the attention of the step that fills the block; every step reads earlier blocks quantized and its
    own block as it is."""
    torch.manual_seed(prompt)
    B, H, D, R, bits, steps = 1, 2, 16, 8, 2, 27
    pol = get_policy("kivi", bits=bits, group_size=R, residual_length=R, schedule="paged")
    rule = pol.decode_rule()
    assert rule.after_attention and rule.value_window is None and rule.flush_every == R
    k = torch.randn(B, H, prompt + steps, D, dtype=torch.float16)
    v = torch.randn(B, H, prompt + steps, D, dtype=torch.float16)
    store = LayerStore(pol.spec, torch.float16, "cpu")
    start = max(prompt, 1)
    plan = pol.plan_prefill(type("Ctx", (), {"keys": k[:, :, :start], "seq_len": start, "batch_size": B})())
    store.prefill(k[:, :, :start], v[:, :, :start], plan.bits, plan.residual)
    for t in range(start, prompt + steps):
        store.append(k[:, :, t:t + 1], v[:, :, t:t + 1], rule.bits, rule.keep_recent, rule.flush_every,
                     rule.value_window, rule.after_attention)
        own = (t // R) * R  # the first token of this step's own block
        wk = torch.cat([_fake(k[:, :, :own], bits, R, "channel"), k[:, :, own:t + 1]], -2)
        wv = torch.cat([_fake(v[:, :, :own], bits, R, "token"), v[:, :, own:t + 1]], -2)
        sk, sv = store.materialize()
        assert torch.equal(sk, wk) and torch.equal(sv, wv), f"step {t}"
        store.settle()


def test_kivi_reference_memory_holds_quantized_keys_beside_full_values(tiny_llama):
    """Through the model: after a 40-token prompt and 30 generated tokens with R = 32, keys of 64 tokens are
    quantized, values of the last 32 are held in full precision (and counted in the bytes)."""
    from vlmkv import QuantizedKVCache, cache_kwargs

    ids = torch.randint(5, 200, (1, 40))
    with QuantizedKVCache(tiny_llama, "kivi", bits=2, residual_length=32) as cache:
        tiny_llama.generate(input_ids=ids, max_new_tokens=31, min_new_tokens=31, do_sample=False, **cache_kwargs(cache))
        store = cache.layers[0].store
        assert store.length == 70
        seg = store.segments[2]
        assert seg.n == 64 and seg.vpend.shape[-2] == 32 - store.residual_len
        assert store.residual_len == 70 - 64
        H, D = seg.vpend.shape[1], seg.vpend.shape[-1]
        assert seg.nbytes() >= seg.vpend.numel() * 2 + (64 - 26) * H * D // 4  # full values + 2-bit codes


@torch.no_grad()
def test_kivi_reference_takes_a_multi_token_append_after_decode_steps(tiny_llama):
    """A second question on a KIVI cache (a multi-token append after generated tokens, whose values wait in the
    value window): blocks flush in slot order, older deferred values quantized first; afterwards exactly the last
    R values are in full precision, as after the same tokens one at a time."""
    from vlmkv import QuantizedKVCache, cache_kwargs

    ids = torch.randint(5, 200, (1, 300), generator=torch.Generator().manual_seed(2))
    for steps in (5, 31):
        with QuantizedKVCache(tiny_llama, "kivi", bits=2, residual_length=32) as cache:
            tiny_llama(input_ids=ids, **cache_kwargs(cache), use_cache=True)
            for t in range(steps):
                tiny_llama(input_ids=ids[:, t:t + 1], **cache_kwargs(cache), use_cache=True)
            out = tiny_llama(input_ids=ids[:, :66], **cache_kwargs(cache), use_cache=True).logits
            store = cache.layers[0].store
            assert torch.isfinite(out).all() and store.length == 300 + steps + 66
            store.settle()
            seg = store.segments[2]
            full = (0 if seg.vpend is None else seg.vpend.shape[-2]) + store.residual_len
            assert full == 32 and seg.n % 32 == 0 and seg.n + store.residual_len == store.length


# ---------------------------------------------------------------------------------------------------- SKVQ
from vlmkv.policies.skvq import CLIP_GRID, calibrate_clips, cluster_channels  # noqa: E402
from vlmkv.quant.packing import pack_trits, unpack_trits  # noqa: E402


def _separated_channels(n=64):
    """[n, 16] tokens whose channels fall in three (min, max) clusters of sizes 9, 4 and 3."""
    g = torch.Generator().manual_seed(0)
    x = torch.empty(n, 16)
    scale = {**{c: 1.0 for c in range(9)}, **{c: 10.0 for c in (9, 10, 11, 12)}, **{c: 0.1 for c in (13, 14, 15)}}
    for c, s in scale.items():
        x[:, c] = (torch.rand(n, generator=g) * 2 - 1) * s
        x[0, c], x[1, c] = -s, s  # exact extremes: tight clusters
    return x[:, torch.randperm(16, generator=g)], scale


def test_skvq_grouping_recovers_uneven_clusters_of_min_max():
    x, _ = _separated_channels()
    perm, bounds = cluster_channels(x, 3)
    assert sorted(perm.tolist()) == list(range(16))
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    assert sizes == [3, 9, 4]  # uneven, ordered by range: 0.1, 1 and 10
    rng = (x.amax(0) - x.amin(0))[perm]
    for a, b in zip(bounds, bounds[1:]):
        assert rng[a:b].max() / rng[a:b].min() < 1.01  # one cluster each


def test_skvq_grouping_is_a_lloyd_fixed_point_on_real_shaped_data():
    """Reference property of k-means: every channel is nearest to its own cluster's mean (min, max)."""
    x = torch.randn(200, 96) * torch.linspace(0.1, 4, 96) + torch.linspace(-1, 1, 96)
    perm, bounds = cluster_channels(x, 4)
    pts = torch.stack([x.amin(0), x.amax(0)], 1).double()[perm]
    means = torch.stack([pts[a:b].mean(0) for a, b in zip(bounds, bounds[1:])])
    own = torch.repeat_interleave(torch.arange(len(means)), torch.tensor([b - a for a, b in zip(bounds, bounds[1:])]))
    nearest = torch.cdist(pts, means).argmin(1)
    assert torch.equal(nearest, own)


def test_uneven_groups_quantize_each_group_on_its_own():
    """The reference: each group of `bounds` quantized alone, as one plain group of its width, at its clip."""
    torch.manual_seed(1)
    x = torch.randn(3, 2, 7, 20)
    bounds, clips = (0, 3, 12, 20), (1.0, 0.8, 0.65)
    got = dequantize(quantize(x, QuantSpec(2, 128, 1.0, "token", bounds=bounds, clips=clips)), torch.float32)
    for (a, b), c in zip(zip(bounds, bounds[1:]), clips):
        want = dequantize(quantize(x[..., a:b].contiguous(), QuantSpec(2, b - a, c, "token")), torch.float32)
        assert torch.equal(got[..., a:b], want)


def test_skvq_clip_search_picks_each_groups_least_error_ratio():
    x, _ = _separated_channels(256)
    x[5, 0] = 40.0  # an outlier in one group: clipping it pays
    perm, bounds = cluster_channels(x, 3)
    xs = x[:, perm]
    spec = QuantSpec(2, 128, 1.0, "token", bounds=bounds)
    clips = calibrate_clips(xs, spec)
    for (a, b), c in zip(zip(bounds, bounds[1:]), clips):  # brute force, group by group
        errs = [((dequantize(quantize(xs[:, a:b].contiguous(), QuantSpec(2, b - a, r, "token")), torch.float32)
                  - xs[:, a:b]) ** 2).sum().item() for r in CLIP_GRID]
        assert c == CLIP_GRID[min(range(len(errs)), key=lambda i: (errs[i], i))]
    assert min(clips) < 1.0


def test_ternary_codes_pack_five_to_a_byte_and_round_trip():
    c = torch.randint(0, 3, (4, 23), dtype=torch.uint8)
    p = pack_trits(c)
    assert p.shape == (4, 5) and torch.equal(unpack_trits(p, 23), c)
    x = torch.randn(2, 1, 9, 40)
    qt = quantize(x, QuantSpec(2, 40, 1.0, "token", levels=3))
    assert qt.codes.shape[-1] == 8 and qt.nbytes() < quantize(x, QuantSpec(2, 40)).nbytes()
    y = dequantize(qt, torch.float32)
    step = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / 2
    assert ((y - x).abs() <= step * 0.5 + 1e-3).all()
    assert len(torch.unique(torch.round((y - y.amin(-1, keepdim=True)) / step), dim=None)) <= 3


def test_skvq_k2v15_and_options():
    p = get_policy("skvq", value_bits=1.5)
    assert p.spec(2, "value", 192).levels == 3 and p.spec(2, "key", 192).levels == 0
    for bad in ({"value_bits": 3}, {"grouping": "random"}, {"clip_ratio": 0.0}):
        with pytest.raises(ValueError):
            get_policy("skvq", **bad)


@pytest.mark.parametrize("opts", [{}, {"value_bits": 1.5}, {"grouping": "sorted"}, {"grouping": "sorted", "clip_ratio": 0.9}])
def test_skvq_decodes_through_a_model_and_counts_its_layout(tiny_llama, opts):
    from vlmkv import QuantizedKVCache, cache_kwargs

    ids = torch.randint(5, 200, (2, 60), generator=torch.Generator().manual_seed(2))
    with QuantizedKVCache(tiny_llama, "skvq", window=8, flush_every=4, **opts) as cache:
        out = tiny_llama.generate(input_ids=ids, max_new_tokens=6, do_sample=False, **cache_kwargs(cache))
        assert out.shape == (2, 66)
        st = cache.layers[0].store
        fk, fv = st.spec_fields
        assert ("bounds" in fk) == (opts.get("grouping", "kmeans") == "kmeans")
        assert ("clips" in fk) == ("clip_ratio" not in opts)
        k, v = st.materialize()
        assert torch.isfinite(k).all() and torch.isfinite(v).all()
        # segment attention (from codes, uneven groups included) equals attention over the materialized cache
        q = torch.randn(2, k.shape[1], 1, k.shape[-1])
        want = torch.softmax((q @ k.float().transpose(-1, -2)) * 0.25, -1) @ v.float()
        got = segment_attention(q, st, None, 0.25).transpose(1, 2)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
