"""The C++ CPU kernels (vlmkv/kernels/cpu_kv.cpp) against their torch twins. The build itself is tested: a
machine set up by scripts/setup.sh has a compiler and ninja, so a kernel that does not build is a failure here."""
import pytest
import torch

from vlmkv.kernels.reference import pv_from_codes, qk_from_codes
from vlmkv.kernels import cpu
from vlmkv.quant import QuantSpec, dequantize, quantize


@pytest.fixture(scope="module", autouse=True)
def built():
    if not cpu.load():
        pytest.fail(f"the CPU kernels did not build: {cpu.error()}")


def _oracle(q, kq, vq, ok, scaling):
    s = qk_from_codes(q, kq) * scaling
    if ok is not None:
        s = s.masked_fill(~ok[:, None, None, :], float("-inf"))
    return pv_from_codes(torch.softmax(s, -1), vq), s


@pytest.mark.parametrize("bits,group,clip,dtype", [(2, 32, 1.0, torch.float32), (4, 64, 0.8, torch.float32),
                                                   (8, 32, 1.0, torch.float16), (2, 64, 0.8, torch.bfloat16)])
def test_quantize_pack_is_bit_exact(bits, group, clip, dtype):
    g = torch.Generator().manual_seed(bits * 100 + group)
    x = (torch.randn(2, 3, 17, 64, generator=g) * torch.rand(64, generator=g) * 4).to(dtype)
    x[0, 0, 0] = 1.5  # a constant row: the min == max guard
    x[1, 2, 3, :group] = torch.arange(group) * 0.5  # exact ties of x / scale
    spec = QuantSpec(bits, group_size=group, clip_ratio=clip)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLMKV_KERNELS", "torch")
        ref = quantize(x, spec)
    got = cpu.quantize_pack(x, spec)
    for a, b in ((got.codes, ref.codes), (got.scale, ref.scale), (got.zero, ref.zero)):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    assert got.dtype == dtype


def test_quantize_into_writes_a_view_of_a_larger_buffer():
    g = torch.Generator().manual_seed(5)
    spec = QuantSpec(2, group_size=32)
    buf = quantize(torch.randn(2, 3, 40, 64, generator=g), spec)
    before = buf.codes.clone()
    x = torch.randn(2, 3, 4, 64, generator=g)
    cpu.quantize_into(x, buf.slice_tokens(10, 14))
    want = quantize(x, spec)
    assert torch.equal(buf.codes[:, :, 10:14], want.codes) and torch.equal(buf.scale[:, :, 10:14], want.scale)
    assert torch.equal(buf.codes[:, :, :10], before[:, :, :10]) and torch.equal(buf.codes[:, :, 14:], before[:, :, 14:])


@pytest.mark.parametrize("kb,vb,R,n,kg,vg,kaxis", [
    (2, 2, 3, 150, 32, 16, "token"), (4, 2, 1, 300, 64, 32, "token"), (8, 4, 4, 150, 32, 16, "token"),
    (2, 4, 2, 700, 16, 64, "token"), (2, 2, 3, 2048, 64, 64, "token"), (4, 8, 7, 600, 32, 32, "token"),
    (2, 2, 3, 640, 32, 32, "channel"), (4, 2, 1, 96, 32, 64, "channel")])  # KIVI: keys per channel
