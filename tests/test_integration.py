"""Integration with transformers as people use it: both spellings of the cache argument and every entry point
reach the policies with the prompt's labels; caches are independent objects (two on one model, deep copies,
closing in any order, failed constructors); sliding-window layers; fused projections; torch.compile."""
import copy
import inspect

import pytest
import torch
from transformers import DynamicCache

import vlmkv
from vlmkv import QuantizedKVCache, get_policy
from vlmkv.bench import dynamic_bytes
from vlmkv.cache import cache_kwarg
from vlmkv.models import hooks
from vlmkv.models.hooks import decoder_layers
from vlmkv.models.modality import IMAGE, PAD, TEXT

SPELLINGS = sorted({"past_key_values", cache_kwarg()})


def _clean(model, impl="sdpa"):
    """Nothing of vlmkv left on the model: no hooks, no shared entries, the original attention implementation."""
    assert not model._forward_pre_hooks and not model._forward_hooks
    for layer in decoder_layers(model):
        assert not layer._forward_pre_hooks and not layer.self_attn._forward_pre_hooks
    assert all(hooks.holders(model, kind) == 0 for kind in ("inputs", "massive", "attention"))
    cfg = model.config.get_text_config(decoder=True)
    assert cfg._attn_implementation == impl


def _check_akvq_plan(cache, types):
    plan = cache.plans[0]["bits"]
    img, txt = plan[types == IMAGE].tolist(), plan[types == TEXT].tolist()
    assert set(img) <= {2, 16} and img.count(2) >= len(img) - 2, f"image tokens stored as {sorted(set(img))}"
    assert set(txt) <= {4, 16}
    assert set(plan[types == PAD].tolist()) <= {2}  # padding planned as padding (the low width), never as text


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("entry", ["generate", "forward"])
@torch.no_grad()
def test_labels_reach_the_policy_whatever_the_spelling_and_entry_point(name, spelling, entry, family):
    model, inputs, types, _ = family(name)
    for policy in ("akvq-vl", "windowquant"):
        pol = get_policy(policy, recent=2, **({"num_pivots": 2} if policy == "akvq-vl" else {"budget": 6.0}))
        with QuantizedKVCache(model, pol, inspect=True) as cache:
            if entry == "generate":
                model.generate(**inputs, **{spelling: cache}, max_new_tokens=3, do_sample=False)
            else:
                model(**inputs, **{spelling: cache}, use_cache=True)
            assert torch.equal(cache.inputs["attention_mask"], inputs["attention_mask"])
            if policy == "akvq-vl":
                _check_akvq_plan(cache, types)
            else:
                img = cache.plans[0]["bits"][types == IMAGE]
                # a 6-bit budget cannot hold every visual token at 8 bits: labels lost would put them all at 8
                assert int(img.min()) < 8 and set(img.tolist()) <= {2, 4, 8}, sorted(set(img.tolist()))
        _clean(model)


@torch.no_grad()
def test_vision_aware_policy_without_labels_raises(family):
    model, inputs, types, frames = family("llava")
    embeds = model.get_input_embeddings()(inputs["input_ids"].clamp_max(298))
    for policy in (get_policy("akvq-vl"), get_policy("windowquant", budget=6.0)):
        with QuantizedKVCache(model, policy) as cache:
            with pytest.raises(ValueError, match="modality labels"):
                model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], past_key_values=cache)
        with QuantizedKVCache(model, policy) as cache:  # a submodule's forward: the recorder never sees the prompt
            with pytest.raises(ValueError, match="modality labels"):
                model.model.language_model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                                           past_key_values=cache)
    # auto ranks tokens by the question's queries, not by labels: embeddings need none
    with QuantizedKVCache(model, get_policy("auto", bits=6.0)) as cache:
        model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], past_key_values=cache)
        assert cache.get_seq_length() == embeds.shape[1]
    # labels given by hand make embeddings work
    with QuantizedKVCache(model, "akvq-vl", recent=2, num_pivots=2, inspect=True) as cache:
        cache.set_spans(types, frames)
        model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], past_key_values=cache)
        _check_akvq_plan(cache, types)
    _clean(model)


def _prefill_and_decode(model, ids, cache, steps=12):
    out = model(input_ids=ids, past_key_values=cache)
    logits, nxt = [], out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        out = model(input_ids=nxt, past_key_values=cache)
        logits.append(out.logits[:, -1])
        nxt = out.logits[:, -1:].argmax(-1)
    return torch.stack(logits, 1)


