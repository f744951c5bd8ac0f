"""What a quantized cache adds to prefill: the time its `update()` spends planning (scores, window ranking, clip
searches, calibration), rotating and packing, against the model's own prefill with DynamicCache, on one prompt.

    python benchmarks/prefill_overhead.py --context 4096 --reps 3 --out docs/prefill_overhead.json

Protocol: SmolLM2-135M (embedded) prefills a `--context`-token prompt (the passage `vlmkv bench` uses). The first
7/8 of the prompt is labelled visual (`cache.set_spans`: frames of 64 tokens), the rest text, so that vision-aware
policies plan windows, pivots and questions as on a video prompt. For each method, `--reps` prefills, alternating with
DynamicCache's; the cache side is timed inside the call (every `QuantizedKVLayer.update` of the prefill, planning
included), so that the ratio does not depend on two separate runs' noise. Reported: the model's prefill with
DynamicCache (median), the cache's own time (median) and its share of the model's, the planning time alone
(`cache.plan_seconds()`), and the end-to-end prefill ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vlmkv  # noqa: E402
from vlmkv.bench import prompt_ids  # noqa: E402
from vlmkv.cache import QuantizedKVLayer  # noqa: E402
from vlmkv.labels import IMAGE, TEXT  # noqa: E402

METHODS = "auto:bits=3.0,akvq-vl,windowquant,kivi-2,rtn-2,skvq,smoothquant-2"


def spans(S: int, frame: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 `[1, S]` token types (the first 7/8 visual, the rest text) and long `[1, S]` frame ids."""
    vis = S * 7 // 8
    types = torch.full((1, S), TEXT, dtype=torch.int8)
    types[0, :vis] = IMAGE
    frames = torch.full((1, S), -1, dtype=torch.long)
    frames[0, :vis] = torch.arange(vis) // frame
    return types, frames


@torch.no_grad()
def run(args) -> list[dict]:
    from vlmkv.cli import _method_entry

    model, tok = vlmkv.load_model(args.model)
    ids = prompt_ids(tok, args.context, 1)
    types, frames = spans(args.context)
    spent = [0.0]
    real = QuantizedKVLayer.update

    def timed(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return real(self, *a, **k)
        finally:
            spent[0] += time.perf_counter() - t0

    QuantizedKVLayer.update = timed

    def prefill(cache) -> float:
        t0 = time.perf_counter()
        model(input_ids=ids, **vlmkv.cache_kwargs(cache), use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t0

    rows, base = [], []
    prefill(DynamicCache(config=model.config))  # warm-up
    for method in args.methods.split(","):
        entry = _method_entry(method)
        policy = entry if isinstance(entry, str) else entry[1]
        totals, cache_s, plan_s = [], [], []
        for _ in range(args.reps):
            base.append(prefill(DynamicCache(config=model.config)))
            with vlmkv.QuantizedKVCache(model, policy, tokenizer=tok) as cache:
                cache.set_spans(types, frames)
                spent[0] = 0.0
                totals.append(prefill(cache))
                cache_s.append(spent[0])
                plan_s.append(sum(cache.plan_seconds()))
        rows.append({"method": method, "context": args.context, "prefill_s": round(statistics.median(totals), 3),
                     "cache_s": round(statistics.median(cache_s), 3), "plan_s": round(statistics.median(plan_s), 3)})
        print(f"{method}: cache {rows[-1]['cache_s']:.3f} s", file=sys.stderr)
    QuantizedKVLayer.update = real
    model_s = statistics.median(base)
    for r in rows:
        r["dynamic_prefill_s"] = round(model_s, 3)
        r["cache_share"] = round(r["cache_s"] / model_s, 4)
        r["prefill_vs_dynamic"] = round(r["prefill_s"] / model_s, 3)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| method | context | DynamicCache prefill s | with the cache s | cache's own time s | of which planning s | "
             "cache / model prefill | prefill vs DynamicCache |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['context']} | {r['dynamic_prefill_s']:.2f} | {r['prefill_s']:.2f} | "
                     f"{r['cache_s']:.3f} | {r['plan_s']:.3f} | {100 * r['cache_share']:.1f}% | "
                     f"{r['prefill_vs_dynamic']:.2f}x |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = run(args)
    print(markdown(rows))
    print(f"\n{args.model}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
