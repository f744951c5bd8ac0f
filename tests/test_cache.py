import pytest
import torch
from transformers import DynamicCache

import vlmkv
from vlmkv import QuantizedKVCache, get_policy, list_policies
from vlmkv.quant import QuantSpec
from vlmkv.storage import LayerStore


def _decode_logits(model, ids, mask, cache, steps=32):
    """Prefill then `steps` greedy decode steps, returning every step's logits."""
    out = model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    logits = [out.logits[:, -1]]
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        out = model(input_ids=nxt, attention_mask=mask, past_key_values=cache)
        logits.append(out.logits[:, -1])
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return torch.stack(logits, 1)


@torch.no_grad()
def test_fp16_bit_identical_to_dynamic_cache_tiny(tiny_llama, padded_batch):
    ids, mask = padded_batch
    ref = _decode_logits(tiny_llama, ids, mask, DynamicCache(config=tiny_llama.config))
    with QuantizedKVCache(tiny_llama, "fp16") as cache:
        got = _decode_logits(tiny_llama, ids, mask, cache)
    assert torch.equal(ref, got)


@pytest.mark.slow
@torch.no_grad()
def test_fp16_bit_identical_to_dynamic_cache_smollm2(smollm2):
    model, tok = smollm2
    x = tok(["The quick brown fox jumps over the lazy dog because", "Paris is"], return_tensors="pt", padding=True)
    ref = _decode_logits(model, x["input_ids"], x["attention_mask"], DynamicCache(config=model.config))
    with QuantizedKVCache(model, "fp16") as cache:
        got = _decode_logits(model, x["input_ids"], x["attention_mask"], cache)
    assert torch.equal(ref, got)


# windowquant's default 3-bit budget is below what 2-bit codes cost at head dim 32 (group 32: 3.25 bits with the
# slot map): the cache refuses it at construction, so the tiny model's case names a budget it can meet
POLICY_CASES = [(name, {"windowquant": {"budget": 4.0}, "auto": {"bits": 5.0}}.get(name, {})) for name in list_policies()] + [("rtn", {"bits": 2}), ("kivi", {"bits": 4, "residual_length": 32, "group_size": 16})]


@pytest.mark.parametrize("name,opts", POLICY_CASES, ids=lambda v: str(v))
@torch.no_grad()
def test_every_policy_through_generate(tiny_llama, padded_batch, name, opts):
    ids, mask = padded_batch
    n = ids.shape[1]
    # greedy
    with QuantizedKVCache(tiny_llama, name, **opts) as cache:
        out = tiny_llama.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=40,
                                  min_new_tokens=40, do_sample=False)
        assert out.shape == (2, n + 40)
        assert cache.get_seq_length() == n + 39  # the last token is produced, not cached
        assert cache.nbytes() > 0 and cache.fp16_nbytes() == 2 * 2 * 2 * 2 * 32 * 2 * (n + 39)  # layers, rows, heads, K+V, D, bytes
    # sampling with a seed is reproducible
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        with QuantizedKVCache(tiny_llama, name, **opts) as cache:
            outs.append(tiny_llama.generate(input_ids=ids, attention_mask=mask, past_key_values=cache,
                                            max_new_tokens=12, do_sample=True, top_k=20))
    assert torch.equal(outs[0], outs[1])
    # beam search (reorder_cache): one beam is greedy search; three beams keep 2 x 3 rows of every layer, each as
    # long as the sequence so far, and give the same answer twice
    with QuantizedKVCache(tiny_llama, name, **opts) as cache:
        one = tiny_llama.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=10,
                                  min_new_tokens=10, num_beams=1, do_sample=False)
    with QuantizedKVCache(tiny_llama, name, **opts) as cache:
        greedy = tiny_llama.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=10,
                                     min_new_tokens=10, do_sample=False)
    assert torch.equal(one, greedy)
    beams = []
    for _ in range(2):
        with QuantizedKVCache(tiny_llama, name, **opts) as cache:
            beams.append(tiny_llama.generate(input_ids=ids, attention_mask=mask, past_key_values=cache,
                                             max_new_tokens=10, min_new_tokens=10, num_beams=3, do_sample=False))
            rows = {(layer.store.res_k if layer.store.res_k is not None and layer.store.res_k.numel()
                     else next(iter(layer.store.segments.values())).k.codes if layer.store.segments else None)
                    .shape[0] for layer in cache.layers}
            assert rows == {6} and cache.get_seq_length() == n + 9
    assert torch.equal(beams[0], beams[1]) and beams[0].shape == (2, n + 10)
    assert torch.equal(beams[0][:, :n], ids)


