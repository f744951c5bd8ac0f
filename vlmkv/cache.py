"""`QuantizedKVCache`: a transformers `Cache` whose layers keep KV in packed precision segments.

    cache = vlmkv.QuantizedKVCache(model, "kivi", bits=2)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)   # or cache=cache (transformers >= 5.24)
    cache.nbytes(), cache.fp16_nbytes(), cache.bits_per_element()

Prefill: the policy plans every prompt token's bit-width per layer (`Policy.plan_prefill`) from the
prompt context (`PromptSource`: token modality labels, frame ids, padding, massive activations); the
prefill attention itself uses the unquantized keys and values, as KIVI and AKVQ-VL do. Decode: new tokens
enter the layer's full-precision residual buffer and are flushed to their planned bit-width in blocks
(`Policy.decode_rule`); a one-token step reads the packed segments directly in vlmkv's attention function
(`vlmkv/attention.py`), anything else reads them dequantized in slot order, so padding masks apply unchanged.

Independence: every piece of state lives in the cache and its layers. The model only carries hooks shared by
all caches on it (`models.hooks.acquire`): the prompt recorder, the massive-activation hooks and the attention
switch, each removed when the last cache using it is closed. `copy.deepcopy(cache)` copies the stored tokens
and takes its own leases on the model's hooks; the model itself is never copied.

Sliding-window layers (Mistral, Gemma 2/3's local layers, `layer_types` in the config) keep at most their window,
as transformers' `DynamicSlidingWindowLayer` does, so the cache never holds more bytes than `DynamicCache`.
"""
from __future__ import annotations

import copy
import time
import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import attention
from .models import hooks
from .models.hooks import text_config
from .policies import PrefillContext, get_policy
from .policies.base import PAD, TEXT, Policy
from .quant import fwht, fwht_inverse, saturate
from .storage import LayerStore


def cache_kwarg() -> str:
    """The name transformers' `generate()` and `forward()` take the cache under: `cache` from 5.24 on (the old
    `past_key_values` is deprecated there and removed from `forward` in 5.40), `past_key_values` before."""
    import transformers
    from packaging.version import Version

    return "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


def cache_kwargs(cache) -> dict:
    """`{cache_kwarg(): cache}`: pass a cache under the spelling the installed transformers wants, e.g.
    `model.generate(**inputs, **vlmkv.cache_kwargs(cache))`. Both spellings reach the same policies."""
    return {cache_kwarg(): cache}


def head_dim_of(cfg) -> int:
    hd = getattr(cfg, "head_dim", None)
    return int(hd) if hd else cfg.hidden_size // cfg.num_attention_heads


def sliding_windows(cfg) -> list[int | None]:
    """Per decoder layer: its attention window (tokens) for sliding/chunked layers, None for full attention.
    Follows transformers' rule: `config.layer_types` when given, else `sliding_window` / `attention_chunk_size`."""
    n = int(cfg.num_hidden_layers)
    window = getattr(cfg, "sliding_window", None)
    chunk = getattr(cfg, "attention_chunk_size", None)
    types = getattr(cfg, "layer_types", None)
    if types is None:
        types = ["sliding_attention" if window is not None else "chunked_attention" if chunk is not None
                 else "full_attention"] * n
    out = []
    for i, t in enumerate(types):
        if t == "full_attention":
            out.append(None)
        elif t == "sliding_attention" and window is not None:
            out.append(int(window))
        elif t == "chunked_attention" and chunk is not None:
            out.append(int(chunk))
        else:
            raise ValueError(f"config.layer_types[{i}] must be full, sliding or chunked attention with its window "
                             f"set for a QuantizedKVCache, got {t!r}")
    return out


OBSERVATION = 64  # the prompt's last queries a recording cache keeps, the most a policy's query window may read

COMPILE_REASON = ("vlmkv's cache plans, packs and reads variable-length quantized segments (data-dependent shapes): "
                  "it runs eagerly between compiled pieces; use torch.compile(model) without fullgraph=True")


def eager(fn):
    """`fn` kept out of torch.compile graphs (a graph break under torch.compile; fullgraph=True fails naming why)."""
    try:
        return torch.compiler.disable(fn, reason=COMPILE_REASON)
    except TypeError:  # torch < 2.7 has no `reason`
        return torch.compiler.disable(fn)


