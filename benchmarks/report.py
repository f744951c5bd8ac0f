"""Writes docs/RESULTS.md, and redraws its figures, from the committed records: every table there is made here.

    python benchmarks/report.py            # docs/RESULTS.md and the figures it shows
    python benchmarks/report.py --check    # exit 1 if docs/RESULTS.md differs from what the records give

The records are the output folders of `vlmkv eval` (`docs/pocket/*/results.json`, `records*.jsonl`) and the JSON rows of
`benchmarks/long_fidelity.py` and `benchmarks/baseline_fidelity.py` (`docs/*.json`). Each section names the command that
made its records. tests/test_docs.py checks that the committed RESULTS.md equals this script's output, so an edit by
hand is lost: change this script or the records.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(ROOT))

from vlmkv.eval import presets  # noqa: E402
from vlmkv.eval.runner import Row, load_records  # noqa: E402

LENGTHS = (32, 64, 128)
TOKENS = {32: "~790", 64: "~1,530", 128: "~3,030"}
TEXT_PARETO = {1024: "pareto_smollm2_1024", 2048: "pareto_smollm2", 4096: "pareto_smollm2_4096",
               8192: "pareto_smollm2_8192"}
FAMILY_ORDER = ("auto", "akvq-vl", "kivi", "rtn", "skvq", "windowquant", "smoothquant")
PEER_FAMILIES = ("snapkv", "expected_attention", "knorm", "snapkv+quanto", "turboquant")  # benchmarks/peers.py
OURS = ("auto", "auto evict", "akvq-vl", "kivi", "rtn", "skvq", "windowquant")
BUDGETS = (2.5, 3.0, 3.5, 4.0)
AUTO_RUNS = {n: f"auto_L{n}" for n in LENGTHS}  # pocket-long, auto's current plan beside FP16 on the same clips
AUTO_RUNS_COMMAND = """vlmkv make-data --out out/L{n} --frames {n} --samples 100 --tasks ObjectExistence,FrameColour,WhichFrame,Counting
OMP_NUM_THREADS=1 vlmkv eval --model pocket-long --dtype bfloat16 --linears fp32 --max-new-tokens 6 --data out/L{n} \\
  --tasks ObjectExistence,FrameColour,WhichFrame,Counting --limit {limit} \\
  --methods fp16,auto:bits=2.5,auto:bits=3.0,auto:bits=2.5:evict=True --out docs/pocket/auto_L{n}"""
TEXT_COMMAND = ("bash scripts/setup-peers.sh   # .venv-peers: kvpress pins transformers < 5.3\n"
                ".venv-peers/bin/python benchmarks/long_fidelity.py --contexts 1024 --pareto --peers kvpress,turboquant "
                "--out docs/pareto_smollm2_1024.json\n"
                "for n in 2048 4096 8192; do  # measured a few families at a time: --pareto FAMILIES --replace-in $f\n"
                "  f=docs/pareto_smollm2_$n.json; [ $n = 2048 ] && f=docs/pareto_smollm2.json\n"
                "  .venv-peers/bin/python benchmarks/long_fidelity.py --contexts $n --pareto --peers kvpress,turboquant "
                "--out $f\n"
                "done")

# The seed's Table II, LLaVA-v1.5-7B, 12 MileBench tasks (OE OI MA EN SC ST SU WQA TQA MQA SQA DQA): its numbers, not
# ours, to set beside our share of FP16's accuracy
PAPER_TABLE2 = {
    "FP16": (53.0, 46.5, 47.5, 33.5, 36.5, 73.0, 64.5, 59.0, 47.0, 68.5, 43.0, 45.5),
    "RTN (INT4)": (46.0, 43.5, 47.5, 28.5, 35.5, 58.5, 61.0, 43.0, 43.5, 62.5, 41.5, 37.5),
    "RTN (INT2)": (15.5, 12.0, 12.0, 13.5, 8.0, 7.5, 9.0, 7.0, 16.0, 13.5, 9.5, 5.5),
    "SmoothQuant": (37.5, 24.0, 24.5, 22.0, 31.5, 24.5, 25.0, 24.0, 25.5, 26.5, 25.5, 21.0),
    "KIVI": (18.0, 16.0, 24.0, 20.0, 21.5, 16.0, 25.0, 13.0, 18.5, 27.5, 19.0, 18.0),
    "SKVQ": (35.0, 39.0, 14.0, 20.0, 40.5, 48.5, 54.5, 24.5, 20.5, 54.5, 27.0, 13.5),
    "AKVQ-VL": (54.0, 48.0, 48.5, 36.0, 41.0, 78.0, 66.5, 57.0, 46.0, 68.0, 42.5, 46.5),
}
# the seed's Table III: Scene Transition accuracy on LLaVA-v1.5-7B as each part is added
PAPER_TABLE3 = {"FP16": 73.0, "RTN (INT2)": 7.5, "+ WHT": 20.5, "+ Adaptive quantization based on TSA": 41.0,
                "+ Adaptive quantization based on PSA": 78.0}

TABLE2_COMMAND = """OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 -m vlmkv.cli eval --model pocket-long \\
  --dtype bfloat16 --linears fp32 --max-new-tokens 6 --data out/L{n} \\
  --tasks ObjectExistence,FrameColour,WhichFrame,Counting --preset akvq-table2 \\
  --methods windowquant,auto:bits=3.0,auto:bits=2.5,akvq-vl:recent=0 --limit 100 --out docs/pocket/table2_{n}v5"""


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rows_of(folder: Path) -> list[Row]:
    return [Row(**r) for r in json.loads((folder / "results.json").read_text())]


def _rel(path: Path) -> str:
    return str(path.relative_to(DOCS))


def _fewest(rows, keep: float = 0.99) -> tuple[dict, float]:
    """{family: (bits, label, accuracy, KL) or None}, FP16's mean accuracy."""
    pts = presets._points(rows)
    ref = presets._reference(pts)[1]
    return presets.fewest_per_family(pts, lambda p: p[2] >= keep * ref), ref


