"""Pareto plot and fewest-bits table of finished `vlmkv eval` runs: one plot per run (e.g. per context length).

    python benchmarks/pareto_from_results.py docs/pocket/table2_32v5 docs/pocket/table2_64v5

For each folder holding an eval's `results.json`, writes beside it `table2.md` (accuracy per task, mean, share of
FP16, KL, top-1, and answers lost / gained against FP16 clip by clip where the run's records are there), `pareto.png` (mean accuracy and KL against bits
per element counted from bytes, one line per method family, FP16's line) and `fewest_bits.md` (per family, the
fewest bits keeping 99% of FP16's accuracy), as `vlmkv eval --pareto` does for its own sweep. Method labels join
their family's line: "RTN (INT4)" and "rtn-2" are rtn, "auto:bits=3.0" is auto (vlmkv/eval/presets.py: _family).

A method whose plan changed (a new `Policy.revision`) is rerun in its own folder; `--replace-from` merges it:

    python benchmarks/pareto_from_results.py out/t2_64 \
        --replace-from out/t2_64_auto --out out/t2_64_merged

takes every method of the second run except FP16 in place of the first run's method of the same label, writes
the merged `results.json`, `table2.md`, `fewest_bits.md` and `pareto.png` to `--out`. It refuses runs of another
model, data, dtype, answer length or linears setting (their run.json), and runs whose FP16 answers differ on a clip
both answered: then the two are not the same experiment.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vlmkv.eval import presets  # noqa: E402
from vlmkv.eval.runner import Row, load_records, settings_diff  # noqa: E402

SAME = ("model", "data", "dtype", "max_new_tokens", "fidelity", "linears")  # run.json keys both runs must share


def _rows(run: Path) -> list[Row]:
    path = run / "results.json"
    if not path.is_file():
        raise SystemExit(f"runs must be folders of finished vlmkv eval runs, got {str(run)!r} (no results.json)")
    return [Row(**r) for r in json.loads(path.read_text())]


def _fp16_answers(run: Path) -> dict:
    """(task, sample_id) -> FP16's answer, from the run's records (the label whose family is fp16)."""
    return {(t, s): r["answer"] for (t, s, m), r in load_records(run).items() if presets._family(m) == "fp16"}


def merge(base: Path, other: Path) -> tuple[list[Row], dict, str]:
    """`base`'s rows with every non-FP16 method of `other` in place of (or beside) the one of the same label.

    Returns (rows, the records those rows come from, a line saying what was checked). Raises SystemExit when the
    runs are not the same experiment.
    """
    cfg = [json.loads((r / "run.json").read_text()) for r in (base, other)]
    diff = settings_diff(*cfg, SAME)
    if diff:
        raise SystemExit(f"--replace-from needs a run with the same settings as {base}, got changes {diff!r}")
    a, b = _fp16_answers(base), _fp16_answers(other)
    shared = a.keys() & b.keys()
    if not shared:
        raise SystemExit(f"--replace-from needs FP16 answers on clips both runs answered, got none shared "
                         f"({len(a)} in {base}, {len(b)} in {other})")
    differ = sorted(k for k in shared if a[k] != b[k])
    if differ:
        raise SystemExit(f"FP16 answers differ on {len(differ)} of {len(shared)} shared clips (first {differ[0]!r}): "
                         f"{base} and {other} are not the same experiment")
    new = [r for r in _rows(other) if presets._family(r.method) != "fp16"]
    labels, old = {r.method for r in new}, _rows(base)
    rows = [r for r in old if r.method not in labels] + new
    kept = sorted(labels & {r.method for r in old})
    records = {k: r for k, r in load_records(base).items() if k[2] not in labels}
    records.update({k: r for k, r in load_records(other).items() if k[2] in labels})
    return rows, records, (f"{len(labels)} methods from {other} ({', '.join(sorted(labels))}; replacing {', '.join(kept) or 'none'}); "
                  f"FP16 answers equal on all {len(shared)} shared clips")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="folders of finished `vlmkv eval` runs (each with results.json)")
    p.add_argument("--keep", type=float, default=0.99, help="share of FP16's accuracy a point must keep")
    p.add_argument("--replace-from", default=None, metavar="RUN",
                   help="a run on the same clips whose methods replace the (one) run's methods of the same label")
    p.add_argument("--out", default=None, help="with --replace-from: the folder for the merged tables and plot")
    args = p.parse_args(argv)
    if args.replace_from is not None and (len(args.runs) != 1 or not args.out):
        p.error("--replace-from merges into one run: give exactly one run and --out")
    for run in map(Path, args.runs):
        dest = run
        if args.replace_from is None:
            rows, records = _rows(run), load_records(run)
        else:
            rows, records, line = merge(run, Path(args.replace_from))
            dest = Path(args.out)
            dest.mkdir(parents=True, exist_ok=True)
            (dest / "results.json").write_text(json.dumps([r.__dict__ for r in rows], indent=1))
            print(line)
        flips = presets.answer_flips(records, rows)  # None (no column) where the records are not the table's clips
        (dest / "table2.md").write_text(presets.table2_markdown(rows, flips) + "\n")
        table = presets.fewest_bits_markdown(rows, keep=args.keep)
        (dest / "fewest_bits.md").write_text(table + "\n")
        presets.plot_pareto(rows, dest / "pareto.png", title=str(dest))
        print(f"{dest}:\n{table}\nwrote {dest / 'table2.md'}, {dest / 'pareto.png'} and {dest / 'fewest_bits.md'}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