class PromptSource:
    """What the layers of one cache know about the prompt being prefilled, shared by them (the container builds
    it and hands it to each layer; layers never reach back into the cache).

    At a layer's prefill it reads the current forward call's `Frame` (`models.hooks`), labels the tokens once per
    call with the family adapter (or the labels given by `QuantizedKVCache.set_spans`), and builds the layer's
    `PrefillContext`. A policy that reads modality labels on a vision-language model gets them or an error.
    """

    def __init__(self, adapter, needs_modality: bool, needs_massive: bool, inspect: bool = False):
        self.adapter = adapter
        self.needs_modality = needs_modality
        self.needs_massive = needs_massive
        self.inspect = inspect  # keep the last prefill's inputs (QuantizedKVCache(inspect=True))
        self.span_override: tuple | None = None
        self.inputs: dict = {}  # the last prefill's inputs and labels (token_types, frame_ids), when inspecting

    @property
    def is_vlm(self) -> bool:
        from .models.modality import TextOnlyAdapter

        return self.adapter is not None and not isinstance(self.adapter, TextOnlyAdapter)

    def _labels(self, frame) -> dict:
        """Inputs and labels of this forward call (computed once per call and source)."""
        key = id(self)
        if frame is not None and key in frame.memo:
            return frame.memo[key]
        got = dict(frame.inputs) if frame is not None else {}
        ids = got.get("input_ids")
        if self.span_override is not None:
            got["token_types"], got["frame_ids"] = self.span_override
        elif self.adapter is not None and ids is not None:
            extra = {k: v for k, v in got.items() if k not in ("input_ids", "attention_mask")}
            spans = self.adapter.label(ids, got.get("attention_mask"), **extra)
            got["token_types"] = spans.token_types.to(ids.device)
            got["frame_ids"] = spans.frame_ids.to(ids.device)
        if frame is not None:
            frame.memo[key] = got
        if self.inspect:  # the call's tensors (pixel values too) outlive it only when asked for
            self.inputs = got
        return got

    def context(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> PrefillContext:
        from .models.hooks import current_frame

        B, _, S, _ = keys.shape
        frame = current_frame()
        got = self._labels(frame)
        am = got.get("attention_mask")
        mask = None
        if torch.is_tensor(am) and am.dim() == 2 and am.shape[0] == B and am.shape[1] >= S:
            mask = am[:, -S:].to(device=keys.device, dtype=torch.bool)
        types = got.get("token_types")
        frames = got.get("frame_ids")
        if types is not None and tuple(types.shape) == (B, S):
            types = types.to(keys.device)
            frames = frames.to(keys.device) if frames is not None and tuple(frames.shape) == (B, S) else None
        else:
            if self.needs_modality and self.is_vlm and S > 1:
                why = ("no forward call of the model the cache was built with was seen (was the cache built for "
                       "another model object, or called through a submodule?)" if frame is None else
                       "the call passed no input_ids (inputs_embeds?): call cache.set_spans(token_types, frame_ids)"
                       if types is None else f"labels of shape {tuple(types.shape)} for a prompt of {(B, S)}")
                raise ValueError(f"a vision-aware policy needs modality labels for the prompt it prefills, got none "
                                 f"for layer {layer_idx}: {why}")
            types = torch.full((B, S), TEXT, dtype=torch.int8, device=keys.device)
            if mask is not None:
                types[~mask] = PAD
            frames = None
        massive = frame.stats.get(layer_idx, {}).get("massive_activation") if frame is not None else None
        if self.needs_massive and S > 1 and massive is None:
            raise ValueError(f"the policy keeps pivot tokens from massive activations, got no activations for layer "
                             f"{layer_idx}: the cache must be built from the model that runs the prompt "
                             f"(not from its config) and the prompt must go through that model's forward")
        if massive is not None and tuple(massive.shape) != (B, S):
            massive = None if S == 1 else massive[:, -S:]
        return PrefillContext(keys=keys, values=values, layer_idx=layer_idx, attention_mask=mask,
                              token_types=types, frame_ids=frames, massive_activation=massive)

    @staticmethod
    def recorded_queries(layer_idx: int):
        """The queries the current forward call's attention left for `layer_idx` (a recorded prompt replayed by
        `prefill_from`), or None."""
        from .models.hooks import current_frame

        frame = current_frame()
        return None if frame is None else frame.stats.get(layer_idx, {}).get("queries")


class QuantizedKVLayer(CacheLayerMixin):
    """One decoder layer's cache: an adapter from transformers' per-layer cache API to a `LayerStore`.

    Holds what it needs, handed over by the container: the policy, the shared `PromptSource`, whether keys and
    values are stored Hadamard-rotated, the dtype of full-precision tokens, the language model's config (to see
    whether vlmkv's attention function is selected) and, for sliding layers, the window.
    """

    is_croppable = True
    is_compileable = False

    def __init__(self, layer_idx: int, policy: Policy, source: PromptSource, rotate: bool = False,
                 residual_dtype: torch.dtype | None = None, attn_config=None, sliding_window: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.policy = policy
        self.source = source
        self.rotate = rotate
        self.residual_dtype = residual_dtype
        self.attn_config = attn_config  # None: never hand decode steps to the segment attention
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.store: LayerStore | None = None
        self.offset = 0  # sliding layers: tokens evicted from the front
        self._pending = 0  # sliding layers: tokens the next update drops before appending
        self.full_precision = set(policy.bit_widths()) <= {16}
        self.plan: dict | None = None  # what the last prefill planned: {"bits", "residual", "seconds"}
        self.rule = None  # the decode rule the prefill's plan chose (BitPlan.decode), if any
        self.stats: dict = {}  # the prompt statistics the plan used (e.g. massive activations)
        self.closed = False
        self.record = False  # keep the prompt's raw keys, values and forward call (QuantizedKVCache(record_prompt=True))
        self.prompt_reads_cache = False  # the prompt attends to what is stored of it (QuantizedKVCache option)
        self.recorded: tuple | None = None
        self.inspect = False  # keep the plan and statistics of each prefill (QuantizedKVCache(inspect=True))
        #: the language model's config where vlmkv's attention function is installed (it hands prompts' queries to
        #: a policy with a query window, or to a recording), else None
        self.query_config = None

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        policy = self.policy
        full = self.residual_dtype or self.dtype
        if self.residual_dtype is None and self.dtype == torch.float32 and not policy.keep_model_dtype:
            full = torch.float16  # "16 bits" is 16 bits of memory, also for a float32 model
        self.store = LayerStore(policy.spec, self.dtype, self.device, full)
        self.is_initialized = True

    # ------------------------------------------------------------------ writing
    @eager
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.closed and self.rotate:
            raise ValueError("cache is closed: its keys are stored Hadamard-rotated for an attention function that "
                             "was removed; build a new QuantizedKVCache, got a write after close()")
        if key_states.shape[:-1] != value_states.shape[:-1]:
            # e.g. a rotary embedding broadcast over positions the call did not pass: storing it would be wrong
            raise ValueError(f"keys and values must hold the same [batch, heads, tokens], got {tuple(key_states.shape)!r} "
                             f"and {tuple(value_states.shape)!r} in layer {self.layer_idx}")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        store = self.store
        # rotated in float32: a float16 token's rotation may exceed 65504 (the store then keeps it in float32)
        k, v = (fwht(key_states.float()), fwht(value_states.float())) if self.rotate else (key_states, value_states)
        if store.length == 0 and self.offset == 0:
            if self.record:
                from .models.hooks import current_frame

                frame = current_frame()
                self.recorded = (key_states, value_states, frame)
                if frame is not None and self._attends():  # what a policy with a query window reads on replay
                    attention.handoff_query(self.layer_idx, lambda q: frame.stats.setdefault(self.layer_idx, {})
                                            .__setitem__("queries", q[:, :, -OBSERVATION:].detach().float().clone()))
            window = self.policy.query_window
            if window and key_states.shape[-2] > 1:
                got = self.source.recorded_queries(self.layer_idx)
                if got is None:
                    if self.record or not self._attends():
                        raise ValueError(f"{self.policy.name} plans from the prompt's queries, got none for layer "
                                         f"{self.layer_idx}: they are read in vlmkv's attention function (a cache with "
                                         f"segment_attention=True, on the model that runs the prompt)")
                    # planned when the attention call hands over the queries (the store is empty until then)
                    attention.handoff_query(self.layer_idx, lambda q: self._prefill(k, v, q[:, :, -window:]))
                    return key_states, value_states
                self._prefill(k, v, got[:, :, -window:])
            else:
                self._prefill(k, v)
            if not self.prompt_reads_cache:
                return key_states, value_states  # the prompt attends to itself unquantized
            return self._stored()
        if self._pending:  # tokens the previous step's window no longer needed (see get_mask_sizes)
            self._drop(self._pending)
        rule = self.rule or self.policy.decode_rule(self.layer_idx)
        store.append(k, v, rule.bits, rule.keep_recent, rule.flush_every, rule.value_window, rule.after_attention)
        if store.evicted and (self.attn_config is None or not attention.active(self.attn_config)):
            raise RuntimeError(f"layer {self.layer_idx} evicted {store.evicted} slots, which only vlmkv's attention "
                               f"function masks: the model's attention implementation was changed while the cache "
                               f"was in use")
        # a later prompt (several tokens in one call: a second question, a chunk) attends to itself unquantized, as
        # the first prompt does, and to what the cache stores of everything before it
        n = key_states.shape[-2]
        fresh = n if n > 1 and not self.prompt_reads_cache else 0
        if (self.attn_config is not None and (n == 1 or store.evicted)
                and (store.segments or store.evicted) and attention.active(self.attn_config)):
            # the registered attention reads the segments directly: hand it the store, not a float copy; tokens
            # out of the window are dropped at the next update (the attention still reads this store)
            attention.handoff(self.layer_idx, store, self.rotate, fresh)
            self._pending = self._excess()
            if fresh:  # the attention reads the store and puts these in place of its last `fresh` slots
                return key_states, value_states
            return saturate(store.res_k, self.dtype), saturate(store.res_v, self.dtype)
        kk, vv = self._stored()
        if fresh:
            kk = torch.cat([kk[..., :-fresh, :], key_states.to(kk.dtype)], dim=-2)
            vv = torch.cat([vv[..., :-fresh, :], value_states.to(vv.dtype)], dim=-2)
        store.settle()  # the floats returned are the step's view; what a rule defers until after attention is done
        self._drop(self._excess())
        return kk, vv

    def _stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every held key and value `[B, H, L, D]` in the model's dtype and basis: dequantized, rotated back where
        they are stored rotated (in float32 first: a rotation's values may exceed float16)."""
        kk, vv = self.store.materialize(torch.float32 if self.rotate else None)
        if self.rotate:
            return saturate(fwht_inverse(kk), self.dtype), saturate(fwht_inverse(vv), self.dtype)
        return kk, vv

    def _attends(self) -> bool:
        """Whether the next attention call of this layer is vlmkv's (it takes handoffs)."""
        return self.query_config is not None and attention.active(self.query_config)

    def _prefill(self, k, v, queries: torch.Tensor | None = None) -> None:
        t0 = time.perf_counter()
        ctx = self.source.context(self.layer_idx, k, v)
        if queries is not None:
            queries = queries.detach().float()
            ctx.queries = fwht(queries) if self.rotate else queries  # in the basis the keys are stored in
        plan = self.policy.plan_prefill(ctx)
        check_plan(self.policy, plan, ctx)
        seconds = time.perf_counter() - t0
        S = k.shape[-2]
        keep = S if self.sliding_window is None else min(S, self.sliding_window - 1)
        cut = S - keep  # a sliding layer stores only the tokens its window can still see
        self.offset = cut
        self.rule = plan.decode
        rule = plan.decode or self.policy.decode_rule(self.layer_idx)
        self.store.prefill(k[:, :, cut:], v[:, :, cut:], plan.bits[:, cut:], min(plan.residual, keep),
                           plan.channel_scales, plan.channel_perm, rule.value_window, plan.spec_fields)
        # the plan's summary stays; its per-token widths and the statistics it read only when inspecting (they
        # are not part of the stored cache, whose bytes `nbytes()` counts)
        self.plan = {"residual": plan.residual, "seconds": seconds,
                     "widths": {int(b): int(n) for b, n in zip(*plan.bits.unique(return_counts=True))}}
        if self.inspect:
            self.plan["bits"] = plan.bits.detach().to("cpu")
        self.stats = {} if ctx.massive_activation is None or not self.inspect else \
            {"massive_activation": ctx.massive_activation}

    def _excess(self) -> int:
        """Sliding layers: tokens to drop, the window no longer seeing them: all of them once a few have gathered,
        or at once where every token is kept 16-bit, so that no layer holds more than DynamicCache's W - 1."""
        if self.sliding_window is None or self.store is None:
            return 0
        keep = self.sliding_window - 1
        excess = self.store.length - keep
        return excess if excess > 0 and (self.full_precision or excess >= max(1, keep // 16)) else 0

    def _drop(self, n: int) -> None:
        if n:
            self.store.drop_front(n)
            self.offset += n
        self._pending = 0

    # ------------------------------------------------------------------ sizes
    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        if torch.is_tensor(query_length):  # transformers < 5.2x passes the query's cache_position
            query_length = query_length.shape[0]
        # the keys the next update returns: what is held, less what it drops first, plus the query; the first of
        # them is at position offset + pending
        held = 0 if self.store is None else self.store.length
        return held - self._pending + query_length, self.offset + self._pending

    def get_seq_length(self) -> int:
        return self.offset + (0 if self.store is None else self.store.length)

    def get_max_length(self) -> int:
        return -1 if self.sliding_window is None else self.sliding_window

    get_max_cache_shape = get_max_length  # its name before transformers 5.x renamed it

    def reset(self) -> None:
        self.store = None
        self.rule = None
        self.offset = self._pending = 0
        self.plan = None
        self.is_initialized = False

    def offload(self):  # storage is already compact; offloading is not supported
        return None

    def prefetch(self):
        return None

    # ------------------------------------------------------------------ editing
    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last -tokens_to_remove tokens (transformers >= 5.2x's convention); a positive value is the
        length to keep (the convention of earlier 5.x releases, whose assisted decoding calls it so); 0: nothing."""
        if not isinstance(tokens_to_remove, int) or isinstance(tokens_to_remove, bool):
            raise ValueError(f"tokens_to_remove must be an int, got {tokens_to_remove!r}")
        if self.store is None or tokens_to_remove == 0:
            return
        total = self.get_seq_length()
        keep = min(total, tokens_to_remove) if tokens_to_remove > 0 else max(0, total + tokens_to_remove)
        if keep == total:
            return
        if self.offset or self._pending:
            raise RuntimeError(f"layer {self.layer_idx} is a sliding-window layer that already evicted {self.offset} "
                               f"tokens: it cannot be cropped back (as transformers' DynamicSlidingWindowLayer)")
        self.store.crop(keep)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.store is not None:
            self.store.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.store is not None:
            self.store.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.store is not None:
            self.store.map_batch(lambda t: t[indices.to(t.device)])


def check_plan(policy: Policy, plan, ctx: PrefillContext) -> None:
    """Raise ValueError unless `plan` is a `[B, S]` plan of widths the policy declared (skipped under
    torch.compile, where reading the widths back would break the graph)."""
    if tuple(plan.bits.shape) != (ctx.batch_size, ctx.seq_len):
        raise ValueError(f"plan.bits must have shape {(ctx.batch_size, ctx.seq_len)}, got {tuple(plan.bits.shape)!r}")
    if torch.compiler.is_compiling():
        return
    allowed = set(policy.bit_widths()) | {16}
    got = {int(x) for x in plan.bits.unique().tolist()}
    if not got <= allowed:
        raise ValueError(f"plan.bits must be within {sorted(allowed)} for {policy.name}, got {sorted(got)!r}")


def _release(leases: list) -> None:
    """Release and forget every lease in `leases` (in place: the finalizer holds the same list)."""
    while leases:
        leases.pop().release()


class QuantizedKVCache(Cache):
    """A transformers `Cache` storing each layer's KV at the bit-widths a `Policy` plans.

    model:   the Hugging Face model the cache will be used with (or its config: then no policy that needs the
             prompt's labels, activations or vlmkv's attention function can run).
    policy:  a `Policy` or a registered name (`"kivi"`, `"rtn-2"`...); `**options` go to `get_policy`.
    tokenizer: optional; lets modality adapters label vision marker tokens (e.g. Idefics3's <global-img>).
    residual_dtype: dtype of unquantized ("16-bit") tokens: float16, bfloat16 or float32; None = the model's,
             or float16 for a float32 model.
    segment_attention: decode steps read the packed segments chunk by chunk in the registered attention
             function (`vlmkv/attention.py`) instead of materializing float K/V; False = always materialize.
    prompt_reads_cache: the prompt attends to what the cache stores of it (its quantized keys and values, where the
             policy quantizes them at prefill) instead of to itself unquantized (the default, as KIVI and AKVQ-VL
             do; a later multi-token call, such as a second question, likewise reads its own tokens unquantized
             and what the cache stores of the tokens before it). It is what a paged engine that quantizes on write computes (vlmkv's vLLM pages), so one format
             gives the same numbers in both engines; not for layers with a sliding window.
    inspect: keep what each prefill planned and read, for inspection: `plans[i]["bits"]` (int16 `[B, S]` per layer),
             `layer_stats` (massive activations, float32 `[B, S]` per layer) and `inputs` (the prompt call's tensors).
             They are not part of the stored cache and `nbytes()` does not count them; off (the default), a prefill
             keeps only a summary (`plans[i]["widths"]`: tokens per width) and they are freed with the forward.

    Close the cache (`close()` or a `with` block) to release the hooks it shares on the model.
    """

    def __init__(self, model, policy: Policy | str = "fp16", tokenizer=None, residual_dtype: torch.dtype | None = None,
                 segment_attention: bool = True, record_prompt: bool = False, prompt_reads_cache: bool = False,
                 inspect: bool = False, **options):
        if options and not isinstance(policy, str):
            raise ValueError(f"options are only accepted with a policy name, got {sorted(options)!r}")
        self.policy = get_policy(policy, **options) if isinstance(policy, str) else policy
        if not isinstance(self.policy, Policy):
            raise ValueError(f"policy must be a Policy or a registered name, got {policy!r}")
        if residual_dtype is not None and residual_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"residual_dtype must be torch.float16, torch.bfloat16, torch.float32 or None, "
                             f"got {residual_dtype!r}")
        if not isinstance(segment_attention, bool):
            raise ValueError(f"segment_attention must be a bool, got {segment_attention!r}")
        if not isinstance(record_prompt, bool):
            raise ValueError(f"record_prompt must be a bool, got {record_prompt!r}")
        if not isinstance(prompt_reads_cache, bool):
            raise ValueError(f"prompt_reads_cache must be a bool, got {prompt_reads_cache!r}")
        if not isinstance(inspect, bool):
            raise ValueError(f"inspect must be a bool, got {inspect!r}")
        window = self.policy.query_window
        if not isinstance(window, int) or not 0 <= window <= OBSERVATION:
            raise ValueError(f"a policy's query_window must be an int in [0, {OBSERVATION}], got {window!r}")
        if (window or self.policy.evicts) and not segment_attention:
            raise ValueError(f"{self.policy.name} reads the prompt's queries or evicts tokens, which needs vlmkv's "
                             f"attention function: got segment_attention=False")
        if (self.policy.evicts or window) and prompt_reads_cache:
            raise ValueError(f"prompt_reads_cache cannot show the prompt a cache planned from the prompt's own "
                             f"attention (or one that evicts part of it), got {self.policy.describe()}")
        self.residual_dtype = residual_dtype
        cfg = text_config(model)
        self.config = cfg
        self.num_layers = int(cfg.num_hidden_layers)
        self.head_dim = head_dim_of(cfg)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        self.policy.validate(self.head_dim, self.num_kv_heads)
        windows = sliding_windows(cfg)
        self.model = model if isinstance(model, torch.nn.Module) else None
        self.rotate_keys = bool(self.policy.hadamard_keys)
        self.segment_attention = segment_attention
        # a recording cache gathers everything any policy may read, for the caches `prefill_from` fills
        needs_massive = bool(self.policy.needs_massive_activations) or record_prompt
        if self.model is None and (needs_massive or self.policy.needs_modality or window):
            raise ValueError(f"model must be a torch module for {self.policy.name} (it reads the prompt through hooks "
                             f"on the model), got {type(model).__name__!r}")
        full_cfg = getattr(model, "config", model)
        from .models.modality import adapter_for

        try:
            adapter = adapter_for(full_cfg, tokenizer)
        except ValueError:
            if self.policy.needs_modality:
                raise
            adapter = None
        self.source = PromptSource(adapter, self.policy.needs_modality, needs_massive, inspect)
        self._kinds = []
        use_attn = False
        if self.model is not None:
            self._kinds.append(("inputs", hooks.ForwardRecorder))
            if needs_massive:
                self._kinds.append(("massive", hooks.MassiveActivations))
            use_attn = segment_attention and not self.policy.keep_model_dtype
            # a recording cache takes the prompt's queries in vlmkv's attention function (for policies that plan
            # from them), whatever its own policy reads
            if use_attn or record_prompt:
                self._kinds.append(("attention", attention.AttentionSwitch))
        layers = [QuantizedKVLayer(i, self.policy, self.source, self.rotate_keys, residual_dtype,
                                   cfg if use_attn else None, windows[i]) for i in range(self.num_layers)]
        if prompt_reads_cache and any(w is not None for w in windows):
            raise ValueError("prompt_reads_cache needs every layer to keep the whole prompt, got a model with sliding-"
                             "window layers")
        for layer in layers:
            layer.record = record_prompt
            layer.prompt_reads_cache = prompt_reads_cache
            layer.inspect = inspect
            layer.query_config = cfg if any(k == "attention" for k, _ in self._kinds) else None
        super().__init__(layers=layers)
        self.closed = False
        self._leases = []
        self._acquire()

    def _acquire(self) -> None:
        """Take a lease on each shared hook; on failure release what was taken (nothing is left on the model).
        A cache that is garbage-collected without `close()` releases its leases then."""
        try:
            for kind, factory in self._kinds:
                self._leases.append(hooks.acquire(self.model, kind, factory))
        except Exception:
            self.close()
            raise
        weakref.finalize(self, _release, self._leases)

    def __deepcopy__(self, memo):
        """A copy with its own stored tokens and its own leases on the same model (the model is not copied)."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for obj in (self.model, self.config, self.policy, self.source.adapter):
            memo[id(obj)] = obj  # shared, never copied: the model, its config, the policy, the labeller
        shared = {"model", "config", "policy", "_leases", "_kinds"}
        for k, v in self.__dict__.items():
            if k not in shared:
                new.__dict__[k] = copy.deepcopy(v, memo)
        new.model, new.config, new.policy, new._kinds = self.model, self.config, self.policy, list(self._kinds)
        new._leases = []
        if not self.closed:
            new._acquire()
        return new

    def prefill_from(self, recorded: "QuantizedKVCache") -> None:
        """Fill this empty cache with the prompt another cache of the same model recorded
        (`QuantizedKVCache(model, ..., record_prompt=True)`, after the model's forward over the prompt).

        Equals running that forward through this cache: a prompt attends to itself unquantized, so the forward,
        its logits and the keys and values reaching each layer do not depend on the cache; only what the cache
        stores does. Each layer plans and stores the recorded keys and values through its own prefill, reading
        the recorded call's inputs (its own modality labels, with its own checks) and massive activations.
        Saves a forward per policy when many are compared on one prompt (`vlmkv eval`).
        """
        from .models.hooks import Frame, pushed

        if not isinstance(recorded, QuantizedKVCache) or not recorded.layers or any(
                getattr(layer, "recorded", None) is None for layer in recorded.layers):
            raise ValueError(f"recorded must be a QuantizedKVCache built with record_prompt=True that prefilled a "
                             f"prompt, got {type(recorded).__name__!r}")
        if recorded.model is not self.model or len(recorded.layers) != len(self.layers):
            raise ValueError("recorded must come from the model this cache was built for, got a cache of another model")
        if self.get_seq_length() != 0:
            raise ValueError(f"prefill_from needs an empty cache, got one holding {self.get_seq_length()} tokens")
        prompt = recorded.layers[0].recorded[0].shape[-2]
        if recorded.get_seq_length() != prompt:  # a chunked prefill or decoded tokens: only the first call was kept
            raise ValueError(f"recorded must hold exactly the one prompt it recorded ({prompt} tokens), got a cache "
                             f"holding {recorded.get_seq_length()}: record the prompt in a single forward call")
        frame = recorded.layers[0].recorded[2]
        # the recorded call's inputs and statistics, with labels computed afresh by this cache's own labeller
        replay = Frame(frame.model, frame.inputs, frame.stats) if frame is not None else None
        with pushed(replay):
            for layer, other in zip(self.layers, recorded.layers):
                k, v, _ = other.recorded
                layer.update(k, v)

    # ---------------------------------------------------------------- prompt context
    @property
    def inputs(self) -> dict:
        """The last prefill's inputs and labels (`input_ids`, `attention_mask`, `token_types`, ...): kept with
        `inspect=True` only (else {})."""
        return self.source.inputs

    @property
    def plans(self) -> dict[int, dict]:
        """Layer index -> what its last prefill planned: {"widths": {width: tokens}, "residual", "seconds"}, and with
        `inspect=True` "bits": int16 `[B, S]` (CPU)."""
        return {layer.layer_idx: layer.plan for layer in self.layers if layer.plan is not None}

    @property
    def layer_stats(self) -> dict[int, dict]:
        """Layer index -> the prompt statistics its plan used (e.g. "massive_activation" float32 `[B, S]`); kept with
        `inspect=True` only."""
        return {layer.layer_idx: layer.stats for layer in self.layers if layer.stats}

    def plan_seconds(self) -> list[float]:
        """Seconds each layer's last prefill spent planning (policy search included)."""
        return [layer.plan["seconds"] for layer in self.layers if layer.plan is not None]

    def set_spans(self, token_types: torch.Tensor | None, frame_ids: torch.Tensor | None = None) -> None:
        """Use these modality labels (int8 `[B, S]`, long `[B, S]`) for the next prefills instead of the
        family adapter's: for prompts given as embeddings, or to treat spans of a text model's prompt as
        "visual" windows in experiments. None goes back to the adapter."""
        if token_types is None:
            self.source.span_override = None
            return
        if not torch.is_tensor(token_types) or token_types.dim() != 2:
            raise ValueError(f"token_types must be a [batch, seq] tensor, got {getattr(token_types, 'shape', token_types)!r}")
        if frame_ids is None:
            frame_ids = torch.full(token_types.shape, -1, dtype=torch.long, device=token_types.device)
        if not torch.is_tensor(frame_ids) or tuple(frame_ids.shape) != tuple(token_types.shape):
            raise ValueError(f"frame_ids must be a tensor shaped like token_types {tuple(token_types.shape)}, "
                             f"got {getattr(frame_ids, 'shape', frame_ids)!r}")
        self.source.span_override = (token_types.to(torch.int8), frame_ids.long())

    def close(self) -> None:
        """Release this cache's hooks on the model (removed once no other cache uses them). Idempotent."""
        _release(self._leases)
        for layer in self.layers:
            layer.closed = True
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc and exc[0] is not None:
            attention.clear_handoff()
        self.close()
        return False

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

    def decode_reads(self) -> dict:
        """Quantized key + value elements that decode steps read so far, by path: {"fused": elements a kernel read
        from the codes, "reference": elements the PyTorch reference read, "fused_share": fused / both (1.0 when
        nothing quantized was read)}. Full-precision tokens (residual window, 16-bit segments) are not counted."""
        fused = sum(s.reads["fused"] for s in self._stores())
        ref = sum(s.reads["reference"] for s in self._stores())
        return {"fused": fused, "reference": ref, "fused_share": round(fused / (fused + ref), 4) if fused + ref else 1.0}

    def memory_report(self) -> dict:
        return {
            "policy": self.policy.describe(),
            "tokens": self.get_seq_length(),
            "kv_bytes": self.nbytes(),
            "fp16_bytes": self.fp16_nbytes(),
            "bits_per_element": round(self.bits_per_element(), 4),
            "compression_vs_fp16": round(self.fp16_nbytes() / max(1, self.nbytes()), 3),
            "decode_reads": self.decode_reads(),
        }
