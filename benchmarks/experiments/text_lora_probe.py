"""After LoRA: can SmolLM2-135M learn the demo VLM's tasks when frames are words? (the step after
`text_upper_bound.py`; needs `pip install peft`).

    python benchmarks/experiments/text_lora_probe.py --steps 300 --batch 8 --lr 1e-3

LoRA r=16 on every attention and MLP projection, loss on the answer letter only, tasks mixed, fresh
random clips every step (seeded), then zero-shot-style greedy evaluation on held-out clips per task.
"""
from __future__ import annotations

import argparse
import random
import string
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import vlmkv  # noqa: E402
from vlmkv.eval.synthetic import COLOURS, SHAPES, TASKS, make_question  # noqa: E402


def example(rng, frames, task=None):
    task = task or rng.choice(TASKS)
    clip = [(rng.choice(list(COLOURS)), rng.choice(SHAPES)) for _ in range(frames)]
    if task == "StateChange" and rng.random() < 0.5:
        clip[-1] = (clip[0][0], clip[-1][1])
    q, choices, ans = make_question(task, clip, rng)
    body = "\n".join(f"Frame {k + 1}: {c} {s}" for k, (c, s) in enumerate(clip))
    opts = "\n".join(f"{string.ascii_uppercase[j]}. {c}" for j, c in enumerate(choices))
    msg = f"{body}\nQuestion: {q}\nOptions:\n{opts}\nAnswer with the option's letter."
    return task, msg, string.ascii_uppercase[choices.index(ans)]


def encode(tok, msg, letter=None):
    prompt = tok.apply_chat_template([{"role": "user", "content": msg}], add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if letter is None:
        return ids, None
    ans = tok(letter, add_special_tokens=False)["input_ids"]
    return ids + ans, [-100] * len(ids) + ans


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--eval", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(args.seed)
    model, tok = vlmkv.load_model("smollm2-135m")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    for step in range(args.steps):
        batch = [encode(tok, *example(rng, args.frames)[1:]) for _ in range(args.batch)]
        L = max(len(i) for i, _ in batch)
        ids = torch.full((len(batch), L), tok.pad_token_id)
        lab = torch.full((len(batch), L), -100)
        att = torch.zeros((len(batch), L), dtype=torch.long)
        for b, (i, l) in enumerate(batch):
            ids[b, :len(i)], lab[b, :len(l)], att[b, :len(i)] = torch.tensor(i), torch.tensor(l), 1
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    model.eval()
    erng = random.Random(10_000 + args.seed)
    print(f"| task | accuracy after {args.steps} LoRA steps (batch {args.batch}) |\n|---|---:|")
    with torch.no_grad():
        for task in TASKS:
            ok = 0
            for _ in range(args.eval):
                _, msg, letter = example(erng, args.frames, task)
                ids, _ = encode(tok, msg)
                out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=2, do_sample=False)
                ok += tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()[:1] == letter
            print(f"| {task} | {ok / args.eval:.2f} |")
    print(f"training time {time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
