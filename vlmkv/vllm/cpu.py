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
from dataclasses import replace

import torch
from vllm import _custom_ops as ops
from vllm.config import get_current_vllm_config_or_none
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl,
                                                 CPUAttentionMetadataBuilder)
from vllm.v1.kv_cache_interface import FullAttentionSpec

from . import Settings, check_vllm_version, settings_from
from .pages import PageFormat
from .staging import Staging

# The settings of the engine this process serves: set when its attention layers are built (the config is current
# then), read by `customize_spec`, which vLLM calls with the layer's spec alone.
_ACTIVE: list = [None]
#: seconds this process spent writing pages, building the scratch and in the attention kernel (benchmarks read it)
TIMINGS = {"write_s": 0.0, "scratch_s": 0.0, "attention_s": 0.0}


def _current_settings() -> Settings | None:
    cfg = get_current_vllm_config_or_none()
    if cfg is not None:
        return settings_from(cfg.additional_config)
    return _ACTIVE[0]


def page_spec(spec, settings: Settings):
    """The layer's KV spec with vlmkv's pages: uint8 cells of `PageFormat.token_bytes` a token and kv head."""
    if not isinstance(spec, FullAttentionSpec) or getattr(spec, "sliding_window", None) is not None:
        raise ValueError(f"vlmkv pages serve full-attention decoder layers only (no sliding window, no MLA), got a "
                         f"{type(spec).__name__}")
    if spec.head_size_v != spec.head_size:
        raise ValueError(f"vlmkv pages need keys and values of one head size, got {spec.head_size} and "
                         f"{spec.head_size_v}")
    fmt = settings.page_format(spec.head_size, spec.block_size)
    return replace(spec, dtype=torch.uint8, state_content_bytes=fmt.token_bytes)


class VlmkvCPUBackend(CPUAttentionBackend):
    """vLLM's CPU_ATTN, storing keys and values in vlmkv's packed pages when `additional_config` asks for them."""

    @classmethod
    def customize_spec(cls, spec):
        settings = _current_settings()
        if settings is None:
            return super().customize_spec(spec)
        return page_spec(spec, settings)

    @staticmethod
    def get_impl_cls():
        return VlmkvCPUImpl

    @staticmethod
    def get_builder_cls():
        return CPUAttentionMetadataBuilder