def budget_section(figures: bool) -> str:
    runs = {n: DOCS / "pocket" / f"table2_{n}v5" for n in LENGTHS}
    best, ref = {}, {}
    for n, folder in runs.items():
        rows = rows_of(folder)
        best[n], ref[n] = _fewest(rows)
        if figures:
            presets.plot_pareto(rows, folder / "pareto.png", title=f"pocket-long, {n} frames ({TOKENS[n]} tokens)")
    fams = [f for f in FAMILY_ORDER if f != "auto" and any(f in best[n] for n in LENGTHS)]  # auto: next section
    out = ["## Which method at which budget", "",
           "### A vision-language model on long clips: pocket-long", "",
           "The fewest bits per element (counted from bytes) at which each method keeps 99% of FP16's mean accuracy, "
           "on the seed's Table II clips: four tasks, 100 synthetic clips each, of 32, 64 and 128 frames of 16 visual "
           "tokens, asked of pocket-long (the demo VLM, `vlmkv/models/pocket/MODEL_CARD.md`). `-`: none of the "
           "method's points keeps 99%. In brackets: the point, its accuracy and its next-token KL against FP16. "
           "`auto`, whose plan these records predate, is measured on its own clips in the next section.", "",
           "| method | " + " | ".join(f"{n} frames ({TOKENS[n]} tokens)" for n in LENGTHS) + " |",
           "|---|" + "---:|" * len(LENGTHS)]
    for f in fams:
        cells = []
        for n in LENGTHS:
            b = best[n].get(f)
            cells.append("-" if b is None else f"**{b[0]:.2f}** ({b[1]}: {b[2]:.3f}, KL {b[3]:.4f})" if f == "auto"
                         else f"{b[0]:.2f} ({b[1]}: {b[2]:.3f}, KL {b[3]:.4f})")
        out.append(f"| {f} | " + " | ".join(cells) + " |")
    out.append("| FP16's accuracy | " + " | ".join(f"{ref[n]:.3f}" for n in LENGTHS) + " |")
    out += ["", "Made by, per length (the records hold every answer; `vlmkv make-data` wrote the clips):", "", "```",
            TABLE2_COMMAND.format(n="{32,64,128}"), "```", ""]
    for n in LENGTHS:
        out.append(f"![accuracy and KL against bits, {n} frames]({_rel(runs[n] / 'pareto.png')})")
    out += ["", auto_pocket_section(), "", text_budget_section(figures)]
    return "\n".join(out)


