"""`vlmkv demo` on a VLM (the pocket demo VLM by default): held-out synthetic clips under each method, every
answer against the truth, accuracy, KV memory from `nbytes()` and fidelity, plus the accuracy-vs-bits plot."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .runner import evaluate, table, write_outputs
from .synthetic import TASKS, check_tasks, make_dataset

DEMO_SEED = 7  # held out: training draws its clips from other seeds (models/pocket/train.py)


def run_clip_demo(model, proc, methods: list, clips: int = 3, frames: int = 8, out: str = "out/demo",
                  seed: int = DEMO_SEED, tasks: tuple[str, ...] = TASKS, print_fn=print) -> list:
    """Print one line per clip (each method's answer against the truth) and the summary table; write
    CSV/JSON/PNG under `out`. `methods`: names or (label, policy) pairs, as `evaluate` takes them. Returns the table
    rows."""
    if clips <= 0:
        raise ValueError(f"clips must be positive, got {clips!r}")
    check_tasks(tasks)
    with tempfile.TemporaryDirectory() as root:
        make_dataset(root, tasks, samples=clips, frames=frames, seed=seed)
        answers: list[dict] = []
        rows = evaluate(model, proc, root, list(tasks), methods, answers=answers, max_new_tokens=6)
    by_sample: dict[str, list[dict]] = {}
    for a in answers:
        by_sample.setdefault(a["sample_id"], []).append(a)
    for sid, recs in by_sample.items():
        q = recs[0]["question"].removeprefix("Question: ")
        marks = "  ".join(f"{r['method']}: {r['answer'] or '-'} {'ok' if r['correct'] else 'WRONG'}" for r in recs)
        print_fn(f"[{sid}] {q}  truth: {recs[0]['truth']}\n    {marks}")
    print_fn("")
    print_fn(table(rows))
    print_fn("")
    tot = {}
    for r in rows:
        t = tot.setdefault(r.method, [0, 0.0, 0.0, 0.0])
        t[0] += r.n
        t[1] += r.accuracy * r.n
        t[2] += r.bits_per_element * r.n
        t[3] += r.kv_mib * r.n
    print_fn(f"{'method':<14} {'accuracy':>9} {'bits/el':>8} {'KV KiB':>8}")
    for m, (n, acc, bits, mib) in tot.items():
        print_fn(f"{m:<14} {acc / n:>9.0%} {bits / n:>8.2f} {mib / n * 1024:>8.1f}")
    files = write_outputs(rows, out)
    Path(out, "answers.json").write_text(json.dumps(answers, indent=1))
    print_fn("\nwrote " + ", ".join(str(f) for f in files + [Path(out, "answers.json")]))
    return rows
