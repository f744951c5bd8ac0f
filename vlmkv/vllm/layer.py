"""What both backends' attention implementations share to serve vlmkv's pages inside vLLM: the settings of the
engine being built, the checks that refuse what cannot be served exactly, the page spec, and each layer's
`PageStore`, made on first use from the cache vLLM allocated."""
from __future__ import annotations

from dataclasses import replace

import torch
from vllm.config import get_current_vllm_config_or_none
from vllm.v1.attention.backend import AttentionType
from vllm.v1.kv_cache_interface import FullAttentionSpec

from . import Settings, check_vllm_version, settings_from
from .pages import PageFormat
from .store import PageStore

# The settings of the engine this process serves: set when its attention layers are built (the config is current
# then), read by `customize_spec`, which vLLM calls with the layer's spec alone.
_ACTIVE: list = [None]


def current_settings() -> Settings | None:
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


def check_supported(impl) -> None:
    """ValueError for a layer vlmkv's pages cannot serve exactly (vLLM's impl attributes, both backends)."""
    check_vllm_version()
    if getattr(impl, "kv_cache_dtype", "auto") not in ("auto", None):
        raise ValueError(f"vlmkv pages replace the KV cache dtype: leave kv_cache_dtype at 'auto', got "
                         f"{impl.kv_cache_dtype!r}")
    if impl.sliding_window not in (-1, None, (-1, -1)):
        raise ValueError(f"vlmkv pages serve full-attention layers only, got a sliding window of {impl.sliding_window}")
    if impl.kv_sharing_target_layer_name is not None:
        raise ValueError("vlmkv pages do not serve layers that share another layer's KV cache, got "
                         f"kv_sharing_target_layer_name={impl.kv_sharing_target_layer_name!r}")


def page_format(settings: Settings, head_size: int, kv_cache: torch.Tensor) -> PageFormat:
    """The layer's format, checked against the cache vLLM allocated from `page_spec`."""
    if kv_cache.dtype != torch.uint8 or kv_cache.dim() != 4:
        raise ValueError(f"vlmkv pages expect a uint8 [blocks, heads, block_size, bytes] cache, got "
                         f"{kv_cache.dtype} {tuple(kv_cache.shape)}")
    B, H, N, C = kv_cache.shape
    fmt = settings.page_format(head_size, N)
    if C != fmt.token_bytes:
        raise ValueError(f"{fmt.name}: pages of {fmt.token_bytes} bytes a token and head expected, got {C}")
    return fmt


class LayerPages:
    """One attention layer's pages, held by vLLM's attention implementation (`impl`, built with the config
    current): `active` when `additional_config` names a format and the layer is a decoder layer (then the layer is
    checked, and a layer that cannot be served raises); `store(kv_cache)` gives its `PageStore`."""

    def __init__(self, impl):
        cfg = get_current_vllm_config_or_none()
        self.settings = settings_from(cfg.additional_config) if cfg is not None else None
        _ACTIVE[0] = self.settings
        self.max_seqs = cfg.scheduler_config.max_num_seqs if cfg is not None else 256
        self.head_size = impl.head_size
        self.active = self.settings is not None and impl.attn_type == AttentionType.DECODER
        self._store: PageStore | None = None
        if self.active:
            check_supported(impl)

    def store(self, kv_cache: torch.Tensor) -> PageStore:
        if self._store is None:
            self._store = PageStore(page_format(self.settings, self.head_size, kv_cache), self.max_seqs)
        return self._store


__all__ = ["LayerPages", "current_settings", "page_spec", "page_format", "check_supported"]
