"""`vlmkv eval`: every method on MileBench-format tasks, with accuracy, bytes and fidelity in one table.

Per (method, task): accuracy (MileBench scoring), bits per element and KV MiB from `cache.nbytes()` at the
end of each answer, and next-token KL / top-1 agreement against the `fp16` cache, teacher-forced on the
fp16 answer tokens of the same sample. Deterministic (greedy decoding).
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..cache import QuantizedKVCache
from .fidelity import teacher_forced_logits
from .milebench import Sample, load_task, score


@dataclass
class Row:
    method: str
    task: str
    n: int
    accuracy: float
    bits_per_element: float
    kv_mib: float
    kl: float
    top1: float


def build_sample_inputs(proc, sample: Sample) -> dict:
    """Chat-formatted inputs with the images where the context's {image#N} placeholders are."""
    if not hasattr(proc, "image_processor"):
        raise ValueError(f"model must come with an image processor for image tasks, got {type(proc).__name__!r}")
    from PIL import Image

    content, images = [], []
    for kind, val in sample.segments():
        if kind == "image":
            content.append({"type": "image"})
            images.append(Image.open(val).convert("RGB"))
        else:
            content.append({"type": "text", "text": val})
    text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return dict(proc(text=text, images=images or None, return_tensors="pt"))


@torch.no_grad()
def evaluate(model, proc, data_root, tasks: list[str], methods: list, limit: int | None = None,
             max_new_tokens: int = 8) -> list[Row]:
    """methods: names (`"rtn-2"`) or (label, Policy) pairs."""
    tok = getattr(proc, "tokenizer", proc)
    samples = [s for t in tasks for s in load_task(data_root, t, limit)]
    prepared = [build_sample_inputs(proc, s) for s in samples]
    refs = []
    for inp in tqdm(prepared, desc="fp16 reference"):
        with QuantizedKVCache(model, "fp16", tokenizer=tok) as cache:
            out = model.generate(**inp, past_key_values=cache, max_new_tokens=max_new_tokens, do_sample=False,
                                 min_new_tokens=2, pad_token_id=tok.pad_token_id)
        refs.append(out[:, inp["input_ids"].shape[1]:])
    rows = []
    for entry in methods:
        label, m = (entry, entry) if isinstance(entry, str) else entry
        per_task: dict[str, list] = {}
        for s, inp, ref in tqdm(list(zip(samples, prepared, refs)), desc=label):
            with QuantizedKVCache(model, m, tokenizer=tok) as cache:
                out = model.generate(**inp, past_key_values=cache, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
                ans = tok.decode(out[0, inp["input_ids"].shape[1]:], skip_special_tokens=True)
                bpe, nb = cache.bits_per_element(), cache.nbytes()
            extra = {k: v for k, v in inp.items() if k not in ("input_ids", "attention_mask")}
            with QuantizedKVCache(model, "fp16", tokenizer=tok) as c0:
                lr = teacher_forced_logits(model, inp["input_ids"], inp["attention_mask"], c0, ref, **extra)
            with QuantizedKVCache(model, m, tokenizer=tok) as c1:
                lq = teacher_forced_logits(model, inp["input_ids"], inp["attention_mask"], c1, ref, **extra)
            lp, lqq = lr.log_softmax(-1), lq.log_softmax(-1)
            kl = float((lp.exp() * (lp - lqq)).sum(-1).mean())
            top1 = float((lr.argmax(-1) == lq.argmax(-1)).float().mean())
            per_task.setdefault(s.task, []).append((score(ans, s), bpe, nb, kl, top1))
        for t, vals in per_task.items():
            n = len(vals)
            rows.append(Row(label, t, n, sum(v[0] for v in vals) / n, sum(v[1] for v in vals) / n,
                            sum(v[2] for v in vals) / n / 2**20, sum(v[3] for v in vals) / n, sum(v[4] for v in vals) / n))
    return rows


def write_outputs(rows: list[Row], out_dir) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))
    (out / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    paths = [out / "results.csv", out / "results.json"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for m in dict.fromkeys(r.method for r in rows):
            rs = [r for r in rows if r.method == m]
            acc = sum(r.accuracy * r.n for r in rs) / sum(r.n for r in rs)
            bits = sum(r.bits_per_element * r.n for r in rs) / sum(r.n for r in rs)
            ax.scatter([bits], [acc], label=m)
        ax.set_xlabel("bits per element (from bytes)")
        ax.set_ylabel("accuracy")
        ax.set_title("Accuracy vs KV bits")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "accuracy_vs_bits.png", dpi=90)
        plt.close(fig)
        paths.append(out / "accuracy_vs_bits.png")
    except ImportError:
        pass
    return paths


def table(rows: list[Row]) -> str:
    lines = ["| method | task | n | accuracy | bits/element | KV MiB | KL vs fp16 | top-1 vs fp16 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.method} | {r.task} | {r.n} | {r.accuracy:.2f} | {r.bits_per_element:.2f} | {r.kv_mib:.2f} | "
                     f"{r.kl:.4f} | {r.top1:.3f} |")
    return "\n".join(lines)
