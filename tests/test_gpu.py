"""On a CUDA device: the Triton kernels compiled for real against the pure torch reference, over the grid the
GPU path serves (2/4/8 bits, head dims 64 and 128, fp16 and bf16). Skipped without CUDA (conftest.py)."""
import pytest
import torch

from vlmkv.quant import QuantSpec, dequantize, quantize
from vlmkv.quant.uniform import quantization_step

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_quantize_pack_matches_the_reference(bits, head_dim, dtype, monkeypatch):
    from vlmkv.kernels.triton_kv import quantize_pack

    x = (torch.randn(2, 4, 37, head_dim, generator=torch.Generator().manual_seed(bits)) * 3).to(dtype).cuda()
    spec = QuantSpec(bits, group_size=min(128, head_dim), clip_ratio=0.8 if bits == 2 else 1.0)
    monkeypatch.setenv("VLMKV_KERNELS", "torch")
    ref = quantize(x, spec)
    got = quantize_pack(x, spec)
    assert torch.equal(got.scale, ref.scale) and torch.equal(got.zero, ref.zero)
    # codes may differ only where x / scale lands within float error of a rounding tie: one step at most
    err = (dequantize(got, torch.float32) - dequantize(ref, torch.float32)).abs()
    assert bool((err <= quantization_step(ref) * 1.001).all())
    assert float((got.codes != ref.codes).float().mean()) < 1e-3


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_decode_matches_the_reference(bits, head_dim, dtype):
    from vlmkv.kernels.reference import pv_from_codes, qk_from_codes
    from vlmkv.kernels.triton_kv import decode_partial

    g = torch.Generator().manual_seed(head_dim + bits)
    B, H, R, n = 2, 2, 3, 300
    spec = QuantSpec(bits, group_size=min(128, head_dim))
    k = quantize(torch.randn(B, H, n, head_dim, generator=g).to(dtype).cuda(), spec)
    v = quantize(torch.randn(B, H, n, head_dim, generator=g).to(dtype).cuda(), spec)
    q = torch.randn(B, H, R, head_dim, generator=g).cuda()
    ok = torch.rand(B, n, generator=g).cuda() > 0.1
    m, den, o = decode_partial(q, k, v, ok, head_dim ** -0.5)
    s = (qk_from_codes(q, k) * head_dim ** -0.5).masked_fill(~ok[:, None, None, :], float("-inf"))
    ref = pv_from_codes(torch.softmax(s, -1), v)
    torch.testing.assert_close(o / den, ref, rtol=2e-3, atol=2e-3)


def _formats():
    from kernel_formats import formats

    return [(d, name, spec) for d in (64, 128) for name, spec in formats(d)]


@pytest.mark.parametrize("d,name,spec", _formats(), ids=lambda v: v if isinstance(v, (str, int)) else None)
def test_triton_quantizes_every_stored_format_as_the_reference(d, name, spec, monkeypatch):
    """Every format a policy stores (symmetric, int8 zero points, groups 16..128 and the head dim, uneven groups,
    ternary codes), compiled for real: the same scales and zero points, codes within one step at rounding ties."""
    from vlmkv.kernels.triton_kv import quantize_pack

    x = (torch.randn(2, 4, 37, d, generator=torch.Generator().manual_seed(d)) * 3).half().cuda()
    monkeypatch.setenv("VLMKV_KERNELS", "torch")
    ref = quantize(x, spec)
    got = quantize_pack(x, spec)
    assert torch.equal(got.scale, ref.scale) and (ref.zero is None or torch.equal(got.zero, ref.zero))
    assert float((got.codes != ref.codes).float().mean()) < 1e-3


def _pairs():
    from kernel_formats import decode_pairs

    return [(d, name, ks, vs) for d in (64, 128) for name, ks, vs in decode_pairs(d)]


@pytest.mark.parametrize("d,name,kspec,vspec", _pairs(), ids=lambda v: v if isinstance(v, (str, int)) else None)
def test_triton_decodes_every_stored_format_as_the_reference(d, name, kspec, vspec):
    from vlmkv.kernels.reference import decode_partial_ref
    from vlmkv.kernels.triton_kv import decode_partial

    g = torch.Generator().manual_seed(d + len(name))
    B, H, R, n = 2, 2, 3, 320
    k = quantize(torch.randn(B, H, n, d, generator=g).cuda(), kspec)
    v = quantize(torch.randn(B, H, n, d, generator=g).cuda(), vspec)
    q = torch.randn(B, H, R, d, generator=g).cuda()
    ok = torch.rand(B, n, generator=g).cuda() > 0.1
    m, den, o = decode_partial(q, k, v, ok, d ** -0.5)
    m2, den2, o2 = decode_partial_ref(q, k, v, ok, d ** -0.5)
    torch.testing.assert_close(o / den, o2 / den2, rtol=2e-3, atol=2e-3)
