"""Text-only upper bound for the demo VLM's tasks: can SmolLM2-135M answer them zero-shot when the frames are
given as words ("Frame 3: red circle")? Diagnoses the demo VLM before training it (issue: demo VLM).

    python benchmarks/experiments/text_upper_bound.py --samples 24 --frames 8
"""
from __future__ import annotations

import argparse
import random
import string
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import vlmkv  # noqa: E402
from vlmkv.eval.prompts import chat_inputs  # noqa: E402
from vlmkv.eval.synthetic import COLOURS, SHAPES, TASKS, make_question  # noqa: E402


@torch.no_grad()
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=24)
    p.add_argument("--frames", type=int, default=8)
    args = p.parse_args()
    model, tok = vlmkv.load_model("smollm2-135m")
    print("| task | zero-shot accuracy | chance |\n|---|---:|---:|")
    for task in TASKS:
        rng = random.Random(0)
        ok = 0
        for _ in range(args.samples):
            clip = [(rng.choice(list(COLOURS)), rng.choice(SHAPES)) for _ in range(args.frames)]
            q, choices, ans = make_question(task, clip, rng)
            frames = "\n".join(f"Frame {k + 1}: {c} {s}" for k, (c, s) in enumerate(clip))
            opts = "\n".join(f"{string.ascii_uppercase[j]}. {c}" for j, c in enumerate(choices))
            x = chat_inputs(tok, [f"{frames}\nQuestion: {q}\nOptions:\n{opts}\nAnswer with the option's letter."], True)
            o = model.generate(**x, max_new_tokens=3, do_sample=False)
            a = tok.decode(o[0, x["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            ok += a[:1].upper() == string.ascii_uppercase[choices.index(ans)]
        print(f"| {task} | {ok / args.samples:.2f} | {1 / len(choices):.2f} |")


if __name__ == "__main__":
    main()
