"""Policy interface: a policy decides bit-widths, the cache stores them, attention reads them.

A policy is a pure `@dataclass`: no storage, no model access, no state that changes after construction. At
prefill it turns a `PrefillContext` (one layer's keys/values plus what is known of every token) into a
`BitPlan`; for tokens generated later it gives a `DecodeRule`. Quantizer settings per bit-width come from
`spec()`. What a policy needs from the model it declares (`needs_modality`, `needs_massive_activations`,
`hadamard_keys`); the cache provides it and raises where it cannot.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..quant import QuantSpec, SUPPORTED_BITS

from ..labels import IMAGE, PAD, SPECIAL, TEXT  # noqa: F401  (re-exported)


@dataclass
class PrefillContext:
    """What a policy may look at when planning one layer's prefill tokens.

    keys, values:     `[B, H_kv, S, D]` as the model hands them to the cache (keys after RoPE; both
                      Hadamard-rotated when the policy's `hadamard_keys` is set).
    layer_idx:        index of the decoder layer.
    attention_mask:   bool `[B, S]`, False on padding (None: no padding).
    token_types:      int8 `[B, S]` of PAD / TEXT / IMAGE / SPECIAL (None: all text).
    frame_ids:        long `[B, S]`, image/frame index of visual tokens, -1 elsewhere (None: no images).
    massive_activation: float `[B, S]`, max |residual-stream activation| / its median entering this layer
                      (None unless the policy declared `needs_massive_activations`).
    queries:          float32 `[B, Hq, W, D]`, the queries (after RoPE, Hadamard-rotated as the keys are) of the
                      prompt's last W = `Policy.query_window` positions: the question's observation window (None
                      unless the policy declared a query window).
    """

    keys: torch.Tensor
    values: torch.Tensor
    layer_idx: int = 0
    attention_mask: torch.Tensor | None = None
    token_types: torch.Tensor | None = None
    frame_ids: torch.Tensor | None = None
    massive_activation: torch.Tensor | None = None
    queries: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]

    @property
    def seq_len(self) -> int:
        return self.keys.shape[-2]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[-1]


@dataclass
class BitPlan:
    """A policy's answer for one layer's prefill tokens.

    bits:     int `[B, S]`, the bit-width (2, 4, 8 or 16) each token is stored at; 0 evicts it (stored nowhere,
              its slot masked), for policies whose `bit_widths` include 0.
    residual: the last `residual` tokens wait in the full-precision residual buffer and are quantized
              later (to their planned bits) by the decode rule's flushes; 0 commits everything now.
    channel_scales: see below; fixed at prefill for the layer's whole life.
    """

    bits: torch.Tensor
    residual: int = 0
    #: optional per-channel divisors (keys, values), each `[B, H, 1, D]`: quantized tokens are stored as
    #: x / s and read back as x' * s (SmoothQuant); powers of two keep the round trip exact
    channel_scales: tuple | None = None
    #: optional channel permutations (keys, values), each long `[H * D]` over a token's channels of all kv
    #: heads: quantized tokens are stored flattened across heads, permuted, grouped along H * D (SKVQ)
    channel_perm: tuple | None = None
    #: optional QuantSpec fields (keys, values), each a dict such as {"bounds": ..., "clips": ...}, that this
    #: layer's quantized tokens use on top of `Policy.spec` (SKVQ's uneven groups and calibrated clips)
    spec_fields: tuple | None = None
    #: the rule for this layer's later tokens when it depends on the prompt (`auto` sizes its window to the
    #: budget); None: `Policy.decode_rule`
    decode: "DecodeRule | None" = None


@dataclass(frozen=True)
class DecodeRule:
    """What happens to tokens that enter after prefill (generated or appended).

    bits:        bit-width a new token is stored at once it leaves the residual buffer.
    keep_recent: tokens always kept in full precision at the end of the residual buffer.
    flush_every: once the buffer holds keep_recent + flush_every tokens, its oldest `flush_every`
                 are quantized together (complete groups); None never flushes (full precision).
    value_window: values of the last `value_window` tokens stay in full precision also once their keys are
                 flushed; older values are quantized one token at a time (KIVI's reference; per-token values
                 only). Applies to the prompt too. None: values are quantized with their keys.
    after_attention: flush after the step's attention has read the cache rather than before, so that a
                 step never attends to a token quantized in that same step (KIVI's reference).
    """

    bits: int = 16
    keep_recent: int = 0
    flush_every: int | None = None
    value_window: int | None = None
    after_attention: bool = False


class Policy:
    """Base class. Subclasses are `@dataclass`es that set `name` and override `plan_prefill`,
    `decode_rule` and `spec`; everything else (storage, packing, flushing) is the cache's."""

    name: ClassVar[str] = "base"
    #: store unquantized tokens in the model's dtype even when it is float32 (only the fp16 reference)
    keep_model_dtype: ClassVar[bool] = False
    #: raised when the same options start planning differently, so that `describe()` (and with it eval's --resume
    #: check) tells records of the old plan from the new; 0: never changed
    revision: ClassVar[int] = 0

    def validate(self, head_dim: int, num_kv_heads: int = 1) -> None:
        """Raise ValueError if this policy cannot run with `head_dim` and `num_kv_heads` (called when the cache is
        built, before it touches the model)."""
        if self.hadamard_keys:
            from ..quant import hadamard_block_size

            hadamard_block_size(head_dim)  # raises for odd head dims
        for bits in self.bit_widths():
            if bits not in (0, 16):
                for kind in ("key", "value"):
                    s = self.spec(bits, kind, head_dim)
                    if s.axis == "token" and head_dim % s.group_size:
                        raise ValueError(f"group_size must divide the head dimension {head_dim}, got {s.group_size!r}")

    def bit_widths(self) -> tuple[int, ...]:
        """Every bit-width this policy may emit."""
        return (16,)

    def plan_prefill(self, ctx: PrefillContext) -> BitPlan:
        raise NotImplementedError

    def decode_rule(self, layer_idx: int = 0) -> DecodeRule:
        return DecodeRule()

    def spec(self, bits: int, kind: str, head_dim: int) -> QuantSpec:
        """Quantizer settings for `kind` ('key' or 'value') tokens stored at `bits`."""
        raise NotImplementedError

    #: whether plan_prefill reads token modality labels (the cache then requires a family adapter, and raises
    #: when a vision-language model's prompt reaches it without labels)
    needs_modality: ClassVar[bool] = False

    @property
    def needs_massive_activations(self) -> bool:
        """Whether plan_prefill reads `ctx.massive_activation` (the cache then hooks the decoder layers)."""
        return False

    @property
    def hadamard_keys(self) -> bool:
        """Whether keys and values are stored Walsh-Hadamard-rotated (the cache rotates them, the attention
        rotates the query and the output)."""
        return False

    @property
    def query_window(self) -> int:
        """How many of the prompt's last queries plan_prefill reads (`ctx.queries`; the cache captures them in its
        attention function and raises where it cannot); 0: none."""
        return 0

    @property
    def evicts(self) -> bool:
        """Whether plans may hold width 0 (evicted: the token is stored nowhere, its slot is masked)."""
        return 0 in self.bit_widths()

    def describe(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.repr) \
            if dataclasses.is_dataclass(self) else ""
        return f"{self.name}({fields})" + (f"@r{self.revision}" if self.revision else "")


def uniform_plan(ctx: PrefillContext, bits: int) -> torch.Tensor:
    """int16 `[B, S]` filled with `bits`."""
    return torch.full((ctx.batch_size, ctx.seq_len), bits, dtype=torch.int16, device=ctx.keys.device)


def effective_group(group_size: int, head_dim: int) -> int:
    """Per-token groups: the seed's group 128, or the head dimension when that is smaller."""
    return min(group_size, head_dim)


def check_bits(bits: int, allowed=SUPPORTED_BITS, name: str = "bits") -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {bits!r}")


def check_clip(clip: float, name: str = "clip_ratio") -> None:
    if not isinstance(clip, (int, float)) or isinstance(clip, bool) or not (0.0 < float(clip) <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {clip!r}")


def check_positive(value, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_nonneg(value, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Registry
_REGISTRY: dict[str, type[Policy]] = {}
_WRAPPERS: dict[str, type] = {}


def register_wrapper(suffix: str):
    """Class decorator: make a wrapper policy available as the `+suffix` of a composed name."""
    def deco(cls):
        cls.suffix = suffix
        _WRAPPERS[suffix] = cls
        return cls
    return deco


_TYPES = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,), "tuple": (tuple,), "None": (type(None),)}


def check_field_types(policy) -> None:
    """Raise ValueError naming the option when a dataclass field holds a value of another type than its
    annotation (`bits=2.0`, `wht="no"`, `clip_ratio=True`, `pivot_threshold="2"`), or a float that is not finite."""
    import math

    for f in dataclasses.fields(policy):
        if not f.init or not isinstance(f.type, str):
            continue
        kinds = [k.strip() for k in f.type.split("|")]
        if not all(k in _TYPES for k in kinds):
            continue  # an annotation this check does not know: the policy's own checks apply
        v = getattr(policy, f.name)
        ok = any(isinstance(v, _TYPES[k]) and not (isinstance(v, bool) and k in ("int", "float")) for k in kinds)
        if not ok:
            raise ValueError(f"{f.name} must be {' or '.join(kinds)}, got {v!r}")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{f.name} must be finite, got {v!r}")


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make a policy available by `cls.name` to `get_policy` and the CLI; every instance's
    options are type-checked after construction (`check_field_types`)."""
    post = getattr(cls, "__post_init__", None)

    def __post_init__(self):
        check_field_types(self)  # before the policy's own checks, which assume the types
        if post is not None:
            post(self)
    cls.__post_init__ = __post_init__
    _REGISTRY[cls.name] = cls
    return cls


def list_policies() -> list[str]:
    return sorted(_REGISTRY)


def get_policy(name: str, **options) -> Policy:
    """Build a registered policy by name with its options, e.g. `get_policy("kivi", bits=2)`.

    Shorthand: a trailing `-<bits>` sets `bits`, so `get_policy("rtn-2")` is `get_policy("rtn", bits=2)`.
    """
    if isinstance(name, Policy):
        return name
    if not isinstance(name, str):
        raise ValueError(f"name must be a policy name, got {name!r}")
    key = name.strip().lower()
    if "+" in key:
        # composition: "windowquant+wht+pivots" wraps the base policy (options go to it)
        base, *wraps = key.split("+")
        for w in wraps:
            if w not in _WRAPPERS:
                raise ValueError(f"name's wrappers must be among {sorted(_WRAPPERS)}, got {w!r} in {name!r}")
        policy = get_policy(base, **options)
        for w in wraps:
            policy = _WRAPPERS[w](policy)
        return policy
    if key not in _REGISTRY and "-" in key:
        base, _, suffix = key.rpartition("-")
        if base in _REGISTRY and suffix.isdigit():
            options = {"bits": int(suffix), **options}
            key = base
    if key not in _REGISTRY:
        raise ValueError(f"name must be one of {list_policies()}, got {name!r}")
    cls = _REGISTRY[key]
    valid = {f.name for f in dataclasses.fields(cls) if f.init and f.repr}
    unknown = set(options) - valid
    if unknown:
        raise ValueError(f"options for policy {key!r} must be among {sorted(valid)}, got {sorted(unknown)!r}")
    return cls(**options)

