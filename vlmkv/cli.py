"""vlmkv command line.

    vlmkv generate --model smollm2-135m --method kivi --bits 2 --prompt "..."
    vlmkv demo                      # the demo VLM on held-out clips under each method (the README's main job)
    vlmkv train-demo --out DIR      # retrain the demo VLM (pocket) from scratch
    vlmkv bench --model M           # decode ms/step and KV bytes per method on your model, beside DynamicCache
    vlmkv list                      # registered methods and their options
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path


BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _parse_options(pairs: list[str]) -> dict:
    """`name=value` pairs: ints, floats, booleans (true/false, yes/no, on/off), else strings; the policy checks
    each option's type, so `wht=maybe` is an error, never "true"."""
    opts = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--option must look like name=value, got {pair!r}")
        k, v = pair.split("=", 1)
        if v.lower() in BOOLS and v not in ("0", "1"):
            v = BOOLS[v.lower()]
        else:
            for conv in (int, float):
                try:
                    v = conv(v)
                    break
                except ValueError:
                    pass
        opts[k.replace("-", "_")] = v
    return opts


def _method_entry(text: str):
    """A `--methods` item: a name (`kivi-2`), checked now (ValueError naming it when no policy has it) and kept as
    the label, or a name with options after colons (`kivi-2:schedule=blocks`), which becomes a (label, policy) pair
    labelled by the text itself."""
    from .policies import get_policy

    if ":" not in text:
        get_policy(text)  # resolves the name (and bits shorthand) or raises naming it
        return text
    name, *pairs = text.split(":")
    return text, get_policy(name, **_parse_options(pairs))