@pytest.mark.parametrize("name,opts", POLICY_CASES + [("auto", {"bits": 2.5, "evict": True})], ids=lambda v: str(v))
@torch.no_grad()
def test_a_later_prompt_attends_to_itself_unquantized(tiny_llama, name, opts):
    """A multi-token call after the prompt (a second question, a chunk) reads what the cache stores of every earlier
    token and its own tokens unquantized, as the first prompt reads itself: its logits are those of a DynamicCache
    holding the cache's dequantized keys and values with the call's own after them (evicted slots masked per layer)."""
    from vlmkv import cache_kwargs

    ids = torch.randint(5, 250, (1, 150), generator=torch.Generator().manual_seed(11))
    follow = torch.randint(5, 250, (1, 9), generator=torch.Generator().manual_seed(12))
    with QuantizedKVCache(tiny_llama, name, **opts) as cache:
        tiny_llama(input_ids=ids, **cache_kwargs(cache), use_cache=True)
        before = [layer._stored() for layer in cache.layers]
        got = tiny_llama(input_ids=follow, **cache_kwargs(cache), use_cache=True).logits
        # what the call read of the earlier tokens: the store after the append (where the decode rule flushes
        # before attending) or before it (a rule that flushes after: KIVI's)
        held = [b if (layer.rule or layer.policy.decode_rule(i)).after_attention else layer._stored()
                for i, (b, layer) in enumerate(zip(before, cache.layers))]
        lives = [layer.store.live()[:, :150] for layer in cache.layers]
    ref = DynamicCache(config=tiny_llama.config)
    for i, (k, v) in enumerate(held):
        ref.update(k[..., :150, :], v[..., :150, :], i)
    _compare_layers_with_holes(tiny_llama, follow, ref, lives, got)


def _compare_layers_with_holes(model, follow, ref, lives, got):
    """The logits of `follow` over DynamicCache `ref` where layer i masks the slots `lives[i]` (bool [1, L]) marks
    dead (all True: no eviction, the plain causal mask), through a pre-hook on each attention module that rewrites its
    mask."""
    from vlmkv import cache_kwargs
    from vlmkv.attention import mask_evicted

    hooks = []
    for i, layer in enumerate(model.model.layers):
        live = torch.cat([lives[i], torch.ones(1, follow.shape[1], dtype=torch.bool)], 1)

        def pre(module, args, kwargs, live=live):
            kwargs["attention_mask"] = mask_evicted(kwargs.get("attention_mask"), live, follow.shape[1])
            return args, kwargs

        hooks.append(layer.self_attn.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        want = model(input_ids=follow, **cache_kwargs(ref), use_cache=True).logits
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_beam_search_fp16_matches_dynamic(tiny_llama, padded_batch):
    ids, mask = padded_batch
    ref = tiny_llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, num_beams=3, do_sample=False)
    with QuantizedKVCache(tiny_llama, "fp16") as cache:
        got = tiny_llama.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=10,
                                  num_beams=3, do_sample=False)
    assert torch.equal(ref, got)