def _text_rows() -> dict:
    return {n: json.loads((DOCS / f"{name}.json").read_text()) for n, name in TEXT_PARETO.items()}


def _best_under(points: dict, budget: float) -> dict:
    """{family: (bits, label, KL, top-1)}: each family's point of least KL at most 2% over `budget` bits."""
    out = {}
    for fam, pts in presets.by_family(points).items():
        ok = [p for p in pts if p[0] <= budget * 1.02]
        if ok:
            out[fam] = min(ok, key=lambda p: p[2])
    return out


def text_budget_section(figures: bool) -> str:
    lf = _module("long_fidelity")
    data = _text_rows()
    out = ["### Real text: SmolLM2-135M at 1k, 2k, 4k and 8k tokens, with the peers", "",
           "Teacher-forced next-token KL against the full-precision cache on the Debian licence texts, every point of "
           "`vlmkv eval --pareto`'s grid and, in the same run, the peers (`benchmarks/peers.py`): NVIDIA kvpress's "
           "SnapKV, ExpectedAttention and Knorm presses at five compression ratios and SnapKV over transformers' "
           "4-bit quanto cache, and a TurboQuant MSE port (random rotation, Lloyd-Max levels, a norm per head "
           "vector) at 2, 3 and 4 bits. Bytes are counted alike: everything a cache holds after the last step, over "
           "every slot (an evicting cache's kept fp16 elements spread over all tokens).", "",
           "**At equal bytes.** The least KL each method reaches at or under each budget (2% over allowed, as `auto`'s "
           "own contract); bold: the least of the row.", "",
           "| context | budget | " + " | ".join(OURS[:2] + ("best other vlmkv method",) + PEER_FAMILIES) + " |",
           "|---:|---:|" + "---:|" * (3 + len(PEER_FAMILIES))]
    for n, rows in data.items():
        pts = lf._context_points(rows, n)
        for b in BUDGETS:
            best = _best_under(pts, b)
            other = min((best[f] + (f,) for f in OURS[2:] if f in best), key=lambda p: p[2], default=None)
            cells = [best.get(f) for f in OURS[:2]] + [other] + [best.get(f) for f in PEER_FAMILIES]
            low = min((c[2] for c in cells if c is not None), default=None)

            def cell(c, named=False):
                if c is None:
                    return "-"
                text = f"{c[2]:.3f} ({c[0]:.2f} b" + (f", {c[-1]}" if named else "") + ")"
                return f"**{text}**" if c[2] == low else text
            out.append(f"| {n} | {b} | " + " | ".join(cell(c, named=i == 2) for i, c in enumerate(cells)) + " |")
    out += ["", "**Fewest bits for KL <= 0.05**, per method and context:", ""]
    tables, pngs = [], []
    for n, name in TEXT_PARETO.items():
        tables.append(lf.fewest_bits(data[n]).split("\n"))
        if figures:
            lf.plot(data[n], DOCS / f"{name}.png")
        pngs.append(DOCS / f"{name}.png")
    out += tables[0] + [line for t in tables[1:] for line in t[2:]]
    errors = sorted({(r["method"], r["error"]) for rows in data.values() for r in rows if "error" in r})
    if errors:
        out += ["", "Peers that did not run: " + "; ".join(f"{m}: {e}" for m, e in errors) + "."]
    pinned = json.loads((DOCS / "peers_pinned_transformers.json").read_text())
    why = sorted({r["error"].split(" failed: ")[-1] for r in pinned if "error" in r})
    out += ["", "kvpress 0.5.5 requires transformers < 5.3, so it does not install beside the transformers vlmkv's "
            "environment pins (pip: `kvpress 0.5.5 depends on transformers<5.3`); the runs above use "
            "`.venv-peers` (transformers 5.2, inside vlmkv's supported range). Forced onto transformers 5.25 "
            "(`docs/peers_pinned_transformers.json`), every press fails: " + "; ".join(f"`{w}`" for w in why) +
            " (transformers 5.24 renamed the attention modules' cache argument to `cache`; kvpress's hooks read "
            "`past_key_values`)."]
    out += ["", second_question_section(data), "", "```", TEXT_COMMAND, "```", ""]
    out += [f"![KL and top-1 against bits, {n} tokens]({_rel(p)})" for n, p in zip(TEXT_PARETO, pngs)]
    return "\n".join(out)


