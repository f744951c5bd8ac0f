"""AKVQ-VL ablation on the real SmolLM2-135M-Instruct: fidelity against the full-precision cache and
copy-task accuracy, per method and per AKVQ-VL switch, with bits per element from bytes.

    python benchmarks/experiments/akvq_ablation.py --steps 64 --out docs/akvq_ablation.json

Fidelity: a long prompt (~1k tokens: paragraphs then the 24-row table) is prefilled, then the
full-precision greedy continuation is fed for `--steps` tokens to every cache (teacher forcing);
next-token KL(p_fp || p_q) and top-1 agreement are averaged over those steps. Copy accuracy: the demo's
task (copy the 24-row table), rows reproduced verbatim. Bits per element: `cache.nbytes()` at the end
of the fidelity run over the cached elements.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import vlmkv  # noqa: E402
from vlmkv.eval.prompts import chat_inputs  # noqa: E402
from vlmkv.eval.fidelity import fidelity  # noqa: E402
from vlmkv.eval.prompts import CITIES, copy_table_prompt, score_copy  # noqa: E402

ROWS = [
    ("rtn-4", {}), ("rtn-2", {}), ("kivi-2", {}), ("smoothquant-2", {}), ("skvq", {}),
    ("RTN INT2 (akvq-vl, all switches off)", {"wht": False, "text_4bit": False, "pivots": False}),
    ("+ WHT", {"wht": True, "text_4bit": False, "pivots": False}),
    ("+ WHT + text 4-bit", {"wht": True, "text_4bit": True, "pivots": False}),
    ("+ WHT + text 4-bit + pivots/recent = akvq-vl", {}),
    ("akvq-vl without WHT", {"wht": False}),
    ("akvq-vl without text 4-bit", {"text_4bit": False}),
    ("akvq-vl without pivots/recent", {"pivots": False}),
    ("akvq-vl, TSA/PSA split at layer 2", {"tsa_layers": 2}),
]


def long_prompt(paragraphs: int = 12, seed: int = 0) -> str:
    rng = random.Random(seed)
    paras = []
    for i in range(paragraphs):
        a, b = rng.sample(CITIES, 2)
        paras.append(f"Report {i + 1}. The train from {a} to {b} left at {rng.randint(5, 11)} in the morning and "
                     f"arrived {rng.randint(2, 9)} hours later. Passengers said the views of the mountains and the "
                     f"river were beautiful, although the dining car ran out of coffee before noon.")
    table, _ = copy_table_prompt()
    return "\n\n".join(paras) + "\n\n" + table


def policy(name, opts):
    if name.startswith(("rtn", "kivi", "smoothquant", "skvq")):
        return name
    return vlmkv.get_policy("akvq-vl", **opts)


@torch.no_grad()
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--paragraphs", type=int, default=12)
    p.add_argument("--out", default=None)
    p.add_argument("--only", default=None, help="comma-separated method labels to run (default: all)")
    args = p.parse_args()
    model, tok = vlmkv.load_model("smollm2-135m")
    x = chat_inputs(tok, [long_prompt(args.paragraphs)], True)
    msg, rows = copy_table_prompt()
    xc = chat_inputs(tok, [msg], True)
    print(f"fidelity prompt: {x['input_ids'].shape[1]} tokens; copy prompt: {xc['input_ids'].shape[1]} tokens",
          file=sys.stderr)
    results = []
    rows_to_run = [r for r in ROWS if not args.only or r[0] in args.only.split(",")]
    for label, opts in tqdm(rows_to_run, file=sys.stderr):
        pol = policy(label, opts)
        fid = fidelity(model, x["input_ids"], x["attention_mask"], [pol], steps=args.steps)
        r = next(iter(fid.values()))
        with vlmkv.QuantizedKVCache(model, pol) as cache:
            out = model.generate(**xc, **vlmkv.cache_kwargs(cache), max_new_tokens=12 * len(rows), do_sample=False)
        ans = tok.decode(out[0, xc["input_ids"].shape[1]:], skip_special_tokens=True)
        results.append({"method": label, "kl": r["kl"], "top1": r["top1"], "bits_per_element": r["bits_per_element"],
                        "copy_acc": score_copy(ans, rows), "policy": r["policy"]})
    print("| method | bits/element | next-token KL | top-1 agreement | copy rows ok |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['method']} | {r['bits_per_element']:.2f} | {r['kl']:.4f} | {r['top1']:.3f} | {r['copy_acc']:.0%} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"prompt_tokens": int(x["input_ids"].shape[1]), "steps": args.steps,
                                              "rows": results}, indent=1))


if __name__ == "__main__":
    main()