@torch.no_grad()
def test_crop_and_continue_matches_fresh_run(tiny_llama):
    """Cropping back and feeding the same tokens again gives the same logits as never having cropped."""
    ids = torch.randint(3, 256, (1, 50), generator=torch.Generator().manual_seed(0))
    for name in ("fp16", "rtn-8"):
        cache = QuantizedKVCache(tiny_llama, name)
        tiny_llama(input_ids=ids[:, :40], past_key_values=cache)
        a = tiny_llama(input_ids=ids[:, 40:41], past_key_values=cache).logits
        tiny_llama(input_ids=ids[:, 41:45], past_key_values=cache)
        assert cache.get_seq_length() == 45
        cache.crop(-5)
        assert cache.get_seq_length() == 40
        assert cache.get_mask_sizes(1, 0) == (41, 0)
        b = tiny_llama(input_ids=ids[:, 40:41], past_key_values=cache).logits
        assert torch.allclose(a, b, atol=1e-5), name
        cache.close()


@torch.no_grad()
def test_crop_into_quantized_segments(tiny_llama):
    ids = torch.randint(3, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    cache = QuantizedKVCache(tiny_llama, "rtn-8")
    tiny_llama(input_ids=ids[:, :48], past_key_values=cache)
    cache.crop(-16)  # all 16 dropped tokens live in the 8-bit segment
    assert cache.get_seq_length() == 32
    k, v = cache.layers[0].store.materialize()
    assert k.shape[-2] == 32
    out = tiny_llama(input_ids=ids[:, 32:33], past_key_values=cache)
    cache.close()  # the shared tiny model gets its attention implementation back
    assert torch.isfinite(out.logits).all() and cache.get_seq_length() == 33


def test_kivi_never_quantizes_incomplete_channel_groups(tiny_llama):
    """KIVI keys are per-channel over groups of tokens: a flush of too few tokens would quantize groups
    with min == max. Only complete groups may reach the quantizer; the rest waits in the residual."""
    pol = get_policy("kivi", bits=2, group_size=16, residual_length=32)
    cache = QuantizedKVCache(tiny_llama, pol)
    ids = torch.randint(3, 256, (1, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tiny_llama(input_ids=ids, past_key_values=cache)
        store = cache.layers[0].store
        assert store.residual_len == 70 % 32 and store.segments[2].n == 64
        for t in range(40):
            tiny_llama(input_ids=ids[:, t:t + 1], past_key_values=cache)
            assert store.segments[2].n % 16 == 0
            assert store.segments[2].k.scale.shape[-2] == store.segments[2].n // 16
            assert store.residual_len < 32
    cache.close()
    assert cache.get_seq_length() == 110


def test_history_is_never_requantized():
    """Flushing appends codes: everything stored before stays byte-identical."""
    spec = lambda bits, kind, d=None: QuantSpec(bits, 32, 1.0, "channel" if kind == "key" else "token")
    store = LayerStore(spec, torch.float32, "cpu")
    torch.manual_seed(0)
    k, v = torch.randn(2, 2, 64, 32), torch.randn(2, 2, 64, 32)
    store.prefill(k, v, torch.full((2, 64), 2), residual=0)
    before = store.segments[2].k.codes.clone(), store.segments[2].k.scale.clone()
    for _ in range(70):
        store.append(torch.randn(2, 2, 1, 32), torch.randn(2, 2, 1, 32), 2, keep_recent=0, flush_every=32)
    seg = store.segments[2]
    assert seg.n == 128
    assert torch.equal(seg.k.codes[:, :, :64], before[0]) and torch.equal(seg.k.scale[:, :, :2], before[1])


def test_mixed_plan_rows_differ_and_slot_order_is_kept():
    """Per-row plans with different counts per width: filler pads the shorter rows, materialize() returns
    every token at its own slot; 16-bit tokens come back exactly."""
    spec = lambda bits, kind, d=None: QuantSpec(bits, 16, 1.0, "token")
    store = LayerStore(spec, torch.float32, "cpu")
    torch.manual_seed(0)
    k, v = torch.randn(2, 3, 50, 16), torch.randn(2, 3, 50, 16)
    bits = torch.full((2, 50), 8)
    bits[0, ::3] = 16
    bits[1, 10:13] = 16
    bits[1, 40:] = 4
    store.prefill(k, v, bits, residual=5)
    kk, vv = store.materialize()
    exact = bits == 16
    exact[:, 45:] = True  # residual
    for r in range(2):
        assert torch.equal(kk[r][:, exact[r]], k[r][:, exact[r]])
        assert torch.allclose(kk[r], k[r], atol=0.25)
    # counts per width differ across rows, so the 16-bit segment has filler in row 1
    assert (store.segments[16].index[1] < 0).sum() == 15 - 3  # row 0: slots 0, 3, ..., 42
    hist = store.bits_histogram()
    assert hist[16] == 15 + 3 + 2 * 5 and hist[4] == 5


@pytest.mark.slow
@torch.no_grad()
def test_two_bit_cache_is_six_times_smaller(smollm2):
    """rtn-2 on a 2048-token cache: 2 bits + a fp16 scale and an int16 zero per 64-channel group
    = 2.5 bits an element, exactly 6.4x smaller than FP16."""
    model, _ = smollm2
    ids = torch.randint(100, 40000, (1, 2048), generator=torch.Generator().manual_seed(0))
    with QuantizedKVCache(model, "rtn-2") as cache:
        model(input_ids=ids, past_key_values=cache)
        ratio = cache.fp16_nbytes() / cache.nbytes()
        assert cache.bits_per_element() == pytest.approx(2.5)
        assert ratio == pytest.approx(6.4) and ratio >= 6.0
        # 30 layers x 3 kv heads x 2048 tokens x 64 channels x (K, V)
        assert cache.num_elements() == 30 * 3 * 2048 * 64 * 2


@torch.no_grad()
def test_hooks_removed_on_close(tiny_llama):
    n0 = len(tiny_llama._forward_pre_hooks)
    with QuantizedKVCache(tiny_llama, "kivi", inspect=True) as cache:
        assert len(tiny_llama._forward_pre_hooks) == n0 + 1
        tiny_llama(input_ids=torch.tensor([[5, 6, 7]]), attention_mask=torch.tensor([[0, 1, 1]]), past_key_values=cache)
        assert cache.inputs["attention_mask"].tolist() == [[0, 1, 1]]
    assert len(tiny_llama._forward_pre_hooks) == n0


def test_bad_input(tiny_llama):
    with pytest.raises(ValueError, match="bits"):
        get_policy("rtn", bits=3)
    with pytest.raises(ValueError, match="bits"):
        get_policy("kivi", bits=16)
    with pytest.raises(ValueError, match="group_size"):
        QuantizedKVCache(tiny_llama, "rtn", group_size=24)  # head_dim 32
    with pytest.raises(ValueError, match="residual_length"):
        get_policy("kivi", residual_length=0)
    with pytest.raises(ValueError, match="residual_length"):
        get_policy("kivi", residual_length=-32)
    with pytest.raises(ValueError, match="clip_ratio"):
        get_policy("rtn", clip_ratio=1.2)
    with pytest.raises(ValueError, match="clip_ratio"):
        get_policy("kivi", clip_ratio=0)
    with pytest.raises(ValueError, match="name"):
        get_policy("nope")
    with pytest.raises(ValueError, match="options"):
        get_policy("rtn", residual=3)
    with pytest.raises(ValueError, match="name_or_path"):
        vlmkv.load_model("")


def test_registry_and_shorthand():
    assert {"fp16", "rtn", "kivi"} <= set(list_policies())
    p = get_policy("rtn-2")
    assert p.bits == 2 and p.name == "rtn"
    assert get_policy("kivi", bits=4).bits == 4


@pytest.mark.parametrize("name", ["rtn-4", "kivi-2", "smoothquant-4", "skvq", "akvq-vl", "windowquant"])
@torch.no_grad()
def test_segment_attention_equals_materialized_attention(tiny_llama, padded_batch, name):
    """Decode attention read segment by segment (chunks, log-sum-exp merge, masks through slot maps) equals
    SDPA over the materialized cache, on a left-padded batch."""
    ids, mask = padded_batch
    import vlmkv.attention as att

    opts = {"recent": 4, "flush_every": 2} if name in ("akvq-vl", "windowquant") else {}
    if name == "windowquant":
        opts["budget"] = 8.0
    if name == "kivi-2":
        opts = {"residual_length": 16, "group_size": 8}
    if name == "skvq":
        opts = {"window": 4, "flush_every": 2, "group_size": 16, "key_bits": 4, "value_bits": 4}
    old = att.CHUNK_TOKENS, att.CHUNK_ELEMENTS
    att.CHUNK_TOKENS, att.CHUNK_ELEMENTS = 16, 1  # several chunks per segment (kernels take whole segments)
    try:
        runs = []
        for seg_attn in (True, False):
            with QuantizedKVCache(tiny_llama, name, segment_attention=seg_attn, **opts) as cache:
                runs.append(_decode_logits(tiny_llama, ids, mask, cache, steps=20))
                if seg_attn:
                    assert cache.layers[0].store.segments  # the segment path was taken
    finally:
        att.CHUNK_TOKENS, att.CHUNK_ELEMENTS = old
    assert (runs[0] - runs[1]).abs().max() < 1e-4


def test_decode_appends_in_place_without_copying_segments():
    """Flushing one token a step (rtn) writes into spare capacity: the segment buffer is reallocated only when
    full (a margin of max(16, n/64) tokens), so most steps copy nothing; the spare bytes are counted."""
    spec = lambda bits, kind, d=None: QuantSpec(bits, 32, 1.0, "token")
    store = LayerStore(spec, torch.float32, "cpu")
    torch.manual_seed(0)
    store.prefill(torch.randn(1, 2, 1024, 32), torch.randn(1, 2, 1024, 32), torch.full((1, 1024), 2), residual=0)
    ptrs = set()
    for _ in range(200):
        store.append(torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32), 2, keep_recent=0, flush_every=1)
        ptrs.add(store.segments[2].kb.codes.data_ptr())
    seg = store.segments[2]
    assert seg.n == 1224 and len(ptrs) <= 12  # a handful of reallocations in 200 steps
    assert seg.capacity - seg.n <= max(16, seg.n // 64) + 1
    exact = 2 * 2 * 1224 * (32 * 2 // 8 + 4)  # K and V, 2 heads, codes + fp16 scale + int16 zero per token
    assert exact <= store.nbytes() <= exact * 1.04


def test_residual_buffer_is_append_only():
    """A recent window (keep 128, flush one a step) pushes into spare room and a flush only moves the start: the
    buffer is reallocated once every ~8 steps, the live tokens stay in slot order, and the spare room is counted in
    nbytes()."""
    spec = lambda bits, kind, d=None: QuantSpec(bits, 32, 1.0, "token")
    store = LayerStore(spec, torch.float32, "cpu", torch.float16)
    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 300, 32), torch.randn(1, 2, 300, 32)
    store.prefill(k[:, :, :200], v[:, :, :200], torch.full((1, 200), 2), residual=128)
    ptrs = set()
    for t in range(200, 300):
        store.append(k[:, :, t:t + 1], v[:, :, t:t + 1], 2, keep_recent=128, flush_every=1)
        ptrs.add(store.residual.kb.data_ptr())
        assert store.residual_len == 128
    assert len(ptrs) <= 100 // 8 + 1
    torch.testing.assert_close(store.res_k.float(), k[:, :, 172:300].half().float())
    assert store.segments[2].n == 172
    kk, _ = store.materialize()
    torch.testing.assert_close(kk[:, :, 172:], k[:, :, 172:].half().float())
    res = store.residual
    assert res.bb is None and res.nbytes() == 2 * res.kb.numel() * 2 and res.kb.shape[-2] <= 128 + 128 // 16 + 1
    assert store.nbytes() >= sum(s.nbytes() for s in store.segments.values()) + res.nbytes()


def test_residual_buffer_holds_no_spare_room_where_nothing_slides():
    """A block that fills and flushes whole (KIVI) never holds more than the block and nothing once flushed; a
    buffer that never flushes (fp16) holds exactly its tokens, so its bytes equal DynamicCache's."""
    spec = lambda bits, kind, d=None: QuantSpec(bits, 32, 1.0, "token")
    torch.manual_seed(0)
    block = LayerStore(spec, torch.float32, "cpu", torch.float16)
    block.prefill(torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32), torch.full((1, 40), 2), residual=8)
    for _ in range(100):
        block.append(torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32), 2, keep_recent=0, flush_every=32)
        assert block.residual.kb.shape[-2] <= 32 and block.residual_len < 32
        if block.residual_len == 0:
            assert block.residual.nbytes() == 0
    grow = LayerStore(spec, torch.float32, "cpu")
    grow.prefill(torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32), torch.full((1, 40), 16), residual=40)
    for _ in range(10):
        grow.append(torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32), 16, keep_recent=0, flush_every=None)
    assert grow.nbytes() == 2 * 2 * 50 * 32 * 4  # K and V in float32; one width for all: no bit map


