import torch

from vlmkv import QuantizedKVCache, get_policy
from vlmkv.policies.smoothquant import smoothing_scales
from vlmkv.quant import QuantSpec
from vlmkv.storage import LayerStore


def test_smoothing_is_an_exact_identity_before_quantization():
    torch.manual_seed(0)
    k = torch.randn(2, 3, 40, 32) * torch.logspace(-2, 2, 32)  # channels of very different ranges
    v = torch.randn(2, 3, 40, 32)
    sk, sv = smoothing_scales(k, 0.5), smoothing_scales(v, 0.5)
    assert torch.equal(torch.log2(sk.float()), torch.round(torch.log2(sk.float())))  # powers of two
    assert torch.equal((k / sk.float()) * sk.float(), k) and torch.equal((v / sv.float()) * sv.float(), v)
    # through the storage: 16-bit "quantization" of the smoothed tokens reads back exactly
    store = LayerStore(lambda b, kind, d=None: QuantSpec(b, 32), torch.float32, "cpu", full_dtype=torch.float32)
    store.prefill(k, v, torch.full((2, 40), 16), 0, (sk, sv))
    kk, vv = store.materialize()
    assert torch.equal(kk, k) and torch.equal(vv, v)


def test_smoothing_flattens_channel_outliers_and_helps_quantization():
    torch.manual_seed(0)
    k = torch.randn(1, 1, 256, 64)
    k[..., 3] *= 40  # an outlier channel, as in real keys
    err = {}
    for name, scales in (("plain", None), ("smooth", (smoothing_scales(k, 0.5), smoothing_scales(k, 0.5)))):
        store = LayerStore(lambda b, kind, d=None: QuantSpec(b, 64), torch.float32, "cpu")
        store.prefill(k, k, torch.full((1, 256), 4), 0, scales)
        kk, _ = store.materialize()
        err[name] = float(((kk - k) ** 2).mean())
    assert err["smooth"] < err["plain"] / 2


@torch.no_grad()
def test_smoothquant_bytes_include_the_divisors(tiny_llama, padded_batch):
    ids, mask = padded_batch
    with QuantizedKVCache(tiny_llama, get_policy("smoothquant", bits=4), inspect=True) as cache:
        tiny_llama(input_ids=ids, attention_mask=mask, past_key_values=cache)
        st = cache.layers[0].store
        assert st.channel_scales[0].shape == (2, 2, 1, 32)
        seg = st.segments[4]
        assert st.nbytes() == seg.nbytes() + 2 * (2 * 2 * 32 * 2) + 2 * 0  # + two fp16 [B, H, 1, D] divisors


def test_skvq_reordering_is_a_permutation_undone_exactly():
    from vlmkv.policies.skvq import range_order
    from vlmkv.storage import _flatten, _unflatten

    torch.manual_seed(0)
    k = torch.randn(2, 3, 20, 16) * torch.rand(3, 1, 16) * 10
    perm = range_order(k, None)
    assert sorted(perm.tolist()) == list(range(48))  # a permutation of the 3 x 16 channels
    assert torch.equal(_unflatten(_flatten(k, perm), perm, 3), k)
    # through the storage at 16 bits: exact; at 8 bits: every channel back in its place, within half a step
    store = LayerStore(lambda b, kind, d: QuantSpec(b, min(16, d)), torch.float32, "cpu", full_dtype=torch.float32)
    store.prefill(k, k, torch.full((2, 20), 8), 0, None, (perm, perm))
    kk, _ = store.materialize()
    assert kk.shape == k.shape and (kk - k).abs().max() < 0.1
    assert store.segments[8].k.codes.shape == (2, 1, 20, 48)


@torch.no_grad()
def test_skvq_groups_similar_ranges_and_keeps_sinks(tiny_llama):
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    with QuantizedKVCache(tiny_llama, get_policy("skvq", window=8, sinks=5), inspect=True) as cache:
        tiny_llama(input_ids=ids, past_key_values=cache)
        bits = cache.plans[0]["bits"][0]
        assert bits[:5].tolist() == [16] * 5 and set(bits[5:].tolist()) == {2}
        st = cache.layers[0].store
        assert st.residual_len == 8 and st.channel_perm[0].shape == (2 * 32,)
        assert st.segments[2].k.codes.shape[1] == 1  # heads flattened: groups of 64 over 2 heads x 32 channels
        out = tiny_llama(input_ids=ids[:, :1], past_key_values=cache)
        assert torch.isfinite(out.logits).all()


def test_skvq_group_falls_back_to_a_divisor():
    p = get_policy("skvq")
    assert p._group(192) == 96 and p._group(4096) == 128 and p._group(64) == 64


def test_exact_smoothing_scales_follow_the_formula_and_pow2_rounds_them():
    """Against the formula written out here: s_c = max_t |x_tc| ^ alpha over unpadded tokens; pow2 rounds log2 s_c."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 12, 8) * torch.tensor([1, 3, 0.2, 7, 1, 1, 40, 0.5])
    mask = torch.ones(1, 12, dtype=torch.bool)
    mask[0, :2] = False
    x[0, :, 0, 6] = 1e4  # on padding: ignored
    alpha = 0.5
    want = torch.stack([torch.stack([x[0, h, 2:, c].abs().max() ** alpha for c in range(8)]) for h in range(2)])
    exact = smoothing_scales(x, alpha, mask, exact=True)[0, :, 0]
    pow2 = smoothing_scales(x, alpha, mask)[0, :, 0]
    torch.testing.assert_close(exact.float(), want.to(torch.float16).float())
    torch.testing.assert_close(pow2.float(), torch.exp2(torch.round(torch.log2(want))))
    from vlmkv import get_policy

    assert get_policy("smoothquant").exact_scales and not get_policy("smoothquant", exact_scales=False).exact_scales
