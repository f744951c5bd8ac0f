"""What a model's wrong answers on the synthetic long-range tasks look like, from a `vlmkv eval` run's records.

    python benchmarks/experiments/answer_errors.py out/t2_32 --data out/L32 --seed 2 --method fp16

The clips are regenerated from the `vlmkv make-data` seed (the data files hold images, not the frames' colours and
shapes); each regenerated question and answer must equal the data file's, or the script refuses (wrong --seed).
- Counting: signed error (answer - truth) per clip, and accuracy split by whether some wrong option lies within 2
  of the truth (a rough count fails only there).
- WhichFrame: for each miss, what the chosen frame shares with the asked one: colour, shape, neither.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from vlmkv.eval.runner import load_records, load_samples  # noqa: E402
from vlmkv.eval.synthetic import sample_clip  # noqa: E402

TASKS = ("Counting", "WhichFrame")


def clips(samples: list, task: str, seed: int) -> dict[str, list[tuple[str, str]]]:
    """sample_id -> the clip's (colour, shape) frames, as `make_dataset` drew them with `seed`; checked against
    `samples` (the task's samples as `load_samples` read them from the data file)."""
    frames = len(samples[0].images)
    rng, out = random.Random(f"{seed}-{task}"), {}
    for i, s in enumerate(samples):
        clip, q, _, ans = sample_clip(rng, task, frames)
        if s.sample_id != f"{task}_{i}" or not s.context.endswith(q) or s.answer != ans:
            raise ValueError(f"seed {seed} does not remake the {task} clips ({s.sample_id}: {s.answer!r} vs {ans!r}); "
                             f"pass the --seed given to vlmkv make-data")
        out[s.sample_id] = clip
    return out


def counting(recs: list[dict], choices: dict[str, list[str]]) -> dict:
    err, split = Counter(), Counter()
    for r in recs:
        truth = int(r["truth"])
        near = any(abs(int(c) - truth) <= 2 for c in choices[r["sample_id"]] if c != r["truth"])
        split["near" if near else "far", bool(r["correct"])] += 1
        try:
            err[int(r["answer"].strip()) - truth] += 1
        except ValueError:
            err["not a number"] += 1
    return {"signed_error": dict(sorted(err.items(), key=lambda kv: (isinstance(kv[0], str), kv[0]))),
            "accuracy_with_a_wrong_option_within_2": _acc(split, "near"),
            "accuracy_without": _acc(split, "far")}


def _acc(split: Counter, kind: str) -> dict:
    n = split[kind, True] + split[kind, False]
    return {"clips": n, "accuracy": round(split[kind, True] / n, 3) if n else None}


def which_frame(recs: list[dict], frames: dict[str, list[tuple[str, str]]]) -> dict:
    shares = Counter()
    for r in recs:
        if r["correct"]:
            continue
        clip = frames[r["sample_id"]]
        asked = clip[int(r["truth"].split()[1]) - 1]
        try:
            got = clip[int(r["answer"].split()[1]) - 1]
        except (IndexError, ValueError):
            shares["not a frame"] += 1
            continue
        shares["colour" if got[0] == asked[0] else "shape" if got[1] == asked[1] else "neither"] += 1
    return {"clips": len(recs), "misses": sum(shares.values()), "the chosen frame shares": dict(shares)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a `vlmkv eval --out` directory (records*.jsonl)")
    ap.add_argument("--data", required=True, help="the data directory the run read (its run.json names it)")
    ap.add_argument("--seed", type=int, required=True, help="the seed given to `vlmkv make-data` for --data")
    ap.add_argument("--method", default="fp16", help="method label in the records (default fp16)")
    args = ap.parse_args(argv)
    run_json = Path(args.run) / "run.json"
    read = json.loads(run_json.read_text())["data"] if run_json.exists() else None
    if read is not None and Path(read).resolve() != Path(args.data).resolve():
        raise SystemExit(f"{args.run} read {read}, not --data {args.data}")
    records = load_records(args.run)
    report = {}
    for task in TASKS:
        recs = [r for (t, _, m), r in records.items() if t == task and m == args.method]
        if not recs:
            continue
        listed = load_samples(args.data, [task])
        frames = clips(listed, task, args.seed)
        samples = {s.sample_id: s for s in listed}
        if any(r["sample_id"] not in frames or r["truth"] != samples[r["sample_id"]].answer for r in recs):
            raise SystemExit(f"{args.run}'s {task} records do not match {args.data}")
        if task == "Counting":
            report[task] = {"clips": len(recs), **counting(recs, {k: s.choices for k, s in samples.items()})}
        else:
            report[task] = which_frame(recs, frames)
    if not report:
        raise SystemExit(f"no {TASKS} records for method {args.method!r} in {args.run}")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
