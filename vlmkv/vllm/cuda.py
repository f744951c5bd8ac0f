"""vLLM's Triton attention backend with vlmkv's packed pages, for CUDA: registered as `CUSTOM` by the plugin, picked
with `--attention-backend CUSTOM` (with `additional_config={"vlmkv": {...}}`; without it, vLLM's own TRITON_ATTN).

The same pages, staging and step plans as the CPU backend (cpu.py): writes go through `PageStore`; a step whose
requests each bring one query (decoding) runs `vlmkv.kernels.triton_pages.paged_decode`, which reads the packed
pages in place (no dequantized copy) and each request's own block in full precision; any other step (prefill,
chunked prefill) dequantizes the blocks it references (`PageStore.scratch`) and runs PyTorch's attention on each
attention request of its `StepPlan`. CUDA graphs are not supported (the staging bookkeeping runs on the host): use
`enforce_eager=True`.

Written against the same page layout and tested in Triton's interpreter (tests/test_vllm_pages.py); the run on a
GPU is `benchmarks/vllm_gpu_check.py`.
"""
from __future__ import annotations

import torch
from vllm.config import get_current_vllm_config_or_none
from vllm.v1.attention.backends.triton_attn import (TritonAttentionBackend, TritonAttentionImpl,
                                                    TritonAttentionMetadataBuilder)
from vllm.v1.kv_cache_interface import KVCacheLayout

from .layer import LayerPages, current_settings, page_spec
from .plan import StepPlan
from .store import PageStore


class VlmkvCudaBackend(TritonAttentionBackend):
    """vLLM's TRITON_ATTN, storing keys and values in vlmkv's packed pages when `additional_config` asks for them."""

    @classmethod
    def customize_spec(cls, spec):
        settings = current_settings()
        if settings is None:
            return super().customize_spec(spec)
        return page_spec(spec, settings)

    @classmethod
    def supported_kv_cache_layouts(cls):
        if current_settings() is None:
            return super().supported_kv_cache_layouts()
        return (KVCacheLayout.LBHNC,)  # a (block, head) region of N * C bytes is contiguous, as on the CPU

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        return VlmkvCudaImpl

    @staticmethod
    def get_builder_cls():
        return TritonAttentionMetadataBuilder


class VlmkvCudaImpl(TritonAttentionImpl):
    """TRITON_ATTN's implementation with packed pages; without settings, exactly TRITON_ATTN."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pages = LayerPages(self)
        if not self.pages.active:
            return
        cfg = get_current_vllm_config_or_none()
        if self.alibi_slopes is not None or self.sinks is not None or (self.logits_soft_cap or 0) != 0:
            raise ValueError("vlmkv pages on CUDA serve plain softmax attention (no ALiBi, sinks or soft cap)")
        if cfg is not None and not cfg.model_config.enforce_eager:
            raise ValueError("vlmkv pages on CUDA need enforce_eager=True (their staging runs on the host)")

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        if not self.pages.active:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        self.pages.store(kv_cache).write(key, value, kv_cache, slot_mapping)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if not self.pages.active or attn_metadata is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported with vlmkv pages")
        store = self.pages.store(kv_cache)
        n = attn_metadata.num_actual_tokens
        q = query[:n].view(n, self.num_heads, self.head_size)
        out = output[:n].view(n, self.num_heads, self.head_size)
        if attn_metadata.max_query_len == 1:
            out.copy_(decode_step(store, attn_metadata, q, kv_cache, self.scale))
        else:
            out.copy_(general_step(store, attn_metadata, q, key[:n], value[:n], kv_cache, self.scale))
        store.settle()
        return output


def decode_step(store: PageStore, meta, q, pages, scale: float) -> torch.Tensor:
    """One query a request: the fused Triton kernel over the pages in place and each request's own block from
    staging. q `[R, Hq, d]` -> `[R, Hq, d]`."""
    from ..kernels.triton_pages import paged_decode

    fmt = store.fmt
    N = fmt.block_size
    npage, from_pages, own, own_len = store.decode_view(meta.seq_lens, meta.block_table)
    valid = from_pages - (npage - 1) * N  # tokens read from the last page block
    if own is None:  # rtn: nothing outside the pages
        own = torch.zeros(npage.shape[0], 2, pages.shape[1], N, fmt.head_dim, dtype=q.dtype, device=q.device)
    return paged_decode(q, pages, meta.block_table, npage, valid, own, own_len, fmt, scale)


def general_step(store: PageStore, meta, q, key, value, pages, scale: float) -> torch.Tensor:
    """Any step: the referenced blocks dequantized, then PyTorch's attention per attention request (causal, the
    queries at the end of each request's keys). q `[T, Hq, d]` -> `[T, Hq, d]`."""
    fmt = store.fmt
    plan = StepPlan(meta.seq_lens, meta.query_start_loc, meta.block_table, fmt.block_size, fmt.staged)
    k, v = store.scratch(plan, pages, key, value, q.dtype)  # [S, H, N, d]
    S, H, N, d = k.shape
    out = torch.empty_like(q)
    qsl, lens = plan.query_start_loc.tolist(), plan.seq_lens.tolist()
    for i in range(plan.requests):
        q0, q1, L = qsl[i], qsl[i + 1], lens[i]
        if q1 == q0:
            continue
        nb = -(-L // N)
        idx = plan.table[i, :nb].long().to(k.device)
        kk = k[idx].permute(1, 0, 2, 3).reshape(H, nb * N, d)[:, :L]
        vv = v[idx].permute(1, 0, 2, 3).reshape(H, nb * N, d)[:, :L]
        qq = q[q0:q1].transpose(0, 1)  # [Hq, n, d]
        n = q1 - q0
        mask = torch.arange(L, device=q.device)[None, :] <= (L - n + torch.arange(n, device=q.device))[:, None]
        o = torch.nn.functional.scaled_dot_product_attention(qq[None], kk[None], vv[None], attn_mask=mask,
                                                             scale=scale, enable_gqa=True)
        out[q0:q1] = o[0].transpose(0, 1)
    return out


__all__ = ["VlmkvCudaBackend", "VlmkvCudaImpl", "decode_step", "general_step"]
