"""The attention side of the cache: a registered attention function that reads precision segments
directly at decode steps, and Walsh-Hadamard-rotated keys and values (AKVQ-VL, Figures 6 and 7 of seed 002).

A cache layer that can answer a decode step from its packed segments hands its store to the next attention
call through `handoff(layer_idx, store, rotated)` (thread-local, consumed by exactly that call) and returns only
its residual tokens; `vlmkv_sdpa` / `vlmkv_eager` (registered with transformers' `AttentionInterface`, with
their mask functions in `AttentionMaskInterface`: without them masks silently become None) take it and
compute the step segment by segment. Without a handoff they are plain sdpa / eager attention, so a model
switched to them behaves as before for any other cache. `AttentionSwitch` selects them for the language
model only (VLMs keep their vision tower's implementation); it is shared by every cache on a model through
`models.hooks.acquire` and restored when the last one closes.

Rotation: a cache with Hadamard keys stores K' = K H and V' = V H (H = `hadamard_matrix(D)`, orthogonal: full for
powers of two and 12/20/28 times them, block-diagonal otherwise). Where the cache returns float keys and values it
returns them rotated back (K' H^T = K), so the model's own attention needs nothing; on the segment path the query is
rotated instead ((q H) K'^T = q K^T) and the output rotated back (softmax(.) V' H^T = softmax(.) V). The paper folds H into W_V / W_O offline; rotating
values in the cache gives the same stored values without touching the model's weights, which keeps caches
independent and works for fused or differently named projections.

Decode over segments (`segment_attention`): each segment is read in chunks, a chunk's scores and weighted values
come straight from its codes (or a fused kernel), and partial softmaxes are merged by log-sum-exp
(flash-decoding style). Masks are read through each segment's slot map, so reordered tokens keep their padding.
"""
from __future__ import annotations

import sys
import threading

import torch

from . import kernels
from .kernels.reference import masked, partial_softmax, pv_from_codes, qk_from_codes  # noqa: F401  (re-exported)
from .models.hooks import text_config
from .quant import QTensor, fwht, fwht_inverse, saturate

_REGISTERED = False
NAMES = {"sdpa": "vlmkv_sdpa", "eager": "vlmkv_eager"}
CHUNK_TOKENS = 1024  # the least tokens a chunk holds; a chunk grows to CHUNK_ELEMENTS decoded values
CHUNK_ELEMENTS = 1 << 22  # 16 MB of float codes per chunk: amortizes op dispatch, bounds the scratch memory


def _base_attention(module, impl: str):
    if impl == "eager":
        return getattr(sys.modules[type(module).__module__], "eager_attention_forward")
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _allowed(mask: torch.Tensor | None, B: int, L: int, device) -> torch.Tensor:
    """bool `[B, L + 1]` from the model's mask for a one-token query (last column: filler, never allowed)."""
    out = torch.ones(B, L + 1, dtype=torch.bool, device=device)
    out[:, L] = False
    if mask is not None:
        m = mask[:, 0, -1, :L] if mask.dim() == 4 else mask[:, -1, :L]
        out[:, :L] = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    return out