PROBE_POINTS = ("FP16", "auto bits=3.0", "auto bits=4.0", "auto bits=5.0", "auto evict bits=3.0", "auto evict bits=4.0",
                "kivi-4 r32", "rtn-4 g32 none", "akvq-vl recent=128 clip=0.8", "snapkv@0.75", "snapkv@0.8",
                "snapkv+quanto-4@0.25", "turboquant-3", "turboquant-4")


def second_question_section(data: dict) -> str:
    out = ["### Second question: what eviction costs", "",
           "After the 32 teacher-forced tokens, a second question is asked of the same cache: a paragraph break, then "
           "the document's tokens 16-80 again, fed in one forward (reading its own tokens unquantized, as a prompt "
           "does, and what the cache stores of everything before it). Predicting them means reading the beginning of "
           "the prompt, which the first question (the prompt's last tokens) hardly attended to: what an evicting cache "
           "dropped is gone. Without eviction `auto` adds a uniform prior to the first question's attention (`prior`: "
           "as much attention again, spread evenly over the tokens), so the tokens that question hardly read rise "
           "sooner than it alone would raise them; at 3-4 bits an element many stay at 2 bits, and those are what a "
           "second question misses most. KL and top-1 over the 66 tokens against the full-precision cache "
           "(`probe_kl`, `probe_top1` in the records).", "",
           "| context | method | bits/element | KL, first question | KL, second question | top-1, second question |",
           "|---:|---|---:|---:|---:|---:|"]
    for n, rows in data.items():
        by = {r["method"]: r for r in rows if "error" not in r}
        for label in PROBE_POINTS:
            r = by.get(label)
            if r is None or "probe_kl" not in r:
                continue
            out.append(f"| {n} | {label} | {r['bits_per_element']:.2f} | {r['kl']:.4f} | {r['probe_kl']:.4f} | "
                       f"{r['probe_top1']:.3f} |")
    return "\n".join(out)


def auto_pocket_section() -> str:
    out = ["### `auto` on pocket-long, as it plans now", "",
           "`auto` ranks tokens by the question's queries, stores 2- and 4-bit tokens as codebooks and, with "
           "`evict=True`, drops what the question does not read (the table above holds its earlier plan, measured on "
           "other clips). FP16 and `auto` on the same clips; share of FP16's mean accuracy, and next-token KL.", "",
           "| frames | clips (all tasks) | FP16 accuracy | " + " | ".join(("auto bits=2.5", "auto bits=3.0", "auto bits=2.5 evict"))
           + " |", "|---:|---:|---:|---:|---:|---:|"]
    limits = {}
    for n in LENGTHS:
        folder = DOCS / "pocket" / AUTO_RUNS[n]
        if not (folder / "results.json").exists():
            continue
        rows = rows_of(folder)
        pts = presets._points(rows)
        ref = presets._reference(pts)
        clips = sum(r.n for r in rows if r.method == "fp16")
        limits[n] = clips // 4
        cells = []
        for label in ("auto:bits=2.5", "auto:bits=3.0", "auto:bits=2.5:evict=True"):
            p = pts.get(label)
            cells.append("-" if p is None else f"{100 * p[1] / ref[1]:.1f}% ({p[0]:.2f} b, KL {p[2]:.4f})")
        out.append(f"| {n} | {clips} | {ref[1]:.3f} | " + " | ".join(cells) + " |")
    out += ["", "```"] + [AUTO_RUNS_COMMAND.format(n=n, limit=lim) for n, lim in limits.items()] + ["```"]
    return "\n".join(out)


def _share(rows, label: str) -> float:
    """A label's mean accuracy over FP16's, in percent."""
    pts = presets._points(rows)
    return 100 * pts[label][1] / presets._reference(pts)[1]


