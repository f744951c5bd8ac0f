"""Where one decode step of the vLLM plugin's CPU read path spends its time, per layer, without vLLM's engine: the
page bytes gathered for the batch, their QTensor views, vlmkv's C++ decode kernel, and the whole step (the write
into staging included).

    .venv-vllm/bin/python benchmarks/experiments/vllm_decode_profile.py --batch 8 --context 1088

Needs vLLM installed (the plugin module imports it); the engine itself is not started.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from vlmkv import kernels  # noqa: E402
from vlmkv.vllm import cpu as plugin  # noqa: E402
from vlmkv.vllm.pages import PageFormat  # noqa: E402
from vlmkv.vllm.store import PageStore  # noqa: E402


def timed(fn, n: int = 20) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e3


def profile(name: str, R: int, L: int, H: int = 3, Hq: int = 9, d: int = 64, N: int = 128) -> dict:
    fmt = PageFormat.parse(name, d, N)
    nb = -(-L // N)
    pages = torch.zeros(R * nb + 1, H, N, fmt.token_bytes, dtype=torch.uint8)
    x = torch.randn(R * nb, H, N, d).bfloat16()
    if fmt.staged:
        pages[:R * nb] = fmt.quantize_blocks(x, x)
    else:
        pages[:R * nb] = fmt.quantize_tokens(x.permute(0, 2, 1, 3).reshape(-1, H, d),
                                             x.permute(0, 2, 1, 3).reshape(-1, H, d)).view(R * nb, N, H, -1).transpose(1, 2)
    store = PageStore(fmt, R)
    table = torch.arange(R * nb, dtype=torch.int32).view(R, nb)
    meta = SimpleNamespace(seq_lens=torch.full((R,), L, dtype=torch.int32), block_table=table,
                           query_start_loc=torch.arange(R + 1, dtype=torch.int32), max_query_len=1)
    own = L % N
    slots = (table[:, -1].long() * N).repeat_interleave(own) + torch.arange(own).repeat(R)
    t = torch.randn(R * own, H, d).bfloat16()
    store.write(t, t, pages, slots)
    store.settle()
    q, key = torch.randn(R, Hq, d).bfloat16(), torch.randn(R, H, d).bfloat16()
    new = table[:, -1].long() * N + own

    def step():
        store.write(key, key, pages, new)
        plugin.fused_decode(store, meta, q, pages, d ** -0.5)
        store._release = []

    read = nb - (1 if fmt.staged else 0)
    g = pages[table.long()[:, :read]]
    kq, vq = fmt.qtensors(g)
    qq = q.float().view(R, H, Hq // H, d)
    ok = torch.ones(R, kq.codes.shape[2], dtype=torch.bool)
    return {"format": name, "batch": R, "context": L,
            "step_ms": round(timed(step), 3),
            "gather_ms": round(timed(lambda: pages[table.long()[:, :read]]), 3),
            "qtensors_ms": round(timed(lambda: fmt.qtensors(g)), 3),
            "kernel_ms": round(timed(lambda: kernels.decode_layer(qq, [(kq, vq, ok)], d ** -0.5)), 3)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=1088)
    ap.add_argument("--formats", default="kivi-4,kivi-2,rtn-4")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.formats.split(","):
        print(profile(name, args.batch, args.context))


if __name__ == "__main__":
    main()
