"""Each baseline before and after it was made faithful to its paper, on SmolLM2-135M's real keys, values and
queries: attention-output error and key/value reconstruction error per layer, bits per element from bytes, and the
model's teacher-forced next-token KL against the full-precision cache.

    python benchmarks/baseline_fidelity.py --context 1024 --steps 64 --out docs/baseline_fidelity.json

Text: the first `--context` + `--steps` tokens of the Debian license texts (as `long_fidelity.py`). One forward pass
records every layer's post-RoPE queries, keys and values. Per layer, each configuration's `LayerStore` takes the
first `--context` tokens as its prompt, then the rest one token at a time, exactly as the cache does; at each step
the step's real query attends over the store as that step's attention reads it (`segment_attention`) and over the
exact keys and values. Reported, averaged over layers and steps:
* attention error: ||o - o*|| / ||o*|| of the attention output (all query heads of the step);
* K / V error: ||X' - X|| / ||X|| of the keys / values held after the last step;
* bits/element: the stores' bytes after the last step x 8 / elements;
* KL, top-1: the model end to end (`QuantizedKVCache`), teacher-forced over the `--steps` tokens.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.integrations.sdpa_attention import sdpa_attention_forward

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import vlmkv  # noqa: E402
from long_fidelity import corpus  # noqa: E402
from vlmkv.attention import segment_attention  # noqa: E402
from vlmkv.eval.fidelity import next_token_kl, teacher_forced_logits, top1_agreement  # noqa: E402
from vlmkv.policies import PrefillContext, get_policy  # noqa: E402
from vlmkv.storage import LayerStore  # noqa: E402

# (label, method, options): each changed baseline as it was ("before") and as it is now ("after")
CONFIGS = [
    ("rtn-2 (unchanged, for scale)", "rtn", {"bits": 2}),
    ("kivi-2 before: blocks", "kivi", {"bits": 2, "schedule": "blocks"}),
    ("kivi-2 after: reference schedule", "kivi", {"bits": 2}),
    ("kivi-4 before: blocks", "kivi", {"bits": 4, "schedule": "blocks"}),
    ("kivi-4 after: reference schedule", "kivi", {"bits": 4}),
    ("skvq before: sorted groups, clip 0.9", "skvq", {"grouping": "sorted", "clip_ratio": 0.9}),
    ("skvq: sorted groups, calibrated clips", "skvq", {"grouping": "sorted"}),
    ("skvq: k-means groups, clip 0.9", "skvq", {"clip_ratio": 0.9}),
    ("skvq after: k-means groups, calibrated clips", "skvq", {}),
    ("skvq K2V1.5 (k-means, calibrated)", "skvq", {"value_bits": 1.5}),
    ("smoothquant-2 before: power-of-two scales", "smoothquant", {"bits": 2, "exact_scales": False}),
    ("smoothquant-2 after: exact scales", "smoothquant", {"bits": 2, "exact_scales": True}),
]


def record(model, ids) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every layer's (q `[1, Hq, S, D]`, k, v `[1, Hkv, S, D]`) as its attention received them."""
    seen = []

    def rec(module, query, key, value, attention_mask, **kw):
        seen.append((query.detach().clone(), key.detach().clone(), value.detach().clone()))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("vlmkv_record", rec)
    AttentionMaskInterface.register("vlmkv_record", sdpa_mask)  # else the mask silently becomes None
    orig = model.config._attn_implementation
    model.set_attn_implementation("vlmkv_record")
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        model.set_attn_implementation(orig)
    return seen


def layer_errors(policy, layer_idx, q, k, v, context: int, scaling: float, dtype) -> dict:
    """Simulate one layer's cache under `policy`: prefill `context` tokens, then one token a step."""
    rule = policy.decode_rule(layer_idx)
    ctx = PrefillContext(keys=k[:, :, :context].to(dtype), values=v[:, :, :context].to(dtype), layer_idx=layer_idx)
    plan = policy.plan_prefill(ctx)
    store = LayerStore(policy.spec, dtype, k.device, torch.float16)
    store.prefill(ctx.keys, ctx.values, plan.bits, plan.residual, plan.channel_scales, plan.channel_perm,
                  rule.value_window, plan.spec_fields)
    errs = []
    for t in range(context, k.shape[-2]):
        store.append(k[:, :, t:t + 1].to(dtype), v[:, :, t:t + 1].to(dtype), rule.bits, rule.keep_recent,
                     rule.flush_every, rule.value_window, rule.after_attention)
        qt = q[:, :, t:t + 1].float()
        got = segment_attention(qt, store, None, scaling).transpose(1, 2).float()  # [1, Hq, 1, D]
        store.settle()
        r = qt.shape[1] // k.shape[1]
        kk, vv = (x[:, :, :t + 1].float().repeat_interleave(r, 1) for x in (k, v))
        want = torch.softmax(qt @ kk.transpose(-1, -2) * scaling, -1) @ vv
        errs.append(float((got - want).norm() / want.norm()))
    mk, mv = store.materialize()
    return {"attn": sum(errs) / len(errs),
            "k": float((mk.float() - k.float()).norm() / k.float().norm()),
            "v": float((mv.float() - v.float()).norm() / v.float().norm()),
            "bytes": store.nbytes(), "elements": store.num_elements()}


@torch.no_grad()
def run(args) -> list[dict]:
    model, tok = vlmkv.load_model(args.model)
    n = args.context + args.steps
    ids = tok(corpus(args.text), add_special_tokens=False, return_tensors="pt")["input_ids"][:, :n]
    seen = record(model, ids)
    scaling = seen[0][0].shape[-1] ** -0.5
    dtype = seen[0][1].dtype
    prompt, cont = ids[:, :args.context], ids[:, args.context:]
    mask = torch.ones_like(prompt)
    ref = teacher_forced_logits(model, prompt, mask, DynamicCache(config=model.config), cont)
    rows = []
    for label, method, opts in tqdm(CONFIGS, desc="configurations", file=sys.stderr):
        policy = get_policy(method, **opts)
        t0 = time.perf_counter()
        per = [layer_errors(policy, i, q, k, v, args.context, scaling, dtype) for i, (q, k, v) in enumerate(seen)]
        with vlmkv.QuantizedKVCache(model, policy) as cache:
            got = teacher_forced_logits(model, prompt, mask, cache, cont)
        kl = next_token_kl(ref, got)
        L = len(per)
        rows.append({"config": label, "method": method, "options": opts,
                     "attention_error": round(sum(p["attn"] for p in per) / L, 4),
                     "key_error": round(sum(p["k"] for p in per) / L, 4),
                     "value_error": round(sum(p["v"] for p in per) / L, 4),
                     "bits_per_element": round(8 * sum(p["bytes"] for p in per) / sum(p["elements"] for p in per), 3),
                     "kl": round(float(kl.mean()), 5),
                     "top1": round(float(top1_agreement(ref, got).mean()), 4),
                     "seconds": round(time.perf_counter() - t0, 1)})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| configuration | bits/element | attention error | K error | V error | next-token KL | top-1 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['bits_per_element']:.2f} | {r['attention_error']:.3f} | "
                     f"{r['key_error']:.3f} | {r['value_error']:.3f} | {r['kl']:.4f} | {r['top1']:.3f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--text", default=None, help="a text file instead of the Debian license texts")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args()
    rows = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
