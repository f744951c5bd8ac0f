"""Finite in, finite out: a finite key or value of any size the model's dtype holds gives finite logits through
every registered policy wherever DynamicCache's are finite (prefill and decode, float32 / float16 / bfloat16
models, each kernel backend), and NaN / inf still propagate as they do through DynamicCache."""
import copy

import pytest
import torch
from transformers import DynamicCache

from vlmkv import QuantizedKVCache, cache_kwargs, list_policies

# windowquant's default budget is below what its 2-bit codes cost at head dim 32 (see test_cache.POLICY_CASES)
OPTIONS = {"windowquant": {"budget": 4.0}}
VALUES = {torch.float32: (6e4, 65504.0, 7e4, 3e5), torch.float16: (6e4, 65504.0), torch.bfloat16: (6e4, 65504.0, 7e4, 3e5)}
PROMPT = 160  # longer than every default recent window at this size, so early tokens are quantized


@pytest.fixture(scope="module")
def models(tiny_llama):
    return {dt: copy.deepcopy(tiny_llama).to(dt) for dt in VALUES}


def _plant(model, value, where: str, phase: str):
    """Hooks that set keys and values (k_proj / v_proj outputs of layer 0) to `value` at one prompt position
    ('early': quantized by most policies; 'last': in their full-precision recent window) or at the decode token,
    over one channel ('one') or the whole token ('all')."""
    pos, span = where.split("-")

    def hook(mod, inp, out):
        decoding = out.shape[1] == 1
        if decoding != (phase == "decode"):
            return None
        out = out.clone()
        i = 0 if decoding else (5 if pos == "early" else out.shape[1] - 1)
        if span == "all":
            out[0, i, :] = value
        else:
            out[0, i, 3] = value
        return out

    attn = model.model.layers[0].self_attn
    return [attn.k_proj.register_forward_hook(hook), attn.v_proj.register_forward_hook(hook)]


@torch.no_grad()
def _logits(model, cache, value, where, phase) -> torch.Tensor:
    ids = torch.arange(PROMPT).remainder(250).add(3)[None]
    handles = _plant(model, value, where, phase)
    try:
        out = [model(ids, **cache_kwargs(cache), use_cache=True).logits[:, -1]]
        for t in (7, 9):
            out.append(model(torch.tensor([[t]]), **cache_kwargs(cache), use_cache=True).logits[:, -1])
        return torch.stack(out)
    finally:
        for h in handles:
            h.remove()


_REFERENCE: dict = {}


def _dynamic_finite(model, dtype, value, where, phase) -> bool:
    key = (dtype, value, where, phase)
    if key not in _REFERENCE:
        _REFERENCE[key] = bool(torch.isfinite(_logits(model, DynamicCache(), value, where, phase)).all())
    return _REFERENCE[key]


CASES = [(v, w, p) for v in (6e4, 65504.0, 7e4, 3e5) for w, p in (("early-one", "prefill"), ("early-all", "prefill"),
                                                                 ("last-all", "prefill"), ("one-all", "decode"),
                                                                 ("one-one", "decode"))]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("dtype", list(VALUES), ids=str)
@pytest.mark.parametrize("name", list_policies())
def test_finite_values_give_finite_logits_wherever_dynamic_cache_does(models, name, dtype, backend, monkeypatch):
    monkeypatch.setenv("VLMKV_KERNELS", backend)
    model = models[dtype]
    bad = []
    for value, where, phase in CASES:
        if value not in VALUES[dtype]:
            continue
        if not _dynamic_finite(model, dtype, value, where, phase):
            continue
        with QuantizedKVCache(model, name, **OPTIONS.get(name, {})) as cache:
            got = _logits(model, cache, value, where, phase)
        if not torch.isfinite(got).all():
            bad.append((value, where, phase))
    assert not bad, f"{name} on a {dtype} model gave non-finite logits where DynamicCache's are finite: {bad}"


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("name", list_policies())
def test_extreme_float16_values_stay_finite_through_each_kernel_backend(name, backend, monkeypatch):
    """Every format a policy stores, quantized and read by decode attention on each backend (Triton in its
    interpreter without a GPU): float16 keys and values at +-65504 give a finite attention output."""
    from vlmkv import get_policy, kernels

    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("VLMKV_KERNELS", backend)
    policy = get_policy(name, **OPTIONS.get(name, {}))
    g = torch.Generator().manual_seed(0)
    for bits in sorted(set(policy.bit_widths()) - {16}):
        x = torch.randn(1, 2, 64, 32, generator=g).half()
        x[0, 0, 5, :] = 65504.0  # a whole token
        x[0, 1, 9, 3] = -65504.0  # one channel
        kq, vq = kernels.quantize(x, policy.spec(bits, "key", 32)), kernels.quantize(x, policy.spec(bits, "value", 32))
        q = torch.randn(1, 2, 3, 32, generator=g)
        m, den, o = kernels.decode_partial(q, kq, vq, None, 32 ** -0.5)
        assert torch.isfinite(o / den).all() and torch.isfinite(m).all(), (name, bits)


@pytest.mark.slow
@pytest.mark.parametrize("name", list_policies())
def test_finite_values_through_a_model_on_the_triton_kernels(models, name, monkeypatch):
    """The whole model on the Triton backend (in its interpreter: slow): the float16 model's hardest case, a
    decode-time key and value at 65504."""
    pytest.importorskip("triton")
    monkeypatch.setenv("VLMKV_KERNELS", "triton")
    model = models[torch.float16]
    for value, where, phase in ((65504.0, "one-one", "decode"),):
        assert _dynamic_finite(model, torch.float16, value, where, phase)
        with QuantizedKVCache(model, name, **OPTIONS.get(name, {})) as cache:
            assert torch.isfinite(_logits(model, cache, value, where, phase)).all(), (value, where, phase)


@pytest.mark.parametrize("dtype", list(VALUES), ids=str)
@pytest.mark.parametrize("name", list_policies())
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_inf_propagate_as_through_dynamic_cache(models, name, dtype, value):
    model = models[dtype]
    for where, phase in (("early-one", "prefill"), ("one-one", "decode")):
        ref = _logits(model, DynamicCache(), value, where, phase)
        with QuantizedKVCache(model, name, **OPTIONS.get(name, {})) as cache:
            got = _logits(model, cache, value, where, phase)
        # a non-finite key or value reaches every later step: never turned into a finite answer
        assert not torch.isfinite(ref[1:]).any(dim=-1).all(), (where, phase)
        assert not torch.isfinite(got[1:]).all(dim=-1).any(), (where, phase)


def test_a_float32_models_outlier_widens_the_layers_full_precision_tokens_and_counts_their_bytes(models):
    """A float32 model's 16-bit tokens are float16 (2 bytes); one value float16 cannot hold moves that layer's
    full-precision storage to float32, exactly, and nbytes() counts 4 bytes an element from then on."""
    model = models[torch.float32]
    with QuantizedKVCache(model, "kivi", bits=2) as plain, QuantizedKVCache(model, "kivi", bits=2) as big:
        _logits(model, plain, 1.0, "one-one", "decode")
        _logits(model, big, 7e4, "one-one", "decode")
        s0, s1 = plain.layers[0].store, big.layers[0].store
        assert s0.full_dtype == torch.float16 and s1.full_dtype == torch.float32
        assert big.layers[1].store.full_dtype == torch.float16  # only the layer that holds the value
        assert s1.res_v.dtype == torch.float32 and float(s1.res_v.abs().max()) == 7e4
        assert s1.residual.nbytes() == 2 * s0.residual.nbytes()
        assert big.nbytes() > plain.nbytes()