@pytest.mark.parametrize("masked", [True, False])
def test_decode_partial_matches_the_codes_oracle(kb, vb, R, n, kg, vg, kaxis, masked):
    """Short and long segments (the long ones take the score tables), GQA R = 1..7, every bit-width pair,
    per-token and per-channel key groups."""
    g = torch.Generator().manual_seed(kb * 10 + vb + R + n)
    B, H, D = 2, 2, 64
    k, v = torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g)
    q = torch.randn(B, H, R, D, generator=g)
    kq = quantize(k, QuantSpec(kb, group_size=kg, axis=kaxis))
    vq = quantize(v, QuantSpec(vb, group_size=vg))
    ok = None
    if masked:
        ok = torch.rand(B, n, generator=g) > 0.2
        ok[1, : n // 2] = False  # whole chunks with nothing allowed
    scaling = D ** -0.5
    want, s = _oracle(q, kq, vq, ok, scaling)
    m, l, o = cpu.decode_partial(q, kq, vq, ok, scaling)
    assert m.shape == (B, H, R, 1) and l.shape == (B, H, R, 1) and o.shape == (B, H, R, D)
    # tolerance: the float error of the reference itself (fp32 sums of n terms of size ~|v| max)
    tol = 64 * torch.finfo(torch.float32).eps * n * dequantize(vq).abs().max()
    torch.testing.assert_close(o / l, want, rtol=0, atol=float(tol))
    torch.testing.assert_close(m, s.amax(-1, keepdim=True), rtol=1e-5, atol=1e-5)


def test_decode_partial_with_nothing_allowed_gives_zero_weight():
    kq = quantize(torch.randn(1, 1, 300, 32), QuantSpec(2, group_size=32))
    m, l, o = cpu.decode_partial(torch.randn(1, 1, 2, 32), kq, kq, torch.zeros(1, 300, dtype=torch.bool), 0.2)
    assert (m <= -1e29).all() and (l == 0).all() and (o == 0).all()


def test_decode_partial_reads_views_of_segment_buffers():
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(1, 2, 400, 32, generator=g), torch.randn(1, 2, 400, 32, generator=g)
    spec = QuantSpec(2, group_size=32)
    kq, vq = quantize(k, spec), quantize(v, spec)
    q = torch.randn(1, 2, 2, 32, generator=g)
    m1, l1, o1 = cpu.decode_partial(q, kq.slice_tokens(0, 300), vq.slice_tokens(0, 300), None, 0.2)
    m2, l2, o2 = cpu.decode_partial(q, quantize(k[:, :, :300].contiguous(), spec),
                                    quantize(v[:, :, :300].contiguous(), spec), None, 0.2)
    torch.testing.assert_close(o1 / l1, o2 / l2)


def test_kernels_reject_unsupported_layouts():
    x = torch.randn(1, 1, 32, 32)
    with pytest.raises(ValueError, match="spec"):
        cpu.quantize_pack(x, QuantSpec(2, group_size=32, axis="channel"))
    per_channel = quantize(x, QuantSpec(2, group_size=32, axis="channel"))
    vq = quantize(x, QuantSpec(2, group_size=32))
    with pytest.raises(ValueError, match="vq"):  # per-channel groups: keys only (KIVI)
        cpu.decode_partial(torch.randn(1, 1, 1, 32), per_channel, per_channel, None, 1.0)
    with pytest.raises(ValueError, match="kq"):
        cpu.decode_partial(torch.randn(1, 1, 1, 32), quantize(x, QuantSpec(2, group_size=32, meta_dtype=torch.float32)),
                           vq, None, 1.0)
    with pytest.raises(ValueError, match="q must be"):
        cpu.decode_partial(torch.randn(1, 1, 1, 16), vq, vq, None, 1.0)


def test_bad_kernel_mode_is_rejected(monkeypatch):
    from vlmkv import kernels

    monkeypatch.setenv("VLMKV_KERNELS", "fast")
    with pytest.raises(ValueError, match="VLMKV_KERNELS"):
        kernels.mode()


@pytest.mark.parametrize("method", ["rtn-2", "akvq-vl", "windowquant", "smoothquant-2", "kivi-2", "skvq"])
def test_cache_decode_through_the_cpu_kernels_equals_the_torch_path(tiny_llama, monkeypatch, method):
    """End to end on a left-padded batch: generate with the C++ kernels and with the torch twins."""
    from vlmkv import QuantizedKVCache

    calls = {"decode": 0, "quantize": 0}
    real_d, real_l, real_q = cpu.decode_partial, cpu.decode_layer, cpu.quantize_into
    monkeypatch.setattr(cpu, "decode_partial", lambda *a, **k: calls.__setitem__("decode", calls["decode"] + 1)
                        or real_d(*a, **k))
    monkeypatch.setattr(cpu, "decode_layer", lambda *a, **k: calls.__setitem__("decode", calls["decode"] + 1)
                        or real_l(*a, **k))
    monkeypatch.setattr(cpu, "quantize_into", lambda *a, **k: calls.__setitem__("quantize", calls["quantize"] + 1)
                        or real_q(*a, **k))
    ids = torch.randint(3, 256, (2, 300), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    opts = {"akvq-vl": {"recent": 16, "num_pivots": 2}, "kivi-2": {"residual_length": 32},
            "windowquant": {"budget": 4.0}, "skvq": {"grouping": "sorted"}}.get(method, {})
    outs = []
    for impl in ("cpu", "torch"):
        monkeypatch.setenv("VLMKV_KERNELS", impl)
        with QuantizedKVCache(tiny_llama, method, **opts) as cache:
            out = tiny_llama.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=4,
                                      do_sample=False, output_logits=True, return_dict_in_generate=True,
                                      pad_token_id=0)
        outs.append(torch.stack(out.logits))
        if impl == "cpu":
            assert calls["decode"], "the decode steps did not reach the kernel"
            if method in ("rtn-2", "smoothquant-2"):
                assert calls["quantize"], "the decode steps' tokens were not quantized in place"
            calls.update(decode=0, quantize=0)
    assert calls == {"decode": 0, "quantize": 0}
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("float_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_layer_merges_every_segment_as_the_reference_does(float_dtype):
    """One call over a layer's segments (packed formats of every kind, a 16-bit segment, the recent window; masks
    and GQA) equals the reference's partial softmaxes merged by log-sum-exp, within its own float error."""
    from vlmkv.kernels.reference import decode_partial_ref, masked, partial_softmax

    g = torch.Generator().manual_seed(7)
    B, H, R, D = 2, 2, 3, 64
    q = torch.randn(B, H, R, D, generator=g)
    specs = [(QuantSpec(2, 32, 0.9, zero_point="none"), QuantSpec(2, 32, zero_point="none")),
             (QuantSpec(4, 32, axis="channel"), QuantSpec(4, 16, zero_point="int8")),
             (QuantSpec(8, 64), QuantSpec(2, 32, levels=3)),
             (QuantSpec(2, 32, bounds=(0, 8, 40, 64), clips=(1.0, 0.9, 0.8)), QuantSpec(4, 32, bounds=(0, 24, 64)))]
    parts, ref = [], []
    for i, (ks, vs) in enumerate(specs):
        n = 64 * (i + 1) + (0 if ks.axis == "channel" else 7)
        kq = quantize(torch.randn(B, H, n, D, generator=g) * 2, ks)
        vq = quantize(torch.randn(B, H, n, D, generator=g), vs)
        ok = torch.rand(B, n, generator=g) > 0.3
        parts.append((kq, vq, ok))
        ref.append(decode_partial_ref(q, kq, vq, ok, 0.125))
    for n in (5, 300):  # a 16-bit segment and a recent window, stored as floats
        k = torch.randn(B, H, n, D, generator=g).to(float_dtype)
        v = torch.randn(B, H, n, D, generator=g).to(float_dtype)
        ok = None if n == 5 else torch.rand(B, n, generator=g) > 0.1
        parts.append((k, v, ok))
        s = torch.einsum("bhrd,bhnd->bhrn", q, k.float()) * 0.125
        m, den, e = partial_softmax(masked(s, ok))
        ref.append((m, den, torch.einsum("bhrn,bhnd->bhrd", e, v.float())))
    m = torch.stack([p[0] for p in ref]).amax(0)
    want = sum(p[2] * torch.exp(p[0] - m) for p in ref) / sum(p[1] * torch.exp(p[0] - m) for p in ref)
    m2, den2, o2 = cpu.decode_layer(q, parts, 0.125)
    torch.testing.assert_close(m2, m, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o2 / den2, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n", [96, 400])  # 400: long enough for the 2-bit score tables
@pytest.mark.parametrize("kbits,vbits", [(2, 2), (4, 2), (2, 8)])
def test_codebook_segments_decode_as_the_reference(n, kbits, vbits):
    """Codebook keys and values (a norm a head vector, Lloyd-Max levels): the C++ kernel, through its score tables
    and its unpacking, equals the reference within the reference's own float error."""
    from vlmkv.kernels.reference import decode_partial_ref
    from vlmkv.quant import QuantSpec, quantize

    assert cpu.load(), cpu.error()
    g = torch.Generator().manual_seed(n + kbits)
    d = 64
    ks = QuantSpec(kbits, d, zero_point="none", codebook="lloyd-max")
    vs = QuantSpec(vbits, d, zero_point="none", codebook="lloyd-max")
    kq = quantize(torch.randn(2, 2, n, d, generator=g) * 2, ks)
    vq = quantize(torch.randn(2, 2, n, d, generator=g), vs)
    q = torch.randn(2, 2, 3, d, generator=g)
    ok = torch.rand(2, n, generator=g) > 0.1
    m, den, o = decode_partial_ref(q.double(), kq, vq, ok, d ** -0.5)
    m2, den2, o2 = cpu.decode_partial(q, kq, vq, ok, d ** -0.5)
    torch.testing.assert_close((o2 / den2).double(), (o / den).double(), rtol=2e-5, atol=2e-5)
    layer = cpu.decode_layer(q, [(kq, vq, ok)], d ** -0.5)
    torch.testing.assert_close((layer[2] / layer[1]).double(), (o / den).double(), rtol=2e-5, atol=2e-5)