INDEPENDENT = ["rtn-8", "kivi-2", "akvq-vl", "windowquant+wht+pivots", "skvq", "smoothquant-2"]


@pytest.mark.parametrize("policy", INDEPENDENT)
@torch.no_grad()
def test_two_caches_on_one_model_decode_as_each_would_alone(tiny_llama, policy):
    ids = torch.randint(3, 256, (2, 300), generator=torch.Generator().manual_seed(0))
    opts = {"budget": 6.0} if policy.startswith("windowquant") else {}
    with QuantizedKVCache(tiny_llama, policy, **opts) as c:
        alone = _prefill_and_decode(tiny_llama, ids, c)
    a, b = QuantizedKVCache(tiny_llama, policy, **opts), QuantizedKVCache(tiny_llama, "akvq-vl")
    na = tiny_llama(input_ids=ids, past_key_values=a).logits[:, -1:].argmax(-1)
    nb = tiny_llama(input_ids=ids.flip(1), past_key_values=b).logits[:, -1:].argmax(-1)
    got = []
    for _ in range(12):  # interleaved steps
        out = tiny_llama(input_ids=na, past_key_values=a)
        got.append(out.logits[:, -1])
        na = out.logits[:, -1:].argmax(-1)
        nb = tiny_llama(input_ids=nb, past_key_values=b).logits[:, -1:].argmax(-1)
    a.close()
    # b still works after a closed: its hooks are shared, not a's
    tiny_llama(input_ids=nb, past_key_values=b)
    b.close()
    assert torch.equal(torch.stack(got, 1), alone)
    _clean(tiny_llama)


@pytest.mark.parametrize("order", ["creation", "reverse"])
def test_closing_hadamard_caches_in_any_order_restores_the_model(tiny_llama, order):
    weights = [(l.self_attn.v_proj.weight, l.self_attn.o_proj.weight) for l in decoder_layers(tiny_llama)]
    caches = [QuantizedKVCache(tiny_llama, "akvq-vl"), QuantizedKVCache(tiny_llama, "rtn-4+wht"),
              QuantizedKVCache(tiny_llama, "kivi-2")]
    assert tiny_llama.config._attn_implementation == "vlmkv_sdpa"
    for c in (caches if order == "creation" else caches[::-1]):
        c.close()
    _clean(tiny_llama)
    for l, (wv, wo) in zip(decoder_layers(tiny_llama), weights):
        assert l.self_attn.v_proj.weight is wv and l.self_attn.o_proj.weight is wo


@pytest.mark.parametrize("policy", INDEPENDENT)
@torch.no_grad()
def test_deepcopy_of_a_prefilled_cache_decodes_as_the_original(tiny_llama, policy):
    ids = torch.randint(3, 256, (2, 300), generator=torch.Generator().manual_seed(1))
    opts = {"budget": 6.0} if policy.startswith("windowquant") else {}
    cache = QuantizedKVCache(tiny_llama, policy, **opts)
    first = tiny_llama(input_ids=ids, past_key_values=cache).logits[:, -1:].argmax(-1)
    twin = copy.deepcopy(cache)
    assert twin.model is tiny_llama and twin.layers[0].store is not cache.layers[0].store
    assert twin.nbytes() == cache.nbytes()

    def run(c, nxt):
        out = []
        for _ in range(12):
            o = tiny_llama(input_ids=nxt, past_key_values=c)
            out.append(o.logits[:, -1])
            nxt = o.logits[:, -1:].argmax(-1)
        return torch.stack(out, 1)
    a = run(cache, first)
    cache.close()  # the copy holds its own leases
    b = run(twin, first)
    twin.close()
    assert torch.equal(a, b)
    _clean(tiny_llama)


def test_failed_constructor_leaves_nothing_on_the_model(tiny_llama, monkeypatch):
    from vlmkv import attention

    with monkeypatch.context() as m:  # transformers refuses to build an odd head dim with RoPE: say it has one
        m.setattr(tiny_llama.config, "head_dim", 15)
        with pytest.raises(ValueError, match="even dimension"):
            QuantizedKVCache(tiny_llama, "akvq-vl")
    _clean(tiny_llama)

    def broken(model):
        raise RuntimeError("attention switch failed")
    monkeypatch.setattr(attention, "AttentionSwitch", broken)
    with pytest.raises(RuntimeError, match="attention switch failed"):
        QuantizedKVCache(tiny_llama, "akvq-vl")  # the recorder and the activation hooks came first
    _clean(tiny_llama)


