"""The seed's experiments as presets over `vlmkv eval` (seed 002: Table II, Table III, Figure 8).

    akvq-table2    FP16, RTN INT4/INT2, SmoothQuant, KIVI, SKVQ, AKVQ-VL on every task (Table II layout),
                   with bits per element from bytes as an extra column
    akvq-ablation  RTN INT2 -> + WHT -> + text 4-bit (TSA) -> + pivots and recent (PSA) (Table III)
    sweeps         clip=0.6:1.0:0.1 (2-bit clip, Fig. 8a; --sweep text_clip=... for 8b), recent=0,32,...
                   (Fig. 8c), pivots=0,5,... (number of pivot tokens, Fig. 8d)
All methods use group 128, or the head dimension when that is smaller.
"""
from __future__ import annotations

import re

from ..policies import get_policy
from .runner import paired

TABLE2 = [("FP16", "fp16"), ("RTN (INT4)", "rtn-4"), ("RTN (INT2)", "rtn-2"), ("SmoothQuant", "smoothquant-2"),
          ("KIVI", "kivi-2"), ("SKVQ", "skvq"), ("AKVQ-VL", "akvq-vl")]

ABLATION = [
    ("RTN (INT2)", dict(wht=False, text_4bit=False, pivots=False)),
    ("+ WHT", dict(wht=True, text_4bit=False, pivots=False)),
    ("+ Adaptive quantization based on TSA", dict(wht=True, text_4bit=True, pivots=False)),
    ("+ Adaptive quantization based on PSA", dict(wht=True, text_4bit=True, pivots=True)),
]

SWEEP_KEYS = {"clip": "low_clip", "text_clip": "text_clip", "recent": "recent", "pivots": "num_pivots"}


def preset_methods(name: str) -> list[tuple[str, object]]:
    if name == "akvq-table2":
        return [(label, get_policy(m)) for label, m in TABLE2]
    if name == "akvq-ablation":
        return [("FP16", get_policy("fp16"))] + [(label, get_policy("akvq-vl", **o)) for label, o in ABLATION]
    raise ValueError(f"preset must be 'akvq-table2' or 'akvq-ablation', got {name!r}")


def parse_sweep(spec: str) -> tuple[str, list]:
    """`clip=0.6:1.0:0.1` (start:stop:step, stop included) or `recent=0,32,64` -> (akvq-vl option, values)."""
    if "=" not in spec:
        raise ValueError(f"sweep must look like name=values, got {spec!r}")
    key, vals = spec.split("=", 1)
    if key not in SWEEP_KEYS:
        raise ValueError(f"sweep name must be one of {sorted(SWEEP_KEYS)}, got {key!r}")
    if ":" in vals:
        a, b, s = (float(x) for x in vals.split(":"))
        n = int(round((b - a) / s)) + 1
        values = [round(a + i * s, 6) for i in range(n)]
    else:
        values = [float(v) if "." in v else int(v) for v in vals.split(",")]
    if key in ("recent", "pivots"):
        values = [int(v) for v in values]
    return SWEEP_KEYS[key], values


def sweep_methods(spec: str) -> tuple[str, list, list[tuple[str, object]]]:
    """(akvq-vl option, its values, one labelled policy per value)."""
    option, values = parse_sweep(spec)
    return option, values, [(f"akvq-vl {option}={v}", get_policy("akvq-vl", **{option: v})) for v in values]


def answer_flips(records: dict, rows) -> dict[str, tuple[int, int]] | None:
    """label -> (answers lost, answers gained) against FP16 on the clips both answered, from a run's records
    (`runner.load_records`: {(task, sample_id, label): record with "correct"}): lost where FP16 is right and the
    method wrong, gained the reverse. FP16 is the first label whose family is fp16.

    None when there is no FP16 or when the records are not what `rows` count: each label's records must number its
    rows' samples and hold as many right answers (records of a longer run, or scored by an older scorer than the rows'
    rescoring, would count other answers than the table's)."""
    if any("correct" not in r for r in records.values()):  # not an eval's records
        return None
    counts: dict[str, list[int]] = {}
    for (_, _, m), r in records.items():
        c = counts.setdefault(m, [0, 0])
        c[0] += 1
        c[1] += bool(r["correct"])
    for m in {r.method for r in rows}:
        n, right = sum(r.n for r in rows if r.method == m), sum(r.accuracy * r.n for r in rows if r.method == m)
        if counts.get(m, [0, 0])[0] != n or abs(counts[m][1] - right) > 1e-6 * max(1, n):
            return None
    ref_label = next((m for (_, _, m) in records if _family(m) == "fp16"), None)
    if ref_label is None:
        return None
    out = {}
    for m in dict.fromkeys(m for (_, _, m) in records):
        tasks = paired(records, records, ref_label, m).values()
        if tasks:
            out[m] = (sum(t["lost"] for t in tasks), sum(t["gained"] for t in tasks))
    return out


def _flip_cell(flips: dict | None, label: str) -> str:
    if flips is None:
        return ""
    return " {} / {} |".format(*flips[label]) if label in flips else " - |"


