"""One method's answers in two `vlmkv eval` runs, clip by clip: e.g. FP16 of two weight versions on the same clips.

    python benchmarks/experiments/paired_answers.py out/run_a out/run_b --method FP16 --second-method fp16

Only clips both runs answered are compared (a 25-clip run against a 100-clip one compares those 25), and both
runs must have read the same data with the same dtype, answer length and linears setting (their run.json), so the
two columns differ in the model alone. Per task: clips, accuracy of each run, answers lost and gained by the
second; then the mean over tasks weighted by clips.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from vlmkv.eval.runner import load_records, paired, settings_diff  # noqa: E402

SAME = ("data", "dtype", "max_new_tokens", "linears")  # run.json fields the two runs must share


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("first", type=Path)
    ap.add_argument("second", type=Path)
    ap.add_argument("--method", default="FP16", help="the method label in both runs' records (default FP16)")
    ap.add_argument("--second-method", default=None, help="its label in the second run (default: --method)")
    ap.add_argument("--out", type=Path, default=None, help="also write the comparison as JSON here")
    args = ap.parse_args(argv)
    runs = [json.loads((d / "run.json").read_text()) for d in (args.first, args.second)]
    diff = settings_diff(*runs, SAME)
    if diff:
        raise SystemExit(f"the runs differ in {diff!r}: not one experiment")
    second = args.second_method or args.method
    res = paired(load_records(args.first), load_records(args.second), args.method, second)
    if not res:
        raise SystemExit(f"no clip answered by {args.method!r} in the first run and {second!r} in the second")
    print(f"{args.first} ({args.method}) -> {args.second} ({second})\n")
    print("| task | clips | first | second | lost | gained |\n|---|---:|---:|---:|---:|---:|")
    for task, t in res.items():
        print(f"| {task} | {t['clips']} | {t['first'] / t['clips']:.2f} | {t['second'] / t['clips']:.2f} "
              f"| {t['lost']} | {t['gained']} |")
    n = sum(t["clips"] for t in res.values())
    print(f"| mean | {n} | {sum(t['first'] for t in res.values()) / n:.3f} "
          f"| {sum(t['second'] for t in res.values()) / n:.3f} | {sum(t['lost'] for t in res.values())} "
          f"| {sum(t['gained'] for t in res.values())} |")
    if args.out:
        args.out.write_text(json.dumps({"first": str(args.first), "second": str(args.second), "method": args.method, "second_method": second,
                                        "tasks": res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
