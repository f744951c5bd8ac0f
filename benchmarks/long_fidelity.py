"""Long-context fidelity on the real SmolLM2-135M backbone: teacher-forced next-token KL and top-1 agreement of every
method against the full-precision cache, at several context lengths of real English text, in one run.

    python benchmarks/long_fidelity.py --contexts 2048,4096,8192 --steps 32 --out docs/long_fidelity.json

Text: the license texts Debian ships in /usr/share/common-licenses (GPL-3, Apache-2.0, MPL-2.0, GFDL-1.3, ...),
concatenated: real prose available offline (`--text FILE` to use another). For context N the first N tokens are the
prompt and the next `--steps` tokens of the same text are fed one at a time (teacher forcing), so every method sees
identical inputs; KL(p_full || p_method) and top-1 agreement are averaged over those steps. Bits per element come
from `cache.nbytes()` after the last step (codes, scales, zero points, buffers, slot maps).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vlmkv  # noqa: E402
from vlmkv.cli import _method_entry  # noqa: E402
from vlmkv.eval.fidelity import teacher_forced_logits  # noqa: E402

LICENSES = ["GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "Artistic", "CC0-1.0", "LGPL-2.1", "MPL-1.1"]
METHODS = "rtn-4,rtn-2,kivi-4,kivi-2,smoothquant-2,skvq,akvq-vl,windowquant"


def corpus(path: str | None) -> str:
    if path:
        return Path(path).read_text()
    root = Path("/usr/share/common-licenses")
    parts = [(root / name).read_text() for name in LICENSES if (root / name).exists()]
    if not parts:
        raise SystemExit("no text: pass --text FILE (the Debian license texts are not on this machine)")
    return "\n\n".join(parts)


@torch.no_grad()
def run(args) -> list[dict]:
    model, tok = vlmkv.load_model(args.model)
    ids_all = tok(corpus(args.text), add_special_tokens=False, return_tensors="pt")["input_ids"]
    rows = []
    for n in [int(c) for c in args.contexts.split(",")]:
        if ids_all.shape[1] < n + args.steps:
            raise SystemExit(f"the text holds {ids_all.shape[1]} tokens, fewer than {n} + {args.steps}")
        prompt, cont = ids_all[:, :n], ids_all[:, n:n + args.steps]
        mask = torch.ones_like(prompt)
        t0 = time.perf_counter()
        ref = teacher_forced_logits(model, prompt, mask, DynamicCache(config=model.config), cont).log_softmax(-1)
        t_ref = time.perf_counter() - t0
        for method in tqdm(args.methods.split(","), desc=f"{n} tokens", file=sys.stderr):
            t0 = time.perf_counter()
            entry = _method_entry(method)  # "rtn-4:group_size=32:zero_point=none": a method with options
            with vlmkv.QuantizedKVCache(model, entry if isinstance(entry, str) else entry[1]) as cache:
                got = teacher_forced_logits(model, prompt, mask, cache, cont).log_softmax(-1)
                bits = cache.bits_per_element()
            kl = (ref.exp() * (ref - got)).sum(-1)
            rows.append({"context": n, "method": method, "bits_per_element": round(bits, 3),
                         "kl": round(float(kl.mean()), 5), "kl_max": round(float(kl.max()), 4),
                         "top1": round(float((got.argmax(-1) == ref.argmax(-1)).float().mean()), 4),
                         "seconds": round(time.perf_counter() - t0, 1), "reference_seconds": round(t_ref, 1)})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| context | method | bits/element | next-token KL | top-1 vs full precision |", "|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['context']} | {r['method']} | {r['bits_per_element']:.2f} | {r['kl']:.4f} | {r['top1']:.3f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--contexts", default="2048,4096,8192")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--methods", default=METHODS, help="comma-separated names, or name:option=value:... (as vlmkv eval)")
    p.add_argument("--text", default=None, help="a text file (default: the Debian license texts)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = run(args)
    print(markdown(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