def seed_section() -> str:
    out = ["## The seed's experiments, reproduced", "",
           "### Table II: every method at its paper settings", "",
           "Our share of FP16's mean accuracy on pocket-long's clips, beside the paper's on LLaVA-v1.5-7B (its "
           "Table II, mean over 12 MileBench tasks; its numbers, not our measurement):", "",
           "| method | paper, LLaVA-v1.5-7B | " + " | ".join(f"ours, {n} frames" for n in LENGTHS) + " |",
           "|---|---:|" + "---:|" * len(LENGTHS)]
    runs = {n: rows_of(DOCS / "pocket" / f"table2_{n}v5") for n in LENGTHS}
    fp16 = sum(PAPER_TABLE2["FP16"])
    for label, paper in PAPER_TABLE2.items():
        ours = [f"{_share(runs[n], label):.1f}%" for n in LENGTHS]
        out.append(f"| {label} | {100 * sum(paper) / fp16:.1f}% | " + " | ".join(ours) + " |")
    for label in ("windowquant", "auto:bits=3.0", "auto:bits=2.5", "akvq-vl:recent=0"):
        out.append(f"| {label} | - | " + " | ".join(f"{_share(runs[n], label):.1f}%" for n in LENGTHS) + " |")
    for n in LENGTHS:
        folder = DOCS / "pocket" / f"table2_{n}v5"
        rows = runs[n]
        out += ["", f"{n} frames ({TOKENS[n]} tokens), per task (records: `{_rel(folder)}/`):", "",
                presets.table2_markdown(rows, presets.answer_flips(load_records(folder), rows))]
    abl = DOCS / "pocket" / "ablation100"
    rows = rows_of(abl)
    means = presets._points(rows)
    out += ["", "### Table III: AKVQ-VL's parts, one at a time", "",
            "On pocket (the shipped 8-frame demo VLM), 100 clips per task on each of its four tasks; beside it, the "
            "paper's Scene Transition accuracy on LLaVA-v1.5-7B (its numbers). The RTN (INT2) row is AKVQ-VL with its "
            "parts off, so it keeps AKVQ-VL's 0.8 clip ratio at 2 bits.", "",
            "| step | bits/element | ours, mean accuracy | paper, Scene Transition |", "|---|---:|---:|---:|"]
    for label, paper in PAPER_TABLE3.items():
        out.append(f"| {label} | {means[label][0]:.2f} | {means[label][1]:.3f} | {paper:.1f} |")
    out += ["", "```",
            "OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 -m vlmkv.cli eval --data out/heldout3 \\",
            "  --tasks ObjectExistence,FrameColour,WhichFrame,Counting --preset akvq-ablation --limit 100 \\",
            "  --no-fidelity --max-new-tokens 6 --out docs/pocket/ablation100", "```", "",
            "### Figure 8: AKVQ-VL's knobs swept", "",
            "On pocket, 25 clips per task, every other knob at AKVQ-VL's default (clip 0.8, 128 recent tokens, "
            "15 pivots). The paper sweeps the same knobs on Document QA and Webpage QA and picks 0.8, 128 and 15.", "",
            "| knob | value | bits/element | mean accuracy |", "|---|---:|---:|---:|"]
    for option in ("low_clip", "recent", "num_pivots"):
        folder = DOCS / "pocket" / "sweeps25" / f"sweep_{option}"
        pts = presets._points(rows_of(folder))
        for label in sorted(pts, key=lambda s: float(s.split("=")[1])):
            out.append(f"| {option} | {label.split('=')[1]} | {pts[label][0]:.2f} | {pts[label][1]:.3f} |")
    out += ["", "```",
            "OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 -m vlmkv.cli eval --data out/heldout3 \\",
            "  --tasks ObjectExistence,FrameColour,WhichFrame,Counting --limit 25 --no-fidelity --max-new-tokens 6 \\",
            "  --sweep clip=0.6:1.0:0.1 --sweep recent=0,32,64,128,256 --sweep pivots=0,5,10,15,20 --out docs/pocket/sweeps25",
            "```"]
    return "\n".join(out)


