"""WindowQuant on the real SmolLM2-135M-Instruct with "pseudo-visual" windows, and the cost of its search.

    python benchmarks/windowquant_ablation.py --out docs/windowquant_ablation.json

No VLM weights can be had here, so the long text prompt of the AKVQ ablation is labelled as a VLM
prompt would be: each paragraph and each table row is one "visual" window (a frame), the final
instruction is the text prompt, the chat template is text. Every method then runs unchanged on those
labels (`cache.set_spans`). Reported per method: bits per element of the whole cache from bytes,
next-token KL and top-1 agreement against the full-precision cache over 64 teacher-forced steps, the
copy-task accuracy (the 24 table rows as windows), and the search time against prefill time.

Part 2 times the search alone on synthetic visual prompts (64 frames x 196 tokens, like a video VLM):
window-level against token-level, same budget and scorer.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent / "experiments"))  # akvq_ablation: the same long prompt
import vlmkv  # noqa: E402
from akvq_ablation import long_prompt  # noqa: E402
from vlmkv.eval.fidelity import next_token_kl, teacher_forced_logits, top1_agreement  # noqa: E402
from vlmkv.eval.prompts import copy_table_prompt, score_copy  # noqa: E402
from vlmkv.models.modality import IMAGE, TEXT  # noqa: E402
from vlmkv.policies.base import PrefillContext  # noqa: E402

METHODS = [
    ("rtn-4", {}), ("rtn-2", {}),
    ("windowquant", {"scorer": "key_cosine"}),
    ("windowquant", {"scorer": "key_attention"}),
    ("windowquant", {"scorer": "random"}),
    ("windowquant", {"scorer": "key_cosine", "granularity": "token"}),
    ("windowquant", {"scorer": "key_cosine", "window_size": 8}),
    ("windowquant+wht", {}),
    ("windowquant+pivots", {}),
    ("windowquant+wht+pivots", {}),
    ("akvq-vl", {}),
]


def spans_for(tok, text: str, pieces: list[str]):
    """Chat-formatted ids, and labels marking each of `pieces` (substrings of text) as one visual frame."""
    chat = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    enc = tok(chat, return_tensors="pt", return_offsets_mapping=True, add_special_tokens=False)
    offs = enc.pop("offset_mapping")[0]
    types = torch.full(enc["input_ids"].shape, TEXT, dtype=torch.int8)
    frames = torch.full(enc["input_ids"].shape, -1, dtype=torch.long)
    pos = 0
    for f, piece in enumerate(pieces):
        start = chat.index(piece, pos)
        end = start + len(piece)
        pos = end
        inside = (offs[:, 0] >= start) & (offs[:, 1] <= end) & (offs[:, 1] > offs[:, 0])
        types[0, inside] = IMAGE
        frames[0, inside] = f
    return dict(enc), types, frames


def make_policy(name, opts, budget):
    if name.startswith(("rtn", "kivi")):
        return vlmkv.get_policy(name)
    if name.startswith("windowquant"):
        return vlmkv.get_policy(name, budget=budget, **opts)
    return vlmkv.get_policy(name, **opts)


@torch.no_grad()
def part1(model, tok, args):
    text = long_prompt(args.paragraphs)
    paras = text.split("\n\n")

    pieces = paras[:-2] + paras[-2].split("\n")[1:]  # reports, then each table row
    x, types, frames = spans_for(tok, text, pieces)
    msg, rows = copy_table_prompt()
    xc, ctypes, cframes = spans_for(tok, msg, rows)
    steps = args.steps
    gen = model.generate(**x, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    cont = gen[:, x["input_ids"].shape[1]:]
    ref = teacher_forced_logits(model, x["input_ids"], x["attention_mask"], vlmkv.QuantizedKVCache(model, "fp16"), cont)
    t0 = time.perf_counter()
    model(**x)
    t_prefill = time.perf_counter() - t0
    out = []
    for name, opts in tqdm(METHODS, file=sys.stderr):
        pol = make_policy(name, opts, args.budget)
        with vlmkv.QuantizedKVCache(model, pol) as cache:
            cache.set_spans(types, frames)
            got = teacher_forced_logits(model, x["input_ids"], x["attention_mask"], cache, cont)
            kl = float(next_token_kl(ref, got).mean())
            top1 = float(top1_agreement(ref, got).mean())
            bpe = cache.bits_per_element()
            search = sum(cache.plan_seconds())  # planning time of every layer (scoring + search)
        with vlmkv.QuantizedKVCache(model, make_policy(name, opts, args.budget)) as cache:
            cache.set_spans(ctypes, cframes)
            o = model.generate(**xc, **vlmkv.cache_kwargs(cache), max_new_tokens=12 * len(rows), do_sample=False)
        acc = score_copy(tok.decode(o[0, xc["input_ids"].shape[1]:], skip_special_tokens=True), rows)
        label = name + ("" if not opts else " " + ",".join(f"{k}={v}" for k, v in opts.items()))
        out.append({"method": label, "bits_per_element": bpe, "kl": kl, "top1": top1, "copy_acc": acc,
                    "search_ms": 1000 * search, "prefill_ms": 1000 * t_prefill})
    print(f"\nprompt {x['input_ids'].shape[1]} tokens, {int((types == IMAGE).sum())} in {len(pieces)} pseudo-visual "
          f"windows; budget {args.budget} bits for visual tokens")
    print("| method | bits/element | next-token KL | top-1 | copy rows ok | search ms (30 layers) | prefill ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in out:
        print(f"| {r['method']} | {r['bits_per_element']:.2f} | {r['kl']:.4f} | {r['top1']:.3f} | {r['copy_acc']:.0%} | "
              f"{r['search_ms']:.1f} | {r['prefill_ms']:.0f} |")
    return out


def part2(args):
    torch.manual_seed(0)
    frames, per, H, D = 64, 196, 8, 128
    S = frames * per + 40
    keys = torch.randn(1, H, S, D)
    types = torch.full((1, S), IMAGE, dtype=torch.int8)
    types[0, -40:] = TEXT
    fr = torch.full((1, S), -1)
    fr[0, :frames * per] = torch.arange(frames).repeat_interleave(per)
    ctx = PrefillContext(keys=keys, values=keys, token_types=types, frame_ids=fr)
    res = []
    for gran in ("window", "token"):
        for scorer in ("key_cosine", "key_attention"):
            pol = vlmkv.get_policy("windowquant", budget=args.budget, granularity=gran, scorer=scorer, recent=0)
            pol.plan_prefill(ctx)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                pol.plan_prefill(ctx)
                times.append(time.perf_counter() - t0)
            res.append({"granularity": gran, "scorer": scorer, "items": frames if gran == "window" else frames * per,
                        "ms_per_layer": 1000 * min(times)})
    print(f"\nsearch alone, one layer: {frames} frames x {per} visual tokens, {H} kv heads, head dim {D}")
    print("| granularity | scorer | items searched | ms per layer (scoring + search) |")
    print("|---|---|---:|---:|")
    for r in res:
        print(f"| {r['granularity']} | {r['scorer']} | {r['items']} | {r['ms_per_layer']:.1f} |")
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--paragraphs", type=int, default=12)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    model, tok = vlmkv.load_model("smollm2-135m")
    r1 = part1(model, tok, args)
    r2 = part2(args)
    if args.out:
        Path(args.out).write_text(json.dumps({"methods": r1, "search": r2}, indent=1))


if __name__ == "__main__":
    main()