@pytest.mark.parametrize("arch", ["phi3", "phi"])
@torch.no_grad()
def test_hadamard_policies_on_fused_and_renamed_projections(arch):
    """Phi-3 fuses q/k/v into qkv_proj, Phi names its output projection `dense`: the rotation lives in the cache,
    so neither matters. Unquantized (everything in the window) the rotated cache gives DynamicCache's tokens."""
    from transformers import Phi3Config, Phi3ForCausalLM, PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    model = (Phi3ForCausalLM(Phi3Config(**common)) if arch == "phi3" else PhiForCausalLM(PhiConfig(**common))).eval()
    ids = torch.randint(3, 256, (1, 30), generator=torch.Generator().manual_seed(0))
    ref = model.generate(input_ids=ids, max_new_tokens=10, do_sample=False, past_key_values=DynamicCache(config=model.config))
    for policy in (get_policy("akvq-vl", recent=100000), get_policy("rtn-4+wht")):
        with QuantizedKVCache(model, policy, residual_dtype=torch.float32) as cache:
            out = model.generate(input_ids=ids, max_new_tokens=10, do_sample=False, past_key_values=cache)
        if policy.name == "akvq-vl":
            assert torch.equal(out, ref)
        else:
            assert out.shape == ref.shape
    _clean(model)


def _sliding_models():
    from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig,
                              MistralForCausalLM)

    torch.manual_seed(0)
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, pad_token_id=0, head_dim=16, sliding_window=16)
    gemma3 = Gemma3TextConfig(**common, layer_types=["sliding_attention", "full_attention"] * 2)
    return {"mistral": lambda: MistralForCausalLM(MistralConfig(**common)),
            "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(**common)),
            "gemma3": lambda: Gemma3ForCausalLM(gemma3)}


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3"])
@torch.no_grad()
def test_sliding_window_layers_never_hold_more_than_dynamic_cache(arch):
    model = _sliding_models()[arch]().eval()
    sliding = [l.is_sliding for l in QuantizedKVCache(model, "fp16").layers]
    assert any(sliding) and (arch == "mistral") == all(sliding)
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    for policy, opts in [("fp16", {}), ("rtn-8", {}), ("kivi-4", {"residual_length": 8, "group_size": 8}),
                         ("akvq-vl", {"recent": 4, "num_pivots": 0})]:
        ref, cache = DynamicCache(config=model.config), QuantizedKVCache(model, policy, **opts)
        mask = torch.ones_like(ids)
        a = model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        b = model(input_ids=ids, attention_mask=mask, past_key_values=ref)
        nxt, worst, agree = b.logits[:, -1:].argmax(-1), 0.0, []
        for _ in range(40):
            mask = torch.cat([mask, mask.new_ones(2, 1)], 1)
            a = model(input_ids=nxt, attention_mask=mask, past_key_values=cache)
            b = model(input_ids=nxt, attention_mask=mask, past_key_values=ref)
            assert cache.nbytes() <= dynamic_bytes(ref), (policy, cache.nbytes(), dynamic_bytes(ref))
            worst = max(worst, float((a.logits - b.logits).abs().max()))
            agree.append(torch.equal(a.logits.argmax(-1), b.logits.argmax(-1)))
            nxt = b.logits[:, -1:].argmax(-1)
        assert cache.get_seq_length() == ref.get_seq_length() == 80
        held = [l.store.length for l, s in zip(cache.layers, sliding) if s]
        assert max(held) <= 15 + 15 // 16 + 1  # the window (W - 1), and at most a few tokens waiting to leave
        if policy == "fp16":
            assert worst == 0.0
        else:  # quantized: close to DynamicCache, never attending outside the window
            assert worst < 0.1 and sum(agree) >= 36, (policy, worst, sum(agree))
        cache.close()


@pytest.mark.slow
@torch.no_grad()
def test_torch_compile_runs_the_cache_eagerly_and_refuses_fullgraph_clearly(tiny_llama):
    ids = torch.randint(3, 256, (1, 30), generator=torch.Generator().manual_seed(0))
    with QuantizedKVCache(tiny_llama, "rtn-4") as c:
        ref = _prefill_and_decode(tiny_llama, ids, c, steps=4)
    torch._dynamo.reset()
    with QuantizedKVCache(tiny_llama, "rtn-4") as c:
        got = _prefill_and_decode(torch.compile(tiny_llama), ids, c, steps=4)
    assert torch.allclose(got, ref, atol=1e-4)
    torch._dynamo.reset()
    with QuantizedKVCache(tiny_llama, "rtn-4") as c:
        with pytest.raises(Exception, match="fullgraph"):
            _prefill_and_decode(torch.compile(tiny_llama, fullgraph=True), ids, c, steps=1)
    torch._dynamo.reset()


