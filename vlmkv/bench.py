"""`vlmkv bench`: decode time and KV bytes of each method on your own model, beside `DynamicCache`.

    vlmkv bench --model path/or/hub-id --methods dynamic,rtn-2,kivi-2,akvq-vl,auto:bits=3.0 --context 2048 --batch 1,4

Protocol: a prompt of `--context` tokens (a fixed English passage repeated; text only, also for a VLM) is
prefilled through the model's own forward with each method's cache (so every policy sees the prompt as in real
use), then `--steps` single-token greedy decode steps are timed after 2 warm-up steps; the median is reported.
DynamicCache runs first and last, and the spread of its two runs is reported beside the ratios (to their mean).
Methods are spelled as for `vlmkv eval` (`auto:bits=3.0`, `rtn-4:group_size=32:zero_point=none`) and are all
checked before the model loads.
KV bytes: `cache.nbytes()` for vlmkv caches (codes, scales, zero points, buffers, index maps), every key and
value tensor for `DynamicCache`; bits per element from those bytes over the cached elements.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

PASSAGE = ("The history of the city begins with a small settlement on the river bank, where traders met to "
           "exchange salt, grain and cloth. Over the centuries the market grew into a town with walls, a cathedral "
           "and a university, and the town became a city whose bridges, printing houses and harbour drew people "
           "from every province. ")


def prompt_ids(tok, context: int, batch: int) -> torch.Tensor:
    """long `[batch, context]`: the passage's tokens repeated to `context` tokens, the same in every row."""
    base = tok(PASSAGE, add_special_tokens=False)["input_ids"]
    ids = (base * (context // len(base) + 1))[:context]
    return torch.tensor([ids] * batch)


def dynamic_bytes(cache) -> int:
    return sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in cache.layers
               if getattr(layer, "keys", None) is not None and torch.is_tensor(layer.keys))


def _forward(model, ids, cache):
    from .cache import cache_kwargs

    try:
        return model(input_ids=ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    except TypeError:  # a model without logits_to_keep
        return model(input_ids=ids, **cache_kwargs(cache), use_cache=True)


def _label(method) -> str:
    return method if isinstance(method, str) else method[0]


def _order(methods: list) -> list:
    """The run order: DynamicCache (where listed) first and again last, so that drift over the run (thermal, other
    load) shows as the spread of its two runs; every other method once, in the order given."""
    rest = [m for m in methods if m != "dynamic"]
    return ["dynamic", *rest, "dynamic"] if "dynamic" in methods and rest else ([*rest] or ["dynamic"])


@torch.no_grad()
def bench(model, tok, methods: list, context: int = 1024, batches=(1,), steps: int = 16, progress=True) -> list[dict]:
    """One row per (batch, method): decode ms/step (median), tokens/s, prefill s, KV bytes, bits per element, the
    share of quantized elements decode read through a fused kernel, and the ratio of each to DynamicCache's.

    methods: "dynamic" (transformers' DynamicCache), registered names (`rtn-2`) or (label, Policy) pairs (what
    `--methods rtn-4:group_size=32` parses to). With "dynamic" and others, DynamicCache runs first and last: its
    rows are "dynamic (first)" and "dynamic (last)", the ratios are to their mean, and `dynamic_spread` (last / first
    decode time - 1) says how much the machine drifted over the run."""
    from tqdm import tqdm
    from transformers import DynamicCache

    from .cache import QuantizedKVCache

    if not methods:
        raise ValueError("methods must name at least one method, got none")
    device = next(model.parameters()).device
    rows = []
    for batch in batches:
        ids = prompt_ids(tok, context, batch).to(device)
        order = _order(methods)
        here = []
        for k, method in enumerate(tqdm(order, desc=f"context {context}, batch {batch}", disable=not progress,
                                        file=sys.stderr)):
            dyn = method == "dynamic"
            if dyn:
                cache = DynamicCache(config=model.config)
            elif isinstance(method, str):
                cache = QuantizedKVCache(model, method, tokenizer=tok)
            else:
                cache = QuantizedKVCache(model, method[1], tokenizer=tok)
            try:
                t0 = time.perf_counter()
                out = _forward(model, ids, cache)
                prefill = time.perf_counter() - t0
                nxt, times = out.logits[:, -1:].argmax(-1), []
                for step in range(steps + 2):
                    t0 = time.perf_counter()
                    out = _forward(model, nxt, cache)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if step >= 2:
                        times.append(time.perf_counter() - t0)
                    nxt = out.logits[:, -1:].argmax(-1)
                if dyn:
                    nbytes = dynamic_bytes(cache)
                    n_el = sum(layer.keys.numel() * 2 for layer in cache.layers if getattr(layer, "keys", None) is not None)
                    reads = None
                else:
                    nbytes, n_el = cache.nbytes(), cache.num_elements()
                    reads = cache.decode_reads()
            finally:
                if not dyn:
                    cache.close()
            ms = 1000 * statistics.median(times)
            label = _label(method)
            if dyn and order.count("dynamic") == 2:
                label = "dynamic (first)" if k == 0 else "dynamic (last)"
            row = {"method": label, "context": context, "batch": batch, "decode_ms": round(ms, 2),
                   "tokens_per_s": round(1000 * batch / ms, 1), "prefill_s": round(prefill, 3), "kv_bytes": int(nbytes),
                   "bits_per_element": round(8 * nbytes / max(1, n_el), 3),
                   "fused_share": None if reads is None else reads["fused_share"]}
            here.append(row)
        refs = [r for r in here if r["method"].startswith("dynamic")]
        if refs:
            ref_ms = statistics.mean(r["decode_ms"] for r in refs)
            ref_pf = statistics.mean(r["prefill_s"] for r in refs)
            spread = round(refs[-1]["decode_ms"] / refs[0]["decode_ms"] - 1, 3) if len(refs) == 2 else None
            for row in here:
                row["time_vs_dynamic"] = round(row["decode_ms"] / ref_ms, 3)
                row["prefill_vs_dynamic"] = round(row["prefill_s"] / ref_pf, 3)
                row["bytes_vs_dynamic"] = round(row["kv_bytes"] / refs[0]["kv_bytes"], 3)
                row["dynamic_spread"] = spread
        rows += here
    return rows


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(rows: list[dict]) -> str:
    """The rows as a table; the fused column is the share of quantized elements decode read through a fused kernel
    (1.00: all; '-': nothing quantized, or DynamicCache)."""
    lines = ["| method | context | batch | decode ms/step | tokens/s | prefill s | KV MiB | bits/element | fused | "
             "time vs dynamic | prefill vs dynamic | bytes vs dynamic |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['context']} | {r['batch']} | {r['decode_ms']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['prefill_s']:.3f} | {r['kv_bytes'] / 2**20:.2f} | {r['bits_per_element']:.2f} | "
                     f"{_fmt(r.get('fused_share'), '.2f')} | {_fmt(r.get('time_vs_dynamic'), '.2f')} | "
                     f"{_fmt(r.get('prefill_vs_dynamic'), '.2f')} | {_fmt(r.get('bytes_vs_dynamic'), '.3f')} |")
    spreads = {(r["context"], r["batch"]): r["dynamic_spread"] for r in rows if r.get("dynamic_spread") is not None}
    for (c, b), sp in spreads.items():
        lines.append(f"\nDynamicCache at context {c}, batch {b}: last run {100 * sp:+.1f}% against the first "
                     f"(ratios are to their mean)")
    return "\n".join(lines)
