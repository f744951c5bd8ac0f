"""vlmkv's vLLM plugin against vLLM's own CPU attention (needs vLLM: `bash scripts/setup-vllm.sh`, then
`.venv-vllm/bin/python -m pytest -q -m vllm`; skipped without it).

Parity: the plugin's attention equals vLLM's native CPU_ATTN run on a native bf16 cache holding what the pages
hold, dequantized by vlmkv's reference quantizer, bit for bit (the same kernel on the same numbers). Then the
plugin end to end through `LLM(...)`: prefix caching, agreement with vlmkv's transformers cache at the same format,
tensor parallelism and `vllm serve` (the last two in the slow set)."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="needs vLLM (bash scripts/setup-vllm.sh)")
pytestmark = pytest.mark.vllm

from vllm import _custom_ops as ops  # noqa: E402
from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackendImpl, CPUAttentionMetadata,  # noqa: E402
                                                 _get_attn_isa)

from vlmkv.quant import dequantize, fwht, fwht_inverse, quantize  # noqa: E402
from vlmkv.vllm.cpu import VlmkvCPUImpl  # noqa: E402
from vlmkv.vllm.layer import page_spec  # noqa: E402
from vlmkv.vllm.pages import PageFormat  # noqa: E402
from vlmkv.vllm.staging import StagingError  # noqa: E402

H_Q, H, D, N = 9, 3, 64, 128  # SmolLM2-135M's heads; vLLM's CPU block size
SCALE = D ** -0.5
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_path():
    from vlmkv.models.loading import embedded_path

    return str(embedded_path("smollm2-135m"))


@pytest.fixture(scope="module")
def model_config(model_path):
    return ModelConfig(model=model_path, dtype="bfloat16")


def _impls(model_config, settings: dict | None, **kw):
    cfg = VllmConfig(model_config=model_config, additional_config={"vlmkv": settings} if settings else {})
    with set_current_vllm_config(cfg):
        return (VlmkvCPUImpl(H_Q, D, SCALE, H, None, None, kw.get("kv_cache_dtype", "auto")),
                CPUAttentionBackendImpl(H_Q, D, SCALE, H, None, None, "auto"))


class _Layer:
    isa = _get_attn_isa(torch.bfloat16, N, D, "auto")
    _k_scale_float = 1.0
    _v_scale_float = 1.0


def _meta(seq_lens, q_lens, table, slots):
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    sched = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(seq_lens), num_heads=H_Q, num_kv_heads=H, head_dim=D, seq_lens=seq, dtype=torch.bfloat16,
        query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=_Layer.isa, enable_kv_split=False,
        dynamic_causal=None, kv_cache_dtype="auto")
    return CPUAttentionMetadata(num_actual_tokens=sum(q_lens), max_query_len=max(q_lens), query_start_loc=qsl,
                                max_seq_len=max(seq_lens), seq_lens=seq, block_table=table,
                                slot_mapping=torch.tensor(slots, dtype=torch.long), scheduler_metadata=sched)


# Two requests sharing their first block (a prefix-cache hit): A holds 2N + 17 tokens in blocks 5, 9, 2; B holds
# N + 40 in blocks 5, 7. Step 1 prefills A's first 2N + 16 and B's tokens N .. N + 38 (its first block is A's);
# step 2 decodes one token each.
TABLE = torch.tensor([[5, 9, 2], [5, 7, 0]], dtype=torch.int32)
LEN_A, LEN_B = 2 * N + 17, N + 40


def _slot(table_row, pos):
    return int(table_row[pos // N]) * N + pos % N


def _steps():
    a_pos, b_pos = list(range(0, LEN_A - 1)), list(range(N, LEN_B - 1))
    step1 = (a_pos + b_pos, [LEN_A - 1, LEN_B - 1], [len(a_pos), len(b_pos)])
    step2 = ([LEN_A - 1, LEN_B - 1], [LEN_A, LEN_B], [1, 1])
    return step1, step2


def _tokens(seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(LEN_A + LEN_B, H, D, generator=g)
    k[..., 3] += 6  # an outlier channel
    v = torch.randn(LEN_A + LEN_B, H, D, generator=g)
    q = torch.randn(LEN_A + LEN_B, H_Q, D, generator=g)
    return k.bfloat16(), v.bfloat16(), q.bfloat16()


def _index(req, pos):
    """Row of request `req`'s token `pos` in `_tokens` (B's first block is A's first block: the same tokens)."""
    return pos if req == 0 or pos < N else LEN_A + pos


