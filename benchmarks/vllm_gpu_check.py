"""The CUDA side of the vLLM plugin on a GPU: the Triton decode kernel over packed pages
(vlmkv/kernels/triton_pages.py) compiled, against its PyTorch reference for every page format, and timed beside
PyTorch's attention over the same context in bf16 (what bf16 pages cost to read).

    python benchmarks/vllm_gpu_check.py --out gpu_pages.json       # ~1 min on one GPU; needs torch + triton

It needs no vLLM (the kernel and the page formats are vlmkv's own); the end-to-end run through vLLM's CUSTOM backend
needs a CUDA install of vLLM 0.32 and is not part of it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vlmkv.kernels.triton_pages import paged_decode, paged_decode_ref  # noqa: E402
from vlmkv.vllm.pages import PageFormat  # noqa: E402

FORMATS = [("rtn-8", False), ("rtn-4", False), ("rtn-4", True), ("kivi-4", False), ("kivi-2", False),
           ("kivi-2", True)]


def case(name, hadamard, R, tokens, H=8, Hq=32, d=128, N=128, dev="cuda"):
    fmt = PageFormat.parse(name, d, N, 0, hadamard)
    blocks = R * (tokens // N)
    g = torch.Generator(device="cpu").manual_seed(0)
    k = torch.randn(blocks, H, N, d, generator=g)
    v = torch.randn(blocks, H, N, d, generator=g)
    if fmt.kind == "rtn":
        pages = fmt.quantize_tokens(k.permute(0, 2, 1, 3).reshape(-1, H, d), v.permute(0, 2, 1, 3).reshape(-1, H, d))
        pages = pages.view(blocks, N, H, -1).permute(0, 2, 1, 3).contiguous()
    else:
        pages = fmt.quantize_blocks(k, v)
    per = tokens // N
    table = torch.arange(blocks, dtype=torch.int32).view(R, per)
    npage = torch.full((R,), per - (1 if fmt.staged else 0))
    valid = torch.full((R,), N)
    raw = torch.randn(R, 2, H, N, d, generator=g)
    raw_len = torch.full((R,), N if fmt.staged else 0)
    q = torch.randn(R, Hq, d, generator=g)
    want = paged_decode_ref(q, pages, table, npage, valid, raw, raw_len, fmt, d ** -0.5)
    args = [x.to(dev) for x in (q.bfloat16(), pages, table, npage, valid, raw.bfloat16(), raw_len)]
    got = paged_decode(*args, fmt, d ** -0.5).float().cpu()
    err = float((got - want).abs().max() / want.abs().max())

    def timed(fn, n=20):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n * 1e3

    ms = timed(lambda: paged_decode(*args, fmt, d ** -0.5))
    kk = torch.randn(R, H, tokens, d, device=dev, dtype=torch.bfloat16)
    qq = torch.randn(R, Hq, 1, d, device=dev, dtype=torch.bfloat16)
    ms_bf16 = timed(lambda: torch.nn.functional.scaled_dot_product_attention(qq, kk, kk, enable_gqa=True))
    return {"format": fmt.name, "batch": R, "tokens": tokens, "rel_err": round(err, 6),
            "ms": round(ms, 3), "ms_bf16_sdpa": round(ms_bf16, 3)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    rows = []
    for name, had in FORMATS:
        for R, tokens in ((1, 4096), (8, 4096), (8, 16384)):
            rows.append(case(name, had, R, tokens))
            print(json.dumps(rows[-1]), flush=True)
    bad = [r for r in rows if r["rel_err"] > 2e-2]
    result = {"device": torch.cuda.get_device_name(), "rows": rows, "ok": not bad}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    if bad:
        raise SystemExit(f"kernel differs from its reference: {bad}")


if __name__ == "__main__":
    main()
