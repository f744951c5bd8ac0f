"""Decode attention over one mixed-precision KV cache stored two ways (WindowQuant's reordering, measured).

    python benchmarks/layout_bench.py --contexts 4096,16384 --out docs/layout_bench.json

Same tokens, same bits per token (windows of `--window` visual tokens at 8/4/2 bits in a 10/30/60 mix,
interleaved in position order as a frame-by-frame search leaves them):

* segments:  the cache's layout: one contiguous packed segment per width (tokens stably partitioned by
             width) with a slot map; attention dequantizes each segment once and merges the partial
             softmaxes (log-sum-exp), the mask gathered through the slot map;
* runs:      token-interleaved storage, read run by run (each maximal run of equal width is its own
             dequantize + attention piece): the per-window dispatch a mixed layout forces;
* segments, chunked: the same segments read in 256-token chunks (partial softmaxes merged), so that the
             dequantized pieces stay in the CPU cache;
* gather:    token-interleaved storage, regrouped by width at every step (index_select on the packed
             codes, then as segments).

All three compute the same attention output (checked); the median time of one decode step for one
layer (B=1, 8 kv heads, head dim 128, one query per head) is reported. CPU here; the same script runs
on a GPU with --device cuda.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vlmkv.quant import QTensor, QuantSpec, dequantize, quantize  # noqa: E402

WIDTHS = (8, 4, 2)


def build(S, window, H, D, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, H, S, D, generator=g).to(device)
    v = torch.randn(1, H, S, D, generator=g).to(device)
    n_win = S // window
    choice = torch.multinomial(torch.tensor([0.1, 0.3, 0.6]), n_win, replacement=True, generator=g)
    bits = torch.tensor(WIDTHS)[choice].repeat_interleave(window)
    mask = torch.ones(S, dtype=torch.bool, device=device)
    mask[:37] = False  # left padding: must follow the tokens wherever they are stored
    return k, v, bits.to(device), mask


def spec(b, D):
    return QuantSpec(b, min(128, D), 1.0, "token")


def segments_layout(k, v, bits, D):
    segs = []
    for b in WIDTHS:
        idx = (bits == b).nonzero().flatten()
        segs.append((idx, quantize(k[:, :, idx], spec(b, D)), quantize(v[:, :, idx], spec(b, D))))
    return segs


def runs_layout(k, v, bits, D):
    runs, start = [], 0
    S = bits.shape[0]
    change = (bits[1:] != bits[:-1]).nonzero().flatten().tolist() + [S - 1]
    for end in change:
        b = int(bits[start])
        sl = slice(start, end + 1)
        runs.append((sl, quantize(k[:, :, sl], spec(b, D)), quantize(v[:, :, sl], spec(b, D))))
        start = end + 1
    return runs


def merge(parts):
    """Log-sum-exp merge of partial attention results (m, l, o): max logit, sum of exp, weighted values."""
    m = torch.stack([p[0] for p in parts]).amax(0)
    l = sum(p[1] * torch.exp(p[0] - m) for p in parts)
    o = sum(p[2] * torch.exp(p[0] - m).unsqueeze(-1) for p in parts)
    return o / l.unsqueeze(-1)


def partial(q, kd, vd, mask):
    s = torch.einsum("hd,hnd->hn", q, kd[0]) / kd.shape[-1] ** 0.5
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1).clamp_min(-1e30)
    e = torch.exp(s - m.unsqueeze(-1))
    return m, e.sum(-1), torch.einsum("hn,hnd->hd", e, vd[0])


def attend_segments(q, segs, mask):
    return merge([partial(q, dequantize(kq), dequantize(vq), mask[idx]) for idx, kq, vq in segs])


def attend_segments_chunked(q, segs, mask, chunk=256):
    # the same segments, read in chunks that stay in cache (flash-decoding style on a CPU)
    parts = []
    for idx, kq, vq in segs:
        for s in range(0, kq.n, chunk):
            sl = lambda t: t[:, :, s:s + chunk]
            parts.append(partial(q, dequantize(kq.map(sl)), dequantize(vq.map(sl)), mask[idx[s:s + chunk]]))
    return merge(parts)


def attend_runs(q, runs, mask):
    return merge([partial(q, dequantize(kq), dequantize(vq), mask[sl]) for sl, kq, vq in runs])


def attend_gather(q, runs, bits, mask, D):
    # the interleaved store regrouped by width at every step: gather packed codes, scales and zeros per width
    parts = []
    for b in WIDTHS:
        sel = [(sl, kq, vq) for sl, kq, vq in runs if kq.spec.bits == b]
        if not sel:
            continue
        kq = QTensor.cat([s[1] for s in sel])
        vq = QTensor.cat([s[2] for s in sel])
        idx = torch.cat([torch.arange(s[0].start, s[0].stop, device=mask.device) for s in sel])
        parts.append(partial(q, dequantize(kq), dequantize(vq), mask[idx]))
    return merge(parts)


def timeit(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return 1000 * statistics.median(ts)


@torch.no_grad()
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="4096,16384")
    p.add_argument("--window", type=int, default=196)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for S in [int(c) for c in args.contexts.split(",")]:
        for window in (args.window, 16):
            k, v, bits, mask = build(S, window, args.heads, args.head_dim, args.device)
            q = torch.randn(args.heads, args.head_dim, device=args.device)
            segs = segments_layout(k, v, bits, args.head_dim)
            runs = runs_layout(k, v, bits, args.head_dim)
            a = attend_segments(q, segs, mask)
            b = attend_runs(q, runs, mask)
            c = attend_gather(q, runs, bits, mask, args.head_dim)
            d = attend_segments_chunked(q, segs, mask)
            assert all(torch.allclose(a, x, atol=1e-4) for x in (b, c, d))
            row = {"context": S, "window": window, "runs": len(runs),
                   "segments_ms": timeit(lambda: attend_segments(q, segs, mask), args.reps),
                   "segments_chunked_ms": timeit(lambda: attend_segments_chunked(q, segs, mask), args.reps),
                   "runs_ms": timeit(lambda: attend_runs(q, runs, mask), args.reps),
                   "gather_ms": timeit(lambda: attend_gather(q, runs, bits, mask, args.head_dim), args.reps)}
            rows.append(row)
    print("| context | window | runs of equal width | segments ms | segments, 256-token chunks ms | "
          "interleaved, run by run ms | interleaved, regrouped ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['context']} | {r['window']} | {r['runs']} | {r['segments_ms']:.2f} | {r['segments_chunked_ms']:.2f} | "
              f"{r['runs_ms']:.2f} | {r['gather_ms']:.2f} |")
    print(f"\ndevice {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