def _bounded(kind, low, high=None, low_open=False):
    """An argparse type: `kind` within [low, high] (low excluded if `low_open`), with a clear message."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, got {text!r}")
        if v != v or (v <= low if low_open else v < low) or (high is not None and v > high):
            rng = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {rng}, got {text!r}")
        return v
    return parse


POSITIVE = _bounded(int, 1)
NONNEG = _bounded(int, 0)


def _policy_from_args(args):
    from .policies import get_policy

    opts = _parse_options(args.option)
    if args.bits is not None:
        opts["bits"] = args.bits
    return get_policy(args.method, **opts)


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def cmd_generate(args) -> int:
    import torch

    from .eval.prompts import chat_inputs

    from . import QuantizedKVCache, load_model
    from .cache import cache_kwargs

    policy = _policy_from_args(args)
    if args.no_chat and not args.image and not args.prompt:
        raise ValueError(f"--prompt must be text to continue with --no-chat (no chat template adds tokens), got "
                         f"{args.prompt!r}")
    t0 = time.perf_counter()
    model, proc = load_model(args.model, device=args.device)
    t_load = time.perf_counter() - t0
    tok = getattr(proc, "tokenizer", proc)
    if args.image:
        inputs = {k: (v.to(args.device) if hasattr(v, "to") else v) for k, v in build_inputs(proc, args.prompt, args.image).items()}
    else:
        inputs = chat_inputs(tok, [args.prompt], not args.no_chat).to(args.device)
    if inputs["input_ids"].shape[-1] == 0:
        raise ValueError(f"--prompt must give at least one token, got {args.prompt!r} (no tokens)")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0)
    if args.temperature > 0:
        gen.update(temperature=args.temperature, top_p=args.top_p)
    with QuantizedKVCache(model, policy, tokenizer=tok) as cache:
        t0 = time.perf_counter()
        out = model.generate(**inputs, **cache_kwargs(cache), pad_token_id=tok.pad_token_id, **gen)
        dt = time.perf_counter() - t0
        answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        n_new = out.shape[1] - inputs["input_ids"].shape[1]
        print(answer.strip())
        print()
        print(f"method      {policy.describe()}")
        print(f"KV cache    {_fmt_bytes(cache.nbytes())} for {cache.get_seq_length()} tokens "
              f"(FP16 would be {_fmt_bytes(cache.fp16_nbytes())}; {cache.bits_per_element():.2f} bits/element, "
              f"{cache.fp16_nbytes() / max(1, cache.nbytes()):.2f}x smaller than FP16)")
        print("stored      " + ", ".join(f"{b}-bit {n}" for b, n in cache.bits_histogram().items())
              + " tokens (layers x rows; the full-precision window counts as 16)")
        print(f"time        {dt:.2f} s for {n_new} new tokens ({n_new / dt:.1f} tokens/s); model load {t_load:.1f} s")
    return 0


DEMO_METHODS = "fp16,rtn-4,rtn-2,kivi-2,akvq-vl"  # text model: the copy-table demo
VLM_DEMO_METHODS = "fp16,akvq-vl,windowquant,auto,kivi-2,rtn-2"  # a VLM (pocket by default): held-out clips
EVAL_METHODS = "fp16,rtn-4,rtn-2,kivi-2,smoothquant-2,akvq-vl,windowquant"


def cmd_demo(args) -> int:
    from . import QuantizedKVCache, load_model
    from .cache import cache_kwargs
    from .eval.fidelity import fidelity
    from .eval.prompts import chat_inputs, copy_table_prompt, score_copy

    def entries(text: str) -> list:  # (label, policy) pairs; a name is its own policy
        return [(e, e) if isinstance(e, str) else e for e in map(_method_entry, filter(None, text.split(",")))]

    chosen = entries(args.methods) if args.methods else None  # every spelling checked before the model loads
    print(f"Loading {args.model} (the first run converts the GGUF file and assembles the demo VLM once, ~30 s)...",
          flush=True)
    model, tok = load_model(args.model)
    if hasattr(tok, "image_processor"):
        from .eval.clip_demo import run_clip_demo

        methods = chosen or entries(VLM_DEMO_METHODS)
        tasks = tuple(t for t in args.tasks.split(",") if t)
        print(f"Task: answer questions about held-out 8-frame synthetic clips ({args.clips} per task type: "
              f"{', '.join(tasks)}); methods: {', '.join(label for label, _ in methods)}\n", flush=True)
        run_clip_demo(model, tok, methods, clips=args.clips, out=args.out, tasks=tasks)
        print("\naccuracy: answers scored as MileBench scores them. bits/el and KV KiB: counted from the stored "
              "tensors (codes, scales, zero points, buffers, index maps) after each answer; 'fp16' keeps the "
              "model's float32 here. KL / top-1: against the full-precision cache on the fp16 answer.")
        return 0
    methods = chosen or entries(DEMO_METHODS)
    message, rows = copy_table_prompt(n_rows=args.rows, seed=args.seed)
    inputs = chat_inputs(tok, [message], True)
    n_prompt = inputs["input_ids"].shape[1]
    print(f"Task: copy a {len(rows)}-row table of people and cities shown in a {n_prompt}-token prompt.")
    print(f"Truth starts: {' | '.join(rows[:3])} | ...\n")
    fid = fidelity(model, inputs["input_ids"], inputs["attention_mask"], [p for _, p in methods], steps=args.steps)
    results = []
    for m, pol in methods:
        f = fid[pol if isinstance(pol, str) else pol.describe()]
        with QuantizedKVCache(model, pol) as cache:
            t0 = time.perf_counter()
            out = model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=12 * len(rows), do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            dt = time.perf_counter() - t0
            ans = tok.decode(out[0, n_prompt:], skip_special_tokens=True).strip()
            results.append((m, ans, score_copy(ans, rows), cache.nbytes(), cache.fp16_nbytes(),
                            cache.bits_per_element(), f["top1"], f["kl"], dt))
    for m, ans, *_ in results:
        print(f"[{m}] " + " | ".join(ans.splitlines()[:3])[:90])
    print()
    w = max(10, *(len(m) for m, _ in methods))
    print(f"{'method':<{w}} {'rows ok':>8} {'KV bytes':>11} {'FP16 bytes':>11} {'bits/el':>8} {'top-1':>6} {'KL':>8} {'time s':>7}")
    for m, ans, acc, nb, fb, bpe, top1, kl, dt in results:
        print(f"{m:<{w}} {acc:>8.0%} {nb:>11,} {fb:>11,} {bpe:>8.2f} {top1:>6.2f} {kl:>8.4f} {dt:>7.2f}")
    print(f"\nrows ok: table rows copied verbatim. top-1 / KL: agreement with the full-precision cache over "
          f"{args.steps} teacher-forced decode steps.")
    print("KV bytes are counted from the stored tensors (codes, scales, zero points, buffers, index maps) at the end "
          "of generation; 'fp16' keeps the model's own float32 here.")
    return 0


def build_inputs(proc, prompt: str, images: list[str] | None = None):
    """Chat-formatted inputs for a tokenizer (text) or a processor (images + text)."""
    if not images:
        from .eval.prompts import chat_inputs

        tok = getattr(proc, "tokenizer", proc)
        return dict(chat_inputs(tok, [prompt], True))
    from PIL import Image

    pics = [Image.open(p).convert("RGB") for p in images]
    content = [{"type": "image"} for _ in pics] + [{"type": "text", "text": prompt}]
    text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return dict(proc(text=text, images=pics, return_tensors="pt"))


def cmd_inspect(args) -> int:
    from . import load_model
    from .analysis.attention_patterns import inspect_attention, plot_attention
    from .eval.prompts import copy_table_prompt

    model, proc = load_model(args.model)
    prompt = args.prompt or copy_table_prompt()[0]
    inputs = build_inputs(proc, prompt, args.image)
    tok = getattr(proc, "tokenizer", proc)
    rep, maps = inspect_attention(model, inputs, tokenizer=tok, num_pivots=args.num_pivots,
                                  pivot_threshold=args.threshold)
    print(rep.to_markdown())
    files = rep.save(args.out) + plot_attention(rep, maps, args.out, bin_size=args.bin)
    print("\nwrote " + ", ".join(str(f) for f in files))
    return 0


def cmd_make_data(args) -> int:
    from .eval.synthetic import TASKS, make_dataset

    tasks = args.tasks.split(",") if args.tasks else list(TASKS)
    make_dataset(args.out, tasks, samples=args.samples, frames=args.frames, seed=args.seed)
    print(f"wrote {len(tasks)} tasks x {args.samples} clips of {args.frames} frames to {args.out} (MileBench format)")
    return 0


def cmd_eval(args) -> int:
    from . import load_model
    from .eval.milebench import list_tasks
    from .eval.runner import _distributed, load_samples

    runs = _eval_runs(args)  # every method spelled right before anything is written or loaded
    if args.data is None:  # the demo VLM's own held-out clips, written once in MileBench's format
        from .eval.synthetic import TASKS, make_dataset

        n = args.limit or 100
        args.data = f"{args.out}/data-synthetic-{n}"
        if not all(Path(args.data, t, f"{t}.json").exists() for t in TASKS):
            make_dataset(args.data, TASKS, samples=n, frames=8, seed=1)
            print(f"wrote {n} held-out synthetic clips per task to {args.data}", flush=True)
    tasks = args.tasks.split(",") if args.tasks else list_tasks(args.data)
    load_samples(args.data, tasks, args.limit)  # a bad data file fails here, before the model loads
    model, proc = load_model(args.model, device=args.device, dtype=args.dtype)
    _linears(args, model)
    state = _distributed()  # under `accelerate launch`: every process evaluates its share, the main one reports
    try:
        return _eval_and_report(args, model, proc, tasks, state, runs)
    finally:
        if state is not None:  # tear the process group down: a rank that exits with gloo's threads alive aborts
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()


def _linears(args, model) -> None:
    """--linears fp32: bf16/fp16 linear layers through float32 GEMMs; a hint where bf16 matmul is emulated."""
    from .models.cpu_bf16 import apply_linears

    line = apply_linears(model, args.linears)
    if line:
        print(line, flush=True)


def _eval_runs(args) -> list[tuple[str, list, tuple]]:
    """What `vlmkv eval` runs, every method resolved to a policy (a misspelt name or option raises ValueError here,
    before the model loads or the output folder is touched): [(kind, methods, extra)] with kind "pareto" (one run),
    "sweep" (one run per --sweep, extra = (option, values)) or "methods" (one run)."""
    from .eval import presets

    if args.pareto is not None:
        fams = [f for f in args.pareto.split(",") if f] or None
        return [("pareto", presets.pareto_methods(fams), ())]
    if args.sweep:
        out = []
        for spec in args.sweep:
            option, values, methods = presets.sweep_methods(spec)
            out.append(("sweep", methods, (option, values)))
        return out
    listed = [_method_entry(m) for m in (args.methods or ("" if args.preset else EVAL_METHODS)).split(",") if m]
    return [("methods", (presets.preset_methods(args.preset) if args.preset else []) + listed, ())]


def _eval_and_report(args, model, proc, tasks, state, runs) -> int:
    from .eval import presets
    from .eval.runner import baselines, evaluate, load_records, table, write_outputs

    main_proc = state is None or state.is_main_process
    # records.jsonl in each output directory: one line per (sample, method) as it finishes; --resume reuses them
    run = lambda methods, log_dir: evaluate(model, proc, args.data, tasks, methods, limit=args.limit,  # noqa: E731
                                            max_new_tokens=args.max_new_tokens, fidelity=not args.no_fidelity,
                                            log_dir=log_dir, resume=args.resume or args.report_only,
                                            share_prefill=args.share_prefill, answer_missing=not args.report_only)
    files = []
    kind = runs[0][0]
    if kind == "pareto":
        rows = run(_feasible(model, runs[0][1]), args.out)
        if main_proc:
            print(table(rows))
            print("\n" + presets.fewest_bits_markdown(rows))
            files += write_outputs(rows, args.out)
            Path(args.out, "fewest_bits.md").write_text(presets.fewest_bits_markdown(rows) + "\n")
            presets.plot_pareto(rows, f"{args.out}/pareto.png", title=str(args.data))
            files += [f"{args.out}/fewest_bits.md", f"{args.out}/pareto.png"]
    elif kind == "sweep":
        for _, methods, (option, values) in runs:
            out = f"{args.out}/sweep_{option}"
            rows = run(methods, out)
            if main_proc:
                print(table(rows))
                files += write_outputs(rows, out)
                presets.plot_sweep(rows, option, values, f"{out}/sweep_{option}.png")
                files.append(f"{out}/sweep_{option}.png")
    else:
        rows = run(runs[0][1], args.out)
        if main_proc:
            print(table(rows))
            print("\n" + baselines(args.data, tasks, args.limit))
            if args.preset == "akvq-table2":
                print("\n" + presets.table2_markdown(rows, presets.answer_flips(load_records(args.out), rows)))
            elif args.preset == "akvq-ablation":
                print("\n" + presets.ablation_markdown(rows))
            files += write_outputs(rows, args.out)
    if main_proc:
        print("\nwrote " + ", ".join(str(f) for f in files))
    return 0


def _feasible(model, methods: list) -> list:
    """The (label, policy) pairs this model's layers can hold; the others are named on stderr and left out (a
    2.5-bit budget, say, below what 2-bit codes with their scales cost at this head dimension)."""
    from .cache import head_dim_of
    from .models.hooks import text_config

    cfg = text_config(model)
    d, h = head_dim_of(cfg), getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    kept = []
    for label, pol in methods:
        try:
            pol.validate(d, h)
            kept.append((label, pol))
        except ValueError as e:
            print(f"pareto: {label} left out: {e}", file=sys.stderr)
    return kept


def cmd_bench(args) -> int:
    import json

    from . import load_model
    from .bench import bench, markdown

    methods = _bench_methods(args.methods)  # every spelling checked before the model loads
    model, proc = load_model(args.model, device=args.device)
    tok = getattr(proc, "tokenizer", proc)
    rows = bench(model, tok, methods, context=args.context, batches=args.batch, steps=args.steps)
    print(markdown(rows))
    import torch

    print(f"\n{args.model} on {args.device}, {torch.get_num_threads()} threads; decode: median of {args.steps} steps after 2 "
          f"warm-up steps; bytes counted from the stored tensors")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))
        print(f"wrote {args.out}")
    return 0


def _bench_methods(text: str) -> list:
    """`--methods` of `vlmkv bench`: "dynamic", or an entry as `vlmkv eval` takes it (a name, or a name with
    options after colons), each resolved to a policy now (ValueError naming a misspelt one)."""
    out = [m if m == "dynamic" else _method_entry(m) for m in text.split(",") if m]
    if not out:
        raise ValueError(f"--methods must name at least one method, got {text!r}")
    return out


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}")
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"must be integers >= 1, got {text!r}")
    return vals


TRAIN_HELP = {
    "frames": "frames per training clip in the three stages",
    "batch": "clips per training step",
    "questions": "question turns per training clip (the first as `vlmkv eval` asks it)",
    "text_steps": "steps of the text stage (LoRA on the questions' text)",
    "align_steps": "steps of the align stage (vision tower and projector)",
    "joint_steps": "steps of the joint stage (everything trained together)",
    "lr": "learning rate of the LoRA adapters",
    "vision_lr": "learning rate of the vision tower and projector",
    "lora_r": "LoRA rank",
    "eval_clips": "held-out clips per task evaluated after each stage",
    "seed": "random seed (the run is deterministic for a seed)",
    "init": "start from this pocket.safetensors instead of fresh adapters (a smaller rank fills the first ranks)",
    "curriculum": "long-clip LoRA levels after the three stages, FRAMES:STEPS,... in rising order, e.g. 16:60,32:80",
    "mix": "how often each task is drawn, TASK=WEIGHT,... (unnamed tasks weigh 1), e.g. Counting=3,WhichFrame=3",
    "aux": "training-only follow-ups with hard options, AUX=WEIGHT,..., e.g. CountClose=2,CountRange=2,WhichClose=2",
}


def _train_flags() -> list:
    """`TrainConfig` fields exposed as flags (all but `out`, `tasks` and `bf16`, which have their own: `--precision`)."""
    from .models.pocket.config import TrainConfig

    return [f for f in dataclasses.fields(TrainConfig) if f.name not in ("out", "tasks", "bf16")]


def cmd_train_demo(args) -> int:
    import torch

    from .models.pocket.train import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks else TrainConfig.tasks
    bf16 = {"auto": None, "bf16": True, "fp32": False}[args.precision]
    cfg = TrainConfig(out=args.out, tasks=tasks, bf16=bf16, **{f.name: getattr(args, f.name) for f in _train_flags()})
    rec = train(cfg)
    print(f"wrote {args.out}/pocket.safetensors; held-out accuracy after each stage:")
    for name, st in rec["stages"].items():
        print(f"  {name}: {st['steps']} steps, {st['seconds']:.0f} s, {st['heldout_accuracy']}")
    return 0


def cmd_list(args) -> int:
    from .policies import get_policy, list_policies

    for name in list_policies():
        p = get_policy(name)
        doc = (sys.modules[type(p).__module__].__doc__ or "").strip().splitlines()[0]
        opts = ", ".join(f"{f.name}={getattr(p, f.name)!r}" for f in dataclasses.fields(p))
        print(f"{name:<12} {doc}\n{'':<12} options: {opts or '-'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlmkv",
        description="Cut the KV cache of Hugging Face (vision-)language models to 2-4 bits. "
                    "Methods: fp16 (reference), rtn, kivi, smoothquant, skvq, akvq-vl, windowquant, auto, and wrappers "
                    "such as windowquant+wht+pivots (see `vlmkv list`).",
        epilog="Example: vlmkv generate --model smollm2-135m --method kivi --bits 2 --prompt 'Why is the sky blue?'",
    )
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer one prompt with a quantized KV cache; print bytes against FP16 and time",
                       description="Generate an answer with the chosen KV-cache method and report the cache's real "
                                   "memory (counted from stored bytes) against FP16, and the time taken.")
    g.add_argument("--model", default="smollm2-135m", help="embedded name (smollm2-135m), Hugging Face id or local path")
    g.add_argument("--method", default="kivi", help="registered method name, e.g. fp16, rtn-2, kivi, akvq-vl, "
                                                     "windowquant+wht (see `vlmkv list`)")
    g.add_argument("--bits", type=_bounded(int, 2, 8), default=None, help="bit-width for methods that take one (2, 4 or 8)")
    g.add_argument("--option", action="append", metavar="NAME=VALUE", help="other method option, e.g. group_size=64; repeatable")
    g.add_argument("--prompt", required=True, help="the user message")
    g.add_argument("--image", action="append", help="image file for a vision-language model; repeatable")
    g.add_argument("--max-new-tokens", type=POSITIVE, default=64, help="tokens to generate (default 64)")
    g.add_argument("--temperature", type=_bounded(float, 0.0), default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-p", type=_bounded(float, 0.0, 1.0, low_open=True), default=0.95, help="nucleus sampling threshold when sampling")
    g.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    g.add_argument("--no-chat", action="store_true", help="feed the prompt as raw text, without the chat template")
    g.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="compare methods on the demo VLM: answers, accuracy, KV bytes, fidelity",
                       description="With a VLM (default: pocket, the demo VLM trained here): held-out synthetic "
                                   "clips under each method, every answer against the truth, accuracy, KV bytes "
                                   "from the stored tensors, fidelity, and an accuracy-vs-bits plot. With a text "
                                   "model (e.g. smollm2-135m): copy a long table, with the same measures and time.")
    d.add_argument("--model", default="pocket", help="pocket (default), smollm2-135m, a Hugging Face id or local path")
    d.add_argument("--methods", default=None,
                   help=f"comma-separated, each a name or name:option=value:... (default {VLM_DEMO_METHODS} "
                        f"for a VLM, {DEMO_METHODS} for a text model)")
    d.add_argument("--clips", type=POSITIVE, default=2, help="VLM: held-out clips per task type (default 2)")
    d.add_argument("--tasks", default="ObjectExistence,FrameColour,WhichFrame,Counting",
                   help="VLM: synthetic task types (default: the four pocket can do; it is at chance on "
                        "StateChange, see its model card)")
    d.add_argument("--out", default="out/demo", help="VLM: directory for the CSV, JSON, answers and plot")
    d.add_argument("--rows", type=_bounded(int, 1, 24), default=24, help="text model: table rows to copy (1-24)")
    d.add_argument("--steps", type=POSITIVE, default=24, help="text model: teacher-forced decode steps for top-1/KL")
    d.add_argument("--seed", type=int, default=2, help="text model: which random table")
    d.set_defaults(func=cmd_demo)

    td = sub.add_parser("train-demo", help="train the demo VLM (pocket) on synthetic clips; resumable",
                        description="Train pocket's vision tower, projector and LoRA adapters on SmolLM2-135M in "
                                    "three stages (text, align, joint); deterministic for a seed, resumable from "
                                    "--out. Load the result with VLMKV_POCKET_WEIGHTS=OUT/pocket.safetensors.")
    td.add_argument("--out", default="out/pocket-train", help="run directory (checkpoints, train.json, weights)")
    for f in _train_flags():
        td.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                        help=TRAIN_HELP[f.name] + " (default: %(default)s)")
    td.add_argument("--tasks", default=None, help="comma-separated synthetic task types (default: all five)")
    td.add_argument("--threads", type=POSITIVE, default=None, help="torch threads (default: torch's choice)")
    td.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="compute precision of the backbone: bf16 autocast or float32; auto (default) takes bf16 "
                         "where the CPU has bf16 instructions, float32 where bf16 would be emulated (many times slower)")
    td.set_defaults(func=cmd_train_demo)

    ins = sub.add_parser("inspect", help="attention patterns: text / visual / pivot attention per layer and head, "
                                        "TSA/PSA layers, heat maps",
                         description="Measure what AKVQ-VL relies on (seed 002, Section III-A): per layer and head, the "
                                     "average attention received by text, visual and pivot tokens (eager attention), a "
                                     "TSA/PSA classification per layer like Table I, and heat maps like Figures 1 and 3.")
    ins.add_argument("--model", default="smollm2-135m", help="embedded name, Hugging Face id or local path (LLM or VLM)")
    ins.add_argument("--prompt", default=None, help="user message (default: the demo's copy-table prompt)")
    ins.add_argument("--image", action="append", help="image file for a VLM; repeatable")
    ins.add_argument("--num-pivots", type=NONNEG, default=15, help="pivot tokens to mark per layer (default 15)")
    ins.add_argument("--threshold", type=_bounded(float, 1.0, low_open=True), default=100.0, help="massive activation: max|h| / median|h| at least this")
    ins.add_argument("--bin", type=POSITIVE, default=8, help="tokens per heat-map cell")
    ins.add_argument("--out", default="out/inspect", help="directory for the report and PNGs")
    ins.set_defaults(func=cmd_inspect)

    md = sub.add_parser("make-data", help="write synthetic multi-frame clips in MileBench's format",
                        description="Generate synthetic clips (coloured shapes, one per frame) with multiple-choice "
                                    "questions, written in MileBench's on-disk format so `vlmkv eval` reads them "
                                    "like real MileBench data.")
    md.add_argument("--out", required=True, help="dataset root directory")
    md.add_argument("--tasks", default=None, help="comma-separated (default: all synthetic tasks)")
    md.add_argument("--samples", type=POSITIVE, default=20, help="clips per task")
    md.add_argument("--frames", type=POSITIVE, default=8, help="frames per clip")
    md.add_argument("--seed", type=int, default=0, help="random seed of the clips (default 0)")
    md.set_defaults(func=cmd_make_data)

    ev = sub.add_parser("eval", help="accuracy, KV bits and fidelity of methods on MileBench-format tasks",
                        description="Run each method on MileBench-format tasks (real MileBench from a local directory, "
                                    "or `vlmkv make-data` output) with a vision-language model: per task accuracy, "
                                    "bits per element and KV MiB from bytes, next-token KL and top-1 agreement vs "
                                    "fp16; CSV, JSON, a table and a PNG.")
    ev.add_argument("--model", default="pocket", help="pocket (the demo VLM, default), a Hugging Face VLM id or local path")
    ev.add_argument("--data", default=None, help="MileBench-format root directory (default: held-out synthetic "
                                                 "clips, --limit per task or 100, written under --out)")
    ev.add_argument("--methods", default=None, help=f"comma-separated, each a name or name:option=value:... "
                                                    f"(kivi-2:schedule=blocks) (default {EVAL_METHODS}); with --preset: "
                                                    "methods run after the preset's")
    ev.add_argument("--pareto", nargs="?", const="", default=None, metavar="FAMILIES",
                    help="sweep every method's knobs (bits, groups and zero points, KIVI residual, AKVQ-VL window and "
                         "clip, windowquant budget, SKVQ window, auto's budget; optionally only the comma-separated "
                         "families given) and write pareto.png (accuracy and KL vs bits from bytes) and fewest_bits.md")
    ev.add_argument("--preset", choices=["akvq-table2", "akvq-ablation"], default=None,
                    help="the seed's Table II grid or Table III ablation (overrides --methods)")
    ev.add_argument("--sweep", action="append", metavar="NAME=VALUES",
                    help="AKVQ-VL knob sweep like Fig. 8: clip=0.6:1.0:0.1, text_clip=..., recent=0,32,64,128,256, "
                         "pivots=0,5,10,15,20; repeatable; writes CSV and a PNG line plot per sweep")
    ev.add_argument("--tasks", default=None, help="comma-separated (default: every task under --data)")
    ev.add_argument("--limit", type=POSITIVE, default=None, help="samples per task")
    ev.add_argument("--max-new-tokens", type=POSITIVE, default=8, help="answer tokens per question (default 8)")
    ev.add_argument("--no-fidelity", action="store_true", help="skip KL / top-1 against fp16 (about half the time)")
    ev.add_argument("--resume", action="store_true",
                    help="reuse the per-sample results in OUT/records*.jsonl of a stopped run (same model and data)")
    ev.add_argument("--report-only", action="store_true",
                    help="write the tables of a stopped run from OUT/records*.jsonl (same settings) without answering "
                         "anything new: only the clips every method answered count; n is in the table")
    ev.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ev.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="model and cache dtype (default float32 on CPU, float16 on GPU); bfloat16 halves a CPU "
                         "eval's time where the CPU has bf16 instructions, and the fp16 baseline then holds 16 bits")
    ev.add_argument("--linears", choices=["native", "fp32"], default="native",
                    help="fp32: a bfloat16/float16 model's linear layers compute in float32 (bf16 inputs, float32 "
                         "sums, output rounded back: the same op in another summation order), for CPUs without bf16 "
                         "instructions, where it is several times faster; activations and caches stay bf16. Recorded "
                         "in run.json, so --resume will not mix the two")
    ev.add_argument("--share-prefill", action=argparse.BooleanOptionalAction, default=None,
                    help="run each prompt through the model once and fill every method's cache from it (the same "
                         "answers, bits and KL; one forward instead of one per method). Default: on unless the "
                         "model's generation config asks for logits processors (e.g. repetition_penalty); "
                         "--share-prefill requires it, --no-share-prefill prefills per method through generate()")
    ev.add_argument("--out", default="out/eval", help="output folder: records, results (CSV, JSON), tables, plots "
                    "(default out/eval)")
    ev.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="decode ms/step and KV bytes of each method on a model, beside DynamicCache",
                       description="Prefill a text prompt with each method's cache, time single-token decode steps "
                                   "and count the cache's bytes, beside transformers' DynamicCache (vlmkv/bench.py).")
    b.add_argument("--model", default="smollm2-135m", help="embedded name, Hugging Face id or local path (LLM or VLM)")
    b.add_argument("--methods", default="dynamic,fp16,rtn-4,rtn-2,kivi-2,akvq-vl,auto",
                   help="comma-separated, spelled as for `vlmkv eval` (auto:bits=3.0, rtn-4:group_size=32:zero_point=none); "
                        "'dynamic' is transformers' DynamicCache, run first and last (default: %(default)s)")
    b.add_argument("--context", type=POSITIVE, default=1024, help="prompt tokens (default 1024)")
    b.add_argument("--batch", type=_int_list, default=[1], help="comma-separated batch sizes (default 1)")
    b.add_argument("--steps", type=POSITIVE, default=16, help="timed decode steps (default 16)")
    b.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    b.add_argument("--out", default=None, help="also write the rows as JSON here")
    b.set_defaults(func=cmd_bench)

    ls = sub.add_parser("list", help="list registered methods and their options",
                        description="List every registered KV-cache method with its default options.")
    ls.set_defaults(func=cmd_list)
    return p


def main(argv=None) -> int:
    """Run one command; errors a user can fix (bad options, data, paths, missing extras) print one line to
    stderr and return 2 (set VLMKV_DEBUG=1 for the traceback)."""
    import os

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, ImportError, OSError, RuntimeError) as e:
        if os.environ.get("VLMKV_DEBUG"):
            raise
        print(f"vlmkv {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