def _fake(fmt: PageFormat, x: torch.Tensor, spec) -> torch.Tensor:
    """`x` `[n, H, d]` as the reference stores and reads it (float32)."""
    r = fwht(x.float()) if fmt.hadamard else x
    if spec.axis == "channel":
        got = dequantize(quantize(r.transpose(0, 1)[None], spec), torch.float32)[0].transpose(0, 1)
    else:
        got = dequantize(quantize(r.reshape(-1, 1, D), spec), torch.float32).reshape(x.shape)
    return fwht_inverse(got) if fmt.hadamard else got


def _run_steps(impl, fmt, pages, k, v, q):
    """Both steps through the plugin; the outputs of each step `[T, H_Q * D]`."""
    outs = []
    for pos_list, seq_lens, q_lens in _steps():
        reqs = [0] * q_lens[0] + [1] * q_lens[1]
        rows = [_index(r, p) for r, p in zip(reqs, pos_list)]
        slots = [_slot(TABLE[r], p) for r, p in zip(reqs, pos_list)]
        meta = _meta(seq_lens, q_lens, TABLE, slots)
        impl.do_kv_cache_update(_Layer, k[rows], v[rows], pages, meta.slot_mapping)
        out = torch.zeros(len(rows), H_Q, D, dtype=torch.bfloat16)
        impl.forward(_Layer, q[rows], k[rows], v[rows], pages, meta, out)
        outs.append((out, meta, rows))
    return outs


def _native(native, meta, q_rows, cache_k, cache_v, q, blocks=16):
    """vLLM's CPU_ATTN over a native cache holding `cache_k/v[(block, offset)]` `[H, D]` float tensors."""
    kv = torch.zeros(blocks, H, N, 2 * D, dtype=torch.bfloat16)
    slots = torch.tensor([b * N + o for b, o in cache_k], dtype=torch.long)
    kk = torch.stack([cache_k[s] for s in cache_k]).bfloat16()
    vv = torch.stack([cache_v[s] for s in cache_k]).bfloat16()
    native.do_kv_cache_update(_Layer, kk, vv, kv, slots)
    out = torch.zeros(len(q_rows), H_Q, D, dtype=torch.bfloat16)
    native.forward(_Layer, q[q_rows], None, None, kv, meta, out)
    return out


@pytest.mark.parametrize("path", ["scratch", "fused"])
@pytest.mark.parametrize("name, hadamard", [("rtn-4", False), ("rtn-2", True), ("rtn-8", False),
                                            ("kivi-4", False), ("kivi-2", True)])
