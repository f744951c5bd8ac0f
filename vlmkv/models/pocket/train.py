"""Train the pocket demo VLM on synthetic clips (`vlmkv train-demo`): deterministic for a seed, resumable.

Three stages, each one fixing what the feasibility probe (shared/notes/demo-vlm-probe.md) found missing:
1. `text`: LoRA on SmolLM2 with each frame given as words, in the very token layout the images will have:
   the frame's 16 `<image>` positions hold the ids of " <colour>" (first half) and " <shape>" (second
   half). The eval's exact prompt, loss on the answer tokens only. The backbone learns the tasks themselves,
   answering with the option text (mapping options to letters is the indirection the 135M model failed to
   learn).
2. `align`: vision tower + projector regressed onto the embeddings of those same 16 words, so a frame's
   visual tokens arrive reading exactly like its stage-1 words. No language-model pass: seconds.
3. `joint`: the real task, images in, LoRA + projector + vision tower trained together.

Why the 16-word layout: an earlier run taught stage 1 on the short form "red circle"; the backbone then
reached 0.97-1.00 in words but fell back to chance on the tasks matching colour and shape together once
images replaced the words, because 8 copies of " red" and 8 of " circle" are not the bigram it had learnt.

Data are fresh random clips each step from `random.Random(f"{seed}-{stage}-{step}")`, so a resumed run
sees the same batches; held-out clips come from a disjoint seed.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from ...eval.milebench import Sample, score
from ...eval.synthetic import ANSWER_HINT, COLOURS, INSTRUCTION, SHAPES, TASKS, make_question, context, draw, sample_clip
from .config import AUX_TASKS, TrainConfig, aux_weights, curriculum_levels, task_weights
from .model import LORA_TARGETS, TOKENS_PER_FRAME, build_untrained, load_vision, part, trained_state

EVAL_SEED = 1_000_003


_FRAMES: dict = {}


def frame(colour: str, shape: str):
    """The rendered frame (cached: there are only len(COLOURS) * len(SHAPES) distinct ones)."""
    if (colour, shape) not in _FRAMES:
        _FRAMES[colour, shape] = draw(colour, shape)
    return _FRAMES[colour, shape]


def messages(clip, question: str, choices: list[str]) -> list[dict]:
    """The chat message `vlmkv eval` builds from the MileBench-format sample (see `Sample.segments`)."""
    s = Sample(task="", sample_id="", instruction=INSTRUCTION, context=context(len(clip), question),
               images=[Path(f"{k}") for k in range(len(clip))], choices=choices, answer_hint=ANSWER_HINT)
    content = [{"type": "image"} if kind == "image" else {"type": "text", "text": val} for kind, val in s.segments()]
    return [{"role": "user", "content": content}]


def frame_words(tok, colour: str, shape: str) -> list[int]:
    """The TOKENS_PER_FRAME token ids standing for one frame in words: " <colour>" x 8 then " <shape>" x 8."""
    h = TOKENS_PER_FRAME // 2
    ids = [tok(" " + w, add_special_tokens=False)["input_ids"] for w in (colour, shape)]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"colour and shape must be single tokens with a leading space, got {colour!r}, {shape!r}")
    return ids[0] * h + ids[1] * (TOKENS_PER_FRAME - h)


def _as_words(tok, texts: list[str], clips: list) -> dict:
    """Left-padded ids of `texts` with the k-th `<image>` of row b replaced by `frame_words` of clips[b][k]:
    the same positions the processor gives the images, so stage 1 and the image stages share one layout."""
    image = tok.convert_tokens_to_ids("<image>")
    rows = []
    for text, clip in zip(texts, clips):
        ids, k = [], 0
        for t in tok(text, add_special_tokens=False)["input_ids"]:
            if t == image:
                ids += frame_words(tok, *clip[k])
                k += 1
            else:
                ids.append(t)
        rows.append(ids)
    return dict(tok.pad({"input_ids": rows}, return_tensors="pt"))  # left-padded: the processor's tokenizer


def _follow_up(question: str, choices: list[str]) -> dict:
    """A later user turn about the same clip: the question and options, as `Sample.segments` words them."""
    s = Sample(task="", sample_id="", instruction="", context=f"Question: {question}", choices=choices,
               answer_hint=ANSWER_HINT)
    return {"role": "user", "content": [{"type": "text", "text": "".join(v for _, v in s.segments())}]}


def aux_question(kind: str, clip: list[tuple[str, str]], rng: random.Random) -> tuple[str, list[str], str]:
    """A training-only question (config.AUX_TASKS) about `clip` with hard options: (question, choices, answer).

    The eval's Counting draws its three distractors from 0..frames, so most are far from the truth and a rough
    count passes; "CountClose" (the eval's question) and "CountRange" (frames i..j, at least two: counts of every
    size from one clip) put every option within 2 of the truth, so only an exact count earns the loss.
    The eval's WhichFrame draws its wrong frames at random; pocket's misses on long clips are nearly all a frame
    of the same colour and another shape, so "WhichClose" draws them from frames sharing the colour or the shape.
    """
    if kind == "WhichClose":
        k = rng.randrange(len(clip))
        (c, s), frames = clip[k], range(len(clip))
        near = [i for i in frames if clip[i] != clip[k] and (clip[i][0] == c or clip[i][1] == s)]
        wrong = rng.sample(near, min(3, len(near)))
        far = [i for i in frames if clip[i][0] != c and clip[i][1] != s]
        wrong += rng.sample(far, min(3 - len(wrong), len(far)))
        opts = [f"frame {i + 1}" for i in wrong + [k]]
        rng.shuffle(opts)
        return f"In which frame is the {c} {s}?", opts, f"frame {k + 1}"
    s = rng.choice(SHAPES)
    if kind == "CountClose":
        lo, hi, q = 0, len(clip), f"How many frames show a {s}?"
    elif kind == "CountRange":
        lo = rng.randrange(len(clip) - 1)
        hi = rng.randrange(lo + 2, len(clip) + 1)
        q = f"How many of frames {lo + 1} to {hi} show a {s}?"
    else:
        raise ValueError(f"kind must be one of {AUX_TASKS}, got {kind!r}")
    cnt = sum(1 for _, sh in clip[lo:hi] if sh == s)
    near = [v for v in range(cnt - 2, cnt + 3) if v != cnt and 0 <= v <= hi - lo]
    opts = sorted([cnt, *rng.sample(near, min(3, len(near)))])
    return q, [str(o) for o in opts], str(cnt)


def make_batch(proc, rng: random.Random, cfg: TrainConfig, as_words: bool, task: str | None = None,
               with_answer: bool = True):
    """Left-padded batch: (inputs, labels, records), records = (task, clip, choices, answer) of each first question.

    With answers, each clip carries `cfg.questions` question turns (the first exactly as `vlmkv eval` asks it,
    the others as follow-up turns about the same clip: more supervised tokens per pass over the clip);
    `labels` is -100 except on the answer tokens and their `<|im_end|>`. Without answers: one question,
    ending in the generation prompt, and labels None.
    """
    tok = proc.tokenizer
    texts, images, recs = [], [], []
    weights = task_weights(cfg.mix, cfg.tasks)
    tasks = list(zip(cfg.tasks, weights or [1.0] * len(cfg.tasks)))
    # StateChange is balanced only when the clip is drawn for it, so it is never a follow-up
    others = [(x, w) for x, w in tasks if x != "StateChange"]
    if weights is not None and others and not any(w for _, w in others):
        others = []  # only StateChange has weight: no follow-ups, as with tasks=("StateChange",)
    aux = aux_weights(cfg.aux)
    if aux and others:
        others += list(aux.items())

    def draw_task(pool):  # uniform draws keep the rng stream of runs made before `mix` existed
        if weights is None and not aux:
            return rng.choice([x for x, _ in pool])
        return rng.choices([x for x, _ in pool], [w for _, w in pool])[0]

    for _ in range(cfg.batch):
        t = task or draw_task(tasks)
        clip, q, choices, ans = sample_clip(rng, t, cfg.frames)
        msgs = messages(clip, q, choices)
        if with_answer:
            msgs.append({"role": "assistant", "content": ans})
            for _ in range(cfg.questions - 1 if others else 0):
                kind = draw_task(others)
                fq, fc, fa = aux_question(kind, clip, rng) if kind in aux else make_question(kind, clip, rng)
                msgs += [_follow_up(fq, fc), {"role": "assistant", "content": fa}]
        texts.append(proc.apply_chat_template(msgs, add_generation_prompt=not with_answer))
        if not as_words:
            images += [frame(c, s) for c, s in clip]
        recs.append((t, clip, choices, ans))
    if as_words:
        inputs = _as_words(tok, texts, [r[1] for r in recs])
    else:
        inputs = dict(proc(text=texts, images=images, return_tensors="pt", padding=True))
    inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return inputs, (_answer_labels(tok, inputs["input_ids"]) if with_answer else None), recs


def _answer_labels(tok, ids: torch.Tensor) -> torch.Tensor:
    """-100 everywhere except the tokens after each `<|im_start|>assistant\n`, up to its `<|im_end|>`."""
    head = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    labels = torch.full_like(ids, -100)
    for b, row in enumerate(ids.tolist()):
        i = 0
        while i <= len(row) - len(head):
            if row[i:i + len(head)] == head:
                j = i + len(head)
                while j < len(row) and row[j] != end:
                    j += 1
                labels[b, i + len(head):j + 1] = ids[b, i + len(head):j + 1]
                i = j
            i += 1
    return labels


def answer_loss(model, inputs: dict, labels: torch.Tensor, bf16: bool) -> torch.Tensor:
    """Cross-entropy on the labelled (answer) tokens; the LM head runs on those positions only."""
    sel = labels[:, 1:] != -100  # position p predicts token p + 1
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        hidden = model.model(**inputs).last_hidden_state[:, :-1][sel]
        logits = model.lm_head(hidden).float()
    return torch.nn.functional.cross_entropy(logits, labels[:, 1:][sel])


@torch.no_grad()
def heldout_accuracy(model, proc, cfg: TrainConfig, as_words: bool = False, clips: int | None = None,
                     max_new_tokens: int = 4) -> dict[str, float]:
    """Greedy answers on held-out clips, scored as `vlmkv eval` scores them (MileBench option matching)."""
    model.eval()
    tok = proc.tokenizer
    res = {}
    n = clips or cfg.eval_clips
    for t in cfg.tasks:
        rng, ok, done = random.Random(f"{EVAL_SEED}-{t}"), 0, 0
        while done < n:
            inputs, _, recs = make_batch(proc, rng, cfg, as_words, task=t, with_answer=False)
            inputs.pop("position_ids")
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            for row, (_, _, choices, ans) in zip(out[:, inputs["input_ids"].shape[1]:], recs):
                if done < n:
                    pred = tok.decode(row, skip_special_tokens=True)
                    ok += score(pred, Sample(task=t, sample_id="", instruction="", context="", choices=choices, answer=ans))
                    done += 1
        res[t] = ok / n
    model.train()
    return res


def at_length(cfg: TrainConfig, frames: int) -> TrainConfig:
    """`cfg` for clips of `frames` frames, batched to about as many tokens as `cfg.batch` clips of `cfg.frames`."""
    return replace(cfg, frames=frames, batch=max(1, round(cfg.batch * cfg.frames / frames)), curriculum="")


def _align_targets(model, proc, clip_frames):
    """[N, 16, 576] float32: the embeddings of each frame's `frame_words`."""
    emb = model.model.language_model.embed_tokens.weight
    return torch.stack([emb[frame_words(proc.tokenizer, c, s)] for c, s in clip_frames]).detach()


