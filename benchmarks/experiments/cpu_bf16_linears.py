"""Prefill time of a bf16 VLM on the CPU: native bf16 linears against `linears_via_fp32` (float32 GEMMs).

    python benchmarks/experiments/cpu_bf16_linears.py --data out/L64 --task Counting --threads 1

Loads `--model` in bf16, builds the first clip of `--task` from `--data` (MileBench format, `vlmkv make-data`),
and times one prefill (a forward over the whole prompt into a DynamicCache, as eval's shared prefill does) and
`--steps` greedy decode steps, first with the native bf16 kernels, then with the linear layers through float32.
Prints the times and how far the last-position logits moved (max |diff|, and whether the argmax agrees).
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="pocket-long")
    ap.add_argument("--data", required=True)
    ap.add_argument("--task", default="Counting")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import DynamicCache

    from vlmkv import load_model
    from vlmkv.eval.fidelity import greedy_continuation, prefill_logits
    from vlmkv.eval.runner import build_sample_inputs, load_samples
    from vlmkv.models.cpu_bf16 import bf16_gemm_is_native, linears_via_fp32

    model, proc = load_model(args.model, dtype="bfloat16")
    sample = load_samples(args.data, [args.task], limit=1)[0]
    inp = build_sample_inputs(proc, sample)
    print(f"cpu: {torch.backends.cpu.get_cpu_capability()}, bf16 instructions: {bf16_gemm_is_native()}, "
          f"threads: {args.threads}, prompt: {inp['input_ids'].shape[1]} tokens")
    extra = {k: v for k, v in inp.items() if k not in ("input_ids", "attention_mask")}
    eos = model.generation_config.eos_token_id
    logits = {}
    for mode in ("native", "fp32"):
        if mode == "fp32":
            print(f"linears_via_fp32: {linears_via_fp32(model)} layers")
        # eval's own steps: the padding-aware prefill, then greedy decoding (EOS barred so every step runs)
        cache = DynamicCache()
        t = time.perf_counter()
        first = prefill_logits(model, inp["input_ids"], inp["attention_mask"], cache, **extra)
        pre = time.perf_counter() - t
        t = time.perf_counter()
        greedy_continuation(model, inp["attention_mask"], cache, first, args.steps + 1, eos, proc.tokenizer.pad_token_id,
                            min_new_tokens=args.steps + 1)
        dec = time.perf_counter() - t
        logits[mode] = first
        print(f"{mode:>6}: prefill {pre:.2f} s, {args.steps} decode steps {dec:.2f} s")
    d = (logits["native"] - logits["fp32"]).abs().max().item()
    same = bool((logits["native"].argmax(-1) == logits["fp32"].argmax(-1)).all())
    print(f"last-position logits: max |native - fp32| = {d:.4f} (scale {logits['native'].abs().max().item():.1f}), "
          f"same argmax: {same}")


if __name__ == "__main__":
    main()