def table2_markdown(rows, flips: dict | None = None) -> str:
    """Methods as rows, tasks as columns (accuracy in %), plus bits per element from bytes, and over all tasks
    (weighted by samples): mean accuracy, its share of FP16's, mean KL and top-1 against FP16 ('-' unmeasured).
    `flips` (`answer_flips`) adds a last column: answers lost / gained against FP16, clip by clip."""
    import math

    methods = list(dict.fromkeys(r.method for r in rows))
    tasks = list(dict.fromkeys(r.task for r in rows))
    cell = {(r.method, r.task): r for r in rows}
    pts = _points(rows)
    ref = _reference(pts)

    def shown(v, fmt):
        return "-" if math.isnan(v) else format(v, fmt)

    extra = " lost / gained vs FP16 |" if flips is not None else ""
    lines = ["| Method | Bits (from bytes) | " + " | ".join(tasks) + " | Mean | % of FP16 | KL | top-1 |" + extra,
             "|---|---:|" + "---:|" * len(tasks) + "---:|---:|---:|---:|" + ("---:|" if extra else "")]
    for m in methods:
        rs = [cell[(m, t)] for t in tasks if (m, t) in cell]
        bits, acc, kl = pts[m]
        top1 = _weighted(rs, "top1")
        share = f"{100 * acc / ref[1]:.1f}%" if ref and ref[1] > 0 else "-"
        lines.append(f"| {m} | {bits:.2f} | " + " | ".join(f"{100 * cell[(m, t)].accuracy:.1f}" if (m, t) in cell else "-"
                                                           for t in tasks)
                     + f" | {acc:.3f} | {share} | {shown(kl, '.4f')} | {shown(top1, '.3f')} |"
                     + _flip_cell(flips, m))
    return "\n".join(lines)


def ablation_markdown(rows) -> str:
    methods = list(dict.fromkeys(r.method for r in rows))
    acc = {m: sum(r.accuracy * r.n for r in rows if r.method == m) / max(1, sum(r.n for r in rows if r.method == m))
           for m in methods}
    lines = ["| Method | Accuracy | Delta |", "|---|---:|---:|"]
    prev = None
    for m in methods:
        d = "" if prev is None else f"{100 * (acc[m] - acc[prev]):+.1f}"
        lines.append(f"| {m} | {100 * acc[m]:.1f} | {d} |")
        prev = m if m != "FP16" else None
    return "\n".join(lines)