def test_cache_kwargs_uses_the_spelling_the_installed_transformers_wants(tiny_llama):
    import transformers

    assert cache_kwarg() in inspect.signature(type(tiny_llama).forward).parameters or cache_kwarg() == "past_key_values"
    with QuantizedKVCache(tiny_llama, "rtn-4") as c:
        assert vlmkv.cache_kwargs(c) == {cache_kwarg(): c}
    major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    assert (cache_kwarg() == "cache") == (major_minor >= (5, 24))


@torch.no_grad()
def test_library_calls_emit_no_future_warnings(tiny_llama, local_llava, capsys):
    """vlmkv's own calls into transformers use the spelling the installed release wants (no FutureWarning about
    the cache argument from fidelity, generate or eval)."""
    import warnings

    from vlmkv.cli import main
    from vlmkv.eval.fidelity import fidelity

    ids = torch.randint(3, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    d, img = local_llava
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        fidelity(tiny_llama, ids, torch.ones_like(ids), ["fp16", "rtn-4"], steps=3)
        assert main(["generate", "--model", str(d), "--method", "rtn-4", "--prompt", "hi", "--image", str(img),
                     "--max-new-tokens", "2"]) == 0


def test_bench_reports_time_and_bytes_beside_dynamic_cache(local_llava, capsys, tmp_path):
    import json

    from vlmkv.cli import main

    d, _ = local_llava
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(d), "--methods", "dynamic,fp16,rtn-2,akvq-vl,rtn-4:group_size=16:zero_point=none",
                 "--context", "96", "--steps", "2", "--batch", "1,2", "--out", str(out)]) == 0
    rows = {(r["method"], r["batch"]): r for r in json.loads(out.read_text())}
    printed = capsys.readouterr().out
    assert len(rows) == 12 and "| dynamic (first) |" in printed and "| dynamic (last) |" in printed
    assert "last run" in printed  # the baseline's spread over the run
    for b in (1, 2):
        first, last = rows["dynamic (first)", b], rows["dynamic (last)", b]
        assert first["bytes_vs_dynamic"] == 1.0 and rows["fp16", b]["kv_bytes"] <= first["kv_bytes"]
        assert first["fused_share"] is None and first["dynamic_spread"] == round(last["decode_ms"] / first["decode_ms"] - 1, 3)
        assert rows["rtn-2", b]["bytes_vs_dynamic"] < 0.2 and rows["rtn-2", b]["decode_ms"] > 0
        assert rows["rtn-2", b]["fused_share"] == 1.0 and rows["rtn-4:group_size=16:zero_point=none", b]["fused_share"] == 1.0
        assert rows["rtn-2", b]["prefill_vs_dynamic"] > 0
    assert rows["rtn-2", 2]["kv_bytes"] > rows["rtn-2", 1]["kv_bytes"]


