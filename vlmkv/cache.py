"""`QuantizedKVCache`: a transformers `Cache` whose layers keep KV in packed precision segments.

    cache = vlmkv.QuantizedKVCache(model, vlmkv.get_policy("kivi", bits=2))
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
    cache.nbytes(), cache.fp16_nbytes(), cache.bits_per_element()

Tested with transformers 5.23 (see pyproject.toml for the pinned range).

Prefill: the policy plans every prompt token's bit-width per layer (`Policy.plan_prefill`); the
prefill attention itself uses the unquantized keys and values, as KIVI and AKVQ-VL do. Decode: new
tokens enter the layer's full-precision residual buffer and are flushed to their planned bit-width
in blocks (`Policy.decode_rule`); attention reads all segments dequantized, in slot order, so
padding masks apply unchanged.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .policies import PrefillContext, get_policy
from .policies.base import Policy, PAD, TEXT
from .quant import fwht
from .storage import LayerStore


def text_config(model_or_config):
    cfg = getattr(model_or_config, "config", model_or_config)
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def head_dim_of(cfg) -> int:
    hd = getattr(cfg, "head_dim", None)
    return int(hd) if hd else cfg.hidden_size // cfg.num_attention_heads


class QuantizedKVLayer(CacheLayerMixin):
    """Adapter from transformers' per-layer cache API to a `LayerStore`."""

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(self, cache: "QuantizedKVCache", layer_idx: int):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.store: LayerStore | None = None

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        policy = self.cache.policy
        full = self.cache.residual_dtype or self.dtype
        if self.cache.residual_dtype is None and self.dtype == torch.float32 and not policy.keep_model_dtype:
            full = torch.float16  # "16 bits" is 16 bits of memory, also for a float32 model
        self.store = LayerStore(lambda bits, kind, d: policy.spec(bits, kind, d), self.dtype, self.device, full)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        store = self.store
        if self.cache.closed and self.cache.rotate_keys:
            raise ValueError("cache is closed: its keys are stored Hadamard-rotated for attention functions that "
                             "were removed; build a new QuantizedKVCache, got a write after close()")
        note = self.cache.notes[self.layer_idx] if self.cache.notes else None
        if self.cache.rotate_keys:
            # keys are stored (and attended) Hadamard-rotated; the attention function rotates the query
            key_states = fwht(key_states)
            note.rotate = True
        if store.length == 0:
            ctx = self.cache.prefill_context(self.layer_idx, key_states, value_states)
            plan = self.cache.policy.plan_prefill(ctx)
            self.cache.check_plan(plan, ctx)
            store.prefill(key_states, value_states, plan.bits, plan.residual, plan.channel_scales, plan.channel_perm)
            self.cache._record_plan(self.layer_idx, plan)
            return key_states, value_states
        rule = self.cache.policy.decode_rule(self.layer_idx)
        store.append(key_states, value_states, rule.bits, rule.keep_recent, rule.flush_every)
        if note is not None and self.cache.segment_attention and key_states.shape[-2] == 1 and store.segments:
            # the registered attention reads the segments directly; hand it the store, not a float copy
            note.pending = store
            return store.res_k.to(self.dtype), store.res_v.to(self.dtype)
        return store.materialize()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return 0 if self.store is None else self.store.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.store = None
        self.is_initialized = False

    def offload(self):  # storage is already compact; offloading is not supported
        return None

    def prefetch(self):
        return None

    def crop(self, tokens_to_remove: int) -> None:
        if self.store is None or tokens_to_remove == 0:
            return
        if tokens_to_remove > 0:
            raise ValueError(f"tokens_to_remove must be negative (tokens to drop), got {tokens_to_remove!r}")
        self.store.crop(max(0, self.store.length + tokens_to_remove))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.store is not None:
            self.store.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.store is not None:
            self.store.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.store is not None:
            self.store.map_batch(lambda t: t[indices.to(t.device)])


class QuantizedKVCache(Cache):
    """A transformers `Cache` storing each layer's KV at the bit-widths a `Policy` plans.

    model:   the Hugging Face model (or its config) the cache will be used with.
    policy:  a `Policy` or a registered name (`"kivi"`, `"rtn-2"`...); `**options` go to `get_policy`.
    tokenizer: optional; lets modality adapters label vision marker tokens (e.g. Idefics3's <global-img>).
    residual_dtype: dtype of unquantized ("16-bit") tokens; None = the model's, or float16 for a float32 model.
    segment_attention: decode steps read the packed segments chunk by chunk in the registered attention
             function (`vlmkv/attention.py`) instead of materializing float K/V; False = always materialize.

    Policies that need hooks on the model install them here and remove them on `close()` or at the end
    of a `with` block. A forward pre-hook records the prompt's `input_ids`/`attention_mask` so that
    policies see padding and token types at prefill.
    """

    def __init__(self, model, policy: Policy | str = "fp16", tokenizer=None, residual_dtype: torch.dtype | None = None,
                 segment_attention: bool = True, **options):
        self.policy = get_policy(policy, **options) if isinstance(policy, str) else policy
        if residual_dtype is not None and not isinstance(residual_dtype, torch.dtype):
            raise ValueError(f"residual_dtype must be a torch.dtype or None, got {residual_dtype!r}")
        self.residual_dtype = residual_dtype
        if options and not isinstance(policy, str):
            raise ValueError(f"options are only accepted with a policy name, got {sorted(options)!r}")
        cfg = text_config(model)
        self.config = cfg
        self.num_layers = int(cfg.num_hidden_layers)
        self.head_dim = head_dim_of(cfg)
        self.policy.validate(self.head_dim)
        super().__init__(layers=[QuantizedKVLayer(self, i) for i in range(self.num_layers)])
        self.model = model if isinstance(model, torch.nn.Module) else None
        self.inputs: dict = {}  # prompt-level context recorded at prefill (input_ids, attention_mask, ...)
        self.layer_stats: dict[int, dict] = {}  # per-layer data hooks collect (e.g. massive activations)
        self.plans: dict[int, dict] = {}
        self._hooks = []
        self.closed = False
        self.notes = None  # per layer, set by CacheAttention: what the next attention call must do
        self.segment_attention = segment_attention
        self.rotate_keys = bool(self.policy.hadamard_keys)
        segment_attention = bool(segment_attention)
        if self.rotate_keys and self.model is None:
            raise ValueError(f"model must be a torch module for {self.policy.name} (Hadamard keys need the attention "
                             f"function installed), got {type(model).__name__!r}")
        self.adapter = None
        self.span_override = None
        full_cfg = getattr(model, "config", model)
        try:
            from .models.modality import adapter_for

            self.adapter = adapter_for(full_cfg, tokenizer)
        except ValueError:
            if self.policy.needs_modality:
                raise
        if self.model is not None:
            self._hooks.append(self.model.register_forward_pre_hook(self._record_inputs, with_kwargs=True))
            try:
                if self.rotate_keys or (segment_attention and not self.policy.keep_model_dtype):
                    from .attention import CacheAttention

                    self._hooks.append(CacheAttention(self.model, self))
                self._hooks.extend(self.policy.install(self.model, self))
            except Exception:
                self.close()
                raise

    # ---------------------------------------------------------------- model hooks
    def _record_inputs(self, module, args, kwargs):
        if kwargs.get("past_key_values") is not self or self.get_seq_length() > 0:
            return None
        ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        self.inputs = {"input_ids": ids}
        am = kwargs.get("attention_mask")
        if torch.is_tensor(am) and am.dim() == 2:
            self.inputs["attention_mask"] = am
        for key in ("image_grid_thw", "video_grid_thw", "mm_token_type_ids", "token_type_ids", "position_ids"):
            if key in kwargs and kwargs[key] is not None:
                self.inputs[key] = kwargs[key]
        if self.span_override is not None:
            self.inputs["token_types"], self.inputs["frame_ids"] = self.span_override
        elif self.adapter is not None and torch.is_tensor(ids) and ids.dim() == 2:
            extra = {k: v for k, v in self.inputs.items() if k not in ("input_ids", "attention_mask")}
            spans = self.adapter.label(ids, self.inputs.get("attention_mask"), **extra)
            self.inputs["token_types"] = spans.token_types.to(ids.device)
            self.inputs["frame_ids"] = spans.frame_ids.to(ids.device)
        self.layer_stats = {}
        self.plans = {}
        return None

    def set_spans(self, token_types: torch.Tensor | None, frame_ids: torch.Tensor | None = None) -> None:
        """Use these modality labels (int8 `[B, S]`, long `[B, S]`) for the next prefill instead of the
        family adapter's, e.g. to treat spans of a text model's prompt as "visual" windows in experiments."""
        if token_types is None:
            self.span_override = None
            return
        if token_types.dim() != 2:
            raise ValueError(f"token_types must be [batch, seq], got shape {tuple(token_types.shape)!r}")
        if frame_ids is None:
            frame_ids = torch.full(token_types.shape, -1, dtype=torch.long, device=token_types.device)
        self.span_override = (token_types.to(torch.int8), frame_ids.long())

    def close(self) -> None:
        """Remove every hook, attention function and folded weight this cache (and its policy) put on the model."""
        for h in reversed(self._hooks):
            h.remove()
        self._hooks = []
        self.notes = None
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # ---------------------------------------------------------------- policy plumbing
    def prefill_context(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> PrefillContext:
        B, _, S, _ = keys.shape
        am = self.inputs.get("attention_mask")
        mask = None
        if am is not None and am.shape[0] == B and am.shape[1] >= S:
            mask = am[:, -S:].to(device=keys.device, dtype=torch.bool)
        types = self.inputs.get("token_types")
        if types is not None and types.shape == (B, S):
            types = types.to(keys.device)
        else:
            types = torch.full((B, S), TEXT, dtype=torch.int8, device=keys.device)
            if mask is not None:
                types[~mask] = PAD
        frames = self.inputs.get("frame_ids")
        if frames is not None and frames.shape != (B, S):
            frames = None
        stats = self.layer_stats.get(layer_idx, {})
        return PrefillContext(
            keys=keys, values=values, layer_idx=layer_idx, num_layers=self.num_layers,
            attention_mask=mask, token_types=types, frame_ids=frames,
            positions=self.inputs.get("positions"),
            massive_activation=stats.get("massive_activation"),
            extras=dict(self.inputs.get("extras", {})),
        )

    def check_plan(self, plan, ctx: PrefillContext) -> None:
        allowed = set(self.policy.bit_widths()) | {16}
        if tuple(plan.bits.shape) != (ctx.batch_size, ctx.seq_len):
            raise ValueError(f"plan.bits must have shape {(ctx.batch_size, ctx.seq_len)}, got {tuple(plan.bits.shape)!r}")
        got = {int(x) for x in plan.bits.unique().tolist()}
        if not got <= allowed:
            raise ValueError(f"plan.bits must be within {sorted(allowed)} for {self.policy.name}, got {sorted(got)!r}")

    def _record_plan(self, layer_idx: int, plan) -> None:
        self.plans[layer_idx] = {"bits": plan.bits.detach().to("cpu"), "residual": plan.residual}

    # ---------------------------------------------------------------- memory accounting
    def _stores(self):
        return [layer.store for layer in self.layers if layer.store is not None]

    def nbytes(self) -> int:
        """Bytes held by the cache: packed codes, scales, zero points, index maps, residual buffers."""
        return sum(s.nbytes() for s in self._stores())

    def num_elements(self) -> int:
        """Key and value elements cached (all layers, rows, heads, slots, channels)."""
        return sum(s.num_elements() for s in self._stores())

    def fp16_nbytes(self) -> int:
        """What the same cache would take in FP16 (2 bytes an element)."""
        return 2 * self.num_elements()

    def bits_per_element(self) -> float:
        """Average bits an element, from `nbytes()` (metadata and buffers included)."""
        n = self.num_elements()
        return 8.0 * self.nbytes() / n if n else 0.0

    def bits_histogram(self) -> dict[int, int]:
        """Tokens (layers x rows) stored at each width right now; the residual buffer counts as 16."""
        hist: dict[int, int] = {}
        for s in self._stores():
            for b, n in s.bits_histogram().items():
                hist[b] = hist.get(b, 0) + n
        return dict(sorted(hist.items()))

    def memory_report(self) -> dict:
        return {
            "policy": self.policy.describe(),
            "tokens": self.get_seq_length(),
            "kv_bytes": self.nbytes(),
            "fp16_bytes": self.fp16_nbytes(),
            "bits_per_element": round(self.bits_per_element(), 4),
            "compression_vs_fp16": round(self.fp16_nbytes() / max(1, self.nbytes()), 3),
        }