def _init_from(model, state: dict) -> None:
    """Load a `trained_state` (the tensors of a file `train` wrote) into a model whose backbone carries (unmerged)
    LoRA adapters of the same or a larger rank (`lora.load_lora`)."""
    from .lora import load_lora

    load_vision(model, state)
    load_lora(model.model.language_model, part(state, "language_model."))  # a larger --lora-r widens the adapters


def _trainable(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(state: dict, path: Path) -> None:
    """Write a resumable checkpoint (tensors, numbers, strings only) atomically: a kill mid-write leaves the
    previous checkpoint, never a truncated one."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by `save_checkpoint`, loaded without running code from the file (`weights_only`:
    tensors, numbers, strings and containers only). Anything else (a planted pickle, a corrupt file) is refused."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise ValueError(f"{path} is not a checkpoint vlmkv wrote (refused: {type(e).__name__}: {str(e)[:200]}); "
                         f"delete it to start the run afresh") from None
    if not isinstance(state, dict) or not {"stage", "step", "seconds", "opt", "params"} <= set(state):
        raise ValueError(f"{path} is not a checkpoint vlmkv wrote: missing keys, got {sorted(state) if isinstance(state, dict) else type(state).__name__!r}")
    return state


def train(cfg: TrainConfig, log=print) -> dict:
    """Run the stages not yet done under `cfg.out`; returns the run record (also written as train.json)."""
    import json

    from safetensors.torch import save_file

    from .lora import add_lora

    if cfg.bf16 is None:  # resolved once, so the record says which precision the run used
        from ..cpu_bf16 import bf16_gemm_is_native

        cfg = replace(cfg, bf16=bf16_gemm_is_native())
    init = None
    if cfg.init:  # a wrong file is named before anything is built or written
        from ..loading import load_safetensors

        init = load_safetensors(cfg.init, "--init")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model, proc = build_untrained(cfg.seed)
    add_lora(model.model.language_model, LORA_TARGETS, r=cfg.lora_r, alpha=2.0 * cfg.lora_r)
    if init is not None:
        _init_from(model, init)
    for p in model.parameters():
        p.requires_grad_(False)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    vision = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    for p in lora + vision:
        p.requires_grad_(True)
    record_path = out / "train.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"config": asdict(cfg), "stages": {}}
    ckpt = out / "checkpoint.pt"
    state = load_checkpoint(ckpt) if ckpt.exists() else None
    if state is not None:
        model.load_state_dict(state["params"], strict=False)
        log(f"resumed at stage {state['stage']} step {state['step']}")
    model.train()

    def run_stage(name: str, steps: int, params: list, lr: float, step_fn, eval_cfg: TrainConfig = cfg):
        done = record["stages"].get(name, {}).get("done")
        if done or steps == 0:
            return
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        start = 0
        if state is not None and state["stage"] == name:
            opt.load_state_dict(state["opt"])
            start = state["step"]
        t0 = time.perf_counter() - (state["seconds"] if state is not None and state["stage"] == name else 0.0)
        bar = tqdm(range(start, steps), desc=name, initial=start, total=steps)
        saved = time.perf_counter()
        for step in bar:
            for g in opt.param_groups:  # warm-up then cosine decay
                g["lr"] = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
            loss = step_fn(random.Random(f"{cfg.seed}-{name}-{step}"))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            # every 50 steps, or every 2 minutes on long clips (a step can take 15 s there)
            if step + 1 < steps and ((step + 1) % 50 == 0 or time.perf_counter() - saved > 120):
                saved = time.perf_counter()
                save_checkpoint({"stage": name, "step": step + 1, "seconds": time.perf_counter() - t0,
                                 "opt": opt.state_dict(), "params": _trainable(model)}, ckpt)
        secs = time.perf_counter() - t0
        # after `align`, images in: how much of stage 1 the visual route carries before any joint step
        acc = heldout_accuracy(model, proc, eval_cfg, as_words=name == "text")
        record["stages"][name] = {"done": True, "steps": steps, "seconds": round(secs, 1), "final_loss": round(loss.item(), 4),
                                  "bf16": cfg.bf16, "heldout_accuracy": acc}
        log(f"stage {name}: {steps} steps in {secs:.0f} s, loss {loss.item():.3f}, held-out {acc}")
        save_checkpoint({"stage": name + ":done", "step": steps, "seconds": secs, "opt": None,
                         "params": _trainable(model)}, ckpt)
        save_file(trained_state(model), out / f"after_{name}.safetensors")
        record_path.write_text(json.dumps(record, indent=1))

    def text_step(rng):
        inputs, labels, _ = make_batch(proc, rng, cfg, as_words=True)
        return answer_loss(model, inputs, labels, cfg.bf16)

    def align_step(rng):
        fr = [(rng.choice(list(COLOURS)), rng.choice(SHAPES)) for _ in range(64)]
        px = proc.image_processor([frame(c, s) for c, s in fr], return_tensors="pt")["pixel_values"]
        feats = model.model.get_image_features(pixel_values=px).pooler_output
        feats = torch.stack(list(feats))
        tgt = _align_targets(model, proc, fr)
        return ((feats - tgt) ** 2).sum(-1).mean() / (tgt ** 2).sum(-1).mean()

    def long_step(frames: int, earlier: tuple[int, ...], rng):
        # half the steps at this level's length, half at an earlier one so that short clips are not forgotten;
        # LoRA only, frames as words: `align` already makes a frame's visual tokens read as its words
        n = frames if rng.random() < 0.5 else rng.choice(earlier)
        inputs, labels, _ = make_batch(proc, rng, at_length(cfg, n), as_words=True)
        return answer_loss(model, inputs, labels, cfg.bf16)

    def joint_step(rng):
        inputs, labels, _ = make_batch(proc, rng, cfg, as_words=False)
        return answer_loss(model, inputs, labels, cfg.bf16)

    run_stage("text", cfg.text_steps, lora, cfg.lr, text_step)
    run_stage("align", cfg.align_steps, vision, cfg.vision_lr, align_step)
    run_stage("joint", cfg.joint_steps, lora + vision, cfg.lr, joint_step)
    lengths = [cfg.frames]
    for frames, steps in curriculum_levels(cfg.curriculum, cfg.frames):
        run_stage(f"frames{frames}", steps, lora, cfg.lr, partial(long_step, frames, tuple(lengths)),
                  eval_cfg=at_length(cfg, frames))
        lengths.append(frames)
    save_file(trained_state(model), out / "pocket.safetensors")
    record["threads"] = torch.get_num_threads()
    record_path.write_text(json.dumps(record, indent=1))
    return record