def plot_sweep(rows, option: str, values: list, out_path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("sweep plots need matplotlib: pip install 'vlmkv[plot]'") from e
    tasks = list(dict.fromkeys(r.task for r in rows))
    fig, ax = plt.subplots(figsize=(6, 4))
    for t in tasks:
        ys = [next(r.accuracy for r in rows if r.task == t and r.method == f"akvq-vl {option}={v}") for v in values]
        ax.plot(values, ys, marker="o", label=t)
    ax.set_xlabel(option)
    ax.set_ylabel("accuracy")
    ax.set_title(f"AKVQ-VL: accuracy vs {option} (seed 002, Fig. 8)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- Pareto
#: each method's knobs swept by `vlmkv eval --pareto`: (method family, label, get_policy name, options)
PARETO = (
    [("rtn", f"rtn-{b} g{g} {z}", f"rtn-{b}", {"group_size": g, "zero_point": z})
     for b in (2, 4, 8) for g, z in ((128, "int16"), (32, "int16"), (32, "int8"), (32, "none"))]
    + [("kivi", f"kivi-{b} r{r}", f"kivi-{b}", {"residual_length": r}) for b in (2, 4) for r in (32, 128)]
    + [("akvq-vl", f"akvq-vl recent={r} clip={c}", "akvq-vl", {"recent": r, "low_clip": c})
       for r in (0, 32, 128) for c in (0.8, 1.0)]
    + [("akvq-vl", "akvq-vl no pivots", "akvq-vl", {"pivots": False})]
    + [("windowquant", f"windowquant budget={b}", "windowquant", {"budget": b}) for b in (2.5, 3.0, 4.0, 6.0)]
    + [("skvq", f"skvq window={w} V{v}", "skvq", {"window": w, "value_bits": v}) for w in (32, 128) for v in (1.5, 2)]
    + [("auto", f"auto bits={b}", "auto", {"bits": b}) for b in (2.5, 3.0, 4.0, 5.0, 6.0)]
    + [("auto evict", f"auto evict bits={b}", "auto", {"bits": b, "evict": True}) for b in (2.0, 2.5, 3.0, 4.0, 5.0)]
)


def pareto_methods(families: list[str] | None = None) -> list[tuple[str, object]]:
    """FP16, then every point of PARETO (of `families` only, when given) as a labelled policy."""
    known = sorted({f for f, *_ in PARETO})
    if families is not None and any(f not in known for f in families):
        raise ValueError(f"pareto families must be among {known}, got {families!r}")
    return [("FP16", get_policy("fp16"))] + [(label, get_policy(name, **opts)) for fam, label, name, opts in PARETO
                                             if families is None or fam in families]


def _family(label: str) -> str:
    """The method a result label belongs to (one Pareto line each): a PARETO point's family, else the policy name of
    a Table II label or of the label itself, lower-case, less options and bits shorthand ("RTN (INT4)", "rtn-2",
    "rtn-4:group_size=32": rtn; "auto:bits=3.0": auto; "FP16": fp16)."""
    hit = next((f for f, lab, *_ in PARETO if lab == label), None)
    if hit is not None:
        return hit
    name = dict(TABLE2).get(label, label).split()[0].split(":")[0].split("@")[0].lower()  # "snapkv@0.75": snapkv
    return re.sub(r"-\d+$", "", name)


def _reference(points: dict):
    """The FP16 point of {label: (bits, *metrics)} (the first whose family is fp16), or None."""
    return next((p for label, p in points.items() if _family(label) == "fp16"), None)


def _weighted(rows, field: str) -> float:
    """Mean of `field` over `rows` (one method's tasks), weighted by their samples."""
    return sum(getattr(r, field) * r.n for r in rows) / max(1, sum(r.n for r in rows))


def _points(rows) -> dict:
    """label -> (bits from bytes, mean accuracy, mean KL), averaged over tasks weighted by samples."""
    out = {}
    for m in dict.fromkeys(r.method for r in rows):
        rs = [r for r in rows if r.method == m]
        out[m] = tuple(_weighted(rs, f) for f in ("bits_per_element", "accuracy", "kl"))
    return out


def by_family(points: dict) -> dict[str, list[tuple]]:
    """{label: (bits, *metrics)} -> {family: [(bits, label, *metrics), ...] by rising bits}, FP16 left out: the
    points of each method's Pareto line (shared by `vlmkv eval --pareto` and benchmarks/long_fidelity.py)."""
    fams: dict[str, list[tuple]] = {}
    for label, (bits, *metrics) in points.items():
        if _family(label) != "fp16":
            fams.setdefault(_family(label), []).append((bits, label, *metrics))
    return {f: sorted(v) for f, v in fams.items()}


def fewest_per_family(points: dict, ok) -> dict[str, tuple | None]:
    """Per family, its point with the fewest bits among those `ok((bits, label, *metrics))` accepts, or None."""
    return {f: next((p for p in pts if ok(p)), None) for f, pts in by_family(points).items()}


def draw_families(ax, points: dict, metric: int) -> None:
    """One line per family on `ax`: bits (log2 axis) against metric number `metric` of the points' tuples."""
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    import matplotlib

    xs = []
    colors = matplotlib.colormaps["tab20"]
    for i, (fam, pts) in enumerate(by_family(points).items()):  # 20 colours, markers apart: no two lines alike
        color = colors((2 * i) % 20 + (i // 10) % 2)  # dark shades first, then light ones
        ax.plot([p[0] for p in pts], [p[2 + metric] for p in pts], marker="os^Dv"[i % 5], color=color, label=fam,
                linestyle="-" if i < 10 else "--")
        xs += [p[0] for p in pts]
    ax.set_xscale("log", base=2)
    if xs:  # plain numbers at the bit widths people compare (a log2 axis alone labels only powers of two)
        ticks = [t for t in (2, 2.5, 3, 4, 5, 6, 8, 12, 16) if min(xs) / 1.1 <= t <= max(xs) * 1.1]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())


def fewest_bits_markdown(rows, keep: float = 0.99) -> str:
    """Per method family, the fewest bits per element (from bytes) of a point that keeps `keep` of FP16's mean
    accuracy, with that point; '-' where none does."""
    pts = _points(rows)
    ref = (_reference(pts) or (None, float("nan"), 0.0))[1]
    lines = [f"| method | fewest bits keeping {100 * keep:.0f}% of FP16 accuracy | at | accuracy | KL vs FP16 |",
             "|---|---:|---|---:|---:|"]
    for fam, best in fewest_per_family(pts, lambda p: p[2] >= keep * ref).items():
        lines.append(f"| {fam} | {best[0]:.2f} | {best[1]} | {best[2]:.3f} | {best[3]:.4f} |" if best
                     else f"| {fam} | - | none of its points | | |")
    lines.append(f"\nFP16: mean accuracy {ref:.3f} ({sum(r.n for r in rows if _family(r.method) == 'fp16')} answers).")
    return "\n".join(lines)


def plot_pareto(rows, out_path, title: str = "") -> None:
    """Mean accuracy and KL vs bits per element (from bytes), one line per method family, with FP16's line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("Pareto plots need matplotlib: pip install 'vlmkv[plot]'") from e
    pts = _points(rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    draw_families(ax1, pts, 0)
    draw_families(ax2, pts, 1)
    if _reference(pts) is not None:
        ax1.axhline(_reference(pts)[1], color="k", linestyle="--", label="FP16")
    ax2.set_yscale("symlog", linthresh=1e-3)
    ax2.set_ylim(bottom=0)  # KL is never negative
    ax1.set(xlabel="bits per element (from bytes)", ylabel="mean accuracy", title=title)
    ax2.set(xlabel="bits per element (from bytes)", ylabel="next-token KL vs FP16")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
