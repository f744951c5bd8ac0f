"""Where `auto` loses accuracy: oracle ablations of its plan on a development set of long pocket clips.

    vlmkv make-data --out out/dev64 --tasks WhichFrame,Counting --samples 40 --frames 64 --seed 3
    OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 benchmarks/experiments/auto_ablation.py \
        --data out/dev64 --out out/auto_ablation --linears fp32

Each oracle takes `auto`'s plan at `--bits` and raises one part of the cache (breaking the budget on purpose), so
the drop in KL and in answers lost against FP16 says how much of auto's error that part holds:

    prompt16   the question (text after the last frame) at 16 bits
    prompt8    the question at 8 bits or more
    text8      every text token at 8 bits or more
    visual4    every visual token at 4 bits or more
    keys8      keys of every quantized token at 8 bits (values as planned)
    values8    values of every quantized token at 8 bits (keys as planned)
    layers0-3  layers 0 to 3 at 8 bits or more
    window128  the recent window at 128 tokens (AKVQ-VL's), the rest as planned
    keys32     2-bit keys in groups of 32 channels where the plan took larger groups (one more fp16 scale a 32:
               +0.25 bits on those keys), values as planned; not in the default set (`--oracles keys32`)

Use a seed other than the test clips' (Table II uses --seed 2), so that what is tuned here is not scored on the
clips it was tuned on. Writes `OUT/ablation.md` and `OUT/ablation.json`: per variant, bits per element (from
bytes), next-token KL and top-1 against FP16, accuracy, and answers that differ from FP16's. `--report-only`
writes them from the records of a stopped run. The oracles raise parts of `auto`'s current plan.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from vlmkv.policies.auto import AutoPolicy  # noqa: E402
from vlmkv.policies.base import IMAGE, PAD, BitPlan, PrefillContext  # noqa: E402
from vlmkv.policies.windows import prompt_mask  # noqa: E402

ORACLES = ("prompt16", "prompt8", "text8", "visual4", "keys8", "values8", "layers0-3", "window128", "keys32")


@dataclass
class AutoOracle(AutoPolicy):
    """`auto`'s plan with one part raised (`what`, one of ORACLES): a diagnostic, over the budget by design."""

    what: str = "prompt16"

    def __post_init__(self):
        super().__post_init__()
        if self.what not in ORACLES:
            raise ValueError(f"what must be one of {ORACLES}, got {self.what!r}")

    def _window(self, spare, cost, dec):
        return (128, 8) if self.what == "window128" else super()._window(spare, cost, dec)

    def plan_prefill(self, ctx: PrefillContext) -> BitPlan:
        plan = super().plan_prefill(ctx)
        bits = plan.bits
        types = ctx.token_types.to(bits.device) if ctx.token_types is not None else torch.zeros_like(bits, dtype=torch.int8)
        text = (types != IMAGE) & (types != PAD)
        body = torch.zeros_like(text)
        body[:, :bits.shape[1] - plan.residual] = True  # the recent window is already at 16 bits
        if self.what == "prompt16":
            bits[prompt_mask(types) & body] = 16
        elif self.what == "prompt8":
            bits[prompt_mask(types) & body & (bits < 8)] = 8
        elif self.what == "text8":
            bits[text & body & (bits < 8)] = 8
        elif self.what == "visual4":
            bits[(types == IMAGE) & (bits < 4)] = 4
        elif self.what == "layers0-3" and ctx.layer_idx < 4:
            bits[body & (bits < 8)] = 8
        return plan

    def spec(self, bits, kind, head_dim):
        if bits < 8 and (self.what, kind) in (("keys8", "key"), ("values8", "value")):
            return super().spec(8, kind, head_dim)
        spec = super().spec(bits, kind, head_dim)
        if self.what == "keys32" and kind == "key" and bits == 2 and spec.group_size > 32 and head_dim % 32 == 0:
            return replace(spec, group_size=32)
        return spec


def summarize(records: list[dict]) -> list[dict]:
    """Per method: n, bits, accuracy, KL, top-1, and answers that differ from FP16's (lost / gained a right one)."""
    ref = {(r["task"], r["sample_id"]): r for r in records if r["method"] == "fp16"}
    by = defaultdict(list)
    for r in records:
        by[r["method"]].append(r)
    out = []
    for m, rs in by.items():
        rs = [r for r in rs if (r["task"], r["sample_id"]) in ref]
        f = [ref[(r["task"], r["sample_id"])] for r in rs]
        n = len(rs)
        out.append({"method": m, "n": n, "bits": sum(r["bits"] for r in rs) / n,
                    "accuracy": sum(r["correct"] for r in rs) / n,
                    "kl": sum(r["kl"] for r in rs) / n if m != "fp16" else 0.0,
                    "top1": sum(r["top1"] for r in rs) / n if m != "fp16" else 1.0,
                    "differ": sum(r["answer"] != a["answer"] for r, a in zip(rs, f)),
                    "lost": sum(a["correct"] and not r["correct"] for r, a in zip(rs, f)),
                    "gained": sum(r["correct"] and not a["correct"] for r, a in zip(rs, f))})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="a development set (make-data with a seed the test clips do not use)")
    ap.add_argument("--tasks", default="WhichFrame,Counting")
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="pocket-long")
    ap.add_argument("--bits", type=float, default=3.0)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=6)
    ap.add_argument("--oracles", default=",".join(o for o in ORACLES if o != "keys32"))
    ap.add_argument("--extra", default="akvq-vl,akvq-vl:recent=0", help="registered methods to run beside (labels)")
    ap.add_argument("--linears", choices=("native", "fp32"), default="native")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="only write the tables from OUT's records (a stopped run)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        return report(out)
    if not args.data:
        ap.error("--data is needed unless --report-only")

    import vlmkv
    from vlmkv.cli import _method_entry
    from vlmkv.eval.runner import evaluate
    from vlmkv.models.cpu_bf16 import apply_linears

    model, proc = vlmkv.load_model(args.model, dtype=torch.bfloat16)
    line = apply_linears(model, args.linears)  # the same check and switch as `vlmkv eval --linears`
    if line:
        print(line, flush=True)
    methods = ["fp16", (f"auto:bits={args.bits}", AutoPolicy(bits=args.bits))]
    methods += [(f"oracle:{w}", AutoOracle(bits=args.bits, what=w)) for w in args.oracles.split(",") if w]
    methods += [_method_entry(m) for m in args.extra.split(",") if m]
    evaluate(model, proc, args.data, args.tasks.split(","), methods, limit=args.limit,
             max_new_tokens=args.max_new_tokens, log_dir=out, resume=args.resume)
    try:
        from accelerate import PartialState

        if not PartialState().is_main_process:
            return 0
    except ImportError:
        pass
    return report(out)


def report(out: Path) -> int:
    """Write OUT/ablation.json and OUT/ablation.md from OUT/records*.jsonl (clips FP16 answered)."""
    records = [json.loads(line) for p in sorted(out.glob("records*.jsonl")) for line in p.read_text().splitlines()
               if line.strip()]
    rows = summarize(records)
    (out / "ablation.json").write_text(json.dumps(rows, indent=1))
    lines = ["| variant | n | bits | accuracy | KL | top-1 | answers != FP16 | lost | gained |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['n']} | {r['bits']:.2f} | {r['accuracy']:.3f} | {r['kl']:.4f} | {r['top1']:.3f} | "
              f"{r['differ']} | {r['lost']} | {r['gained']} |" for r in rows]
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
