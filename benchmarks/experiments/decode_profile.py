"""Where a decode step's time goes: torch profiler over single-token steps on SmolLM2-135M, per cache.

    python benchmarks/experiments/decode_profile.py --context 4096 --methods dynamic,rtn-2,akvq-vl --out docs/decode_profile.json

Same protocol as decode_bench.py (the context prefilled once, each cache filled through its own `update()`),
then `--steps` decode steps under `torch.profiler`. Operators are grouped: the model's matmuls, vlmkv's C++
kernels, PyTorch's own attention, the cache's copies (cat / copy_ / index ops), and everything else, which on
this model is mostly per-op dispatch of many small ops. Times are self CPU time per step; the profiler adds
its own overhead, so compare the shares, and take absolute step times from decode_bench.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from decode_bench import TEXT, make_cache  # noqa: E402

import vlmkv  # noqa: E402

GROUPS = [
    ("model matmuls", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("vlmkv kernels", ("vlmkv_cpu::",)),
    ("torch attention", ("aten::_scaled_dot_product", "aten::scaled_dot_product")),
    ("cache copies", ("aten::cat", "aten::copy_", "aten::index_select", "aten::index", "aten::gather", "aten::scatter")),
]


def group_of(name: str) -> str:
    for g, prefixes in GROUPS:
        if name.startswith(prefixes):
            return g
    return "other ops"


@torch.no_grad()
def profile(model, tok, method: str, ctx: int, steps: int) -> dict:
    base = tok(TEXT, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([(base * (ctx // len(base) + 1))[:ctx]])
    ref = DynamicCache(config=model.config)
    out = model(input_ids=ids, **vlmkv.cache_kwargs(ref), logits_to_keep=1)
    cache = make_cache(method, model)
    for i, layer in enumerate(ref.layers):
        cache.update(layer.keys.clone(), layer.values.clone(), i)
    t = out.logits[:, -1:].argmax(-1)
    for _ in range(2):  # warm-up
        t = model(input_ids=t, **vlmkv.cache_kwargs(cache), logits_to_keep=1).logits[:, -1:].argmax(-1)
    from torch.profiler import profile as tprofile

    with tprofile() as p:
        for _ in range(steps):
            t = model(input_ids=t, **vlmkv.cache_kwargs(cache), logits_to_keep=1).logits[:, -1:].argmax(-1)
    groups, calls, top = defaultdict(float), 0, []
    for e in p.key_averages():
        # only leaf-level self time, so nested ops are not counted twice
        groups[group_of(e.key)] += e.self_cpu_time_total / 1000 / steps
        calls += e.count
        top.append((e.self_cpu_time_total / 1000 / steps, e.key, e.count / steps))
    if isinstance(cache, vlmkv.QuantizedKVCache):
        cache.close()
    top.sort(reverse=True)
    return {"method": method, "context": ctx, "ms_per_step": {k: round(v, 2) for k, v in groups.items()},
            "total_ms": round(sum(groups.values()), 2), "ops_per_step": round(calls / steps),
            "top": [{"op": k, "ms": round(ms, 2), "calls": round(c)} for ms, k, c in top[:8]]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--methods", default="dynamic,rtn-2,akvq-vl")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    model, tok = vlmkv.load_model(args.model)
    rows = [profile(model, tok, m, args.context, args.steps) for m in args.methods.split(",")]
    names = [g for g, _ in GROUPS] + ["other ops"]
    print(f"| method (context {args.context}) | " + " | ".join(names) + " | total ms | ops/step |")
    print("|---|" + "---:|" * (len(names) + 2))
    for r in rows:
        cells = " | ".join(f"{r['ms_per_step'].get(n, 0.0):.1f}" for n in names)
        print(f"| {r['method']} | {cells} | {r['total_ms']:.1f} | {r['ops_per_step']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
