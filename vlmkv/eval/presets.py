"""The seed's experiments as presets over `vlmkv eval` (seed 002: Table II, Table III, Figure 8).

    akvq-table2    FP16, RTN INT4/INT2, SmoothQuant, KIVI, SKVQ, AKVQ-VL on every task (Table II layout),
                   with bits per element from bytes as an extra column
    akvq-ablation  RTN INT2 -> + WHT -> + text 4-bit (TSA) -> + pivots and recent (PSA) (Table III)
    sweeps         clip=0.6:1.0:0.1 (2-bit clip, Fig. 8a; --sweep text_clip=... for 8b), recent=0,32,...
                   (Fig. 8c), pivots=0,5,... (number of pivot tokens, Fig. 8d)
All methods use group 128, or the head dimension when that is smaller.
"""
from __future__ import annotations

from ..policies import get_policy

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


def table2_markdown(rows) -> str:
    """Methods as rows, tasks as columns (accuracy in %), plus bits per element from bytes."""
    methods = list(dict.fromkeys(r.method for r in rows))
    tasks = list(dict.fromkeys(r.task for r in rows))
    cell = {(r.method, r.task): r for r in rows}
    lines = ["| Method | Bits (from bytes) | " + " | ".join(tasks) + " |",
             "|---|---:|" + "---:|" * len(tasks)]
    for m in methods:
        rs = [cell[(m, t)] for t in tasks if (m, t) in cell]
        bits = sum(r.bits_per_element * r.n for r in rs) / max(1, sum(r.n for r in rs))
        lines.append(f"| {m} | {bits:.2f} | " + " | ".join(f"{100 * cell[(m, t)].accuracy:.1f}" if (m, t) in cell else "-"
                                                           for t in tasks) + " |")
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
