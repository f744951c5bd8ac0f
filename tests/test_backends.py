"""Every available kernel backend against the pure PyTorch reference (`vlmkv/kernels/reference.py`), over grids of
bits x group x head dim x dtype x layout. Tolerances are relative to the reference's own float error: the decode
reference in float32 is compared with an exact float64 evaluation, and a backend may differ from that exact value
by a small multiple of the reference's own deviation. The backends: the C++ kernels (always built here) and the
Triton kernels (compiled on CUDA, else in Triton's interpreter, on a smaller grid since it is slow)."""
import itertools

import pytest
import torch

from vlmkv import kernels
from vlmkv.kernels import cpu
from vlmkv.kernels.reference import decode_partial_ref, quantize_pack_ref
from vlmkv.quant import QuantSpec
from vlmkv.quant.uniform import _code_lut

HAS_TRITON = kernels.triton_installed()
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _backends():
    out = ["cpu"]
    if HAS_TRITON:
        out.append("triton")
    return out


def _run_quantize(backend, x, spec):
    if backend == "cpu":
        assert cpu.load(), cpu.error()
        return cpu.quantize_pack(x, spec)
    from vlmkv.kernels.triton_kv import quantize_pack

    return quantize_pack(x.to(DEV), spec)


def _grid_quantize(backend):
    # both quantize kernels take power-of-two groups dividing d (`kernels.fits_quantize`)
    if backend == "cpu":
        dims, groups, dtypes = (64, 96, 128), (16, 32, 64, 128), (torch.float32, torch.float16, torch.bfloat16)
    else:  # the Triton interpreter is slow: a smaller grid off the GPU
        dims = (64, 128) if DEV == "cuda" else (64,)
        groups, dtypes = (32, 64, 128), (torch.float32, torch.float16, torch.bfloat16)
    for bits, d, g, dt in itertools.product((2, 4, 8), dims, groups, dtypes):
        if d % g == 0 and (backend == "cpu" or d >= g):
            yield bits, d, g, dt


QUANT_CASES = [(be, *case) for be in _backends() for case in _grid_quantize(be)]


@pytest.mark.parametrize("backend,bits,d,group,dtype", QUANT_CASES)
def test_quantize_backend_equals_the_reference(backend, bits, d, group, dtype):
    g = torch.Generator().manual_seed(bits * 1000 + d + group)
    x = (torch.randn(2, 3, 19, d, generator=g) * torch.rand(d, generator=g) * 4).to(dtype)
    x[0, 0, 0] = 1.5  # a constant row: the min == max guard
    x[1, 2, 3, :group] = torch.arange(group) * 0.5  # exact ties of x / scale
    spec = QuantSpec(bits, group_size=group, clip_ratio=0.8 if bits == 2 else 1.0)
    ref = quantize_pack_ref(x, spec)
    got = _run_quantize(backend, x, spec)
    assert got.codes.shape == ref.codes.shape and got.dtype == dtype
    assert torch.equal(got.scale.cpu(), ref.scale) and torch.equal(got.zero.cpu(), ref.zero)
    if backend == "cpu":  # the same float32 operations in the same order: bit for bit
        assert torch.equal(got.codes, ref.codes)
    else:  # a code may differ only where x / scale lands within float error of a rounding tie
        assert float((got.codes.cpu() != ref.codes).float().mean()) < 0.01


def _format_cases():
    from kernel_formats import formats

    for be in _backends():
        dims = (64, 96, 128) if be == "cpu" else ((64, 128) if DEV == "cuda" else (64,))
        for d in dims:
            for name, spec in formats(d):
                if be == "triton" and DEV != "cuda" and "-g16-" in name:
                    continue  # the interpreter is slow: group 16 is covered on the CPU grid and on a GPU
                yield be, d, name, spec


