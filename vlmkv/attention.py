"""Attention with Walsh-Hadamard-rotated keys (AKVQ-VL, Figures 6 and 7 of seed 002).

Keys: the cache stores K' = K H (after RoPE; H the normalized Hadamard matrix, symmetric and
orthogonal), and the registered attention function rotates the query the same way, so
Q' K'^T = Q H H^T K^T = Q K^T and attention is unchanged.

Values: H is folded offline into the weights, per head: W_V,h <- H W_V,h (rows of head h's output),
b_V,h <- b_V,h H, and W_O <- W_O blockdiag(H, ..., H) over the query heads (GQA: every query head reads
rotated values of its kv head, and undoes it in its own columns of W_O). Then V' = V H is what the cache
stores, o' = o H per head, and o' W_O'^T = o W_O^T.

`HadamardAttention(model, cache).remove()` (called by `cache.close()`) puts the original weight
Parameters and the original attention implementation back; nothing lasts after it.
"""
from __future__ import annotations

import sys

import torch

from .models.hooks import attention_modules, text_config
from .quant import fwht, hadamard_matrix

_REGISTERED = False
NAMES = {"sdpa": "vlmkv_wht_sdpa", "eager": "vlmkv_wht_eager"}


def _base_attention(module, impl: str):
    if impl == "eager":
        mod = sys.modules[type(module).__module__]
        return getattr(mod, "eager_attention_forward")
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _make_attention(impl: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        flag = getattr(module, "_vlmkv_rotate_query", None)
        if flag is not None and flag[0]:
            # the cache just returned Hadamard-rotated keys for this layer: rotate the query too
            query = fwht(query)
            flag[0] = False
        return _base_attention(module, impl)(module, query, key, value, attention_mask, **kwargs)
    attention.__name__ = NAMES[impl]
    return attention


def register() -> None:
    """Register the attention functions and their masks with transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    for impl, name in NAMES.items():
        AttentionInterface.register(name, _make_attention(impl))
        # without a mask function registered under the same name, masks silently become None
        AttentionMaskInterface.register(name, sdpa_mask if impl == "sdpa" else eager_mask)
    _REGISTERED = True


def _set_impl(model, name: str) -> None:
    cfg = model.config
    if cfg is text_config(model):
        model.set_attn_implementation(name)
    else:
        sub = {"text_config": name}
        for key in ("vision_config", "audio_config"):
            if getattr(cfg, key, None) is not None:
                sub[key] = getattr(cfg, key)._attn_implementation or "sdpa"
        model.set_attn_implementation(sub)


class HadamardAttention:
    """Installs rotated-key attention on `model` for `cache` (and folds H into W_V/W_O if `fold_values`)."""

    def __init__(self, model, cache, fold_values: bool = True):
        register()
        self.model = model
        self.orig_impl = text_config(model)._attn_implementation or "sdpa"
        impl = "eager" if self.orig_impl == "eager" else "sdpa"
        self.modules = attention_modules(model)
        self.saved: list[tuple[torch.nn.Module, str, torch.nn.Parameter | None]] = []
        for m in self.modules:
            m._vlmkv_rotate_query = [False]
        cache.attn_flags = [m._vlmkv_rotate_query for m in self.modules]
        if fold_values:
            self._fold()
        _set_impl(model, NAMES[impl])

    @torch.no_grad()
    def _fold(self):
        for m in self.modules:
            d = m.head_dim
            v, o = m.v_proj, m.o_proj
            h = hadamard_matrix(d, torch.float64, v.weight.device)
            wv = v.weight.double().view(-1, d, v.weight.shape[-1])  # [H_kv, D, hidden]
            new_v = torch.einsum("ij,hjk->hik", h, wv).reshape(v.weight.shape)
            wo = o.weight.double().view(o.weight.shape[0], -1, d)  # [hidden, H_q, D]
            new_o = (wo @ h).reshape(o.weight.shape)
            self._swap(v, "weight", new_v.to(v.weight.dtype))
            self._swap(o, "weight", new_o.to(o.weight.dtype))
            if v.bias is not None:
                new_b = (v.bias.double().view(-1, d) @ h).reshape(v.bias.shape)
                self._swap(v, "bias", new_b.to(v.bias.dtype))

    def _swap(self, module, name, tensor):
        self.saved.append((module, name, getattr(module, name)))
        setattr(module, name, torch.nn.Parameter(tensor, requires_grad=False))

    def remove(self) -> None:
        for module, name, param in reversed(self.saved):
            setattr(module, name, param)
        self.saved = []
        for m in self.modules:
            if hasattr(m, "_vlmkv_rotate_query"):
                del m._vlmkv_rotate_query
        _set_impl(self.model, self.orig_impl)
