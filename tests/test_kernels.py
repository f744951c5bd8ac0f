"""Triton kernels against their torch twins. Without a GPU they run in Triton's interpreter (CPU, numpy), which
checks their semantics; on a CUDA machine the same tests compile and run them for real."""
import pytest
import torch

# without a GPU, conftest.py has turned Triton's interpreter on (TRITON_INTERPRET=1) before triton was imported
triton = pytest.importorskip("triton", reason="the Triton kernels need `pip install 'vlmkv[gpu]'`")

from vlmkv.kernels.reference import pv_from_codes, qk_from_codes  # noqa: E402
from vlmkv.quant import QuantSpec, dequantize, quantize  # noqa: E402
from vlmkv.quant.uniform import quantization_step  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("bits,group,clip", [(2, 32, 1.0), (4, 64, 0.8), (8, 32, 1.0), (2, 64, 0.8)])
def test_quantize_pack_matches_torch_quantize(bits, group, clip):
    from vlmkv.kernels.triton_kv import quantize_pack

    g = torch.Generator().manual_seed(bits * 100 + group)
    x = (torch.randn(2, 3, 17, 64, generator=g) * torch.rand(64, generator=g) * 4).to(DEV)
    x[0, 0, 0] = 1.5  # a constant row: min == max guard
    spec = QuantSpec(bits, group_size=group, clip_ratio=clip)
    ref, got = quantize(x, spec), quantize_pack(x, spec)
    assert got.codes.shape == ref.codes.shape and got.codes.dtype == torch.uint8
    assert torch.equal(got.scale, ref.scale) and torch.equal(got.zero, ref.zero)
    # codes may differ only where x / scale sits on a rounding tie within float error: allow a handful
    assert (got.codes != ref.codes).float().mean() < 1e-3
    err = (dequantize(got) - dequantize(ref)).abs()
    assert (err <= quantization_step(ref) * 1.0001).all()


@pytest.mark.parametrize("kb,vb,R", [(2, 2, 3), (4, 2, 1), (8, 4, 4)])
def test_decode_partial_matches_codes_oracle(kb, vb, R):
    from vlmkv.kernels.triton_kv import decode_partial

    g = torch.Generator().manual_seed(kb * 10 + vb + R)
    B, H, n, D = 2, 2, 150, 32
    k = torch.randn(B, H, n, D, generator=g).to(DEV)
    v = torch.randn(B, H, n, D, generator=g).to(DEV)
    q = torch.randn(B, H, R, D, generator=g).to(DEV)
    kq, vq = quantize(k, QuantSpec(kb, group_size=32)), quantize(v, QuantSpec(vb, group_size=16))
    ok = torch.rand(B, n, generator=g).to(DEV) > 0.2
    ok[1, :100] = False  # a split with nothing allowed
    scaling = D ** -0.5
    # oracle: the torch twin used on the CPU path
    s = qk_from_codes(q, kq) * scaling
    s = s.masked_fill(~ok[:, None, None, :], float("-inf"))
    p = torch.softmax(s, -1)
    want = pv_from_codes(p, vq)
    m, l, o = decode_partial(q, kq, vq, ok, scaling, block_n=32, splits=3)
    got = o / l
    # tolerance: the float error of the reference itself (fp32 sums of n terms of size ~|v| max)
    tol = 64 * torch.finfo(torch.float32).eps * n * dequantize(vq).abs().max()
    torch.testing.assert_close(got, want, rtol=0, atol=float(tol))
    assert m.shape == (B, H, R, 1) and l.shape == (B, H, R, 1)


def test_decode_partial_reads_views_of_segment_buffers():
    """Segments keep spare capacity: the kernel must follow the strides of a view into a larger buffer."""
    from vlmkv.kernels.triton_kv import decode_partial

    g = torch.Generator().manual_seed(3)
    k = torch.randn(1, 2, 96, 32, generator=g).to(DEV)
    v = torch.randn(1, 2, 96, 32, generator=g).to(DEV)
    kq, vq = quantize(k, QuantSpec(2, group_size=32)), quantize(v, QuantSpec(2, group_size=32))
    q = torch.randn(1, 2, 2, 32, generator=g).to(DEV)
    ok = torch.ones(1, 96, dtype=torch.bool, device=DEV)
    m1, l1, o1 = decode_partial(q, kq.slice_tokens(0, 64), vq.slice_tokens(0, 64), ok[:, :64], 0.2)
    sub = [quantize(t[:, :, :64].contiguous(), QuantSpec(2, group_size=32)) for t in (k, v)]
    m2, l2, o2 = decode_partial(q, sub[0], sub[1], ok[:, :64], 0.2)
    torch.testing.assert_close(o1 / l1, o2 / l2)


def test_kernels_reject_unsupported_layouts():
    from vlmkv.kernels.triton_kv import decode_partial, quantize_pack

    x = torch.randn(1, 1, 32, 32, device=DEV)
    with pytest.raises(ValueError, match="spec"):
        quantize_pack(x, QuantSpec(2, group_size=32, axis="channel"))
    with pytest.raises(ValueError, match="spec"):
        quantize_pack(x, QuantSpec(2, group_size=32, meta_dtype=torch.bfloat16))
    kq = quantize(x, QuantSpec(2, group_size=32, axis="channel"))
    with pytest.raises(ValueError, match="vq"):  # per-channel groups are for keys only
        decode_partial(torch.randn(1, 1, 1, 32, device=DEV), kq, kq, torch.ones(1, 32, dtype=torch.bool), 1.0)
    vq = quantize(torch.randn(1, 1, 32, 48), QuantSpec(2, group_size=16))
    with pytest.raises(ValueError, match="power"):
        decode_partial(torch.randn(1, 1, 1, 48, device=DEV), vq, vq, torch.ones(1, 32, dtype=torch.bool), 1.0)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rtn-2", "akvq-vl"])
def test_cache_decode_through_the_kernel_equals_the_torch_path(tiny_llama, monkeypatch, method):
    """End to end: generate with the fused decode kernel (interpreted on a CPU) and with the torch twin."""
    import vlmkv.kernels.triton_kv as tk
    from vlmkv import QuantizedKVCache

    calls = []
    real = tk.decode_partial
    monkeypatch.setattr(tk, "decode_partial", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_llama.to(DEV)
    ids = torch.randint(3, 256, (2, 200), generator=torch.Generator().manual_seed(0)).to(DEV)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    opts = {"recent": 16, "num_pivots": 2} if method == "akvq-vl" else {}
    outs = []
    for impl in ("triton", "torch"):
        monkeypatch.setenv("VLMKV_KERNELS", impl)
        with QuantizedKVCache(model, method, **opts) as cache:
            out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=3,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        outs.append(torch.stack(out.logits))
        if impl == "triton":
            assert calls, "the decode steps did not reach the kernel"
            calls.clear()
    assert not calls
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