def test_plugin_attention_is_native_attention_on_the_dequantized_cache(model_config, name, hadamard, path,
                                                                        monkeypatch):
    """scratch: the dequantized blocks through vLLM's own kernel, bit for bit; fused (decode steps): vlmkv's C++
    kernel over the packed pages, equal up to the native kernel's bf16 rounding."""
    from vlmkv.kernels import decode_layer_available

    if path == "scratch":
        monkeypatch.setenv("VLMKV_KERNELS", "torch")  # no C++ kernel: decode steps take the scratch too
    elif not decode_layer_available(torch.zeros(1)):
        pytest.skip("vlmkv's C++ kernels are not built here")
    impl, native = _impls(model_config, {"format": name, "hadamard": hadamard})
    fmt = PageFormat.parse(name, D, N, 0, hadamard)
    pages = torch.randint(0, 256, (16, H, N, fmt.token_bytes), dtype=torch.uint8)  # garbage must not leak
    k, v, q = _tokens()
    (out1, meta1, rows1), (out2, meta2, rows2) = _run_steps(impl, fmt, pages, k, v, q)
    # what the pages hold after each step, dequantized by the reference
    ck, cv = {}, {}
    reqs = {0: (TABLE[0], LEN_A), 1: (TABLE[1], LEN_B)}
    for r, (row, n) in reqs.items():
        for b in range(-(-n // N)):
            idx = [_index(r, p) for p in range(b * N, min(n, (b + 1) * N))]
            full = len(idx) == N
            if fmt.staged and not full:
                kq, vq = k[idx].float(), v[idx].float()  # the request's own, partly filled block: staged as is
            else:
                kq, vq = _fake(fmt, k[idx], fmt.key_spec), _fake(fmt, v[idx], fmt.value_spec)
            for j, p in enumerate(range(b * N, b * N + len(idx))):
                ck[(int(row[b]), p % N)], cv[(int(row[b]), p % N)] = kq[j], vq[j]
    # the decode step: each query reads earlier blocks as stored and its own (partly filled) block as it is
    want2 = _native(native, meta2, rows2, ck, cv, q)
    exact = dict(rtol=0, atol=0) if path == "scratch" else dict(rtol=2 ** -6, atol=2 ** -6)
    torch.testing.assert_close(out2, want2, **exact)
    if not fmt.staged:  # rtn: every token as stored, the prefill's own tokens included
        want1 = _native(native, meta1, rows1, ck, cv, q)
        torch.testing.assert_close(out1, want1, rtol=0, atol=0)
    else:  # kivi prefill: a query reads earlier blocks quantized and its own block as it is (float64 reference)
        got, want, o = out1.double(), torch.zeros_like(out1, dtype=torch.float64), 0
        for r, start, end in ((0, 0, LEN_A - 1), (1, N, LEN_B - 1)):
            row = TABLE[r]
            for p in range(start, end):
                keys, vals = [], []
                for t in range(p + 1):
                    b, own = t // N, t // N == p // N
                    src = _index(r, t)
                    if own:
                        keys.append(k[src].double()), vals.append(v[src].double())
                    else:
                        keys.append(ck[(int(row[b]), t % N)].double()), vals.append(cv[(int(row[b]), t % N)].double())
                K, V = torch.stack(keys, 1), torch.stack(vals, 1)  # [H, t, D]
                qq = q[_index(r, p)].double().view(H, H_Q // H, D)
                w = torch.softmax(qq @ K.transpose(1, 2) * SCALE, -1)
                want[o] = (w @ V).reshape(H_Q, D)
                o += 1
        err = (got - want).abs().max()
        assert err <= 4 * 2 ** -8 * want.abs().max(), err  # a few bf16 steps: the kernel's own rounding


@pytest.mark.parametrize("name, hadamard", [("kivi-4", False), ("kivi-2", True), ("rtn-4", True)])
def test_cuda_steps_read_the_pages_as_the_cpu_backend(model_config, name, hadamard):
    """The CUDA backend's two paths, run here on CPU tensors (the Triton kernel in Triton's interpreter): the decode
    kernel over the pages in place and the general path (dequantized blocks, PyTorch attention) give the CPU
    backend's outputs up to bf16 rounding."""
    pytest.importorskip("triton")
    from vlmkv.vllm.cuda import decode_step, general_step
    from vlmkv.vllm.store import PageStore

    impl, _ = _impls(model_config, {"format": name, "hadamard": hadamard})
    fmt = PageFormat.parse(name, D, N, 0, hadamard)
    k, v, q = _tokens()
    pages = torch.zeros(16, H, N, fmt.token_bytes, dtype=torch.uint8)
    (out1, meta1, rows1), (out2, meta2, rows2) = _run_steps(impl, fmt, pages, k, v, q)
    store, pages2 = PageStore(fmt, 8), torch.zeros_like(pages)
    tol = dict(rtol=2 ** -6, atol=2 ** -6)
    store.write(k[rows1], v[rows1], pages2, meta1.slot_mapping)
    torch.testing.assert_close(general_step(store, meta1, q[rows1], k[rows1], v[rows1], pages2, SCALE), out1, **tol)
    store.settle()
    store.write(k[rows2], v[rows2], pages2, meta2.slot_mapping)
    assert torch.equal(pages2, pages)  # the same bytes as the CPU backend wrote
    torch.testing.assert_close(decode_step(store, meta2, q[rows2], pages2, SCALE), out2, **tol)
    torch.testing.assert_close(general_step(store, meta2, q[rows2], k[rows2], v[rows2], pages2, SCALE), out2, **tol)


def test_a_lost_staging_slot_raises_instead_of_reading_garbage(model_config):
    impl, _ = _impls(model_config, {"format": "kivi-4"})
    fmt = PageFormat.parse("kivi-4", D, N)
    pages = torch.zeros(16, H, N, fmt.token_bytes, dtype=torch.uint8)
    k, v, q = _tokens()
    (pos1, seq1, ql1), (pos2, seq2, ql2) = _steps()
    reqs = [0] * ql1[0] + [1] * ql1[1]
    rows = [_index(r, p) for r, p in zip(reqs, pos1)]
    meta = _meta(seq1, ql1, TABLE, [_slot(TABLE[r], p) for r, p in zip(reqs, pos1)])
    impl.do_kv_cache_update(_Layer, k[rows], v[rows], pages, meta.slot_mapping)
    impl.forward(_Layer, q[rows], k[rows], v[rows], pages, meta, torch.zeros(len(rows), H_Q, D, dtype=torch.bfloat16))
    impl.pages._store.staging.release(impl.pages._store.staging.slot_of[2])  # A's last block, as if reclaimed while A still runs
    rows = [_index(0, pos2[0]), _index(1, pos2[1])]
    meta = _meta(seq2, ql2, TABLE, [_slot(TABLE[0], pos2[0]), _slot(TABLE[1], pos2[1])])
    with pytest.raises(StagingError, match="not staged"):
        impl.do_kv_cache_update(_Layer, k[rows], v[rows], pages, meta.slot_mapping)


def test_unservable_combinations_refuse_to_start(model_config):
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        _impls(model_config, {"format": "kivi-4"}, kv_cache_dtype="fp8")
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    from vlmkv.vllm import Settings

    with pytest.raises(ValueError, match="full-attention"):
        page_spec(SlidingWindowSpec(block_size=1, num_kv_heads=H, head_size=D, dtype=torch.bfloat16,
                                    sliding_window=64), Settings("kivi-4"))
    spec = page_spec(FullAttentionSpec(block_size=N, num_kv_heads=H, head_size=D, dtype=torch.bfloat16),
                     Settings("kivi-2"))
    assert spec.dtype == torch.uint8 and spec.page_size_bytes == H * N * 40


def test_without_settings_the_plugin_is_vllms_own_backend(model_config):
    impl, _ = _impls(model_config, None)
    assert not impl.pages.active
    from vlmkv.vllm.cpu import VlmkvCPUBackend
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vlmkv.vllm.cuda import VlmkvCudaBackend
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend

    spec = FullAttentionSpec(block_size=N, num_kv_heads=H, head_size=D, dtype=torch.bfloat16)
    cfg = VllmConfig(model_config=model_config)
    with set_current_vllm_config(cfg):
        assert VlmkvCPUBackend.customize_spec(spec) == spec
        assert VlmkvCudaBackend.customize_spec(spec) == spec
        assert VlmkvCudaBackend.supported_kv_cache_layouts() == TritonAttentionBackend.supported_kv_cache_layouts()
    with set_current_vllm_config(VllmConfig(model_config=model_config,
                                            additional_config={"vlmkv": {"format": "kivi-4"}})):
        assert VlmkvCudaBackend.customize_spec(spec).state_content_bytes == 72


def test_the_entry_point_puts_the_backend_in_vllms_registry():
    from vllm.plugins import load_general_plugins
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    load_general_plugins()
    assert AttentionBackendEnum.CPU_ATTN.get_path() == "vlmkv.vllm.cpu.VlmkvCPUBackend"
    assert AttentionBackendEnum.CUSTOM.get_path() == "vlmkv.vllm.cuda.VlmkvCudaBackend"


# ---------------------------------------------------------------------------------------------- end to end
def _run(script: str, timeout: int = 600, **env_extra) -> dict:
    """Run `script` in a fresh interpreter (vLLM's CPU engine spawns processes: a __main__ guard is needed); it
    prints its result as one line `RESULT <json>`."""
    env = dict(os.environ, VLLM_HOST_IP="127.0.0.1", VLLM_CPU_KVCACHE_SPACE="1", PYTHONPATH=str(ROOT), **env_extra)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not lines:
        errors = [x for x in out.stderr.splitlines() if "Error" in x or "error" in x]
        raise AssertionError(f"rc {out.returncode}, result printed: {bool(lines)}\n" + "\n".join(errors[-20:]) +
                             "\n" + out.stderr[-3000:])
    return json.loads(lines[-1][7:])


E2E = r'''
import json, os, sys, math, torch
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vlmkv import QuantizedKVCache
from vlmkv.models.loading import embedded_path, load_model
from vlmkv.vllm.pages import PageFormat
if __name__ == "__main__":
    path = str(embedded_path("smollm2-135m"))
    llm = LLM(model=path, enforce_eager=True, dtype="bfloat16", max_model_len=1024, enable_prefix_caching=True,
              additional_config={"vlmkv": {"format": "kivi-4"}}, seed=0, max_num_seqs=8)
    tok = llm.get_tokenizer()
    text = open("/usr/share/common-licenses/Apache-2.0").read()
    ids = tok(text)["input_ids"][:400]
    greedy = SamplingParams(max_tokens=24, temperature=0)
    first = llm.generate([TokensPrompt(prompt_token_ids=ids)], greedy, use_tqdm=False)[0]
    again = llm.generate([TokensPrompt(prompt_token_ids=ids)], greedy, use_tqdm=False)[0]
    branch = llm.generate([TokensPrompt(prompt_token_ids=ids[:300] + ids[:50])], greedy, use_tqdm=False)[0]
    lp = llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=0),
                      use_tqdm=False)[0]
    vllm_lp = [d[t].logprob for d, t in zip(lp.prompt_logprobs[1:], ids[1:])]
    cc = llm.llm_engine.vllm_config.cache_config
    def hf(dtype, name):
        """vlmkv's transformers cache at format `name`, a block at a time (the paged schedule)."""
        model, _ = load_model("smollm2-135m", dtype=dtype)
        fmt = PageFormat.parse(name, 64, cc.block_size)
        x = torch.tensor([ids])
        cache = QuantizedKVCache(model, fmt.policy())
        outs = []
        with torch.no_grad():
            for s in range(0, len(ids), cc.block_size):
                e = min(s + cc.block_size, len(ids))
                outs.append(model(input_ids=x[:, s:e], past_key_values=cache, use_cache=True,
                                  position_ids=torch.arange(s, e)[None]).logits)
        return torch.cat(outs, 1)[0, :-1].float().log_softmax(-1).gather(-1, x[0, 1:, None])[:, 0].tolist()
    hf_lp, hf_fp32, hf_other = hf(torch.bfloat16, "kivi-4"), hf(torch.float32, "kivi-4"), hf(torch.bfloat16, "kivi-2")
    print("RESULT " + json.dumps({"first": first.outputs[0].text, "again": again.outputs[0].text,
                      "cached": again.num_cached_tokens, "branch_cached": branch.num_cached_tokens,
                      "branch": branch.outputs[0].text, "vllm_lp": vllm_lp, "hf_lp": hf_lp,
                      "hf_fp32": hf_fp32, "hf_other": hf_other,
                      "tokens": cc.num_gpu_blocks * cc.block_size}))

    sys.stdout.flush()
    llm.llm_engine.engine_core.shutdown()  # the engine's processes first, then no interpreter teardown (where a
    os._exit(0)  # thread still running at exit can abort the process after its work is done)
'''


@pytest.fixture(scope="module")
def e2e():
    return _run(E2E)


def test_llm_generates_from_packed_pages_and_reuses_cached_prefix_pages(e2e):
    assert len(e2e["first"].split()) >= 5
    assert e2e["cached"] >= 384  # the three full blocks of the prompt came from the prefix cache
    assert e2e["again"] == e2e["first"]  # a cached page is read as it was written: the same answer
    assert e2e["branch_cached"] >= 256
    assert e2e["tokens"] >= 3.5 * 46_592  # kivi-4 pages: tokens in 1 GiB against bf16 pages' 46,592


def test_one_format_two_engines_score_the_text_alike(e2e):
    """vLLM with kivi-4 pages and vlmkv's transformers cache at the same format give the same log-probabilities up
    to bf16 noise: their difference is within what bf16 arithmetic alone moves the transformers engine (bf16 against
    float32), while another format (kivi-2) is far outside it."""
    a, b = torch.tensor(e2e["vllm_lp"]), torch.tensor(e2e["hf_lp"])
    noise = float((b - torch.tensor(e2e["hf_fp32"])).abs().mean())
    assert a.shape == b.shape
    assert float((a - b).abs().mean()) <= 1.5 * noise, (float((a - b).abs().mean()), noise)
    assert abs(float(a.mean() - b.mean())) <= 0.5 * noise
    assert float((a - torch.tensor(e2e["hf_other"])).abs().mean()) > 2 * noise


PREEMPT = r'''
import json, os, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vlmkv.models.loading import embedded_path
if __name__ == "__main__":
    llm = LLM(model=str(embedded_path("smollm2-135m")), enforce_eager=True, dtype="bfloat16", max_model_len=1024,
              num_gpu_blocks_override=12, max_num_seqs=4, enable_prefix_caching=False, seed=0, disable_log_stats=False,
              additional_config={"vlmkv": {"format": "kivi-4"}})
    tok = llm.get_tokenizer()
    ids = tok(open("/usr/share/common-licenses/GPL-3").read())["input_ids"]
    prompts = [ids[i * 700:i * 700 + 300] for i in range(4)]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(max_tokens=120, temperature=0, ignore_eos=True, logprobs=0), use_tqdm=False)
    pre = sum(getattr(m, "value", 0) for m in llm.get_metrics() if "preemption" in m.name)
    decoded, forced = [], []
    for p, o in zip(prompts, outs):
        gen = list(o.outputs[0].token_ids)
        decoded.append([lp[t].logprob for t, lp in zip(gen, o.outputs[0].logprobs)])
        # the same tokens scored in one prefill, alone: what the cache should have held while decoding
        s = llm.generate([TokensPrompt(prompt_token_ids=p + gen)], SamplingParams(max_tokens=1, prompt_logprobs=0),
                         use_tqdm=False)[0]
        forced.append([d[t].logprob for d, t in zip(s.prompt_logprobs[len(p):], gen)])
    print("RESULT " + json.dumps({"decoded": decoded, "forced": forced, "preemptions": pre}))

    sys.stdout.flush()
    llm.llm_engine.engine_core.shutdown()  # the engine's processes first, then no interpreter teardown (where a
    os._exit(0)  # thread still running at exit can abort the process after its work is done)
'''


@pytest.mark.slow
def test_preempted_requests_recompute_what_they_held():
    """Twelve blocks for four requests of four blocks each: run together, some are preempted (their blocks freed,
    their staging reopened when recomputed). The log-probabilities their tokens got while decoding, preemption
    included, are those the same tokens get scored in one prefill (up to batch arithmetic): what a request's pages
    hold after a recomputation is what they held before. Decode steps take the scratch path here, as prefills do, so
    both read the same bf16 numbers (vlmkv's C++ decode kernel reads the dequantized values in float32: a few
    hundredths of a nat apart); bf16 pages themselves differ by up to 0.1 between a batch and a prefill."""
    out = _run(PREEMPT, VLMKV_KERNELS="torch")
    assert out["preemptions"] > 0
    for dec, forced in zip(out["decoded"], out["forced"]):
        assert len(dec) == len(forced) == 120
        diff = torch.tensor(dec) - torch.tensor(forced)
        assert float(diff.abs().mean()) < 0.03 and float(diff.abs().max()) < 0.3, diff


TP = r'''
import json, os, sys
from vllm import LLM, SamplingParams
from vlmkv.models.loading import embedded_path
if __name__ == "__main__":
    llm = LLM(model=str(embedded_path("smollm2-135m")), enforce_eager=True, dtype="bfloat16", max_model_len=512,
              tensor_parallel_size=3, distributed_executor_backend="mp", max_num_seqs=4,
              additional_config={"vlmkv": {"format": "kivi-4"}})
    out = llm.generate(["The Apache License is a permissive free software license"],
                       SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)
    print("RESULT " + json.dumps({"text": out[0].outputs[0].text}))

    sys.stdout.flush()
    llm.llm_engine.engine_core.shutdown()  # the engine's processes first, then no interpreter teardown (where a
    os._exit(0)  # thread still running at exit can abort the process after its work is done)
'''


@pytest.mark.slow
def test_tensor_parallel_3_serves_packed_pages():
    before = set(Path("/dev/shm").glob("vllm_dist_*")) if Path("/dev/shm").exists() else set()
    try:
        # three ranks on a machine with one NUMA node: vLLM's automatic thread binding wants a node a rank
        out = _run(TP, timeout=900, VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1")
    finally:
        for p in set(Path("/dev/shm").glob("vllm_dist_*")) - before:
            p.unlink(missing_ok=True)
    assert len(out["text"].split()) >= 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_vllm_serve_answers_an_openai_request(model_path, tmp_path):
    port = _free_port()
    env = dict(os.environ, VLLM_HOST_IP="127.0.0.1", VLLM_CPU_KVCACHE_SPACE="1")
    # vLLM's own CLI; through vlmkv's launcher, since on the CPU build (packaged as vllm-cpu) the `vllm` script stops
    # at its version lookup
    cli = [sys.executable, "-m", "vlmkv.vllm"]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([*cli, "serve", model_path, "--host", "127.0.0.1", "--port", str(port),
                             "--dtype", "bfloat16", "--enforce-eager", "--max-model-len", "512",
                             "--served-model-name", "smollm2", "--additional-config",
                             json.dumps({"vlmkv": {"format": "kivi-2"}})], stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError((tmp_path / "serve.log").read_text()[-4000:])
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(2)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", method="POST",
                                     headers={"Content-Type": "application/json"},
                                     data=json.dumps({"model": "smollm2", "prompt": "The capital of France is",
                                                      "max_tokens": 8, "temperature": 0}).encode())
        body = json.loads(urllib.request.urlopen(req, timeout=120).read())
        assert "Paris" in body["choices"][0]["text"]
        # the server holds kivi-2 pages: 6.7 times the tokens of bf16 pages (46,592 in 1 GiB for SmolLM2)
        import re

        sizes = re.findall(r"KV cache size: ([\d,]+) tokens", (tmp_path / "serve.log").read_text())
        assert sizes and int(sizes[-1].replace(",", "")) >= 6 * 46_592, sizes
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
