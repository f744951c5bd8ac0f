"""vlmkv's packed pages inside vLLM (CPU build): capacity, perplexity and throughput of each page format beside
vLLM's own bf16 pages, and the same text's perplexity through vlmkv's transformers cache at the same format.

    .venv-vllm/bin/python benchmarks/vllm_bench.py --out docs/vllm/records.json     # ~10 min on 2 cores

(`bash scripts/setup-vllm.sh` makes `.venv-vllm`.) Per format, one engine (`LLM(...)`, SmolLM2-135M, bf16,
enforce_eager, block 128, `--kv-space-gib` of KV space, prefix caching off) gives:
* capacity: the tokens vLLM says fit in the KV space (`num_gpu_blocks * block_size`); page bytes count codes,
  scales, zero points and padding; the staging room of `kivi` formats (one block a running request) is reported
  beside it as bytes a request;
* perplexity: `prompt_logprobs` over the first `--tokens` tokens of each of `--docs` license texts Debian ships
  (/usr/share/common-licenses), one prefill each. Every token attends to the cache as a decoding token would
  (`rtn`: every token quantized, itself included; `kivi`: earlier blocks quantized, its own block in full
  precision), so the number is the teacher-forced perplexity of generating with that format;
* throughput: `--prompt` tokens then `--new` generated tokens (ignore_eos) at batch 1 and 8; decode tokens/s is
  measured as (B * (new - 1)) / (t(new) - t(1)), the prefill cancelling out, each time the best of three.
The transformers side runs the same tokens through `QuantizedKVCache` with `PageFormat.policy()` in bf16, so that
every token attends to what it does in the engine: `rtn` formats in one prefill with `prompt_reads_cache=True`
(every token as stored, itself included), `kivi` formats a block at a time (earlier blocks quantized, its own
block in full precision). Records go to `--out`; `python benchmarks/report.py` writes the tables in docs/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LICENSES = ["GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3"]
FORMATS = "bf16,rtn-8,rtn-4,rtn-4+hadamard,kivi-8,kivi-4,kivi-2,kivi-2/32,kivi-2+hadamard,rtn-2+hadamard"


def documents(tokenizer, n_docs: int, n_tokens: int) -> list[list[int]]:
    root = Path("/usr/share/common-licenses")
    docs = []
    for name in LICENSES[:n_docs]:
        ids = tokenizer((root / name).read_text())["input_ids"][:n_tokens]
        if len(ids) < n_tokens:
            raise SystemExit(f"{name} has only {len(ids)} tokens, fewer than --tokens {n_tokens}")
        docs.append(ids)
    return docs


def split(fmt: str) -> tuple[str, bool, int]:
    """`kivi-2/32+hadamard` -> ("kivi-2", True, 32): the format, Hadamard, the key group (0: the default)."""
    name, _, extra = fmt.partition("+")
    if extra not in ("", "hadamard"):
        raise SystemExit(f"format must be NAME[/KEY_GROUP][+hadamard], got {fmt!r}")
    name, _, kg = name.partition("/")
    return name, extra == "hadamard", int(kg or 0)


def one_engine(fmt: str, args) -> dict:
    """Everything measured on one vLLM engine (run in its own process)."""
    from vllm import LLM, SamplingParams

    from vlmkv.models.loading import embedded_path
    from vlmkv.vllm import cpu as plugin_cpu

    path = str(embedded_path("smollm2-135m"))
    extra = {}
    if fmt != "bf16":
        name, had, kg = split(fmt)
        extra["additional_config"] = {"vlmkv": {"format": name, "hadamard": had, "key_group": kg}}
    t0 = time.perf_counter()
    llm = LLM(model=path, enforce_eager=True, dtype="bfloat16", block_size=args.block_size,
              max_model_len=max(args.tokens, args.prompt + args.new) + 8, enable_prefix_caching=False,
              max_num_seqs=16, seed=0, **extra)
    startup = time.perf_counter() - t0
    cc = llm.llm_engine.vllm_config.cache_config
    rec = {"format": fmt, "startup_s": round(startup, 1), "blocks": cc.num_gpu_blocks,
           "block_size": cc.block_size, "tokens": cc.num_gpu_blocks * cc.block_size}
    tok = llm.get_tokenizer()
    docs = documents(tok, args.docs, args.tokens)
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    nll, count = 0.0, 0
    per_doc = []
    for ids in docs:
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], sp, use_tqdm=False)[0]
        lps = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])]
        per_doc.append(round(math.exp(-sum(lps) / len(lps)), 4))
        nll -= sum(lps)
        count += len(lps)
    rec["ppl"] = round(math.exp(nll / count), 4)
    rec["ppl_docs"] = per_doc
    rec["scored_tokens"] = count
    # throughput: prompts from distinct offsets of the texts (all of them, whole)
    root = Path("/usr/share/common-licenses")
    flat = tok("\n\n".join((root / name).read_text() for name in LICENSES))["input_ids"]
    for B in args.batches:
        prompts = [TokensPrompt(prompt_token_ids=flat[i * 97:i * 97 + args.prompt]) for i in range(B)]
        times = {}
        for n in (1, args.new):
            p = SamplingParams(max_tokens=n, ignore_eos=True, temperature=0)
            llm.generate(prompts, p, use_tqdm=False)  # warm
            best = float("inf")
            for _ in range(3):  # the best of three: other work on the machine only ever adds time
                t0 = time.perf_counter()
                llm.generate(prompts, p, use_tqdm=False)
                best = min(best, time.perf_counter() - t0)
            times[n] = best
        rec[f"decode_tok_s_b{B}"] = round(B * (args.new - 1) / (times[args.new] - times[1]), 1)
        rec[f"prefill_s_b{B}"] = round(times[1], 3)
    if fmt != "bf16":
        name, had, kg = split(fmt)
        from vlmkv.vllm.pages import PageFormat

        f = PageFormat.parse(name, 64, cc.block_size, 0, had, kg)
        rec["token_bytes"] = f.token_bytes
        rec["bits_per_element"] = round(f.bits_per_element(), 3)
        cfg = llm.llm_engine.vllm_config.model_config.hf_config
        rec["staging_bytes_per_request"] = f.staging_bytes(cfg.num_key_value_heads) * cfg.num_hidden_layers
    rec["timings"] = {k: round(v, 3) for k, v in plugin_cpu.TIMINGS.items()}
    rec["paths"] = dict(plugin_cpu.PATHS)  # layer steps each read path ran
    llm.llm_engine.engine_core.shutdown()
    return rec


def transformers_ppl(fmt: str, args, dtype=None) -> float:
    """Perplexity of the same tokens through vlmkv's transformers cache at `fmt` (a bf16 model, or `dtype`)."""
    import torch

    from vlmkv import QuantizedKVCache
    from vlmkv.cache import head_dim_of
    from vlmkv.models.loading import load_model
    from vlmkv.vllm.pages import PageFormat

    model, tok = load_model("smollm2-135m", dtype=dtype or torch.bfloat16)
    docs = documents(tok, args.docs, args.tokens)
    nll, count = 0.0, 0
    for ids in docs:
        x = torch.tensor([ids])
        f = None
        if fmt == "bf16":
            from transformers import DynamicCache

            cache = DynamicCache()
        else:
            name, had, kg = split(fmt)
            f = PageFormat.parse(name, head_dim_of(model.config), args.block_size, 0, had, kg)
            cache = QuantizedKVCache(model, f.policy(), prompt_reads_cache=not f.staged)
        # kivi: one block at a time, so that each block attends to itself in full precision and to the earlier
        # ones quantized (the `paged` schedule); rtn: one prefill attending to what the cache stores
        step = args.block_size if f is not None and f.staged else x.shape[1]
        outs = []
        with torch.no_grad():
            for s in range(0, x.shape[1], step):
                outs.append(model(input_ids=x[:, s:s + step], past_key_values=cache, use_cache=True,
                                  position_ids=torch.arange(s, min(s + step, x.shape[1]))[None]).logits)
        logits = torch.cat(outs, 1)[:, :-1].float()
        lp = logits.log_softmax(-1).gather(-1, x[:, 1:, None])[..., 0]
        nll -= float(lp.sum())
        count += lp.numel()
    return round(math.exp(nll / count), 4)


