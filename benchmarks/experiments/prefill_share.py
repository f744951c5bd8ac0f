"""Where a shared-prefill eval spends its time on one clip: the one forward over the prompt, then per method the
fill from it (`QuantizedKVCache.prefill_from`: planning and quantizing the prompt's keys and values) and the greedy
decode steps.

    OMP_NUM_THREADS=1 python benchmarks/experiments/prefill_share.py --data out/L64 --task Counting
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import vlmkv  # noqa: E402
from vlmkv.cli import _method_entry  # noqa: E402
from vlmkv.eval.fidelity import greedy_continuation, prefill_logits  # noqa: E402
from vlmkv.eval.runner import build_sample_inputs, load_samples  # noqa: E402

METHODS = "fp16,rtn-4,kivi-2,skvq,akvq-vl,windowquant,auto:bits=3.0"


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="pocket-long")
    p.add_argument("--data", required=True, help="MileBench-format data (vlmkv make-data)")
    p.add_argument("--task", default="Counting")
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--tokens", type=int, default=6, help="greedy decode steps per method")
    args = p.parse_args()
    model, proc = vlmkv.load_model(args.model)
    model = model.to(torch.bfloat16)
    tok = proc.tokenizer
    inp = build_sample_inputs(proc, load_samples(args.data, [args.task], 1)[0])
    extra = {k: v for k, v in inp.items() if k not in ("input_ids", "attention_mask")}
    t = time.perf_counter()
    rec = vlmkv.QuantizedKVCache(model, "fp16", tokenizer=tok, record_prompt=True)
    first = prefill_logits(model, inp["input_ids"], inp["attention_mask"], rec, **extra)
    rec.close()
    print(f"{inp['input_ids'].shape[1]} tokens, bf16, {torch.get_num_threads()} threads: shared prefill "
          f"{time.perf_counter() - t:.2f} s")
    print("| method | fill s | decode s |\n|---|---:|---:|")
    for m in args.methods.split(","):
        e = _method_entry(m)
        pol = vlmkv.get_policy(e) if isinstance(e, str) else e[1]
        t = time.perf_counter()
        with vlmkv.QuantizedKVCache(model, pol, tokenizer=tok) as c:
            c.prefill_from(rec)
            t1 = time.perf_counter()
            greedy_continuation(model, inp["attention_mask"], c, first, args.tokens, model.generation_config.eos_token_id,
                                tok.pad_token_id, min_new_tokens=args.tokens)
            print(f"| {m} | {t1 - t:.2f} | {time.perf_counter() - t1:.2f} |")


if __name__ == "__main__":
    main()