def test_bench_checks_every_method_before_loading_the_model(capsys):
    from vlmkv.cli import main

    # the model does not exist: the misspelt method is what is named, so it was checked first
    assert main(["bench", "--model", "/no/such/model", "--methods", "dynamic,rtn-2,auto:bitz=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bitz" in err[0]
    assert main(["bench", "--model", "/no/such/model", "--methods", "dynamic,kivy-2"]) == 2
    assert "kivy" in capsys.readouterr().err


@pytest.mark.parametrize("head_dim", [80, 96])
@torch.no_grad()
def test_full_hadamard_rotation_on_non_power_of_two_head_dims(head_dim):
    """Head dims 80 and 96 take a full (Paley x Sylvester) Hadamard rotation, which is not symmetric: keys and values
    stored rotated, the query rotated and the output rotated back by H^T leave the logits of DynamicCache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlmkv.quant import hadamard_matrix

    assert not torch.allclose(hadamard_matrix(head_dim), hadamard_matrix(head_dim).T)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=2 * head_dim, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         head_dim=head_dim)).eval()
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    ref = _prefill_and_decode(model, ids, DynamicCache(config=model.config), steps=6)
    for seg_attn in (True, False):
        with QuantizedKVCache(model, "rtn-8+wht", residual_dtype=torch.float32, segment_attention=seg_attn) as c:
            got = _prefill_and_decode(model, ids, c, steps=6)
        assert (got - ref).abs().max() < 0.05 * ref.abs().max(), float((got - ref).abs().max())
    with QuantizedKVCache(model, get_policy("akvq-vl", recent=100000), residual_dtype=torch.float32) as c:
        got = _prefill_and_decode(model, ids, c, steps=6)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max() + 1e-5


@torch.no_grad()
def test_a_forward_that_raised_mid_step_does_not_poison_the_next(tiny_llama, monkeypatch):
    """A decode step that fails between the cache update and the attention leaves a handoff nobody took; the next
    forward call starts clean instead of reporting a changed attention implementation."""
    from vlmkv import attention

    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    cache = QuantizedKVCache(tiny_llama, "rtn-4")
    nxt = tiny_llama(input_ids=ids, past_key_values=cache).logits[:, -1:].argmax(-1)
    real = attention.segment_attention
    monkeypatch.setattr(attention, "_take", lambda module: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        tiny_llama(input_ids=nxt, past_key_values=cache)
    monkeypatch.undo()
    assert attention.segment_attention is real
    cache.layers[0].crop(40)  # drop the half-written step (layer 0 stored the new token before its attention failed)
    tiny_llama(input_ids=nxt, past_key_values=cache)  # no stale-handoff error
    cache.close()


@torch.no_grad()
def test_assisted_decoding_crops_the_cache_under_either_crop_convention(tiny_llama):
    """Assisted generation rolls the cache back after rejected draft tokens (`crop`: a negative count on recent
    transformers, a length to keep on earlier 5.x): the fp16 cache gives plain greedy decoding's tokens."""
    ids = torch.randint(3, 256, (1, 30), generator=torch.Generator().manual_seed(0))
    ref = tiny_llama.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    with QuantizedKVCache(tiny_llama, "fp16") as c:
        out = tiny_llama.generate(input_ids=ids, max_new_tokens=12, do_sample=False, assistant_model=tiny_llama,
                                  **vlmkv.cache_kwargs(c))
    assert torch.equal(out, ref)
    with QuantizedKVCache(tiny_llama, "rtn-8") as c:
        tiny_llama(input_ids=ids, **vlmkv.cache_kwargs(c))
        c.crop(-5)
        assert c.get_seq_length() == 25
        for layer in c.layers:
            layer.crop(20)  # the earlier convention: the length to keep
        assert c.get_seq_length() == 20


@pytest.mark.parametrize("policy", ["akvq-vl", "kivi-2", "auto"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@torch.no_grad()
def test_vlmkv_attention_lives_beside_packages_that_wrap_attention_functions(tiny_llama, monkeypatch, policy, impl):
    """kvpress re-wraps every registered attention function at import, passing `dropout` by position: vlmkv's
    functions take the interface's full calling convention (extra positional and keyword arguments) and decode
    exactly as unwrapped."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS  # noqa: F401  (registered alongside)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from vlmkv import QuantizedKVCache, attention

    attention.register()
    ids = torch.randint(3, 256, (1, 200), generator=torch.Generator().manual_seed(5))
    opts = {"auto": {"bits": 5.0}}.get(policy, {})
    prev = tiny_llama.config._attn_implementation
    tiny_llama.set_attn_implementation(impl)
    try:
        def run():
            with QuantizedKVCache(tiny_llama, policy, **opts) as cache:
                out = tiny_llama.generate(input_ids=ids, **vlmkv.cache_kwargs(cache), max_new_tokens=5,
                                          min_new_tokens=5, do_sample=False, output_logits=True,
                                          return_dict_in_generate=True, pad_token_id=0)
            return torch.stack(out.logits)

        want = run()
        calls = []

        def kvpress_style(func):
            if impl == "sdpa":  # as kvpress.attention_patch wraps them: dropout passed by position
                def wrapper(module, query, key, value, attention_mask, dropout=0.0, **kwargs):
                    calls.append(1)
                    return func(module, query, key, value, attention_mask, dropout, **kwargs)
            else:  # eager's order: scaling, then dropout, both by position
                def wrapper(module, query, key, value, attention_mask, **kwargs):
                    calls.append(1)
                    scaling, dropout = kwargs.pop("scaling"), kwargs.pop("dropout", 0.0)
                    return func(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
            return wrapper

        for name in list(attention.NAMES.values()):
            monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, name,
                                kvpress_style(ALL_ATTENTION_FUNCTIONS[name]))
        got = run()
    finally:
        tiny_llama.set_attn_implementation(prev)
    assert calls, "the wrapped functions were not called"
    torch.testing.assert_close(got, want, rtol=0, atol=0)