def ran(rec: dict) -> str:
    """Which read paths a record's engine ran, from the plugin's timings."""
    if rec["format"] == "bf16":
        return "vLLM's CPU_ATTN on bf16 pages"
    t = rec.get("timings", {})
    paths = []
    if t.get("fused_s"):
        paths.append(f"decode: vlmkv's C++ kernel over the packed pages ({t['fused_s']:.1f} s)")
    if t.get("scratch_s"):
        paths.append(f"prefill: dequantized scratch ({t['scratch_s']:.1f} s) + vLLM's CPU kernel "
                     f"({t['attention_s']:.1f} s)")
    return "; ".join(paths) + f"; writes {t.get('write_s', 0):.1f} s"


def markdown(result: dict) -> str:
    """The records as the tables of docs/RESULTS.md: capacity and perplexity, then throughput."""
    recs = result["records"]
    bf = next(r for r in recs if r["format"] == "bf16")
    head = ("| pages | bytes a token and head | tokens in {} GiB | vs bf16 | perplexity (vLLM) | vs bf16 | "
            "vlmkv's transformers cache, same format | engines apart | bf16 against float32 (transformers) |"
            .format(result["kv_space_gib"]))
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in recs:
        tb = r.get("token_bytes", 2 * 64 * 2)
        hf, fp32 = r["transformers_ppl"], r.get("transformers_ppl_fp32", float("nan"))
        lines.append(f"| {r['format']} | {tb} | {r['tokens']:,} | {r['tokens'] / bf['tokens']:.2f}x | {r['ppl']:.3f} | "
                     f"{100 * (r['ppl'] / bf['ppl'] - 1):+.2f}% | {hf:.3f} | {100 * abs(r['ppl'] / hf - 1):.2f}% | "
                     f"{100 * abs(hf / fp32 - 1):.2f}% |")
    lines += ["", "| pages | decode tokens/s, batch 1 | batch 8 | prefill of {} tokens, batch 1 (s) | what ran |".format(
        result["prompt"]), "|---|---:|---:|---:|---|"]
    for r in recs:
        lines.append(f"| {r['format']} | {r.get('decode_tok_s_b1', '-')} | {r.get('decode_tok_s_b8', '-')} | "
                     f"{r.get('prefill_s_b1', '-')} | {ran(r)} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default=FORMATS, help=f"comma-separated page formats (default {FORMATS})")
    ap.add_argument("--docs", type=int, default=4, help="license texts scored (default 4)")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens scored per text (default 2048)")
    ap.add_argument("--prompt", type=int, default=1024, help="throughput prompt tokens (default 1024)")
    ap.add_argument("--new", type=int, default=64, help="throughput generated tokens (default 64)")
    ap.add_argument("--batches", default="1,8", help="throughput batch sizes (default 1,8)")
    ap.add_argument("--block-size", type=int, default=128, help="vLLM block size (default 128, the CPU default)")
    ap.add_argument("--kv-space-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (default 1)")
    ap.add_argument("--out", default=None, help="write the records here (JSON)")
    ap.add_argument("--markdown", default=None, metavar="RECORDS", help="print the tables of a records file and exit")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one format, print JSON
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in str(args.batches).split(",")]
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_space_gib)
    if args.one:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the plugin's timings live in this process
        rec = one_engine(args.one, args)
        rec["transformers_ppl"] = transformers_ppl(args.one, args)
        import torch

        # the same engine in float32: how far bf16 arithmetic alone moves the number (the noise both engines share)
        rec["transformers_ppl_fp32"] = transformers_ppl(args.one, args, torch.float32)
        print("RECORD " + json.dumps(rec), flush=True)
        os._exit(0)  # no interpreter teardown: a thread still running at exit can abort a finished run
    from tqdm import tqdm

    records = []
    for fmt in tqdm(args.formats.split(","), desc="formats", file=sys.stderr):
        cmd = [sys.executable, __file__, "--one", fmt] + [a for a in (argv or sys.argv[1:]) if a]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith("RECORD ")]
        if out.returncode or not line:
            sys.stderr.write(out.stderr[-4000:])
            raise SystemExit(f"{fmt}: the engine run failed (rc {out.returncode})")
        rec = json.loads(line[-1][7:])
        records.append(rec)
        print(json.dumps({k: rec[k] for k in ("format", "tokens", "ppl", "transformers_ppl", "decode_tok_s_b1",
                                              "decode_tok_s_b8") if k in rec}), file=sys.stderr)
    bf = next((r for r in records if r["format"] == "bf16"), None)
    if bf:
        for r in records:
            r["capacity_x"] = round(r["tokens"] / bf["tokens"], 2)
            r["ppl_vs_bf16"] = round(r["ppl"] / bf["ppl"] - 1, 4)
    result = {"command": ".venv-vllm/bin/python benchmarks/vllm_bench.py " + " ".join(argv or sys.argv[1:]),
              "model": "smollm2-135m", "dtype": "bfloat16", "kv_space_gib": args.kv_space_gib,
              "docs": LICENSES[:args.docs], "tokens": args.tokens, "prompt": args.prompt, "new": args.new,
              "records": records}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
