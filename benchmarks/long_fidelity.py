"""Long-context fidelity on the real SmolLM2-135M backbone: teacher-forced next-token KL and top-1 agreement of every
method against the full-precision cache, at several context lengths of real English text, in one run.

    python benchmarks/long_fidelity.py --contexts 2048,4096,8192 --steps 32 --out docs/long_fidelity.json
    python benchmarks/long_fidelity.py --contexts 2048 --pareto --out docs/pareto_smollm2.json   # every knob

With `--pareto [FAMILIES]` the methods are the points of `vlmkv eval --pareto` (vlmkv/eval/presets.py: PARETO), and
it also writes, beside `--out`, a KL-vs-bits plot per context (`.png`) and the fewest bits each family needs to stay
within a KL of 0.05 of full precision (`.md`).

Text: the license texts Debian ships in /usr/share/common-licenses (GPL-3, Apache-2.0, MPL-2.0, GFDL-1.3, ...),
concatenated: real prose available offline (`--text FILE` to use another). For context N the first N tokens are the
prompt and the next `--steps` tokens of the same text are fed one at a time (teacher forcing), so every method sees
identical inputs (the prompt is run through the model once and every cache, the full-precision reference included, is
filled from that forward, as `vlmkv eval` does; `--per-method-prefill` runs it once per method); KL(p_full || p_method) and top-1 agreement are averaged over those steps. Bits per element come
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # peers.py, decode_bench.py
import vlmkv  # noqa: E402
from vlmkv.cli import _feasible, _method_entry  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from vlmkv.cache import cache_kwargs  # noqa: E402
from vlmkv.eval.fidelity import PromptPrefill, next_token_kl, top1_agreement  # noqa: E402

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
def probe_logits(model, cache, probe: torch.Tensor, held: int, positional: bool = False) -> torch.Tensor:
    """float32 `[K, V]`: the logits of a K-token second question `probe` `[1, K]` fed in one forward to a cache that
    holds `held` slots, at positions held .. held + K - 1 (with a mask over them all, or none where the cache keeps
    fewer slots than the sequence: `positional`, kvpress's caches)."""
    pos = torch.arange(held, held + probe.shape[1])[None]
    extra = {} if positional else {"attention_mask": torch.ones(1, held + probe.shape[1], dtype=torch.long)}
    return model(input_ids=probe, **cache_kwargs(cache), use_cache=True, position_ids=pos, **extra).logits[0].float()


@torch.no_grad()
def context_rows(model, prompt: torch.Tensor, cont: torch.Tensor, methods, per_method_prefill: bool = False,
                 probe: torch.Tensor | None = None) -> list[dict]:
    """One row per (label, policy) of `methods`: teacher-forced KL and top-1 against full precision over the
    continuation `cont` `[1, T]` of `prompt` `[1, N]` (int64 ids), and bits per element from the cache's bytes.

    By default the prompt runs through the model once and every cache (the DynamicCache reference too) is filled
    from that forward (`PromptPrefill`); `per_method_prefill` prefills each cache through the model instead. Both
    give the same rows (a prompt attends to itself unquantized)."""
    n = prompt.shape[1]
    t0 = time.perf_counter()
    src = PromptPrefill(model, prompt, torch.ones_like(prompt), shared=not per_method_prefill)
    ref_cache = DynamicCache(config=model.config)
    if src.shared:  # what a prefill through the model stores: the recorded raw keys and values
        src.fill(ref_cache)
    ref = src.forced(ref_cache, cont)
    held = n + cont.shape[1] - 1  # slots after the continuation: where the second question starts
    ref_probe = None if probe is None else probe_logits(model, ref_cache, probe, held)
    t_ref = time.perf_counter() - t0
    rows = []
    for method, policy in tqdm(methods, desc=f"{n} tokens", file=sys.stderr):
        t0 = time.perf_counter()
        if hasattr(policy, "forced"):  # a peer (benchmarks/peers.py): its own cache, its bytes counted as ours
            from peers import PeerError

            try:
                got, bits, cache = policy.forced(model, prompt, cont, src)
                second = None if probe is None else probe_logits(model, cache, probe, held, policy.positional)
            except PeerError as e:  # reported, never dropped
                rows.append({"context": n, "method": method, "error": str(e), "describe": policy.describe()})
                print(f"{method}: {e}", file=sys.stderr)
                continue
        else:
            with src.cache(policy) as cache:
                got = src.forced(cache, cont)
                bits = cache.bits_per_element()  # before the second question: the continuation's bytes
                second = None if probe is None else probe_logits(model, cache, probe, held)
        if second is not None:
            extra = {"probe_kl": round(float(next_token_kl(ref_probe, second).mean()), 5),
                     "probe_top1": round(float(top1_agreement(ref_probe, second).mean()), 4)}
        else:
            extra = {}
        kl = next_token_kl(ref, got)
        rows.append({"context": n, "method": method, "bits_per_element": round(bits, 3),
                     "kl": round(float(kl.mean()), 5), "kl_max": round(float(kl.max()), 4),
                     "top1": round(float(top1_agreement(ref, got).mean()), 4),
                     "seconds": round(time.perf_counter() - t0, 1), "reference_seconds": round(t_ref, 1),
                     "shared_prefill": src.shared, "describe": _describe(policy), **extra})
    return rows


def _describe(policy) -> str:
    """The policy's full description, its plan revision included (`auto(bits=3.0)@r2`): which plan made a row."""
    return policy.describe() if hasattr(policy, "describe") else str(policy)


SETUP = ("model", "text", "steps")  # what rows of one sweep share; rows from before 2026-12-02 do not record it


def setup(args) -> dict:
    return {"model": args.model, "text": args.text or "debian-licenses", "steps": args.steps}


def setups(rows: list[dict]) -> set[tuple]:
    """The distinct setups (values of SETUP) that `rows` record; rows that record none add nothing."""
    return {tuple(r[k] for k in SETUP) for r in rows if all(k in r for k in SETUP)}


def replace_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """`old` with each row of the same (context, method) as a row of `new` replaced by it, new pairs appended.

    For rerunning one family (a changed plan) into a finished sweep without rerunning the others. Rows that record
    their setup (model, text, steps) must all agree on it: a sweep measured otherwise is refused, not mixed in."""
    seen = setups(old + new)
    if len(seen) > 1:
        raise ValueError(f"replace_rows needs rows of one setup {SETUP}, got {sorted(seen, key=str)!r}")
    fresh = {(r["context"], r["method"]): r for r in new}
    out = [fresh.pop((r["context"], r["method"]), r) for r in old]
    return out + [r for r in new if (r["context"], r["method"]) in fresh]


def run(args, keep: list[dict] | None = None) -> list[dict]:
    """Every context's rows; with `keep` (a finished run's rows), what is saved after each context is `keep` with
    these rows in place (`replace_rows`), so a stopped rerun never leaves less than the finished run had."""
    model, tok = vlmkv.load_model(args.model)
    ids_all = tok(corpus(args.text), add_special_tokens=False, return_tensors="pt")["input_ids"]
    rows = []
    for n in [int(c) for c in args.contexts.split(",")]:
        if ids_all.shape[1] < n + args.steps:
            raise SystemExit(f"the text holds {ids_all.shape[1]} tokens, fewer than {n} + {args.steps}")
        pairs = entries(args)
        policies = _feasible(model, [(m, p) for m, p in pairs if not hasattr(p, "forced")])
        new = context_rows(model, ids_all[:, :n], ids_all[:, n:n + args.steps],
                           policies + [(m, p) for m, p in pairs if hasattr(p, "forced")], args.per_method_prefill,
                           second_question(tok, ids_all, args.probe) if args.probe else None)
        rows += [{**r, **setup(args)} for r in new]
        if args.out:  # each finished context is kept, should a later (longer) one be stopped
            Path(args.out).write_text(json.dumps(rows if keep is None else replace_rows(keep, rows), indent=1))
    return rows


PROBE_START = 16  # the second question repeats the document from this token (past its first, always-kept tokens)


def second_question(tok, ids_all: torch.Tensor, k: int) -> torch.Tensor:
    """long `[1, 2 + k]`: a paragraph break, then the document's tokens PROBE_START .. PROBE_START + k again: asked
    after the cache was built, it can only be predicted by reading the beginning of the prompt (a copy; induction
    heads), which is what an evicting cache cannot promise to keep."""
    sep = tok("\n\n", add_special_tokens=False, return_tensors="pt")["input_ids"]
    return torch.cat([sep, ids_all[:, PROBE_START:PROBE_START + k]], 1)


def entries(args) -> list[tuple[str, object]]:
    """(label, method) pairs: the --pareto points, or --methods ("rtn-4:group_size=32" is a method with options),
    then the --peers (benchmarks/peers.py)."""
    if args.pareto is not None:
        from vlmkv.eval.presets import pareto_methods

        out = pareto_methods([f for f in args.pareto.split(",") if f] or None)
    else:
        out = [(m, vlmkv.get_policy(e) if isinstance(e, str) else e[1]) for m in args.methods.split(",") if m
               for e in [_method_entry(m)]]
    if getattr(args, "peers", None):
        from peers import peer_entries

        out += peer_entries(args.peers)
    return out


def _context_points(rows: list[dict], n: int) -> dict:
    """label -> (bits from bytes, KL, top-1) of context `n`."""
    return {r["method"]: (r["bits_per_element"], r["kl"], r["top1"]) for r in rows if r["context"] == n and "error" not in r}


def fewest_bits(rows: list[dict], max_kl: float = 0.05) -> str:
    """Per context and method family, the fewest bits per element (from bytes) of a point with mean KL <= max_kl."""
    from vlmkv.eval.presets import fewest_per_family

    lines = [f"| context | method | fewest bits with KL <= {max_kl} | at | KL | top-1 |", "|---:|---|---:|---|---:|---:|"]
    for n in dict.fromkeys(r["context"] for r in rows):
        for fam, best in fewest_per_family(_context_points(rows, n), lambda p: p[2] <= max_kl).items():
            lines.append(f"| {n} | {fam} | {best[0]:.2f} | {best[1]} | {best[2]:.4f} | {best[3]:.3f} |" if best
                         else f"| {n} | {fam} | - | none of its points | | |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """KL and top-1 against bits per element, one line per method family, one row of panels per context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlmkv.eval.presets import draw_families

    ctxs = list(dict.fromkeys(r["context"] for r in rows))
    fig, axes = plt.subplots(len(ctxs), 2, figsize=(10, 3.6 * len(ctxs)), squeeze=False)
    for (ax1, ax2), n in zip(axes, ctxs):
        pts = _context_points(rows, n)
        draw_families(ax1, pts, 0)
        draw_families(ax2, pts, 1)
        ax2.axhline(1.0, color="k", linestyle="--", label="FP16")
        ax1.set_yscale("symlog", linthresh=1e-3)
        ax1.set_ylim(bottom=0)  # KL is never negative
        ax1.set(xlabel="bits per element (from bytes)", ylabel="next-token KL vs full precision", title=f"{n} tokens")
        ax2.set(xlabel="bits per element (from bytes)", ylabel="top-1 agreement", title=f"{n} tokens")
        ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(rows: list[dict]) -> str:
    lines = ["| context | method | bits/element | next-token KL | top-1 vs full precision |", "|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['context']} | {r['method']} | - | did not run: {r['error']} | |" if "error" in r else
                     f"| {r['context']} | {r['method']} | {r['bits_per_element']:.2f} | {r['kl']:.4f} | {r['top1']:.3f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--contexts", default="2048,4096,8192")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--methods", default=METHODS, help="comma-separated names, or name:option=value:... (as vlmkv eval)")
    p.add_argument("--pareto", nargs="?", const="", default=None, metavar="FAMILIES",
                   help="the points of `vlmkv eval --pareto` (optionally only these comma-separated families)")
    p.add_argument("--peers", default=None, metavar="NAMES",
                   help="peers in the same run (benchmarks/peers.py): kvpress (its presses at several ratios and SnapKV "
                        "over quanto-4), snapkv, expected_attention, knorm, snapkv+quanto, turboquant, or points "
                        "such as snapkv@0.75, turboquant@3")
    p.add_argument("--probe", type=int, default=64, metavar="K",
                   help="after the continuation, a second question: the document's first K tokens again, fed in one "
                        "forward; its KL and top-1 against full precision are the rows' probe_kl / probe_top1 "
                        "(0: no probe)")
    p.add_argument("--per-method-prefill", action="store_true",
                   help="prefill the prompt once per method (default: once, every cache filled from it, as vlmkv eval)")
    p.add_argument("--text", default=None, help="a text file (default: the Debian license texts)")
    p.add_argument("--out", default=None)
    p.add_argument("--replace-in", default=None, metavar="JSON",
                   help="a finished run's JSON: this run's rows replace its rows of the same context and method, "
                        "the others are kept; the merged rows go to --out (which may be the same file)")
    args = p.parse_args()
    if args.replace_in is not None and not args.out:
        p.error("--replace-in needs --out")
    old = json.loads(Path(args.replace_in).read_text()) if args.replace_in else None  # read before anything runs
    theirs = setups(old or [])
    if theirs and theirs != setups([setup(args)]):  # refused before an hour of work, not after
        p.error(f"--replace-in holds rows of setup {SETUP} = {sorted(theirs, key=str)!r}, this run is {setup(args)!r}")
    rows = run(args, old)
    if old is not None:
        rows = replace_rows(old, rows)
    print(markdown(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
        print(f"wrote {args.out}")
        if args.pareto is not None:
            out, table = Path(args.out), fewest_bits(rows)
            plot(rows, out.with_suffix(".png"))
            out.with_suffix(".md").write_text(table + "\n")
            print(table)
            print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
