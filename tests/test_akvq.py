import pytest
import torch
from transformers import DynamicCache

import vlmkv
from vlmkv import QuantizedKVCache, get_policy
from vlmkv.models.hooks import decoder_layers
from vlmkv.models.modality import IMAGE, PAD, TEXT, label_tokens, list_families
from vlmkv.policies.base import PrefillContext

from tiny_vlms import FAMILIES, expected_bytes

@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_spans_multi_image_padded_batch(name, family):
    model, inputs, types, frames = family(name)
    spans = label_tokens(model.config, inputs["input_ids"], inputs["attention_mask"])
    assert torch.equal(spans.token_types, types)
    assert torch.equal(spans.frame_ids, frames)
    assert int(spans.frame_ids.max()) == 1  # two images per row
    assert (spans.token_types == PAD).sum() > 0


def test_families_registered():
    assert {"llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm"} <= set(list_families())


def test_unknown_family_error_names_how_to_add():
    from transformers import PretrainedConfig

    cfg = PretrainedConfig()
    cfg.model_type = "mystery_vl"
    cfg.vision_config = PretrainedConfig()
    with pytest.raises(ValueError, match=r"vlmkv/models/families/mystery_vl\.py"):
        label_tokens(cfg, torch.tensor([[1, 2, 3]]))


def test_text_only_model_is_all_text(tiny_llama, padded_batch):
    ids, mask = padded_batch
    spans = label_tokens(tiny_llama.config, ids, mask)
    assert set(spans.token_types[mask.bool()].tolist()) == {TEXT}
    assert (spans.token_types[~mask.bool()] == PAD).all()


def test_qwen2_video_frames_split_by_grid(family):
    from vlmkv.models.modality import adapter_for

    model, *_ = family("qwen2_vl")
    n = 4  # 4x4 patches merged 2x2 per frame, 3 frames
    ids = torch.tensor([[5, 292] + [291] * (3 * n) + [293, 7]])
    spans = adapter_for(model.config).label(ids, None, video_grid_thw=torch.tensor([[3, 4, 4]]))
    assert spans.frame_ids[0, 2:2 + 3 * n].tolist() == [0] * n + [1] * n + [2] * n


# ---------------------------------------------------------------- pivots (massive activations)

