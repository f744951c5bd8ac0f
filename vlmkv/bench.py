"""`vlmkv bench`: decode time and KV bytes of each method on your own model, beside `DynamicCache`.

    vlmkv bench --model path/or/hub-id --methods dynamic,rtn-2,kivi-2,akvq-vl --context 2048 --batch 1,4

Protocol: a prompt of `--context` tokens (a fixed English passage repeated; text only, also for a VLM) is
prefilled through the model's own forward with each method's cache (so every policy sees the prompt as in real
use), then `--steps` single-token greedy decode steps are timed after 2 warm-up steps; the median is reported.
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


@torch.no_grad()
def bench(model, tok, methods: list[str], context: int = 1024, batches=(1,), steps: int = 16, progress=True) -> list[dict]:
    """One row per (batch, method): decode ms/step (median), tokens/s, prefill s, KV bytes, bits per element,
    and the ratio of each to DynamicCache's where it ran."""
    from tqdm import tqdm
    from transformers import DynamicCache

    from .cache import QuantizedKVCache

    if not methods:
        raise ValueError("methods must name at least one method, got none")
    device = next(model.parameters()).device
    rows = []
    for batch in batches:
        ids = prompt_ids(tok, context, batch).to(device)
        ref = None
        for method in tqdm(methods, desc=f"context {context}, batch {batch}", disable=not progress, file=sys.stderr):
            cache = DynamicCache(config=model.config) if method == "dynamic" else QuantizedKVCache(model, method, tokenizer=tok)
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
                if method == "dynamic":
                    nbytes = dynamic_bytes(cache)
                    n_el = sum(layer.keys.numel() * 2 for layer in cache.layers if getattr(layer, "keys", None) is not None)
                else:
                    nbytes, n_el = cache.nbytes(), cache.num_elements()
            finally:
                if method != "dynamic":
                    cache.close()
            ms = 1000 * statistics.median(times)
            row = {"method": method, "context": context, "batch": batch, "decode_ms": round(ms, 2),
                   "tokens_per_s": round(1000 * batch / ms, 1), "prefill_s": round(prefill, 3), "kv_bytes": int(nbytes),
                   "bits_per_element": round(8 * nbytes / max(1, n_el), 3)}
            if method == "dynamic":
                ref = row
            rows.append(row)
        for row in rows:
            if ref is not None and row["batch"] == batch:
                row["time_vs_dynamic"] = round(row["decode_ms"] / ref["decode_ms"], 3)
                row["bytes_vs_dynamic"] = round(row["kv_bytes"] / ref["kv_bytes"], 3)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| method | context | batch | decode ms/step | tokens/s | prefill s | KV MiB | bits/element | "
             "time vs dynamic | bytes vs dynamic |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['context']} | {r['batch']} | {r['decode_ms']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['prefill_s']:.3f} | {r['kv_bytes'] / 2**20:.2f} | {r['bits_per_element']:.2f} | "
                     f"{r.get('time_vs_dynamic', float('nan')):.2f} | {r.get('bytes_vs_dynamic', float('nan')):.3f} |")
    return "\n".join(lines)