@pytest.mark.parametrize("backend,d,name,spec", list(_format_cases()), ids=lambda v: v if isinstance(v, str) else None)
def test_every_stored_format_quantizes_as_the_reference(backend, d, name, spec):
    """Symmetric groups, int8 and int16 zero points, groups of 16..128 and the head dim, uneven groups with clips,
    ternary codes: bit for bit on the CPU; on Triton, a code may differ only at a rounding tie."""
    g = torch.Generator().manual_seed(d + len(name))
    x = (torch.randn(2, 3, 11, d, generator=g) * torch.rand(d, generator=g) * 4)
    x[0, 0, 0] = 1.5  # a constant row
    x[0, 1, 2, 3] = float("nan")
    x[1, 0, 1, d - 1] = float("inf")
    x[1, 2, 5, 7] = 3e5  # the step saturates
    ref = quantize_pack_ref(x, spec)
    got = _run_quantize(backend, x, spec)
    assert got.codes.shape == ref.codes.shape and got.scale.shape == ref.scale.shape
    rs, gs = ref.scale, got.scale.cpu()
    assert torch.equal(rs.isnan(), gs.isnan()) and torch.equal(rs.nan_to_num(), gs.nan_to_num())
    assert (ref.zero is None) == (got.zero is None) and (ref.zero is None or torch.equal(ref.zero, got.zero.cpu()))
    if backend == "cpu":
        assert torch.equal(got.codes, ref.codes)
    else:
        assert float((got.codes.cpu() != ref.codes).float().mean()) < 0.01


def _pair_cases():
    from kernel_formats import decode_pairs

    for be in _backends():
        for d in ((64, 128) if be == "cpu" or DEV == "cuda" else (64,)):
            for name, ks, vs in decode_pairs(d):
                yield be, d, name, ks, vs


@pytest.mark.parametrize("backend,d,name,kspec,vspec", list(_pair_cases()),
                         ids=lambda v: v if isinstance(v, (str, int)) else None)
