"""Finding a model's decoder layers and reading its residual stream with forward hooks."""
from __future__ import annotations

import torch


def text_config(model):
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def decoder_layers(model) -> torch.nn.ModuleList:
    """The language model's decoder layers (a ModuleList of `num_hidden_layers` blocks with `self_attn`)."""
    n = int(text_config(model).num_hidden_layers)
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n and hasattr(mod[0], "self_attn"):
            if any(v in name for v in ("vision", "visual", "image_tower", "connector")):
                continue
            if best is None or len(name) < len(best[0]):
                best = (name, mod)
    if best is None:
        raise ValueError(f"model must have a ModuleList of {n} decoder layers with `self_attn`, got {type(model).__name__!r}")
    return best[1]


def attention_modules(model) -> list[torch.nn.Module]:
    return [layer.self_attn for layer in decoder_layers(model)]


class MassiveActivationHooks:
    """Forward pre-hooks on every decoder layer that record, at prefill, how far each token's residual
    stream entering the layer stands out: ratio[b, s] = max_c |h[b, s, c]| / median_{s, c} |h[b, :, :]|
    (massive activations, Sun et al. 2024, are hundreds to thousands of times the median).

    The ratios land in `cache.layer_stats[layer_idx]["massive_activation"]` as float32 `[B, S]`, before
    the layer's attention writes its keys, so the policy sees them when it plans that layer.
    """

    def __init__(self, model, cache):
        self.cache = cache
        self.handles = []
        for idx, layer in enumerate(decoder_layers(model)):
            self.handles.append(layer.register_forward_pre_hook(self._make(idx), with_kwargs=True))

    def _make(self, idx):
        def hook(module, args, kwargs):
            layer = self.cache.layers[idx] if idx < len(self.cache.layers) else None
            if layer is None or layer.get_seq_length() > 0:
                return None
            h = args[0] if args else kwargs.get("hidden_states")
            if h is None or h.dim() != 3:
                return None
            with torch.no_grad():
                a = h.detach().abs().float()
                tok_max = a.amax(dim=-1)  # [B, S]
                med = a.flatten(1).median(dim=1).values.clamp_min(1e-6)  # [B]
                self.cache.layer_stats.setdefault(idx, {})["massive_activation"] = tok_max / med[:, None]
            return None
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []
