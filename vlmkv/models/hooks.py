"""Finding a model's decoder layers, and the few hooks vlmkv puts on a model, shared by every cache on it.

Caches are independent objects: nothing a cache needs is kept on the model's modules. What must sit on the
model (a forward pre-hook that sees the prompt, pre-hooks that read the residual stream, the attention
implementation) is installed once per model and kind, counted by `acquire` and removed when the last cache
that asked for it releases its `Lease`: two caches on one model, deep copies and closing in any order all
leave the model as it was once every lease is released.

What the hooks see belongs to the forward call, not to a cache: `ForwardRecorder` pushes a `Frame` (the
call's inputs, and per-layer statistics the layer hooks add) on a thread-local stack for the duration of the
model's forward, and a cache layer that prefills during that call reads `current_frame()`. The cache is
never identified by the name of the forward argument that carries it (`past_key_values` or `cache`).
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass, field

import torch


def text_config(model_or_config):
    """The language model's config of a model or config (the config itself for text-only models)."""
    cfg = getattr(model_or_config, "config", model_or_config)
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


# ------------------------------------------------------------------------------------- shared, counted hooks
_SHARED: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


class Lease:
    """One holder's claim on a shared hook; `release()` is idempotent."""

    def __init__(self, model, kind: str):
        self._model = weakref.ref(model)
        self.kind = kind
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        model = self._model()
        if model is None:
            return
        with _LOCK:
            entry = _SHARED.get(model, {}).get(self.kind)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                del _SHARED[model][self.kind]
                entry[0].remove()


def acquire(model: torch.nn.Module, kind: str, factory) -> Lease:
    """A lease on the hook `kind` of `model`, installed by `factory(model)` (an object with `remove()`) when
    nobody holds one yet."""
    with _LOCK:
        kinds = _SHARED.setdefault(model, {})
        if kind not in kinds:
            kinds[kind] = [factory(model), 0]
        kinds[kind][1] += 1
    return Lease(model, kind)


def holders(model: torch.nn.Module, kind: str) -> int:
    """How many leases on `kind` of `model` are held (0: not installed)."""
    entry = _SHARED.get(model, {}).get(kind)
    return 0 if entry is None else entry[1]


# ------------------------------------------------------------------------------------- forward frames
INPUT_KEYS = ("attention_mask", "image_grid_thw", "video_grid_thw", "mm_token_type_ids", "token_type_ids",
              "position_ids")
_local = threading.local()


@dataclass
class Frame:
    """What one forward call of a hooked model carries: its inputs, and per-layer statistics.

    inputs: `input_ids` (long `[B, S]`, None when the call passed embeddings), `attention_mask` (`[B, S]`) and
            the family-specific tensors of `INPUT_KEYS` that were given.
    stats:  layer index -> {"massive_activation": float32 `[B, S]`} filled by `MassiveActivations`.
    memo:   labels computed from the inputs, per labeller (so that every layer of a cache labels once).
    """

    model: object
    inputs: dict
    stats: dict = field(default_factory=dict)
    memo: dict = field(default_factory=dict)


def _stack() -> list:
    if not hasattr(_local, "frames"):
        _local.frames = []
    return _local.frames


def current_frame() -> Frame | None:
    """The innermost forward call of a hooked model running on this thread, or None."""
    s = _stack()
    return s[-1] if s else None


@contextlib.contextmanager
def pushed(frame: Frame | None):
    """Make `frame` the current forward call for the block (e.g. to replay a recorded prompt); None: no change."""
    if frame is None:
        yield
        return
    s = _stack()
    s.append(frame)
    try:
        yield
    finally:
        if s and s[-1] is frame:
            s.pop()


class ForwardRecorder:
    """Pushes a `Frame` for every forward call of `model` and pops it when the call ends (also on error)."""

    def __init__(self, model):
        self.handles = [model.register_forward_pre_hook(self._enter, with_kwargs=True),
                        model.register_forward_hook(self._exit, always_call=True)]

    @staticmethod
    def _enter(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        inputs = {"input_ids": ids if torch.is_tensor(ids) and ids.dim() == 2 else None}
        for key in INPUT_KEYS:
            if kwargs.get(key) is not None:
                inputs[key] = kwargs[key]
        stack = _stack()
        if not stack:  # an outermost call starts: a decode handoff left by a call that raised is stale
            from ..attention import clear_handoff

            clear_handoff()
        stack.append(Frame(module, inputs))
        return None

    @staticmethod
    def _exit(module, args, output):
        s = _stack()
        if s and s[-1].model is module:
            s.pop()
        return None

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def row_median(x: torch.Tensor) -> torch.Tensor:
    """`x.median(dim=1).values` for x `[B, N]`, exactly (the lower middle value), about twice as fast on long rows:
    the middle value is looked for only among the values between two quantiles of a strided sample (about 2% of the
    row), counting those below; where the sample's band misses it, or the row holds NaN, `torch.median` decides."""
    B, N = x.shape
    if N < 65536:
        return x.median(dim=1).values
    k = (N + 1) // 2  # kthvalue's 1-based rank of torch.median's lower middle value
    step = N // 32768
    out = torch.empty(B, dtype=x.dtype, device=x.device)
    for b in range(B):
        row = x[b]
        s = row[::step]
        n = s.numel()
        lo, hi = s.kthvalue(max(1, int(n * 0.49))).values, s.kthvalue(min(n, int(n * 0.51) + 1)).values
        below = int((row < lo).sum())
        band = row[(row >= lo) & (row <= hi)]
        if below < k <= below + band.numel() and not bool(torch.isnan(row).any()):
            out[b] = band.kthvalue(k - below).values
        else:
            out[b] = row.median()
    return out


class MassiveActivations:
    """Forward pre-hooks on every decoder layer that record, for a prompt (more than one token), how far each
    token's residual stream entering the layer stands out: ratio[b, s] = max_c |h[b, s, c]| / median_{s, c}
    |h[b, :, :]| (massive activations, Sun et al. 2024, are hundreds to thousands of times the median).

    The ratios land in the current `Frame`'s `stats[layer_idx]["massive_activation"]` as float32 `[B, S]`,
    before the layer's attention writes its keys, so a policy sees them when it plans that layer.
    """

    def __init__(self, model):
        self.handles = [layer.register_forward_pre_hook(self._make(i), with_kwargs=True)
                        for i, layer in enumerate(decoder_layers(model))]

    @staticmethod
    def _make(idx):
        def hook(module, args, kwargs):
            frame = current_frame()
            h = args[0] if args else kwargs.get("hidden_states")
            if frame is None or h is None or h.dim() != 3 or h.shape[1] < 2:
                return None  # no hooked forward, or a decode step: nothing to plan
            with torch.no_grad():
                a = h.detach().abs().float()
                tok_max = a.amax(dim=-1)  # [B, S]
                med = row_median(a.flatten(1)).clamp_min(1e-6)  # [B]
                frame.stats.setdefault(idx, {})["massive_activation"] = tok_max / med[:, None]
            return None
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []
