"""vLLM's CPU attention backend with vlmkv's packed pages (see vlmkv/vllm/__init__.py for how it is switched on).

Writing (`do_kv_cache_update`, before a step's attention): `rtn` formats quantize each new token into its row of
the page; `kivi` formats stage a block's tokens in full precision (`Staging`) and quantize the block into its
page when its last token arrives. Reading (`forward`): the blocks the step's requests reference are dequantized
once each (a block shared by several requests through prefix caching too) into a scratch cache in the native
kernel's layout, the staged tokens of each request's last, partly filled block beside them, and vLLM's own CPU
attention kernel runs on that scratch through a remapped block table. So the attention is vLLM's, bit for bit, on
the dequantized keys and values, and every query attends to what the cache holds after the step's writes (a
prompt's own tokens included: prefix caching then gives the same numbers as recomputing).

Nothing is requantized: a full block is quantized once and read as it is, by every request that shares it.
"""
from __future__ import annotations

import time

import torch
from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl,
                                                 CPUAttentionMetadataBuilder)

from .. import kernels
from ..quant import fwht, fwht_inverse
from .layer import LayerPages, current_settings, page_spec
from .pages import PageFormat
from .plan import StepPlan
from .store import PageStore

#: seconds this process spent writing pages, building the scratch and in the attention kernel (benchmarks read it)
TIMINGS = {"write_s": 0.0, "scratch_s": 0.0, "attention_s": 0.0, "fused_s": 0.0}
#: layer steps each read path ran: "fused" (decode steps: vlmkv's C++ kernel over the packed pages in place),
#: "scratch" (other steps, or no C++ kernel: dequantized scratch + vLLM's CPU attention kernel)
PATHS = {"fused": 0, "scratch": 0}


class VlmkvCPUBackend(CPUAttentionBackend):
    """vLLM's CPU_ATTN, storing keys and values in vlmkv's packed pages when `additional_config` asks for them."""

    @classmethod
    def customize_spec(cls, spec):
        settings = current_settings()
        if settings is None:
            return super().customize_spec(spec)
        return page_spec(spec, settings)

    @staticmethod
    def get_impl_cls():
        return VlmkvCPUImpl

    @staticmethod
    def get_builder_cls():
        return CPUAttentionMetadataBuilder