class _Plan:
    """How one step's requests read the cache, shared by the step's layers (one block table for all of them).

    `rtn` formats: each request reads every block it references from the pages (its last block's rows past its
    length are zeroed in the scratch). `kivi` formats: a query reads the blocks before its own from the pages and
    its own block in full precision (the staged tokens of earlier steps, then the step's new ones), as a decoding
    token does; so the step's queries are split into one kernel request per (request, block), sharing the page
    blocks in the scratch."""

    def __init__(self, meta, N: int, staged: bool, impl, isa: str):
        seq = meta.seq_lens.to(torch.long)
        bt = meta.block_table.to(torch.long)
        R, M = bt.shape
        self.staged = staged
        if not staged:
            full = -(-seq // N)
            mask = torch.arange(M)[None, :] < full[:, None]
            self.page_blocks, inv = torch.unique(bt[mask], return_inverse=True)
            table = torch.zeros(R, M, dtype=torch.int32)
            table[mask] = inv.to(torch.int32)
            self.tails = [(int(table[r, int(full[r]) - 1]), p) for r, p in enumerate((seq % N).tolist()) if p]
            self.table, self.blocks = table, self.page_blocks.numel()
            self.query_start_loc, self.seq_lens, self.scheduler_metadata = (meta.query_start_loc, meta.seq_lens,
                                                                            meta.scheduler_metadata)
            return
        if meta.dynamic_causal is not None or not meta.causal:
            raise ValueError("vlmkv's kivi pages serve causal decoder attention only, got a non-causal step")
        ends, qsl = seq.tolist(), meta.query_start_loc.tolist()
        before = [(e - 1) // N for e in ends]  # blocks before the last query's own block
        mask = torch.arange(M)[None, :] < torch.tensor(before)[:, None]
        self.page_blocks, inv = torch.unique(bt[mask], return_inverse=True)
        U = self.page_blocks.numel()
        pos = torch.zeros(R, M, dtype=torch.long)
        pos[mask] = inv
        rows, lens, starts = [], [], [0]
        self.raw: list[tuple[int, int, int, int]] = []  # (block id, staged tokens, first and end new-token index)
        for r in range(R):
            e, q0 = ends[r], qsl[r]
            s = e - (qsl[r + 1] - q0)
            for j in range(s // N, (e - 1) // N + 1):
                qs, qe = max(s, j * N), min(e, (j + 1) * N)
                rows.append(pos[r, :j].tolist() + [U + len(self.raw)])
                self.raw.append((int(bt[r, j]), qs - j * N, q0 + qs - s, q0 + qe - s))
                lens.append(qe)
                starts.append(starts[-1] + qe - qs)
        width = max(len(x) for x in rows)
        self.table = torch.tensor([x + [0] * (width - len(x)) for x in rows], dtype=torch.int32)
        self.seq_lens = torch.tensor(lens, dtype=torch.int32)
        self.query_start_loc = torch.tensor(starts, dtype=torch.int32)
        self.blocks = U + len(self.raw)
        from vllm import envs

        self.scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(rows), num_heads=impl.num_heads, num_kv_heads=impl.num_kv_heads, head_dim=impl.head_size,
            seq_lens=self.seq_lens, dtype=impl._dtype, query_start_loc=self.query_start_loc, causal=True,
            sliding_window_size=-1, isa=isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=None,
            kv_cache_dtype="auto")


class VlmkvCPUImpl(CPUAttentionBackendImpl):
    """CPU_ATTN's implementation with packed pages; without settings, exactly CPU_ATTN."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = get_current_vllm_config_or_none()
        self.settings = settings_from(cfg.additional_config) if cfg is not None else None
        _ACTIVE[0] = self.settings
        self.fmt: PageFormat | None = None
        self.staging: Staging | None = None
        self._plan_key = None
        self._plan = None
        self._release: list[int] = []  # staging slots of blocks the step filled, freed after its attention
        self._dtype = None
        self.max_seqs = cfg.scheduler_config.max_num_seqs if cfg is not None else 256
        if self.settings is None or self.attn_type != AttentionType.DECODER:
            return
        check_vllm_version()
        if self.is_fp8_kv_cache:
            raise ValueError(f"vlmkv pages replace the KV cache dtype: leave kv_cache_dtype at 'auto', got "
                             f"{self.kv_cache_dtype!r}")
        if self.sliding_window != -1:
            raise ValueError(f"vlmkv pages serve full-attention layers only, got a sliding window of "
                             f"{self.sliding_window}")
        if self.kv_sharing_target_layer_name is not None:
            raise ValueError("vlmkv pages do not serve layers that share another layer's KV cache, got "
                             f"kv_sharing_target_layer_name={self.kv_sharing_target_layer_name!r}")

    @property
    def active(self) -> bool:
        return self.settings is not None and self.attn_type == AttentionType.DECODER

    def _format(self, kv_cache: torch.Tensor) -> PageFormat:
        if self.fmt is None:
            if kv_cache.dtype != torch.uint8 or kv_cache.dim() != 4:
                raise ValueError(f"vlmkv pages expect a uint8 [blocks, heads, block_size, bytes] cache, got "
                                 f"{kv_cache.dtype} {tuple(kv_cache.shape)}")
            B, H, N, C = kv_cache.shape
            fmt = self.settings.page_format(self.head_size, N)
            if C != fmt.token_bytes:
                raise ValueError(f"{fmt.name}: pages of {fmt.token_bytes} bytes a token and head expected, got {C}")
            self.fmt = fmt
        return self.fmt

    # ------------------------------------------------------------------ writing
    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if not self.active:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        fmt = self._format(kv_cache)
        t0 = time.perf_counter()
        self._write(fmt, key, value, kv_cache, slot_mapping)
        TIMINGS["write_s"] += time.perf_counter() - t0

    def _write(self, fmt, key, value, kv_cache, slot_mapping) -> None:
        n = slot_mapping.shape[0]
        slots = slot_mapping.to(torch.long)
        key, value = key[:n], value[:n]
        keep = slots >= 0  # padded positions carry -1
        if not bool(keep.all()):
            slots, key, value = slots[keep], key[keep], value[keep]
        if slots.numel() == 0:
            return
        N = fmt.block_size
        blocks, offs = slots // N, slots % N
        if not fmt.staged:
            kv_cache[blocks, :, offs] = fmt.quantize_tokens(key, value)
            return
        staging = self._staging(kv_cache, key)
        self._settle()
        self._release = write_blocks(fmt, staging, kv_cache, blocks, offs, key, value)

    def _settle(self) -> None:
        """Free the staging slots of blocks the last step filled (kept until its attention read them)."""
        for slot in self._release:
            self.staging.release(slot)
        self._release = []

    def _staging(self, kv_cache, key) -> Staging:
        if self.staging is None:
            B, H, N, C = kv_cache.shape
            self.staging = Staging(H, N, self.head_size, key.dtype, key.device, cap=2 * self.max_seqs + 8)
        return self.staging

    # ------------------------------------------------------------------ reading
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if not self.active or attn_metadata is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported with vlmkv pages")
        fmt = self._format(kv_cache)
        if self._plan_key is not attn_metadata:
            self._dtype = query.dtype
            self._plan = _Plan(attn_metadata, fmt.block_size, fmt.staged, self, layer.isa)
            self._plan_key = attn_metadata
        plan = self._plan
        t0 = time.perf_counter()
        n = attn_metadata.num_actual_tokens
        key_cache, value_cache = scratch_cache(fmt, plan, kv_cache, self.staging, key[:n], value[:n], query.dtype,
                                               layer.isa)
        t1 = time.perf_counter()
        ops.cpu_attention_with_kv_cache(
            query=query[:n], key_cache=key_cache, value_cache=value_cache, output=output[:n],
            query_start_loc=plan.query_start_loc, seq_lens=plan.seq_lens, scale=self.scale,
            causal=attn_metadata.causal, alibi_slopes=self.alibi_slopes, sliding_window=self.sliding_window,
            block_table=plan.table, softcap=self.logits_soft_cap, scheduler_metadata=plan.scheduler_metadata,
            s_aux=self.sinks, dynamic_causal=attn_metadata.dynamic_causal, k_scale=1.0, v_scale=1.0,
            kv_cache_dtype="auto")
        if fmt.staged:
            self._settle()
        TIMINGS["scratch_s"] += t1 - t0
        TIMINGS["attention_s"] += time.perf_counter() - t1
        return output


def write_blocks(fmt: PageFormat, staging: Staging, pages, blocks, offs, key, value) -> list[int]:
    """Write tokens of staged (`kivi`) formats: `blocks`, `offs` long `[T]` (each block's tokens in consecutive
    slots), key, value `[T, H, d]`. Blocks the write fills are quantized into their pages: straight from the input
    when written whole in one call, else from `staging`, where the others wait. Returns the staging slots of the
    blocks filled, which the caller frees after the step's attention (its queries read their own block from them)."""
    N = fmt.block_size
    staging.begin_step()
    b, o = blocks.tolist(), offs.tolist()
    starts = [i for i in range(len(b)) if i == 0 or b[i] != b[i - 1]] + [len(b)]
    direct, done = [], []  # (block id, token start) quantized from the input; (block id, slot) from staging
    for i0, i1 in zip(starts, starts[1:]):
        blk, o0 = b[i0], o[i0]
        if o[i1 - 1] - o0 != i1 - i0 - 1:
            raise ValueError(f"block {blk}: tokens of one block must be written in consecutive slots, got offsets "
                             f"{o[i0:i1]}")
        if o0 == 0 and i1 - i0 == N:
            direct.append((blk, i0))
            if blk in staging.slot_of:  # a block reopened and now written whole: its old slot is free
                staging.release(staging.slot_of[blk])
            continue
        slot = staging.write(blk, o0, key[i0:i1], value[i0:i1])
        if slot is not None:
            done.append((blk, slot))
    if direct:
        idx = torch.tensor([i for _, i in direct])[:, None] + torch.arange(N)[None, :]  # [B, N]
        k = key[idx].permute(0, 2, 1, 3)  # [B, H, N, d]
        v = value[idx].permute(0, 2, 1, 3)
        pages[torch.tensor([blk for blk, _ in direct])] = fmt.quantize_blocks(k, v)
    if done:
        buf = staging.buf[torch.tensor([s for _, s in done])]  # [B, 2, H, N, d]
        pages[torch.tensor([blk for blk, _ in done])] = fmt.quantize_blocks(buf[:, 0], buf[:, 1])
    return [s for _, s in done]


def scratch_cache(fmt: PageFormat, plan: _Plan, pages, staging: Staging | None, key, value, dtype, isa: str):
    """The keys and values the step reads, in a native CPU cache: (key_cache, value_cache) views of one
    `[plan.blocks, H, N, 2 d]` tensor in `dtype`, in the kernel's layout for `isa`. The page blocks come first,
    dequantized; then, for `kivi` formats, one full-precision block per (request, block) of queries: its staged
    tokens, then the step's new ones (`key`, `value` `[T, H, d]`, the step's tokens in order)."""
    B, H, N, C = pages.shape
    d = fmt.head_dim
    k, v = fmt.dequantize_pages(pages[plan.page_blocks], dtype)  # [U, H, N, d]
    if not plan.staged:
        for j, p in plan.tails:  # past the request's length: whatever the page held
            k[j, :, p:] = 0
            v[j, :, p:] = 0
    else:
        P = len(plan.raw)
        rk = torch.zeros(P, H, N, d, dtype=dtype)
        rv = torch.zeros(P, H, N, d, dtype=dtype)
        for i, (blk, held, t0, t1) in enumerate(plan.raw):
            if held:
                st = staging.prefix(blk, held)  # [2, H, held, d]
                rk[i, :, :held], rv[i, :, :held] = st[0], st[1]
            rk[i, :, held:held + t1 - t0] = key[t0:t1].transpose(0, 1)
            rv[i, :, held:held + t1 - t0] = value[t0:t1].transpose(0, 1)
        k, v = torch.cat([k, rk]), torch.cat([v, rv])
    S = plan.blocks
    cache = torch.empty(S, H, N, 2 * d, dtype=dtype).view(S, H, 2 * N, d)
    key_cache, value_cache = cache.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(k.permute(0, 2, 1, 3).reshape(S * N, H, d),
                                   v.permute(0, 2, 1, 3).reshape(S * N, H, d), key_cache, value_cache,
                                   torch.arange(S * N, dtype=torch.long), isa, 1.0, 1.0, "auto")
    return key_cache, value_cache


__all__ = ["VlmkvCPUBackend", "VlmkvCPUImpl", "page_spec", "write_blocks", "scratch_cache"]