def segment_attention(query: torch.Tensor, store, mask, scaling: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode attention over a `LayerStore`, segment by segment, without materializing the cache.

    query: `[B, Hq, 1, D]` (already rotated if the keys are). Returns `[B, 1, Hq, D]` in `out_dtype` (default: the
    query's; saturating, see `quant.saturate`: scores and weighted values are accumulated in float32, and a
    convex combination of stored values may exceed float16's range only by rounding), as transformers'
    sdpa_attention_forward, equal to softmax(q K^T * scaling + mask) V over all cached
    tokens in slot order, up to float summation order. Each quantized segment goes to `kernels.decode_partial`
    (the backend `kernels.decode_backend` picks, or the reference), float segments to a plain partial softmax.
    """
    B, Hq, _, D = query.shape
    L = store.length
    # no mask (batch 1, no padding: sdpa's causal skip) and no filler in the index maps: nothing to mask, skip the
    # passes (slot maps alone reorder tokens, which attention does not see)
    allowed = None if mask is None and not any(seg.has_filler() for seg in store.segments.values()) \
        else _allowed(mask, B, L, query.device)
    parts = []
    cs = store.channel_scales

    def piece(k, v, ok):
        Hkv = k.shape[1]
        q = query.float().view(B, Hkv, Hq // Hkv, D)
        m, den, e = partial_softmax(masked(torch.einsum("bgrd,bgcd->bgrc", q, k.float()) * scaling, ok))
        parts.append((m, den, torch.einsum("bgrc,bgcd->bgrd", e, v.float())))

    def piece_codes(kq, vq, ok, backend):
        # scores and weighted values straight from the codes, on the chosen backend (no dequantized copy)
        Hkv = kq.codes.shape[1]
        q = query.float().view(B, Hkv, Hq // Hkv, D)
        if cs is not None:
            q = q * cs[0].float()
        m, den, o = kernels.decode_partial(q, kq, vq, ok, scaling, backend)
        if cs is not None:
            o = o * cs[1].float()
        parts.append((m, den, o))

    def piece_codes_permuted(kq, vq, ok, backend):
        # SKVQ: tokens stored flattened across kv heads with permuted channels. Each query head becomes a
        # query over all H*D channels (zeros outside its own head), permuted the same way, so scores come
        # straight from the codes; the weighted values are un-permuted and each head keeps its own channels.
        Hkv = store.num_heads
        r = Hq // Hkv
        pk, pv = (p.long().to(query.device) for p in store.channel_perm)
        q = query.float().view(B, Hkv, r, D)
        full = torch.zeros(B, Hkv, r, Hkv, D, device=query.device)
        for h in range(Hkv):
            full[:, h, :, h] = q[:, h]
        qp = full.view(B, 1, Hkv * r, Hkv * D).index_select(-1, pk)
        if backend != "torch":  # a kernel over the flattened rows: Hkv * r query "heads" of Hkv * D channels
            m, den, o = kernels.decode_partial(qp, kq, vq, ok, scaling, backend)
            m, den = m.view(B, Hkv, r, 1), den.view(B, Hkv, r, 1)
        else:  # the reference, with each head's scores masked apart
            s = (qk_from_codes(qp, kq) * scaling).view(B, Hkv, r, -1)
            m, den, e = partial_softmax(masked(s, ok))
            o = pv_from_codes(e.view(B, 1, Hkv * r, -1), vq)  # [B, 1, Hkv*r, H*D] in permuted channel order
        o = o.index_select(-1, torch.argsort(pv)).view(B, Hkv, r, Hkv, D)
        o = torch.stack([o[:, h, :, h] for h in range(Hkv)], dim=1)
        parts.append((m, den, o))

    def ok_for(seg, s0, s1):
        if allowed is None or (mask is None and not seg.has_filler()):
            return None
        if seg.index is None:
            return allowed[:, seg.start + s0:seg.start + s1]
        idx = seg.index[:, s0:s1].long()
        return allowed.gather(1, torch.where(idx >= 0, idx, L))

    one = _one_call_parts(query, store, ok_for, allowed)
    if one is not None:  # every segment and the recent window in one call of the CPU kernel, merged there
        Hkv = store.num_heads
        m, den, num = kernels.decode_layer(query.float().view(B, Hkv, Hq // Hkv, D), one, scaling)
        return saturate((num / den).view(B, Hq, 1, D), out_dtype or query.dtype).transpose(1, 2).contiguous()
    for seg in store.segments.values():
        n = seg.split  # tokens [n, seg.n) hold deferred (full-precision) values: read as floats below
        if n < seg.n:
            k, v = store.read(seg, n, seg.n, torch.float32)
            piece(k, v, ok_for(seg, n, seg.n))
        if n == 0:
            continue
        sk, sv = seg.head(n)  # views of the used tokens (each access builds them anew: take them once)
        quantized = isinstance(sk, QTensor)
        t = sk.codes
        per_token = t.shape[1] * sk.d
        step = max(CHUNK_TOKENS, CHUNK_ELEMENTS // max(1, t.shape[0] * per_token))
        if quantized:
            for qt in (sk, sv):  # chunks end on per-channel group boundaries
                if qt.spec.axis == "channel":
                    step = max(qt.spec.group_size, step // qt.spec.group_size * qt.spec.group_size)
        on_codes = quantized and sv.spec.axis == "token" and store.channel_perm is None
        # permuted (SKVQ) segments: the codes path costs H x more products, worth it for few kv heads
        on_codes_perm = (quantized and store.channel_perm is not None and sk.spec.axis == "token"
                         and sv.spec.axis == "token" and store.channel_scales is None and store.num_heads <= 8)
        backend = "torch"
        if on_codes:
            backend = kernels.decode_backend(query, sk, sv, D)
        elif on_codes_perm:
            backend = kernels.decode_backend(query, sk, sv, store.num_heads * D)
        if quantized:
            fmt = None if backend != "torch" or kernels.mode() == "torch" else \
                kernels.describe_format(sk, sv, why=_why_reference(query, on_codes, on_codes_perm))
            store.count_read(n * per_token * 2, backend, fmt)
        if backend != "torch":
            step = max(1, n)  # the kernel chunks and parallelizes the segment itself
        for s0 in range(0, n, step):
            s1 = min(n, s0 + step)
            ok = ok_for(seg, s0, s1)
            whole = s0 == 0 and s1 == n
            if on_codes or on_codes_perm:
                kq, vq = (sk, sv) if whole else (sk.slice_tokens(s0, s1), sv.slice_tokens(s0, s1))
                (piece_codes if on_codes else piece_codes_permuted)(kq, vq, ok, backend)
                continue
            k, v = store.read(seg, s0, s1, torch.float32)
            piece(k, v, ok)
    r = store.residual_len
    if r:
        piece(store.res_k, store.res_v, None if allowed is None else allowed[:, L - r:L])
    out_dtype = out_dtype or query.dtype
    if len(parts) == 1:  # one segment, no residual: its partial softmax is the whole softmax
        m, den, num = parts[0]
        return saturate((num / den).view(B, Hq, 1, D), out_dtype).transpose(1, 2).contiguous()
    m = torch.stack([p[0] for p in parts]).amax(0)
    den = sum(p[1] * torch.exp(p[0] - m) for p in parts)
    num = sum(p[2] * torch.exp(p[0] - m) for p in parts)
    out = saturate((num / den).view(B, Hq, 1, D), out_dtype)
    return out.transpose(1, 2).contiguous()


def mask_evicted(mask: torch.Tensor | None, live: torch.Tensor, q: int) -> torch.Tensor:
    """The model's attention mask for a `q`-token query over L cached slots with the evicted ones (`live` bool
    `[B, L]` False) masked: bool (True: attend) or additive float `[B, 1, q, L]` as `mask` is; None (sdpa's causal
    skip) becomes the causal mask of the query's slots L - q .. L - 1."""
    B, L = live.shape
    keep = live[:, None, None, :]
    if mask is None:
        pos = torch.arange(L, device=live.device)
        causal = pos[None, :] <= pos[L - q:, None]  # [q, L]
        return causal[None, None] & keep
    if mask.dim() == 3:
        mask = mask[:, None]
    m = mask[..., -L:]
    if m.dtype == torch.bool:
        return m & keep
    return m.masked_fill(~keep, torch.finfo(m.dtype).min)


def _one_call_parts(query, store, ok_for, allowed) -> list | None:
    """[(keys, values, ok)] for `kernels.decode_layer`: every segment of `store` (packed as QTensors, 16-bit ones and
    deferred values as float tensors) and the recent window, where the CPU kernel reads them all in one call; None
    where it does not (another device or backend, SKVQ's permuted or SmoothQuant's scaled channels, a format no
    kernel reads), and the segments then go one by one. Counts the quantized reads as fused."""
    if store.channel_perm is not None or store.channel_scales is not None:
        return None
    if not kernels.decode_layer_available(query):  # another device, VLMKV_KERNELS=torch, or no compiler
        return None
    D = query.shape[-1]
    parts, reads = [], 0
    for seg in store.segments.values():
        n = seg.split
        if n < seg.n:  # deferred values: keys and values of these tokens as floats
            k, v = store.read(seg, n, seg.n, torch.float32)
            parts.append((k, v, ok_for(seg, n, seg.n)))
        if n == 0:
            continue
        sk, sv = seg.head(n)
        if isinstance(sk, QTensor):
            if sv.spec.axis != "token" or kernels.decode_backend(query, sk, sv, D) != "cpu":
                return None
            reads += n * sk.codes.shape[1] * sk.d * 2
            parts.append((sk, sv, ok_for(seg, 0, n)))
        else:
            parts.append((sk.codes, sv.codes, ok_for(seg, 0, n)))
    r = store.residual_len
    if r:
        L = store.length
        parts.append((store.res_k, store.res_v, None if allowed is None else allowed[:, L - r:L]))
    if reads:
        store.count_read(reads, "cpu")
    return parts


def _why_reference(query, on_codes: bool, on_codes_perm: bool) -> str:
    """Why a quantized segment is read by the reference (for the one-time warning)."""
    if not (on_codes or on_codes_perm):
        return "no fused path for this layout"
    return "no backend reads this format on " + query.device.type


_local = threading.local()


def handoff(layer_idx: int, store, rotated: bool, fresh: int = 0) -> None:
    """Leave `store` (a LayerStore) for the next attention call of decoder layer `layer_idx` on this thread.
    fresh: the store's last `fresh` slots are a multi-token call's own tokens, which it attends to unquantized: the
    call's key and value arguments are those tokens (in the model's basis), read in place of the stored ones.

    Raises RuntimeError when the previous handoff was never taken: an attention function other than vlmkv's
    ran on keys that held only the residual tokens, a silent wrong result this refuses to continue past."""
    prev = getattr(_local, "pending", None)
    if prev is not None:
        _local.pending = None
        raise RuntimeError(f"attention of layer {prev[0]} did not take what the cache handed it (its segments or a "
                           f"prompt's queries): the model's attention implementation was changed while a "
                           f"QuantizedKVCache was in use")
    _local.pending = (layer_idx, store, rotated, fresh)


def handoff_query(layer_idx: int, fn) -> None:
    """Have the next attention call of decoder layer `layer_idx` on this thread call `fn(query)` (`[B, Hq, S, D]`,
    after RoPE, as the model computed it) before it attends: how a prefill reads the prompt's queries (a policy
    that plans from the question's attention, a recording cache). Raises as `handoff` does."""
    handoff(layer_idx, fn, False)


def _take(module):
    pending = getattr(_local, "pending", None)
    if pending is None:
        return None
    _local.pending = None
    idx = getattr(module, "layer_idx", pending[0])
    if idx != pending[0]:
        raise RuntimeError(f"attention of layer {idx} got the cache of layer {pending[0]}: layers must attend in the "
                           f"order they update the cache")
    return pending


def clear_handoff() -> None:
    """Drop a handoff no attention call will take (a forward that failed between update and attention)."""
    _local.pending = None


_SIGNATURES: dict = {}


def _named(fn, args: tuple, kwargs: dict) -> dict:
    """The options of an attention call by name: positional ones after the attention mask (`dropout`, `scaling`...,
    in the order `fn`, the attention function this one stands in for, takes them) and keyword ones. Callers differ:
    transformers passes them by keyword, packages that wrap attention functions (kvpress) may pass them by position."""
    if not args:
        return kwargs
    if fn not in _SIGNATURES:
        import inspect

        _SIGNATURES[fn] = [p.name for p in list(inspect.signature(fn).parameters.values())[5:]
                           if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = _SIGNATURES[fn]
    if len(args) > len(names):
        raise TypeError(f"attention takes at most {5 + len(names)} positional arguments ({', '.join(names)} after the "
                        f"mask), got {5 + len(args)}")
    return {**dict(zip(names, args)), **kwargs}


def _make_attention(impl: str):
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        base = _base_attention(module, impl)
        pending = _take(module)
        if pending is None:
            return base(module, query, key, value, attention_mask, *args, **kwargs)
        _, store, rotated, fresh = pending
        if callable(store):  # a prefill that reads the prompt's queries (handoff_query), then attends as usual
            store(query)
            return base(module, query, key, value, attention_mask, *args, **kwargs)
        fresh_k, fresh_v = key, value
        opts = _named(base, args, kwargs)
        plain = not any(opts.get(k) is not None for k in ("softcap", "s_aux", "sinks"))
        if plain and query.shape[2] == 1 and (opts.get("dropout") or 0.0) == 0.0:
            scaling = opts.get("scaling") or query.shape[-1] ** -0.5
            if not rotated:
                out = segment_attention(query, store, attention_mask, scaling)
            else:  # keys are stored rotated: q H . k H = q . k; the output is rotated back in float32
                out = segment_attention(fwht(query.float()), store, attention_mask, scaling, torch.float32)
                out = saturate(fwht_inverse(out), query.dtype)  # values are stored rotated: o H H^T = o
            store.settle()  # flushes a decode rule defers until the step has attended (KIVI's reference)
            return out, None
        # anything unusual: the plain path over the full cache (rotated values rotated back in float32)
        store.count_materialized("a decode step that segment attention does not take (softcap, sinks, dropout or "
                                 "a multi-token query)")
        key, value = store.materialize(torch.float32 if rotated else None)
        if store.evicted:  # evicted slots hold zeros: masked, as if the keys were never there
            attention_mask = mask_evicted(attention_mask, store.live(), query.shape[2])
        store.settle()
        if rotated:
            key, value = saturate(fwht_inverse(key), query.dtype), saturate(fwht_inverse(value), query.dtype)
        if fresh:  # the call's own tokens, unquantized (what the layer returned: `handoff`)
            key = torch.cat([key[..., :-fresh, :], fresh_k.to(key.dtype)], dim=-2)
            value = torch.cat([value[..., :-fresh, :], fresh_v.to(value.dtype)], dim=-2)
        return base(module, query, key, value, attention_mask, *args, **kwargs)
    attention.__name__ = NAMES[impl]
    from .cache import eager

    return eager(attention)


def register() -> None:
    """Register the attention functions and their masks with transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    for impl, name in NAMES.items():
        AttentionInterface.register(name, _make_attention(impl))
        AttentionMaskInterface.register(name, sdpa_mask if impl == "sdpa" else eager_mask)
    _REGISTERED = True


def _set_impl(model, name: str) -> None:
    """Select an attention implementation for the language model only."""
    cfg = model.config
    if cfg is text_config(model):
        model.set_attn_implementation(name)
    else:
        sub = {"text_config": name}
        for key in ("vision_config", "audio_config"):
            if getattr(cfg, key, None) is not None:
                sub[key] = getattr(cfg, key)._attn_implementation or "sdpa"
        model.set_attn_implementation(sub)


class AttentionSwitch:
    """Selects vlmkv's attention function for `model`'s language model; `remove()` restores the original.
    Shared by the caches on one model (`models.hooks.acquire(model, "attention", AttentionSwitch)`)."""

    def __init__(self, model):
        register()
        self.model = model
        self.config = text_config(model)
        self.orig_impl = self.config._attn_implementation or "sdpa"
        # eager stays eager (its masks and softmax dtype); anything else reads as sdpa, the decode path's twin
        _set_impl(model, NAMES["eager" if self.orig_impl == "eager" else "sdpa"])

    def remove(self) -> None:
        _set_impl(self.model, self.orig_impl)


def active(config) -> bool:
    """Whether `config` (a language model's) currently selects vlmkv's attention function."""
    return getattr(config, "_attn_implementation", None) in NAMES.values()