class VlmkvCPUImpl(CPUAttentionBackendImpl):
    """CPU_ATTN's implementation with packed pages; without settings, exactly CPU_ATTN."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pages = LayerPages(self)
        self._plan_key = None
        self._plan = None

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if not self.pages.active:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        store = self.pages.store(kv_cache)
        t0 = time.perf_counter()
        store.write(key, value, kv_cache, slot_mapping)
        TIMINGS["write_s"] += time.perf_counter() - t0

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if not self.pages.active or attn_metadata is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported with vlmkv pages")
        store = self.pages.store(kv_cache)
        fmt = store.fmt
        n = attn_metadata.num_actual_tokens
        if attn_metadata.max_query_len == 1 and kernels.decode_layer_available(query):
            t0 = time.perf_counter()
            out = fused_decode(store, attn_metadata, query[:n], kv_cache, self.scale)
            output[:n] = out.reshape(output[:n].shape).to(output.dtype)
            store.settle()
            TIMINGS["fused_s"] += time.perf_counter() - t0
            PATHS["fused"] += 1
            return output
        if self._plan_key is not attn_metadata:  # one plan a step, shared by the layers
            self._plan = cpu_plan(attn_metadata, fmt, self, query.dtype, layer.isa)
            self._plan_key = attn_metadata
        plan, sched = self._plan
        t0 = time.perf_counter()
        k, v = store.scratch(plan, kv_cache, key[:n], value[:n], query.dtype)
        key_cache, value_cache = native_cache(k, v, layer.isa)
        t1 = time.perf_counter()
        ops.cpu_attention_with_kv_cache(
            query=query[:n], key_cache=key_cache, value_cache=value_cache, output=output[:n],
            query_start_loc=plan.query_start_loc, seq_lens=plan.seq_lens, scale=self.scale,
            causal=attn_metadata.causal, alibi_slopes=self.alibi_slopes, sliding_window=self.sliding_window,
            block_table=plan.table, softcap=self.logits_soft_cap, scheduler_metadata=sched,
            s_aux=self.sinks, dynamic_causal=attn_metadata.dynamic_causal, k_scale=1.0, v_scale=1.0,
            kv_cache_dtype="auto")
        store.settle()
        PATHS["scratch"] += 1
        TIMINGS["scratch_s"] += t1 - t0
        TIMINGS["attention_s"] += time.perf_counter() - t1
        return output


def fused_decode(store: PageStore, meta, q, pages, scale: float) -> torch.Tensor:
    """A step whose requests each bring one query: vlmkv's C++ decode kernel (`kernels.decode_layer`) over the packed
    pages in place, in one call for the layer: each request's page blocks (gathered as packed bytes, never
    dequantized into a copy) and, for `kivi`, its own block in full precision from staging (where the step's token
    already is), merged by log-sum-exp. q `[R, Hq, d]` -> float32 `[R, Hq, d]`."""
    fmt = store.fmt
    N, d = fmt.block_size, fmt.head_dim
    R, Hq, _ = q.shape
    H = pages.shape[1]
    npage, from_pages, own, own_len = store.decode_view(meta.seq_lens, meta.block_table)
    parts = []
    nb = int(npage.max())
    if nb:  # columns past a request's blocks: masked
        kq, vq = fmt.qtensors(pages[meta.block_table.to(torch.long)[:, :nb]])  # [R, H, nb * N, .]
        parts.append((kq, vq, torch.arange(nb * N)[None, :] < from_pages[:, None]))
    if own is not None:  # past each request's tokens: masked, never read
        if fmt.hadamard:
            own = fwht(own.float())
        parts.append((own[:, 0], own[:, 1], torch.arange(N)[None, :] < own_len[:, None]))
    qq = q.float().view(R, H, Hq // H, d)
    if fmt.hadamard:
        qq = fwht(qq)
    m, l, o = kernels.decode_layer(qq, parts, scale)
    out = o / l
    if fmt.hadamard:
        out = fwht_inverse(out)
    return out.reshape(R, Hq, d)


def cpu_plan(meta, fmt: PageFormat, impl, dtype, isa: str):
    """The step's `StepPlan` and the native kernel's scheduler metadata for its attention requests."""
    from vllm import envs

    if fmt.staged and (meta.dynamic_causal is not None or not meta.causal):
        raise ValueError("vlmkv's kivi pages serve causal decoder attention only, got a non-causal step")
    plan = StepPlan(meta.seq_lens, meta.query_start_loc, meta.block_table, fmt.block_size, fmt.staged)
    if not fmt.staged:
        return plan, meta.scheduler_metadata
    sched = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=plan.requests, num_heads=impl.num_heads, num_kv_heads=impl.num_kv_heads, head_dim=impl.head_size,
        seq_lens=plan.seq_lens, dtype=dtype, query_start_loc=plan.query_start_loc, causal=True,
        sliding_window_size=-1, isa=isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=None,
        kv_cache_dtype="auto")
    return plan, sched


def native_cache(k: torch.Tensor, v: torch.Tensor, isa: str):
    """k, v `[S, H, N, d]` into a native CPU cache: (key_cache, value_cache) views of one `[S, H, N, 2 d]` tensor
    in their dtype, in the kernel's layout for `isa`."""
    S, H, N, d = k.shape
    cache = torch.empty(S, H, N, 2 * d, dtype=k.dtype).view(S, H, 2 * N, d)
    key_cache, value_cache = cache.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(k.permute(0, 2, 1, 3).reshape(S * N, H, d),
                                   v.permute(0, 2, 1, 3).reshape(S * N, H, d), key_cache, value_cache,
                                   torch.arange(S * N, dtype=torch.long), isa, 1.0, 1.0, "auto")
    return key_cache, value_cache


__all__ = ["VlmkvCPUBackend", "VlmkvCPUImpl", "fused_decode", "cpu_plan", "native_cache"]
