"""Peak process memory, prefill overhead and batch scaling on SmolLM2-135M (CPU), per KV method.

    python benchmarks/memory_bench.py --context 2048 --batches 1,8 --out docs/memory_bench.json

Each method runs in its own subprocess (so the peak resident set, `ru_maxrss`, is that method's alone):
load the model, prefill `--context` tokens of real text at each batch size, decode `--steps` tokens.
Reported: peak RSS (and its rise over the RSS after loading the model), the RSS while decoding (after the
decode steps, cache alive, freed memory handed back to the OS with malloc_trim), prefill time (and its overhead over `dynamic`: quantization, packing and the policy's
planning), decode ms per step and tokens/s, KV bytes. Max batch under a KV budget (the seed's Table IV
grows the batch until the GPU runs out of memory; on this CPU we divide a fixed budget, `--kv-budget-gib`,
by the measured KV bytes per sequence).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("The history of the city begins with a small settlement on the river bank, where traders met to "
        "exchange salt, grain and cloth. Over the centuries the market grew into a town with walls. ")


def _rss_mib() -> float:
    """The process's resident set now (Linux), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _trim() -> None:
    """glibc's malloc_trim(0), where there is one."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def one(method: str, context: int, batches: list[int], steps: int) -> dict:
    import torch
    from transformers import DynamicCache

    sys.path.insert(0, str(ROOT))
    import vlmkv

    torch.manual_seed(0)
    model, tok = vlmkv.load_model("smollm2-135m")
    base = tok(TEXT, add_special_tokens=False)["input_ids"]
    ids1 = torch.tensor([(base * (context // len(base) + 1))[:context]])
    out = {"method": method, "context": context, "runs": [],
           "load_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    for b in batches:
        ids = ids1.repeat(b, 1)
        cache = DynamicCache(config=model.config) if method == "dynamic" else vlmkv.QuantizedKVCache(model, method)
        with torch.no_grad():
            t0 = time.perf_counter()
            # logits of the last token only: full-vocabulary logits of every prompt token (3 GiB at batch 8)
            # would be the peak, hiding the cache
            o = model(input_ids=ids, **vlmkv.cache_kwargs(cache), logits_to_keep=1)
            t_prefill = time.perf_counter() - t0
            nxt = o.logits[:, -1:].argmax(-1)
            times = []
            for s in range(steps + 1):
                t0 = time.perf_counter()
                o = model(input_ids=nxt, **vlmkv.cache_kwargs(cache), logits_to_keep=1)
                if s:
                    times.append(time.perf_counter() - t0)
                nxt = o.logits[:, -1:].argmax(-1)
        _trim()  # hand freed prefill memory back to the OS first: otherwise glibc keeps it and RSS hides the cache
        rss_now = _rss_mib()  # steady state while decoding: the model and the cache
        if method == "dynamic":
            kv = sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers)
        else:
            kv = cache.nbytes()
            cache.close()
        out["runs"].append({"batch": b, "prefill_s": t_prefill, "decode_ms": 1000 * statistics.median(times),
                            "tokens_per_s": b / statistics.median(times), "kv_bytes": kv,
                            "rss_decoding_mib": rss_now})
        del cache
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="dynamic,rtn-2,rtn-4,kivi-2,smoothquant-2,akvq-vl,windowquant")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--kv-budget-gib", type=float, default=1.0)
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.child:
        print(json.dumps(one(args.child, args.context, batches, args.steps)))
        return
    from tqdm import tqdm

    rows = []
    for m in tqdm(args.methods.split(","), file=sys.stderr):
        r = subprocess.run([sys.executable, __file__, "--child", m, "--context", str(args.context), "--batches",
                            args.batches, "--steps", str(args.steps)], capture_output=True, text=True)
        if r.returncode:
            rows.append({"method": m, "error": r.stderr.strip().splitlines()[-1][:200]})
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    base = {run["batch"]: run["prefill_s"] for run in rows[0]["runs"]} if rows and "runs" in rows[0] else {}
    budget = args.kv_budget_gib * 2 ** 30
    print(f"context {args.context}, SmolLM2-135M float32, CPU; KV budget for max batch: {args.kv_budget_gib} GiB")
    print("| method | batch | peak RSS MiB | peak over model load MiB | RSS while decoding MiB | prefill s | "
          "prefill overhead vs dynamic | decode ms/step | tokens/s | KV MiB | max batch in budget |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | error: {r['error']} |||||||||")
            continue
        for run in r["runs"]:
            per_seq = run["kv_bytes"] / run["batch"]
            over = run["prefill_s"] / base.get(run["batch"], run["prefill_s"]) - 1
            print(f"| {r['method']} | {run['batch']} | {r['peak_rss_mib']:.0f} | "
                  f"{r['peak_rss_mib'] - r['load_rss_mib']:.0f} | {run['rss_decoding_mib']:.0f} | {run['prefill_s']:.2f} | "
                  f"{100 * over:+.0f}% | "
                  f"{run['decode_ms']:.1f} | {run['tokens_per_s']:.1f} | {run['kv_bytes'] / 2**20:.1f} | {int(budget // per_seq)} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