def test_every_stored_format_decodes_within_the_references_own_float_error(backend, d, name, kspec, vspec):
    g = torch.Generator().manual_seed(d + 3 * len(name))
    B, H, R, n = 2, 2, 3, 96
    kq = quantize_pack_ref(torch.randn(B, H, n, d, generator=g) * 2, kspec)
    vq = quantize_pack_ref(torch.randn(B, H, n, d, generator=g), vspec)
    q = torch.randn(B, H, R, d, generator=g)
    ok = torch.rand(B, n, generator=g) > 0.2
    scaling = d ** -0.5
    m, den, o = decode_partial_ref(q, kq, vq, ok, scaling)
    exact = _exact(q, kq, vq, ok, scaling)
    ref_err = float(((o / den).double() - exact).abs().max())
    if backend == "triton":
        kq, vq, q, ok = kq.map(lambda t: t.to(DEV)), vq.map(lambda t: t.to(DEV)), q.to(DEV), ok.to(DEV)
    assert kernels.decode_backend(q, kq, vq, d, allow=(backend,)) == backend or backend == "triton" and DEV == "cpu"
    m2, den2, o2 = kernels.decode_partial(q, kq, vq, ok, scaling, backend)
    err = float(((o2 / den2).double().cpu() - exact).abs().max())
    assert err <= 8 * ref_err + 1e-6 * float(exact.abs().max()) + 1e-7, (err, ref_err)
    torch.testing.assert_close(m2.cpu(), m, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", _backends())
def test_non_finite_inputs_agree_with_the_reference(backend):
    spec = QuantSpec(4, group_size=32)
    x = torch.randn(1, 2, 6, 64, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0, 5] = float("nan")
    x[0, 0, 1, 40] = float("inf")
    x[0, 1, 2, :32] = -float("inf")
    x[0, 1, 3, 7] = 3e5  # the step saturates at fp16's max
    x[0, 1, 4, :32] = 1e5 + torch.rand(32, generator=torch.Generator().manual_seed(1)) * 0.01  # tiny range, far from 0
    ref = quantize_pack_ref(x, spec)
    got = _run_quantize(backend, x, spec)
    rs, gs = ref.scale, got.scale.cpu()
    assert torch.equal(rs.isnan(), gs.isnan()) and int(rs.isnan().sum()) == 3
    assert torch.equal(rs.nan_to_num(), gs.nan_to_num()) and torch.equal(ref.zero, got.zero.cpu())
    assert torch.equal(ref.codes, got.codes.cpu())


def _dequant64(qt) -> torch.Tensor:
    """Exact (float64) dequantization: scale * (code - zero), for every format (uneven groups, ternary codes,
    symmetric groups' implied zero point)."""
    qt = qt.map(lambda t: t.cpu())
    lut = _code_lut(qt.spec.bits, "cpu", qt.spec.levels).double()
    c = lut.index_select(0, qt.codes.reshape(-1).long()).view(*qt.codes.shape[:-1], -1)[..., :qt.d]
    s, z = qt.scale.double(), qt.zeros().double()
    G = qt.spec.group_size
    if qt.spec.axis == "token":
        gid = qt.spec.group_ids(qt.d)
        return (c - z.index_select(-1, gid)) * s.index_select(-1, gid)
    *lead, n, d = c.shape
    return ((c.view(*lead, n // G, G, d) - z[..., None, :]) * s[..., None, :]).view(*lead, n, d)


def _exact(q, kq, vq, ok, scaling):
    s = torch.einsum("bhrd,bhnd->bhrn", q.double().cpu(), _dequant64(kq)) * scaling
    if ok is not None:
        s = s.masked_fill(~ok.cpu()[:, None, None, :], float("-inf"))
    return torch.einsum("bhrn,bhnd->bhrd", torch.softmax(s, -1), _dequant64(vq))


def _grid_decode(backend):
    dims = (64, 128) if backend == "cpu" or DEV == "cuda" else (64,)
    key_axes = ("token", "channel")
    for kb, vb, d, kaxis, R, masked_ in itertools.product((2, 4, 8), (2, 4), dims, key_axes, (1, 3), (False, True)):
        if backend == "triton" and DEV != "cuda" and (kb == 8 or R == 3):
            continue  # the interpreter is slow: the bit-widths and GQA are covered on the CPU grid and on a GPU
        yield kb, vb, d, kaxis, R, masked_


DECODE_CASES = [(be, *case) for be in _backends() for case in _grid_decode(be)]


@pytest.mark.parametrize("backend,kbits,vbits,d,kaxis,R,masked_", DECODE_CASES)
def test_decode_backend_equals_the_reference_within_its_own_float_error(backend, kbits, vbits, d, kaxis, R, masked_):
    g = torch.Generator().manual_seed(kbits * 100 + vbits * 10 + d + R)
    B, H, n = 2, 2, 96
    kspec = QuantSpec(kbits, group_size=32 if kaxis == "channel" else min(64, d), axis=kaxis)
    vspec = QuantSpec(vbits, group_size=min(64, d))
    kq = quantize_pack_ref(torch.randn(B, H, n, d, generator=g) * 2, kspec)
    vq = quantize_pack_ref(torch.randn(B, H, n, d, generator=g), vspec)
    q = torch.randn(B, H, R, d, generator=g)
    ok = (torch.rand(B, n, generator=g) > 0.2) if masked_ else None
    scaling = d ** -0.5
    m, den, o = decode_partial_ref(q, kq, vq, ok, scaling)
    ref = (o / den).double()
    exact = _exact(q, kq, vq, ok, scaling)
    ref_err = float((ref - exact).abs().max())
    if backend == "triton":
        kq, vq, q = (kq.map(lambda t: t.to(DEV)), vq.map(lambda t: t.to(DEV)), q.to(DEV))
        ok = None if ok is None else ok.to(DEV)
    assert kernels.decode_backend(q, kq, vq, d, allow=(backend,)) == backend or backend == "triton" and DEV == "cpu"
    m2, den2, o2 = kernels.decode_partial(q, kq, vq, ok, scaling, backend)
    got = (o2 / den2).double().cpu()
    err = float((got - exact).abs().max())
    # a backend sums in another order: allow a few times the reference's own float error (and float32's epsilon)
    assert err <= 8 * ref_err + 1e-6 * float(exact.abs().max()) + 1e-7, (err, ref_err)
    # the partial-softmax triple itself: the same max and the same normalizer
    torch.testing.assert_close(m2.cpu(), m, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(den2.cpu(), den, rtol=1e-4, atol=1e-5)


def test_one_dispatcher_picks_the_backend(monkeypatch):
    spec = QuantSpec(2, group_size=32)
    x = torch.randn(1, 1, 4, 64)
    monkeypatch.setenv("VLMKV_KERNELS", "torch")
    assert kernels.quantize_backend(x, spec) == "torch"
    monkeypatch.setenv("VLMKV_KERNELS", "cpu")
    assert kernels.quantize_backend(x, spec) == "cpu"
    assert kernels.quantize_backend(x, QuantSpec(2, group_size=32, axis="channel")) == "torch"  # no kernel for it
    assert kernels.quantize_backend(x, QuantSpec(2, group_size=32, zero_point="none")) == "cpu"  # auto's format
    assert kernels.quantize_backend(x, QuantSpec(2, group_size=32, meta_dtype=torch.bfloat16)) == "torch"
    kq = quantize_pack_ref(torch.randn(1, 1, 32, 64), spec)
    assert kernels.decode_backend(torch.randn(1, 1, 1, 64), kq, kq, 64) == "cpu"
    assert kernels.decode_backend(torch.randn(1, 1, 1, 64), kq, kq, 64, allow=()) == "torch"