def _planted_llama(plant_ids, flat=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        emb = m.model.embed_tokens.weight
        if flat:
            emb.copy_(torch.sign(torch.randn_like(emb)))  # every |activation| equal: nothing stands out
        for t in plant_ids:
            emb[t, 7] = 5000.0  # one massive channel, as measured on SmolLM2 (~25,000 vs median ~2)
    return m


def test_planted_massive_activations_become_pivots():
    m = _planted_llama([40, 41])
    ids = torch.tensor([[3, 4, 40, 5, 6, 7, 41, 8, 9, 10, 11, 12]])
    pol = get_policy("akvq-vl", recent=0, wht=False)
    with QuantizedKVCache(m, pol, inspect=True) as cache, torch.no_grad():
        m(input_ids=ids, past_key_values=cache)
        ratio = cache.layer_stats[0]["massive_activation"]
        assert ratio[0, 2] > 100 and ratio[0, 6] > 100
        bits = cache.plans[0]["bits"][0]
        assert bits[2] == 16 and bits[6] == 16
        assert int((bits == 16).sum()) == 2


def test_no_pivots_invented_on_flat_stream():
    m = _planted_llama([], flat=True)
    ids = torch.randint(3, 60, (2, 30), generator=torch.Generator().manual_seed(0))
    with QuantizedKVCache(m, get_policy("akvq-vl", recent=0, wht=False), inspect=True) as cache, torch.no_grad():
        m(input_ids=ids, past_key_values=cache)
        assert not (cache.plans[0]["bits"] == 16).any()


def test_pivot_mask_threshold_and_count():
    pol = get_policy("akvq-vl", num_pivots=3, pivot_threshold=100.0)
    ratio = torch.ones(2, 20)
    ratio[0, [0, 5, 9, 12]] = torch.tensor([900.0, 300.0, 5000.0, 150.0])
    ratio[1, 4] = 99.0  # below the threshold
    ctx = PrefillContext(keys=torch.zeros(2, 1, 20, 8), values=torch.zeros(2, 1, 20, 8), massive_activation=ratio)
    mask = pol.pivot_mask(ctx)
    assert mask[0].nonzero().flatten().tolist() == [0, 5, 9]
    assert not mask[1].any()


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_pivots_are_not_only_the_first_token(smollm2):
    """Measured here: massive activations on SmolLM2-135M sit on the first token and, in layers 1-9,
    on other positions too."""
    model, tok = smollm2
    x = tok(["Here is a table.\nAlice: Lisbon\nBruno: Oslo\nChen: Oslo\n\nCopy the table."], return_tensors="pt")
    with QuantizedKVCache(model, get_policy("akvq-vl", recent=0), inspect=True) as cache:
        model(**x, past_key_values=cache)
        piv = {l: (cache.plans[l]["bits"][0] == 16).nonzero().flatten().tolist() for l in range(30)}
        ratios = [float(cache.layer_stats[l]["massive_activation"].max()) for l in range(30)]
    assert max(ratios) > 1000
    assert any(p and p != [0] for p in piv.values())
    assert all(len(p) <= 15 for p in piv.values())


# ---------------------------------------------------------------- Hadamard equivalence

def _decode(model, inputs, cache, steps=16):
    out = model(**inputs, past_key_values=cache)
    logits = [out.logits[:, -1]]
    mask = inputs["attention_mask"]
    nxt = out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        out = model(input_ids=nxt, attention_mask=mask, past_key_values=cache)
        logits.append(out.logits[:, -1])
        nxt = out.logits[:, -1:].argmax(-1)
    return torch.stack(logits, 1)


def _unquantized_wht():
    # everything stays in the full-precision window: only the transforms act
    return get_policy("akvq-vl", recent=100000, pivots=True, wht=True)


@torch.no_grad()
@pytest.mark.parametrize("which", ["tiny", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_hadamard_keys_and_values_leave_logits_unchanged(which, tiny_llama, padded_batch, request):
    if which == "tiny":
        model = tiny_llama
        ids, mask = padded_batch
        inputs = {"input_ids": ids, "attention_mask": mask}
    else:
        model, tok = request.getfixturevalue("smollm2")
        inputs = dict(tok(["The quick brown fox jumps over the lazy dog", "Paris is"], return_tensors="pt", padding=True))
    ref = _decode(model, inputs, DynamicCache(config=model.config))
    w_before = [(l.self_attn.v_proj.weight, l.self_attn.o_proj.weight) for l in decoder_layers(model)]
    with QuantizedKVCache(model, _unquantized_wht(), residual_dtype=torch.float32) as cache:
        assert model.config._attn_implementation == "vlmkv_sdpa"
        # the rotation lives in the cache: the model's weights are never touched
        assert all(l.self_attn.v_proj.weight is wv and l.self_attn.o_proj.weight is wo
                   for l, (wv, wo) in zip(decoder_layers(model), w_before))
        got = _decode(model, inputs, cache)
        stored = cache.layers[0].store.res_k
    # float error of a fp32 forward through rotated keys and values: far below one logit unit
    scale = ref.abs().max()
    assert (got - ref).abs().max() <= 1e-5 * scale + 1e-4, float((got - ref).abs().max())
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    # undone cleanly: the original Parameters and attention implementation are back
    assert model.config._attn_implementation == "sdpa"
    for l, (wv, wo) in zip(decoder_layers(model), w_before):
        assert l.self_attn.v_proj.weight is wv and l.self_attn.o_proj.weight is wo
        assert not l.self_attn._forward_pre_hooks and not l._forward_pre_hooks
    assert torch.equal(_decode(model, inputs, DynamicCache(config=model.config)), ref)
    assert stored is not None


@torch.no_grad()
def test_keys_and_values_are_stored_rotated(tiny_llama):
    from vlmkv.quant import fwht

    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    ref = DynamicCache(config=tiny_llama.config)
    tiny_llama(input_ids=ids, past_key_values=ref)
    with QuantizedKVCache(tiny_llama, _unquantized_wht(), residual_dtype=torch.float32) as cache:
        tiny_llama(input_ids=ids, past_key_values=cache)
        k, v = cache.layers[1].store.res_k, cache.layers[1].store.res_v
    assert torch.allclose(k, fwht(ref.layers[1].keys), atol=1e-4)
    assert torch.allclose(v, fwht(ref.layers[1].values), atol=1e-4)


# ---------------------------------------------------------------- end to end on every family

@pytest.mark.parametrize("name", sorted(FAMILIES))
@torch.no_grad()
def test_akvq_generate_on_every_family(name, family):
    model, inputs, types, _ = family(name)
    pol = get_policy("akvq-vl", recent=4, flush_every=2, num_pivots=2)
    with QuantizedKVCache(model, pol, inspect=True) as cache:
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=8, do_sample=False)
        assert out.shape[0] == 2
        plan = cache.plans[0]["bits"]
        # visual tokens at 2 bits (or 16 as pivots), text at 4 (or 16)
        assert set(plan[types == IMAGE].tolist()) <= {2, 16} and 2 in set(plan[types == IMAGE].tolist())
        assert set(plan[types == TEXT].tolist()) <= {4, 16}
        assert cache.nbytes() == expected_bytes(cache)
        assert 2.0 < cache.bits_per_element() < 16.0


@torch.no_grad()
def test_ablation_switches_change_stored_bits(tiny_llama, padded_batch):
    ids, mask = padded_batch
    ids, mask = ids[:1], mask[:1]  # no padding (padding is stored at the low width)

    def run(**opts):
        pol = get_policy("akvq-vl", recent=8, num_pivots=3, pivot_threshold=1.5, **opts)
        with QuantizedKVCache(tiny_llama, pol, inspect=True) as cache:
            tiny_llama(input_ids=ids, attention_mask=mask, past_key_values=cache)
            widths = {l: set(cache.plans[l]["bits"].unique().tolist()) for l in range(2)}
            return cache, widths, cache.layers[0].store

    cache, w, st = run()
    assert cache.closed and not tiny_llama._forward_pre_hooks
    assert w[0] == {4, 16} and w[1] == {4, 16}  # text-only model: text at 4, pivots at 16
    assert st.residual_len == 8
    _, w, _ = run(wht=False)
    assert w[0] == {4, 16}
    _, w, _ = run(text_4bit=False)
    assert w[0] == {2, 16}
    _, w, st = run(pivots=False)
    assert w[0] == {4} and st.residual_len == 0  # no pivots, no recent window
    _, w, _ = run(wht=False, text_4bit=False, pivots=False)  # = RTN INT2 (clip 0.8)
    assert w[0] == {2} and w[1] == {2}
    _, w, _ = run(tsa_layers=1)  # TSA treatment in layer 0, PSA in layer 1
    assert w[0] == {4} and w[1] == {2, 16}


def test_akvq_bad_input():
    with pytest.raises(ValueError, match="low_bits"):
        get_policy("akvq-vl", low_bits=3)
    with pytest.raises(ValueError, match="recent"):
        get_policy("akvq-vl", recent=-1)
    with pytest.raises(ValueError, match="low_clip"):
        get_policy("akvq-vl", low_clip=1.5)
    with pytest.raises(ValueError, match="num_pivots"):
        get_policy("akvq-vl", num_pivots=-2)
    with pytest.raises(ValueError, match="model"):
        QuantizedKVCache(vlmkv.load_model.__module__ and _planted_llama([]).config, "akvq-vl")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_inspect_attention_on_every_family(name, tmp_path, family):
    from vlmkv.analysis.attention_patterns import inspect_attention, plot_attention
    from vlmkv.cache import text_config

    model, inputs, types, _ = family(name)
    single = {k: (v[:1] if torch.is_tensor(v) and v.shape[0] == 2 and k != "pixel_values" else v) for k, v in inputs.items()}
    # keep row 0's images only where pixel_values are per row
    if name in ("idefics3", "smolvlm"):
        single["pixel_values"] = inputs["pixel_values"][:1]
    elif name == "llava":
        single["pixel_values"] = inputs["pixel_values"][:2]
    elif name == "llava_onevision":
        single["pixel_values"] = inputs["pixel_values"][:2]
        single["image_sizes"] = inputs["image_sizes"][:2]
    elif name == "qwen2_vl":
        n = int(inputs["image_grid_thw"][:2].prod(-1).sum())
        single["pixel_values"] = inputs["pixel_values"][:n]
        single["image_grid_thw"] = inputs["image_grid_thw"][:2]
    impl = text_config(model)._attn_implementation
    rep, maps = inspect_attention(model, single)
    assert text_config(model)._attn_implementation == impl
    assert rep.n_visual == int((types[0] == IMAGE).sum()) and rep.num_layers == 2
    assert len(rep.text[0]) == rep.num_heads and len(rep.visual[0]) == rep.num_heads
    assert set(rep.table_i()) == {"TSA layers", "PSA layers"}
    assert all(p.stat().st_size > 0 for p in plot_attention(rep, maps, tmp_path, bin_size=2))


@torch.no_grad()
@pytest.mark.parametrize("name", ["qwen2_vl", "llava"])
def test_manual_decode_matches_generate(name, family):
    """Hand-written decode steps (teacher forcing) with explicit position ids — M-RoPE deltas for Qwen2-VL —
    give generate()'s greedy tokens."""
    from vlmkv.eval.fidelity import teacher_forced_logits

    model, inputs, *_ = family(name)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with QuantizedKVCache(model, "fp16") as cache:
        gen = model.generate(**inputs, past_key_values=cache, max_new_tokens=6, do_sample=False)
    cont = gen[:, inputs["input_ids"].shape[1]:]
    with QuantizedKVCache(model, get_policy("akvq-vl", recent=100000), residual_dtype=torch.float32) as cache:
        logits = teacher_forced_logits(model, inputs["input_ids"], inputs["attention_mask"], cache, cont, **extra)
    assert torch.equal(logits.argmax(-1), cont)


def test_row_median_equals_torch_median_exactly():
    """The massive-activation statistic's median: the banded search equals torch.median on every row, with ties,
    NaN and rows where the sample's band misses the middle."""
    from vlmkv.models.hooks import row_median

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 200_000, generator=g).abs()
    x[1, :120_000] = 0.5  # ties around the middle
    x[2] = torch.arange(200_000, dtype=torch.float32)
    x[2, ::7] = 1e9  # the strided sample sees a skewed row: its band misses, torch.median decides
    assert torch.equal(row_median(x), x.median(dim=1).values)
    y = x.clone()
    y[0, 5] = float("nan")
    assert torch.equal(row_median(y).isnan(), y.median(dim=1).values.isnan())
    small = torch.randn(2, 1001, generator=g)
    assert torch.equal(row_median(small), small.median(dim=1).values)
