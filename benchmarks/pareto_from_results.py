"""Pareto plot and fewest-bits table of finished `vlmkv eval` runs: one plot per run (e.g. per context length).

    python benchmarks/pareto_from_results.py docs/pocket/table2_long/32 docs/pocket/table2_long/64

For each folder holding an eval's `results.json`, writes beside it `pareto.png` (mean accuracy and KL against bits
per element counted from bytes, one line per method family, FP16's line) and `fewest_bits.md` (per family, the
fewest bits keeping 99% of FP16's accuracy), as `vlmkv eval --pareto` does for its own sweep. Method labels join
their family's line: "RTN (INT4)" and "rtn-2" are rtn, "auto:bits=3.0" is auto (vlmkv/eval/presets.py: _family).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vlmkv.eval import presets  # noqa: E402
from vlmkv.eval.runner import Row  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="folders of finished `vlmkv eval` runs (each with results.json)")
    p.add_argument("--keep", type=float, default=0.99, help="share of FP16's accuracy a point must keep")
    args = p.parse_args(argv)
    for run in map(Path, args.runs):
        path = run / "results.json"
        if not path.is_file():
            raise SystemExit(f"runs must be folders of finished vlmkv eval runs, got {str(run)!r} (no results.json)")
        rows = [Row(**r) for r in json.loads(path.read_text())]
        table = presets.fewest_bits_markdown(rows, keep=args.keep)
        (run / "fewest_bits.md").write_text(table + "\n")
        presets.plot_pareto(rows, run / "pareto.png", title=str(run))
        print(f"{run}:\n{table}\nwrote {run / 'pareto.png'} and {run / 'fewest_bits.md'}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
