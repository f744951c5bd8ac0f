"""KL against FP16 position by position along the reference `vlmkv eval` teacher-forces, for a few clips.

    python benchmarks/experiments/fidelity_positions.py --model pocket --data out/demo/data-synthetic-10 --task FrameColour --clips 3

For each clip: the FP16 reference tokens, and per method the KL and its argmax at each position, under the reference
`vlmkv eval` uses (fp16's answer through its end-of-sequence token: `--min-new-tokens 1`) or the one it used before
2026-12-02 (`--min-new-tokens 2`: the stop barred at the second token, so a one-token answer runs on into a made-up
next turn). Position 0 is the prompt's own full-precision forward, equal for every method; the rest read the cache.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import vlmkv  # noqa: E402
from vlmkv.eval.fidelity import REFERENCE_MIN_NEW_TOKENS, greedy_continuation, next_token_kl  # noqa: E402
from vlmkv.eval.milebench import load_task  # noqa: E402
from vlmkv.eval.runner import build_sample_inputs, sample_prefill  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="pocket")
    p.add_argument("--data", required=True, help="a MileBench-format folder (vlmkv make-data)")
    p.add_argument("--task", default="FrameColour")
    p.add_argument("--clips", type=int, default=3)
    p.add_argument("--methods", default="auto,akvq-vl")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--min-new-tokens", type=int, default=REFERENCE_MIN_NEW_TOKENS,
                   help=f"{REFERENCE_MIN_NEW_TOKENS}: eval's reference; 2: the one used before")
    args = p.parse_args(argv)
    model, proc = vlmkv.load_model(args.model)
    tok = getattr(proc, "tokenizer", proc)
    eos = model.generation_config.eos_token_id
    for s in load_task(args.data, args.task, args.clips):
        src = sample_prefill(model, build_sample_inputs(proc, s), True, tok)
        with src.cache("fp16") as c:
            ref, lr = greedy_continuation(model, src.attention_mask, c, src.first, args.max_new_tokens, eos,
                                          tok.pad_token_id, min_new_tokens=args.min_new_tokens)
        print(f"{s.sample_id}: reference {[tok.decode(t) for t in ref[0]]}")
        for m in args.methods.split(","):
            with src.cache(vlmkv.get_policy(m)) as c:
                lq = src.forced(c, ref)
            kl = next_token_kl(lr, lq)[0]
            print(f"  {m:10s} KL by position {[round(float(x), 4) for x in kl]}  mean {float(kl.mean()):.4f}")
            print(f"  {'':10s} argmax {[tok.decode(t) for t in lq.argmax(-1)[0]]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
