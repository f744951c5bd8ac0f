"""AKVQ-VL's headline on a GPU: a LLaVA-1.5-7B-shaped model (random weights: speed and memory do not depend on
them), prompts of about 500 tokens with one image, FP16 `DynamicCache` against `akvq-vl` (and any other
method): peak CUDA memory, max batch (the seed's Table IV protocol: grow the batch until out of memory) and
decode throughput at each method's max batch, as ratios beside the paper's 2.13x / 3.25x / 2.46x.

    python benchmarks/gpu_headline.py --methods dynamic,akvq-vl --new-tokens 128 --out docs/gpu_headline.json
    python benchmarks/gpu_headline.py --tiny          # a tiny LLaVA on the CPU: checks the script runs

Prompt: `--image-size 224` gives CLIP-L/14's 256 visual tokens, plus `--text-tokens 250` of text (about 500,
as the seed's setting). Each method runs in its own subprocess so every peak is its own.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAPER = {"peak_memory": 2.13, "max_batch": 3.25, "throughput": 2.46}  # seed 002, LLaVA-v1.5-7B, FP16 / AKVQ-VL


def build(tiny: bool, image_size: int, device: str):
    import torch
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    if tiny:
        vc = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=14, projection_dim=64)
        tc = dict(model_type="llama", vocab_size=32064, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4)
    else:  # llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 + Vicuna-7B
        vc = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=image_size, patch_size=14, projection_dim=768)
        tc = dict(model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    cfg = LlavaConfig(text_config=tc, vision_config=vc.to_dict(), image_token_index=32000, vision_feature_layer=-2)
    dtype = torch.float32 if device == "cpu" else torch.float16
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    return model


def inputs(batch: int, image_size: int, text_tokens: int, device: str, dtype):
    import torch

    n_img = (image_size // 14) ** 2
    g = torch.Generator().manual_seed(0)
    text = torch.randint(2, 32000, (batch, text_tokens), generator=g)
    ids = torch.cat([text[:, :8], torch.full((batch, n_img), 32000), text[:, 8:]], 1).to(device)
    px = torch.randn(batch, 3, image_size, image_size, generator=g).to(device, dtype)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": px}


def run_once(model, method: str, batch: int, args, device: str) -> dict:
    """Prefill + `new_tokens` greedy decode at `batch`; peak memory, decode tokens/s, KV bytes."""
    import torch
    from transformers import DynamicCache

    sys.path.insert(0, str(ROOT))
    import vlmkv

    dtype = next(model.parameters()).dtype
    x = inputs(batch, args.image_size, args.text_tokens, device, dtype)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cache = DynamicCache(config=model.config.text_config) if method == "dynamic" else vlmkv.QuantizedKVCache(model, method)
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model(**x, **vlmkv.cache_kwargs(cache), use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            mask = x["attention_mask"]
            del out
            if device == "cuda":
                torch.cuda.synchronize()
            t_prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(args.new_tokens):
                mask = torch.cat([mask, mask[:, -1:]], 1)
                out = model(input_ids=nxt, attention_mask=mask, **vlmkv.cache_kwargs(cache), use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
                del out
            if device == "cuda":
                torch.cuda.synchronize()
            t_decode = time.perf_counter() - t0
        kv = (sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers) if method == "dynamic"
              else cache.nbytes())
    finally:
        if method != "dynamic":
            cache.close()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"batch": batch, "prompt_tokens": x["input_ids"].shape[1], "prefill_s": t_prefill,
            "decode_tokens_per_s": batch * args.new_tokens / t_decode, "kv_bytes": kv, "peak_bytes": peak}


def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def one(method: str, args) -> dict:
    import torch

    device = "cpu" if args.tiny else "cuda"
    torch.manual_seed(0)
    model = build(args.tiny, args.image_size, device)
    res = {"method": method, "at_batch": run_once(model, method, args.batch, args, device)}
    # max batch: double until OOM (or --max-batch), then bisect
    lo, hi, best = 0, None, None
    b = args.batch
    while hi is None:
        try:
            best, lo = run_once(model, method, b, args, device), b
        except Exception as e:  # noqa: BLE001 - only OOM ends the search
            if not is_oom(e):
                raise
            hi = b
            break
        if b >= args.max_batch:
            break
        b = min(2 * b, args.max_batch)
    while hi is not None and hi - lo > max(1, lo // 16):
        mid = (lo + hi) // 2
        try:
            best, lo = run_once(model, method, mid, args, device), mid
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            hi = mid
    res["max_batch"] = lo
    res["at_max_batch"] = best
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="dynamic,akvq-vl")
    p.add_argument("--batch", type=int, default=8, help="batch for the peak-memory comparison")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--text-tokens", type=int, default=250)
    p.add_argument("--max-batch", type=int, default=4096, help="stop growing the batch here")
    p.add_argument("--tiny", action="store_true", help="a tiny LLaVA on the CPU (checks the script, no GPU)")
    p.add_argument("--out", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args)))
        return
    if not args.tiny:
        import torch

        if not torch.cuda.is_available():
            sys.exit("needs a CUDA GPU (use --tiny for a CPU check of the script)")
    results = []
    for m in args.methods.split(","):
        cmd = [sys.executable, __file__, "--one", m, "--batch", str(args.batch), "--new-tokens", str(args.new_tokens),
               "--image-size", str(args.image_size), "--text-tokens", str(args.text_tokens),
               "--max-batch", str(args.max_batch)] + (["--tiny"] if args.tiny else [])
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"{m} failed:\n{r.stderr[-3000:]}")
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
        a = results[-1]
        print(f"{m:<10} batch {args.batch}: peak {a['at_batch']['peak_bytes'] or 0:,} B, KV {a['at_batch']['kv_bytes']:,} B; "
              f"max batch {a['max_batch']}, {a['at_max_batch']['decode_tokens_per_s']:.1f} tokens/s there", flush=True)
    base = results[0]
    for r in results[1:]:
        pk = base["at_batch"]["peak_bytes"], r["at_batch"]["peak_bytes"]
        r["ratios"] = {
            "peak_memory": pk[0] / pk[1] if pk[1] else None,
            "kv_bytes": base["at_batch"]["kv_bytes"] / r["at_batch"]["kv_bytes"],
            "max_batch": r["max_batch"] / max(1, base["max_batch"]),
            "throughput": r["at_max_batch"]["decode_tokens_per_s"] / base["at_max_batch"]["decode_tokens_per_s"],
            "paper": PAPER}
        print(f"{r['method']} vs {base['method']}: " + ", ".join(
            f"{k} {v:.2f}x" for k, v in r["ratios"].items() if isinstance(v, float)) + f" (paper: {PAPER})")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