def text_section() -> str:
    lf = _module("long_fidelity")
    rows = json.loads((DOCS / "long_fidelity.json").read_text())
    return "\n".join(["## Fidelity on real text", "",
                      "Teacher-forced next-token KL and top-1 agreement against the full-precision cache, SmolLM2-135M on "
                      "the Debian licence texts, each method at its defaults:", "", lf.markdown(rows), "", "```",
                      "python benchmarks/long_fidelity.py --contexts 2048,4096,8192 --steps 32 --out docs/long_fidelity.json",
                      "```"])


def peers_section() -> str:
    bf = _module("baseline_fidelity")
    rows = json.loads((DOCS / "baseline_fidelity.json").read_text())["rows"]
    return "\n".join(["## Peers on the same text", "",
                      "The baselines as their papers define them against the simplified versions first written here "
                      "(SmolLM2-135M, 1,024 tokens of real text: attention-output and reconstruction error, KL, top-1):",
                      "", bf.markdown(rows), "", "```",
                      "python benchmarks/baseline_fidelity.py --context 1024 --steps 64 --out docs/baseline_fidelity.json",
                      "```", "",
                      "transformers' own quantized caches (optimum-quanto, HQQ) are timed beside vlmkv's in "
                      "[BENCHMARKS.md](BENCHMARKS.md). Token eviction (kvpress's presses) and a TurboQuant port run in "
                      "the long-context harness beside every method: see \"Real text\" above."])


def vllm_section() -> str:
    vb = _module("vllm_bench")
    result = json.loads((DOCS / "vllm" / "records.json").read_text())
    recs = {r["format"]: r for r in result["records"]}
    bf = recs["bf16"]

    def line(fmt: str) -> str:
        r = recs[fmt]
        return (f"`{fmt}` holds {r['tokens'] / bf['tokens']:.2f}x bf16's tokens at perplexity "
                f"{100 * (r['ppl'] / bf['ppl'] - 1):+.2f}%")

    return "\n".join([
        "## Serving with vLLM", "",
        "vlmkv's pages inside vLLM's CPU build (the plugin, [VLLM.md](VLLM.md)): SmolLM2-135M in bf16, "
        f"{result['kv_space_gib']} GiB of KV space, blocks of 128 tokens. Capacity is the tokens vLLM reports fit "
        "(every byte of codes, scales and zero points counted; the `kivi` formats' full-precision room for each "
        "running request's last block comes on top: 2.9 MB a request; `kivi-2/32` is `kivi-2` with "
        "`key_group` 32). Perplexity: the first "
        f"{result['tokens']:,} tokens of {len(result['docs'])} license texts Debian ships ({', '.join(result['docs'])}), "
        "each token attending to the cache as it would while decoding. The same tokens through vlmkv's transformers "
        "cache at the same format (one format, two engines) land as far from vLLM's number as the transformers "
        "engine's own bf16 and float32 runs land from each other: that is the noise of bf16 arithmetic through a "
        "quantizer (a key a rounding step apart). Throughput: "
        f"{result['prompt']:,}-token prompts, {result['new']} new tokens, decode tokens/s with the prefill taken out.",
        "", f"- At 8 bits: {line('kivi-8')}; {line('rtn-8')}.",
        f"- At 4 bits: {line('kivi-4')}; {line('rtn-4+hadamard')}.",
        f"- At 2 bits: {line('kivi-2')}; with key groups of 32 tokens, {line('kivi-2/32')}; with Hadamard, "
        f"{line('kivi-2+hadamard')}. Per-token 2-bit keys, even rotated: {line('rtn-2+hadamard')}.",
        "", vb.markdown(result), "", "```", result["command"], "```"])


def _auto_pocket_points() -> dict:
    """frames -> {label: (bits, accuracy share of FP16 in %, KL)} of the auto runs that exist."""
    out = {}
    for n in LENGTHS:
        folder = DOCS / "pocket" / AUTO_RUNS[n]
        if (folder / "results.json").exists():
            pts = presets._points(rows_of(folder))
            ref = presets._reference(pts)[1]
            out[n] = {k: (v[0], 100 * v[1] / ref, v[2]) for k, v in pts.items()}
    return out