def test_load_model_never_fetches_hub_kernels(local_llava, smollm2, monkeypatch):
    """transformers 5.25 turns `use_kernels` on by default: compiled layers fetched from the Hub at load time, and no
    load at all without the `kernels` package. vlmkv's loader asks for none, on the VLM and the text-only path."""
    import transformers

    import vlmkv

    seen = []
    for auto in (transformers.AutoModelForImageTextToText, transformers.AutoModelForCausalLM):
        orig = auto.from_pretrained

        def spy(*args, _orig=orig, **kwargs):
            seen.append(kwargs.get("use_kernels"))
            if kwargs.get("use_kernels") is not False:  # recorded; not loaded (that may need the kernels package)
                raise LookupError("spied")
            return _orig(*args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", spy)
    d, _ = local_llava
    vlmkv.load_model(str(d))
    vlmkv.load_model(smollm2[0].name_or_path)
    assert seen == [False, False]
    with pytest.raises(LookupError, match="spied"):  # a caller's own choice still reaches transformers
        vlmkv.load_model(str(d), use_kernels=True)
    assert seen[-1] is True


def test_prompt_reads_cache_makes_the_prompt_attend_to_what_is_stored(tiny_llama):
    """prompt_reads_cache: the prefill attends to what the cache stores, as a paged engine that quantizes on write
    does. Stored as it is (fp16 keeps the model's float32 tokens here), that is the prompt itself, bit for bit;
    stored at 2 bits, the prompt's logits move away from the default prefill's, which attends unquantized."""
    ids = torch.randint(5, 200, (1, 24))

    def logits(policy, **kw):
        with torch.no_grad(), QuantizedKVCache(tiny_llama, policy, residual_dtype=torch.float32, **kw) as cache:
            return tiny_llama(input_ids=ids, past_key_values=cache, use_cache=True).logits[0]

    torch.testing.assert_close(logits("fp16", prompt_reads_cache=True), logits("fp16"), rtol=0, atol=0)
    assert (logits("rtn-2", prompt_reads_cache=True) - logits("rtn-2")).abs().max() > 1e-2
    with pytest.raises(ValueError, match="prompt_reads_cache must be a bool"):
        QuantizedKVCache(tiny_llama, "rtn-2", prompt_reads_cache=1)
