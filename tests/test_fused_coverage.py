"""No silent slow path: every format a registered policy stores, at its defaults and at every point of its `--pareto`
grid, is read at decode time by a fused kernel on the CPU backend (no quantized element through the PyTorch
reference), and the Triton kernels take the same formats (their numerics: tests/test_backends.py)."""
import warnings

import pytest
import torch

from vlmkv import QuantizedKVCache, cache_kwargs, kernels, list_policies
from vlmkv.eval.presets import PARETO
from vlmkv.kernels import cpu
from vlmkv.policies import get_policy
from vlmkv.storage import Plain


@pytest.fixture(scope="module")
def llama64():
    """A 2-layer random Llama with head dim 64 (a power of two), 2 kv heads for 4 query heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).eval()


CASES = [(name, {}) for name in list_policies()] + [(name, opts) for _, _, name, opts in PARETO]


@pytest.mark.parametrize("name,opts", CASES, ids=lambda v: str(v))
@torch.no_grad()
def test_every_decode_step_reads_quantized_segments_through_a_fused_kernel(llama64, name, opts, monkeypatch):
    assert cpu.load(), cpu.error()
    monkeypatch.setenv("VLMKV_KERNELS", "cpu")
    policy = get_policy(name, **opts)
    try:
        policy.validate(64, 2)
    except ValueError:
        pytest.skip(f"{name} {opts}: infeasible at head dim 64 (refused at construction)")
    ids = torch.randint(3, 256, (2, 320), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # padding: masks read through slot maps
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a reference read warns: fail on it
        with QuantizedKVCache(llama64, policy) as cache:
            llama64.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=24,
                             min_new_tokens=24, do_sample=False, pad_token_id=0)
            reads = cache.decode_reads()
            report = cache.memory_report()
            stores = [layer.store for layer in cache.layers]
    assert reads["reference"] == 0, reads
    assert report["decode_reads"] == reads
    quantized = [s for st in stores for s in st.segments.values() if not isinstance(s.kb, Plain)]
    if quantized:
        assert reads["fused"] > 0 and reads["fused_share"] == 1.0
    for st in stores:  # the Triton kernels take every format stored here too
        for seg in st.segments.values():
            if isinstance(seg.kb, Plain):
                continue
            d = seg.kb.d
            assert kernels.fits_decode(seg.kb, d, key=True) and kernels.fits_decode(seg.vb, d, key=False), \
                kernels.describe_format(seg.kb, seg.vb)
            if seg.vb.spec.axis == "token" and not seg.vb.spec.codebook:  # codebooks: the reference quantizes them
                assert kernels.fits_quantize(seg.vb.spec, d)


def test_a_reference_read_is_counted_and_warns_once_naming_the_format(llama64, monkeypatch):
    """A format no kernel reads (bfloat16 scales) goes through the reference: counted, and one warning names it."""
    import dataclasses

    from vlmkv.policies.rtn import RTNPolicy

    @dataclasses.dataclass
    class BF16Scales(RTNPolicy):
        def spec(self, bits, kind, head_dim):
            return dataclasses.replace(super().spec(bits, kind, head_dim), meta_dtype=torch.bfloat16)

    monkeypatch.setenv("VLMKV_KERNELS", "cpu")
    monkeypatch.setattr(kernels, "_WARNED", set())
    ids = torch.randint(3, 256, (1, 64), generator=torch.Generator().manual_seed(2))
    with pytest.warns(RuntimeWarning, match="bfloat16 scales") as rec:
        with QuantizedKVCache(llama64, BF16Scales(bits=4)) as cache, torch.no_grad():
            llama64.generate(input_ids=ids, **cache_kwargs(cache), max_new_tokens=4, min_new_tokens=4,
                             do_sample=False, pad_token_id=0)
            reads = cache.decode_reads()
    assert reads["reference"] > 0 and reads["fused"] == 0 and reads["fused_share"] == 0.0
    assert sum("reference" in str(w.message) for w in rec) == 1