def summary() -> str:
    """The answers in a few lines, with their numbers read from the same records as the tables below."""
    lf = _module("long_fidelity")
    data = _text_rows()
    pocket = _auto_pocket_points()
    lines = ["## In short", ""]
    if pocket:
        fr = " / ".join(str(n) for n in pocket)
        ev = " / ".join(f"{p['auto:bits=2.5:evict=True'][1]:.1f}%" for p in pocket.values())
        kl = " / ".join(f"{p['auto:bits=2.5:evict=True'][2]:.4f}" for p in pocket.values())
        a3 = " / ".join(f"{p['auto:bits=3.0'][1]:.1f}%" for p in pocket.values())
        a25 = " / ".join(f"{p['auto:bits=2.5'][1]:.1f}%" for p in pocket.values())
        lines.append(f"- **On long video-like prompts (pocket-long, {fr} frames), `auto` at 2.5 bits with `evict=True` "
                     f"keeps {ev} of FP16's accuracy** (next-token KL {kl}); without eviction, {a25} at 2.5 bits and "
                     f"{a3} at 3 bits.")
    cells = []
    for n, rows in data.items():
        best = _best_under(lf._context_points(rows, n), 3.0)
        ours = best.get("auto evict")
        peer = min((best[f] + (f,) for f in PEER_FAMILIES if f in best), key=lambda p: p[2], default=None)
        if ours and peer:
            cells.append(f"{n} tokens: {ours[2]:.3f} against {peer[2]:.3f} ({peer[-1]} at {peer[0]:.2f} bits)")
    if cells:
        lines.append("- **On real text at 3 bits an element, `auto` with eviction against the best peer at equal "
                     "bytes** (next-token KL; lower is better): " + "; ".join(cells) + ".")
    probe = []
    for n, rows in data.items():
        by = {r["method"]: r for r in rows if "probe_kl" in r}
        if all(k in by for k in ("auto bits=3.0", "auto bits=5.0", "auto evict bits=3.0", "turboquant-3")):
            probe.append(f"{n} tokens: {by['auto evict bits=3.0']['probe_kl']:.2f} with eviction, "
                         f"{by['auto bits=3.0']['probe_kl']:.2f} without, TurboQuant-3 "
                         f"{by['turboquant-3']['probe_kl']:.2f}; `auto` at 5 bits "
                         f"{by['auto bits=5.0']['probe_kl']:.3f}")
    if probe:
        lines.append("- **What a question-aware cache cannot promise: a second question about the start of the "
                     "document** (KL over its tokens, 3 bits unless said): " + "; ".join(probe) + ". Eviction "
                     "drops what the first question did not read. Without eviction `auto` keeps every token but, at 3-4 bits, leaves the "
                     "least read at 2 bits, which is what a later question misses; a uniform quantizer such as "
                     "TurboQuant serves every later question alike, at a higher KL on the first. Use `evict=True` when "
                     "the prompt's question is the one that will be asked.")
    lines.append("- **RTN at 2 bits and SmoothQuant collapse on the tasks that match details across frames** (WhichFrame, "
                 "Counting); AKVQ-VL's parts each add accuracy in the paper's order, and its recent window is the knob "
                 "that matters on pocket.")
    return "\n".join(lines)


def render(figures: bool = False) -> str:
    head = ["# Results", "",
            "What vlmkv's methods keep of full precision, at how many bits, on a vision-language model and on real text. "
            "Every table is made by `python benchmarks/report.py` from the committed records it names; bits per element "
            "are always counted from the bytes the cache holds. Speed and memory: [BENCHMARKS.md](BENCHMARKS.md).", ""]
    body = [summary(), budget_section(figures), seed_section(), text_section(), peers_section(), vllm_section()]
    text = "\n".join(head) + "\n" + "\n\n".join(body) + "\n"
    return text.replace("nan%", "-").replace(" nan ", " - ") if "nan" in text else text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare docs/RESULTS.md with the records; write nothing")
    args = p.parse_args(argv)
    text = render(figures=not args.check)
    path = DOCS / "RESULTS.md"
    if args.check:
        same = path.read_text() == text
        print("docs/RESULTS.md is what the records give" if same else "docs/RESULTS.md differs from the records")
        return 0 if same else 1
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
