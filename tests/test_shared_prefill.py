"""One forward over a prompt, many caches filled from it (`QuantizedKVCache.prefill_from`), and greedy decoding
from a filled cache (`greedy_continuation`): both must equal running the prompt through each cache and `generate()`."""
import json

import pytest
import torch
from test_cache import POLICY_CASES
from test_pocket import _transformers_before

from vlmkv import QuantizedKVCache, get_policy
from vlmkv.eval.fidelity import forced_continuation, greedy_continuation, prefill_logits, teacher_forced_logits


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))


def _filled_pair(model, inputs, policy):
    """(cache prefilled through the model, its last logits), (cache filled from a recording, the recording's logits)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    direct = QuantizedKVCache(model, policy, inspect=True)
    a = prefill_logits(model, ids, mask, direct, **extra)
    rec = QuantizedKVCache(model, "fp16", record_prompt=True)
    first = prefill_logits(model, ids, mask, rec, **extra)
    rec.close()
    shared = QuantizedKVCache(model, policy, inspect=True)
    shared.prefill_from(rec)
    return (direct, a), (shared, first), rec


# the tiny LLaVA's head dim is 16: 2-bit groups of 16 cost 4.5 bits with their slot map, so budgets sit above it
CASES = [(n, {**o, **{"windowquant": {"budget": 6.0}, "auto": {"bits": 6.0}}.get(n, {})}) for n, o in POLICY_CASES]


@pytest.mark.parametrize("name,opts", CASES, ids=lambda v: str(v))
@torch.no_grad()
def test_prefill_from_equals_a_prefill_through_the_model(family, name, opts):
    """Every registered policy, on a padded two-image batch of a tiny LLaVA: the same plan, bytes and decode logits."""
    model, inputs, *_ = family("llava")
    pol = get_policy(name, **opts)
    (direct, a), (shared, first), _ = _filled_pair(model, inputs, pol)
    _close(first, a)
    assert direct.plans.keys() == shared.plans.keys()
    for i, p in direct.plans.items():
        assert torch.equal(p["bits"], shared.plans[i]["bits"]) and p["residual"] == shared.plans[i]["residual"]
    assert direct.nbytes() == shared.nbytes() and direct.get_seq_length() == shared.get_seq_length()
    cont = torch.randint(3, 280, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = inputs["attention_mask"]
    _close(forced_continuation(model, mask, shared, cont, first), forced_continuation(model, mask, direct, cont, a))
    assert direct.nbytes() == shared.nbytes()
    direct.close()
    shared.close()


@pytest.mark.parametrize("fam", ["llava", "qwen2_vl", "idefics3", "smolvlm", "llava_onevision"])
@torch.no_grad()
def test_greedy_from_a_shared_prefill_equals_generate(family, fam):
    """Every VLM family (M-RoPE included), a vision-aware policy that reads labels and activations: the filled cache
    decodes greedily to `generate()`'s tokens and logits, and keeps the labels (visual tokens at 2 bits)."""
    from vlmkv.cache import cache_kwargs

    model, inputs, types, _ = family(fam)
    pol = get_policy("akvq-vl", recent=2, num_pivots=1, group_size=16)
    with QuantizedKVCache(model, pol, inspect=True) as c:
        out = model.generate(**inputs, **cache_kwargs(c), max_new_tokens=5, min_new_tokens=3, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        ref_new = out.sequences[:, inputs["input_ids"].shape[1]:]
        ref_lg = torch.stack(out.logits, dim=1).float()
        ref_bits = {i: p["bits"] for i, p in c.plans.items()}
    (_, _), (shared, first), _ = _filled_pair(model, inputs, pol)
    new, lg = greedy_continuation(model, inputs["attention_mask"], shared, first, 5,
                                  model.generation_config.eos_token_id, 0, min_new_tokens=3)
    assert torch.equal(new, ref_new)
    if fam == "qwen2_vl" and _transformers_before(5, 1):
        # transformers 5.0's generate() places a left-padded row's M-RoPE decode positions its own way (later
        # releases agree with our hand-written steps, models/positions.py); the unpadded row 0 must still match,
        # and vlmkv eval's prompts are single unpadded rows
        lg, ref_lg = lg[:1], ref_lg[:1]
    _close(lg, ref_lg)
    for i, b in ref_bits.items():
        assert torch.equal(shared.plans[i]["bits"], b)
    vis = types == 1  # the labels reached the replayed plan: visual tokens out of the recent window at 2 bits
    assert (shared.plans[0]["bits"][vis] <= 4).all() and (shared.plans[0]["bits"][vis] == 2).any()
    shared.close()


@torch.no_grad()
def test_greedy_continuation_stops_and_pads_as_generate(tiny_llama, padded_batch):
    """End-of-sequence rules: barred for min_new_tokens, a finished row continues with padding, all done stops."""
    ids, mask = padded_batch
    with QuantizedKVCache(tiny_llama, "fp16") as c:
        first = prefill_logits(tiny_llama, ids, mask, c)
        eos = int(first[0].argmax())  # row 0 would end at once
        new, lg = greedy_continuation(tiny_llama, mask, c, first, 4, [eos], pad_token_id=7)
    assert new[0, 0] == eos and (new.shape[1] == 1 or (new[0, 1:] == 7).all())
    with QuantizedKVCache(tiny_llama, "fp16") as c:
        first = prefill_logits(tiny_llama, ids, mask, c)
        new2, _ = greedy_continuation(tiny_llama, mask, c, first, 4, [eos], pad_token_id=7, min_new_tokens=2)
    assert new2[0, 0] != eos and new2.shape == (2, 4)
    with QuantizedKVCache(tiny_llama, "fp16") as c:
        ref = tiny_llama.generate(input_ids=ids, attention_mask=mask, past_key_values=c, max_new_tokens=4,
                                  min_new_tokens=2, do_sample=False, eos_token_id=eos, pad_token_id=7)
    assert torch.equal(new2, ref[:, ids.shape[1]:])


@torch.no_grad()
def test_prefill_from_refuses_what_it_cannot_replay(tiny_llama, padded_batch, family):
    ids, mask = padded_batch
    plain = QuantizedKVCache(tiny_llama, "fp16")
    prefill_logits(tiny_llama, ids, mask, plain)
    with pytest.raises(ValueError, match="record_prompt=True"):
        QuantizedKVCache(tiny_llama, "rtn-4").prefill_from(plain)  # it kept nothing to replay
    with pytest.raises(ValueError, match="record_prompt=True"):
        QuantizedKVCache(tiny_llama, "rtn-4").prefill_from(QuantizedKVCache(tiny_llama, "fp16", record_prompt=True))
    rec = QuantizedKVCache(tiny_llama, "fp16", record_prompt=True)
    prefill_logits(tiny_llama, ids, mask, rec)
    with pytest.raises(ValueError, match="empty cache"):
        plain.prefill_from(rec)
    chunked = QuantizedKVCache(tiny_llama, "fp16", record_prompt=True)
    prefill_logits(tiny_llama, ids[:, :4], mask[:, :4], chunked)
    tiny_llama(input_ids=ids[:, 4:], attention_mask=mask, past_key_values=chunked)  # the rest in a second call
    with pytest.raises(ValueError, match="single forward call"):
        QuantizedKVCache(tiny_llama, "rtn-4").prefill_from(chunked)
    other, *_ = family("llava")
    with pytest.raises(ValueError, match="another model"):
        QuantizedKVCache(other, "rtn-4").prefill_from(rec)
    with pytest.raises(ValueError, match="record_prompt must be a bool"):
        QuantizedKVCache(tiny_llama, "fp16", record_prompt=1)


def test_eval_shares_the_prefill_with_the_same_results(local_llava, tmp_path):
    """`evaluate` with one forward per sample gives the answers, bits and KL of a prefill per method."""
    from vlmkv.cli import main
    from vlmkv.eval.runner import evaluate
    from vlmkv.models.loading import load_model

    d, _ = local_llava
    model, proc = load_model(str(d))
    main(["make-data", "--out", str(tmp_path / "data"), "--tasks", "WhichFrame,Counting", "--samples", "2", "--frames", "4"])
    methods = ["fp16", "rtn-2", ("akvq", get_policy("akvq-vl", recent=2, num_pivots=1, group_size=32)),
               ("auto", get_policy("auto", bits=5.0))]
    runs = {}
    for share in (False, True):
        answers = []
        rows = evaluate(model, proc, tmp_path / "data", ["WhichFrame", "Counting"], methods, max_new_tokens=4,
                        answers=answers, share_prefill=share)
        runs[share] = (rows, answers)
    (r0, a0), (r1, a1) = runs[False], runs[True]
    assert [(a["method"], a["answer"], a["bits"]) for a in a0] == [(a["method"], a["answer"], a["bits"]) for a in a1]
    for x, y in zip(r0, r1):
        assert (x.method, x.task, x.accuracy, x.bits_per_element) == (y.method, y.task, y.accuracy, y.bits_per_element)
        assert x.kl == pytest.approx(y.kl, abs=1e-5) and x.top1 == y.top1


def test_eval_refuses_to_share_where_generate_would_differ(local_llava, tmp_path):
    from vlmkv.cli import main
    from vlmkv.eval.runner import evaluate
    from vlmkv.models.loading import load_model

    d, _ = local_llava
    model, proc = load_model(str(d))
    model.generation_config.repetition_penalty = 1.3
    main(["make-data", "--out", str(tmp_path / "data"), "--tasks", "Counting", "--samples", "1", "--frames", "4"])
    with pytest.raises(ValueError, match="repetition_penalty"):
        evaluate(model, proc, tmp_path / "data", ["Counting"], ["fp16"], max_new_tokens=2, share_prefill=True)
    with pytest.raises(ValueError, match="share_prefill must be"):
        evaluate(model, proc, tmp_path / "data", ["Counting"], ["fp16"], max_new_tokens=2, share_prefill="yes")
    # by default it falls back to a prefill per method through generate(), which applies the penalty
    rows = evaluate(model, proc, tmp_path / "data", ["Counting"], ["fp16"], max_new_tokens=2)
    assert rows and rows[0].n == 1


def test_long_fidelity_rows_equal_with_one_prefill(tiny_llama):
    """benchmarks/long_fidelity.py: filling the DynamicCache reference and each method from one recorded prefill
    gives the rows a prefill per cache gives (KL, top-1, bits)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("lf", Path(__file__).parents[1] / "benchmarks" / "long_fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 256, (1, 420), generator=g)
    methods = [(n, get_policy(n)) for n in ("rtn-2", "kivi-2", "akvq-vl", "skvq")]
    shared = mod.context_rows(tiny_llama, ids[:, :400], ids[:, 400:], methods)
    apart = mod.context_rows(tiny_llama, ids[:, :400], ids[:, 400:], methods, per_method_prefill=True)
    keys = ("method", "bits_per_element", "kl", "top1")
    assert [[r[k] for k in keys] for r in shared] == [[r[k] for k in keys] for r in apart]
    assert shared[0]["kl"] > 0 and shared[0]["bits_per_element"] < 4  # rtn-2 does differ from the reference
    assert shared[0]["describe"].startswith("rtn(bits=2")  # each row names the plan that made it
    # --replace-in: a rerun family's rows take the place of its old rows, every other row stays where it was
    old = [{"context": 400, "method": m, "kl": 1.0} for m in ("FP16", "auto bits=3.0", "kivi-2")]
    new = [{"context": 400, "method": "auto bits=3.0", "kl": 0.5}, {"context": 800, "method": "auto bits=3.0", "kl": 0.6}]
    assert mod.replace_rows(old, new) == [old[0], new[0], old[2], new[1]]
    same = {"model": "m", "text": "t", "steps": 32}
    assert mod.replace_rows([{**r, **same} for r in old], [{**r, **same} for r in new])[1]["kl"] == 0.5
    with pytest.raises(ValueError, match="one setup"):  # another number of steps is another measurement
        mod.replace_rows([{**r, **same} for r in old], [{**r, **same, "steps": 16} for r in new])


def test_prompt_prefill_reference_equals_a_dynamic_cache_prefill(tiny_llama):
    """PromptPrefill.reference (a DynamicCache filled from the recorded keys and values) gives the logits a
    DynamicCache prefilled through the model gives; `shared` must be a bool."""
    from transformers import DynamicCache

    from vlmkv.eval.fidelity import PromptPrefill

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 256, (1, 60), generator=g)
    mask = torch.ones_like(ids[:, :50])
    src = PromptPrefill(tiny_llama, ids[:, :50], mask)
    assert src.shared
    want = teacher_forced_logits(tiny_llama, ids[:, :50], mask, DynamicCache(config=tiny_llama.config), ids[:, 50:])
    torch.testing.assert_close(src.reference(ids[:, 50:]), want)
    with pytest.raises(ValueError, match="shared"):
        PromptPrefill(tiny_llama, ids, torch.ones_like(ids), shared=1)


def test_eval_fidelity_reference_ends_at_the_answers_stop(local_llava, tmp_path):
    """KL and top-1 are teacher-forced on fp16's answer through its end-of-sequence token: a model that stops
    after one token gives two positions (the answer and its stop), never a continuation forced past the stop.
    run.json names the reference, so --resume cannot mix records measured against another one."""
    import json

    from vlmkv.cli import main
    from vlmkv.eval.runner import FIDELITY, build_sample_inputs, evaluate
    from vlmkv.eval.milebench import load_task
    from vlmkv.models.loading import load_model

    d, _ = local_llava
    model, proc = load_model(str(d))
    main(["make-data", "--out", str(tmp_path / "data"), "--tasks", "Counting", "--samples", "1", "--frames", "4"])
    inp = build_sample_inputs(proc, load_task(tmp_path / "data", "Counting", 1)[0])
    model.generation_config.eos_token_id = None
    seq = model.generate(**inp, max_new_tokens=2, do_sample=False)[0, inp["input_ids"].shape[1]:].tolist()
    assert seq[0] != seq[1], seq  # the tiny model's first two tokens differ: the second can act as its stop
    model.generation_config.eos_token_id = seq[1]
    answers = []
    evaluate(model, proc, tmp_path / "data", ["Counting"], ["fp16", "rtn-2"], max_new_tokens=6, answers=answers,
             log_dir=tmp_path / "out")
    recs = [json.loads(x) for x in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert [r["kl_positions"] for r in recs] == [2, 2]
    assert json.loads((tmp_path / "out" / "run.json").read_text())["fidelity"] == FIDELITY


def test_next_token_kl_and_top1_agree_with_torch():
    """The one KL every fidelity figure uses equals torch's kl_div, from logits or log-probabilities alike."""
    from vlmkv.eval.fidelity import next_token_kl, top1_agreement

    g = torch.Generator().manual_seed(0)
    ref, got = torch.randn(2, 5, 50, generator=g), torch.randn(2, 5, 50, generator=g)
    want = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                      reduction="none").sum(-1)
    kl = next_token_kl(ref, got)
    assert kl.shape == (2, 5) and kl.dtype == torch.float32
    torch.testing.assert_close(kl, want)
    torch.testing.assert_close(next_token_kl(ref.log_softmax(-1), got.log_softmax(-1)), want)
    torch.testing.assert_close(next_token_kl(ref, ref + 3.0), torch.zeros(2, 5), atol=1e-6, rtol=0)  # a shift: same p
    assert torch.equal(top1_agreement(ref, got), (ref.argmax(-1) == got.argmax(-1)).float())
    assert top1_agreement(ref, ref).eq(1).all()
