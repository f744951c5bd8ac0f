"""Decode-step time and KV bytes on SmolLM2-135M: DynamicCache vs transformers' QuantizedCache
(quanto, HQQ) vs vlmkv policies, at several context lengths, in one run.

    python benchmarks/decode_bench.py --contexts 1024,4096,16384 --batch 1,8 --out docs/bench_decode.json

Protocol: the context (real text, repeated) is prefilled once with a DynamicCache at batch 1; for each batch
size transformers' caches are filled from those keys/values (repeated over the batch) through their own
`update()`, and vlmkv's by one prefill through the model at batch 1 (its policies read the prompt's activations)
whose rows each batch size repeats (`cache.batch_repeat_interleave`), and we time
`--steps` single-token forward passes (after 2 warm-up steps), reporting the median. KV bytes are
counted from every tensor the cache holds (for transformers' caches: quantized data, scales, zero
points and the residual buffer, found by walking the objects).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache, QuantizedCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vlmkv  # noqa: E402
from vlmkv.bench import PASSAGE as TEXT  # noqa: E402  (the passage `vlmkv bench` uses)



def tensor_bytes(obj, seen=None) -> int:
    """Bytes of every distinct tensor reachable from `obj` (tensors, containers, quanto/hqq objects)."""
    seen = set() if seen is None else seen
    if torch.is_tensor(obj):
        inner = getattr(obj, "__tensor_flatten__", None)
        if inner is not None and type(obj) is not torch.Tensor and not isinstance(obj, torch.nn.Parameter):
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, n), seen) for n in names)
        key = (obj.untyped_storage().data_ptr(), obj.numel(), obj.dtype)
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


def cache_bytes(cache) -> int:
    if isinstance(cache, vlmkv.QuantizedKVCache):
        return cache.nbytes()
    total, seen = 0, set()
    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            total += tensor_bytes(getattr(layer, name, None), seen)
    return total


def make_cache(method: str, model):
    if method.startswith("dynamic"):
        return DynamicCache(config=model.config)
    if method.startswith("hf-"):  # hf-quanto-2, hf-hqq-4
        _, backend, bits = method.split("-")
        return QuantizedCache(backend=backend, config=model.config, nbits=int(bits), q_group_size=64, residual_length=128)
    from vlmkv.cli import _method_entry

    entry = _method_entry(method)  # `vlmkv eval`'s spelling: auto:bits=3.0, rtn-4:group_size=32:zero_point=none
    return vlmkv.QuantizedKVCache(model, entry if isinstance(entry, str) else entry[1])


def bandwidth_gbs(mib: int = 1024, reps: int = 5) -> float:
    """This machine's memory bandwidth (GB/s of bytes read plus written) from copying a buffer far larger than any
    cache, on the threads torch uses: the best of `reps` copies."""
    src = torch.ones(mib * 2**18)  # float32
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


def step_bytes(method: str, kv_bytes: int, weight_bytes: int) -> int:
    """Bytes a decode step must move at least: the model's weights once, the cache read once; DynamicCache also
    writes its whole cache again (each step's torch.cat copies it)."""
    return weight_bytes + kv_bytes * (3 if method.startswith("dynamic") else 1)


@torch.no_grad()
def run(args):
    torch.manual_seed(0)
    model, tok = vlmkv.load_model(args.model)
    base = tok(TEXT, add_special_tokens=False)["input_ids"]
    methods = args.methods.split(",")
    if "dynamic" in methods and len(methods) > 1:  # the baseline first and again last: the spread shows drift
        methods = ["dynamic"] + [m for m in methods if m != "dynamic"] + ["dynamic (last)"]
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gbs = bandwidth_gbs() if args.bandwidth else None
    batches = [int(b) for b in str(args.batch).split(",")]
    rows = []
    for ctx in [int(c) for c in args.contexts.split(",")]:
        # one prefill per context at batch 1 (logits of the last token only); batch b repeats its keys and values
        ids = torch.tensor([(base * (ctx // len(base) + 1))[:ctx]])
        t0 = time.perf_counter()
        ref = DynamicCache(config=model.config)
        out = model(input_ids=ids, **vlmkv.cache_kwargs(ref), logits_to_keep=1)
        t_prefill = time.perf_counter() - t0
        kv1 = [(layer.keys, layer.values) for layer in ref.layers]
        del ref
        nxt1 = out.logits[:, -1:].argmax(-1)
        for method in tqdm(methods, desc=f"context {ctx}", file=sys.stderr):
            filled = None
            for batch in batches:
                row = {"context": ctx, "batch": batch, "method": method}
                try:
                    cache = make_cache(method, model)
                    t0 = time.perf_counter()
                    if isinstance(cache, vlmkv.QuantizedKVCache):
                        # through the model, so that policies see the prompt (pivots need its activations), once
                        # per context at batch 1; each batch size repeats that cache's rows
                        if filled is None:
                            model(input_ids=ids, **vlmkv.cache_kwargs(cache), logits_to_keep=1)
                            filled = cache
                            cache = copy.deepcopy(filled)
                        else:
                            cache.close()
                            cache = copy.deepcopy(filled)
                        if batch > 1:
                            cache.batch_repeat_interleave(batch)
                    else:
                        for i, (k, v) in enumerate(kv1):
                            cache.update(k.repeat(batch, 1, 1, 1), v.repeat(batch, 1, 1, 1), i)
                    row["fill_s"] = round(time.perf_counter() - t0, 4)
                    times = []
                    tok_in = nxt1.repeat(batch, 1)
                    for step in range(args.steps + 2):
                        t0 = time.perf_counter()
                        o = model(input_ids=tok_in, **vlmkv.cache_kwargs(cache), logits_to_keep=1)
                        dt = time.perf_counter() - t0
                        tok_in = o.logits[:, -1:].argmax(-1)
                        if step >= 2:
                            times.append(dt)
                    n_el = 2 * batch * sum(k.numel() for k, _ in kv1) * (ctx + args.steps + 2) / ctx
                    row["decode_ms"] = round(1000 * statistics.median(times), 2)
                    row["tokens_per_s"] = round(batch / statistics.median(times), 1)
                    row["kv_bytes"] = cache_bytes(cache)
                    row["fp16_bytes"] = int(n_el) * 2
                    row["bits_per_element"] = round(8 * row["kv_bytes"] / n_el, 3)
                    if gbs:
                        row["bound_ms"] = round(1000 * step_bytes(method, row["kv_bytes"], weight_bytes) / (gbs * 1e9), 2)
                        row["bandwidth_gbs"] = round(gbs, 2)
                    if isinstance(cache, vlmkv.QuantizedKVCache):
                        row["fused_share"] = cache.decode_reads()["fused_share"]
                        cache.close()
                    del cache
                except Exception as e:  # an alternative that does not run here is recorded, not fatal
                    row["error"] = f"{type(e).__name__}: {e}"[:200]
                rows.append(row)
            if filled is not None:
                filled.close()
        print(f"context {ctx}: prefill {t_prefill:.1f} s", file=sys.stderr)
    rows.sort(key=lambda r: (r["context"], r["batch"]))  # stable: the methods in their run order
    return rows


def plot(rows, path) -> None:
    """Decode ms/step against context, one panel per batch size, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    batches = sorted({r["batch"] for r in ok})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in ok))
    colors = plt.get_cmap("tab20").colors
    for ax, b in zip(axes[0], batches):
        for i, m in enumerate(methods):
            pts = sorted((r["context"], r["decode_ms"]) for r in ok if r["batch"] == b and r["method"] == m)
            # the alternatives solid (DynamicCache black and thick), vlmkv's policies dashed
            style = dict(color="black", lw=2.5) if m.startswith("dynamic") else dict(color=colors[i % 20], lw=1.5)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-" if m.startswith("dynamic") or m.startswith("hf-") else "--",
                    marker="o", label=m, **style)
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="decode ms/step", title=f"batch {b}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def to_markdown(rows) -> str:
    """One line per row; `vs dynamic` is the ratio to the mean of DynamicCache's first and last runs at that context
    and batch; `bound` the least time the step's bytes take at the measured bandwidth (where measured)."""
    lines = ["| context | batch | method | decode ms/step | vs dynamic | bound ms | tokens/s | KV MiB | FP16 MiB | "
             "bits/element | fused |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['context']} | {r['batch']} | {r['method']} | error: {r['error']} | | | | | | | |")
            continue
        ref = [x["decode_ms"] for x in rows if x["method"].startswith("dynamic") and "error" not in x
               and (x["context"], x["batch"]) == (r["context"], r["batch"])]
        ratio = f"{r['decode_ms'] / statistics.mean(ref):.2f}x" if ref else "-"
        bound = f"{r['bound_ms']:.1f}" if "bound_ms" in r else "-"
        fused = f"{r['fused_share']:.2f}" if r.get("fused_share") is not None else "-"
        lines.append(f"| {r['context']} | {r['batch']} | {r['method']} | {r['decode_ms']:.1f} | {ratio} | {bound} | "
                     f"{r['tokens_per_s']:.1f} | {r['kv_bytes'] / 2**20:.2f} | {r['fp16_bytes'] / 2**20:.2f} | "
                     f"{r['bits_per_element']:.2f} | {fused} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--contexts", default="512,2048,8192")
    p.add_argument("--methods", default="dynamic,hf-quanto-2,hf-quanto-4,hf-hqq-2,hf-hqq-4,rtn-2,rtn-4,kivi-2,kivi-4")
    p.add_argument("--batch", default="1", help="batch sizes, comma-separated (e.g. 1,8)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--bandwidth", action="store_true", help="measure memory bandwidth and give each row its bound")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG of ms/step against context here")
    p.add_argument("--from-json", default=None, help="re-print and re-plot the rows of an earlier --out file")
    args = p.parse_args()
    rows = json.loads(Path(args.from_json).read_text()) if args.from_json else run(args)
    md = to_markdown(rows)
    print(md)
    from vlmkv import kernels
    from vlmkv.kernels import cpu

    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; VLMKV_KERNELS={kernels.mode()}, CPU kernels "
          f"{'built' if cpu.load() else 'not built: ' + str(cpu.error())}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
