"""Wrapper policies that add one AKVQ-VL component to any policy (combine by wrapping, not inheriting).

    get_policy("windowquant+wht+pivots", budget=3.0)
    == WithPivots(WithHadamard(WindowQuantPolicy(budget=3.0)))

`wht`:    keys and values stored Walsh-Hadamard-rotated, query and output rotated online.
`pivots`: tokens carrying massive activations (up to 15 per layer) kept at 16 bits, on top of whatever
          the inner policy planned (their bytes come on top of the inner policy's budget).
"""
from __future__ import annotations

from .base import BitPlan, DecodeRule, Policy, PrefillContext, register_wrapper
from .pivots import pivot_mask


class PolicyWrapper(Policy):
    """Delegates everything to `inner`; subclasses change one thing."""

    suffix = "wrap"

    def __init__(self, inner: Policy):
        if not isinstance(inner, Policy):
            raise ValueError(f"inner must be a Policy, got {inner!r}")
        self.inner = inner

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.inner.name}+{self.suffix}"

    @property
    def needs_modality(self) -> bool:  # type: ignore[override]
        return self.inner.needs_modality

    @property
    def keep_model_dtype(self) -> bool:  # type: ignore[override]
        return self.inner.keep_model_dtype

    @property
    def hadamard_keys(self) -> bool:
        return self.inner.hadamard_keys

    @property
    def needs_massive_activations(self) -> bool:
        return self.inner.needs_massive_activations

    def validate(self, head_dim: int, num_kv_heads: int = 1) -> None:
        self.inner.validate(head_dim, num_kv_heads)

    def bit_widths(self):
        return self.inner.bit_widths()

    def plan_prefill(self, ctx: PrefillContext) -> BitPlan:
        return self.inner.plan_prefill(ctx)

    def decode_rule(self, layer_idx: int = 0) -> DecodeRule:
        return self.inner.decode_rule(layer_idx)

    def spec(self, bits, kind, head_dim):
        return self.inner.spec(bits, kind, head_dim)

    def describe(self) -> str:
        return f"{self.inner.describe()}+{self.suffix}"

    def __getattr__(self, item):
        # options of the wrapped policy (e.g. `.budget`) stay readable through the wrapper
        if item == "inner":
            raise AttributeError(item)
        return getattr(self.inner, item)


@register_wrapper("wht")
class WithHadamard(PolicyWrapper):

    @property
    def hadamard_keys(self) -> bool:
        return True

    def validate(self, head_dim: int, num_kv_heads: int = 1) -> None:
        Policy.validate(self, head_dim, num_kv_heads)  # the rotation's own check, then the inner policy's
        self.inner.validate(head_dim, num_kv_heads)


@register_wrapper("pivots")
class WithPivots(PolicyWrapper):

    def __init__(self, inner: Policy, num_pivots: int = 15, threshold: float = 100.0):
        super().__init__(inner)
        self.num_pivots = num_pivots
        self.threshold = threshold

    def bit_widths(self):
        return tuple(sorted(set(self.inner.bit_widths()) | {16}))

    def plan_prefill(self, ctx: PrefillContext) -> BitPlan:
        plan = self.inner.plan_prefill(ctx)
        plan.bits[pivot_mask(ctx, self.num_pivots, self.threshold)] = 16
        return plan

    @property
    def needs_massive_activations(self) -> bool:
        return self.num_pivots > 0

