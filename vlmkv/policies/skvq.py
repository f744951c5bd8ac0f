"""`skvq`: SKVQ (Duanmu et al., 2024, "SKVQ: Sliding-window Key and Value Cache Quantization for Large
Language Models"), seed 002's baseline (Table II; "SKVQ employs a sliding window to store recent KV cache in
FP16 and uses a channel reordering technique"; window 128, group 128 in the seed's setting).

* Channel grouping, per layer, over a token's channels of all kv heads (H x D of them), from the prompt's own
  keys and values (padding excluded; SKVQ calibrates offline, vlmkv on the prompt being cached):
  - `grouping="kmeans"` (default, as the authors' code): each channel is the point (min, max) over the prompt
    tokens; k-means clusters them into ceil(H x D / group_size) groups, which may differ in size. Channels are
    reordered cluster by cluster, and each cluster is one quantization group.
  - `grouping="sorted"`: channels sorted by range (max - min) and cut into even groups of `group_size`
    (or its largest divisor of H x D: SmolLM2's 3 x 64 = 192 channels give groups of 96); vlmkv's earlier version.
  The permutation is undone exactly when tokens are read; it costs one int16 per channel and layer for K and V,
  and the group bounds and clips one 16-bit number each, all counted in bytes.
* Clipped asymmetric quantization per group, K at `key_bits`, V at `value_bits` (2/2 as the seed; 1.5 is three
  levels per value, packed five to a byte, as SKVQ's K2V1.5). `clip_ratio=None` (default) calibrates one clip
  ratio per group: the ratio in {1.0, 0.95, ..., 0.5} whose quantization of the prompt's tokens has the least
  squared error; a number fixes one ratio for all groups.
* Full precision for the first `sinks` tokens (attention sinks, 5) and a sliding window of the last `window`
  tokens (128); tokens leaving the window are quantized in blocks of `flush_every`.
Groups span heads when the head dimension is smaller than the group, which is what makes the reordering
matter: with one group per head, reordering inside it would change nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import kernels
from ..quant import QuantSpec, dequantize
from .base import (PAD, BitPlan, DecodeRule, Policy, PrefillContext, check_bits, check_clip, check_nonneg,
                   check_positive, register_policy, uniform_plan)

CLIP_GRID = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.0 .. 0.5
CALIBRATION_TOKENS = 2048  # at most this many prompt tokens (evenly spaced) calibrate groups and clips


def _tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """float32 `[N, H * D]`: the unmasked tokens of `x` `[B, H, S, D]`, channels flattened head-major, at most
    CALIBRATION_TOKENS of them (evenly spaced)."""
    B, H, S, D = x.shape
    flat = x.detach().float().permute(0, 2, 1, 3).reshape(B * S, H * D)
    if mask is not None:
        flat = flat[mask.reshape(-1).to(flat.device)]
    if flat.shape[0] > CALIBRATION_TOKENS:
        flat = flat[torch.linspace(0, flat.shape[0] - 1, CALIBRATION_TOKENS).round().long()]
    return flat


def _by_range(flat: torch.Tensor) -> torch.Tensor:
    """long `[C]`: the channels of `flat` `[N, C]` sorted by range (max - min) over the N tokens."""
    return torch.argsort(flat.amax(0) - flat.amin(0), stable=True)


def range_order(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """long `[H * D]`: the channels of `x` `[B, H, S, D]` (flattened head-major) sorted by range over tokens."""
    return _by_range(_tokens(x, mask))


def cluster_channels(flat: torch.Tensor, groups: int, iters: int = 50) -> tuple[torch.Tensor, tuple[int, ...]]:
    """k-means (Lloyd) of the channels of `flat` `[N, C]` as points (min, max) over the N tokens, into at most
    `groups` clusters. Deterministic: centres start at channels evenly spaced in range order; an empty cluster is
    re-seeded at the channel farthest from its centre.

    Returns (perm long `[C]`: channels cluster by cluster, clusters by increasing centre range, channels in index
    order inside; bounds: the offsets where clusters start in perm, then C, empty clusters dropped)."""
    C = flat.shape[1]
    pts = torch.stack([flat.amin(0), flat.amax(0)], 1).double()  # [C, 2]
    groups = max(1, min(groups, C))
    order = torch.argsort(pts[:, 1] - pts[:, 0], stable=True)
    centres = pts[order[torch.linspace(0, C - 1, groups).round().long()]].clone()
    for _ in range(iters):
        dist = torch.cdist(pts, centres)
        lab = dist.argmin(1)
        new = torch.zeros_like(centres).index_add_(0, lab, pts)
        count = torch.bincount(lab, minlength=groups)
        new = new / count.clamp_min(1)[:, None]
        for g in torch.nonzero(count == 0).flatten().tolist():
            far = dist.gather(1, lab[:, None]).squeeze(1).argmax()
            new[g] = pts[far]
            lab[far] = g
        if torch.equal(new, centres):
            break
        centres = new
    lab = torch.cdist(pts, centres).argmin(1)
    rank = torch.argsort(torch.argsort(centres[:, 1] - centres[:, 0], stable=True), stable=True)
    perm = torch.argsort(rank[lab] * C + torch.arange(C), stable=True)
    sizes = torch.bincount(rank[lab], minlength=groups)
    bounds = (0, *[int(b) for b in torch.cumsum(sizes[sizes > 0], 0)])
    return perm, bounds


def calibrate_clips(flat: torch.Tensor, spec: QuantSpec, grid=CLIP_GRID) -> tuple[float, ...]:
    """Per group of `spec` (whose bounds/groups describe the channels of `flat` `[N, C]`, already permuted), the
    clip ratio of `grid` whose quantization of `flat` has the least squared error (ties: the larger ratio)."""
    gid = spec.group_ids(flat.shape[1], flat.device)
    G = int(gid[-1]) + 1
    best = torch.full((G,), float("inf"), dtype=torch.float64)
    pick = torch.ones(G, dtype=torch.float64)
    for a in grid:  # decreasing: a later ratio must do strictly better
        trial = QuantSpec(spec.bits, spec.group_size, 1.0, "token", spec.meta_dtype, spec.bounds, (a,) * G, spec.levels)
        # the fused kernel where one applies: bit for bit the reference's codes, a fraction of its time
        err = (dequantize(kernels.quantize(flat, trial), torch.float32) - flat).double().pow(2).sum(0)
        e = torch.zeros(G, dtype=torch.float64).index_add_(0, gid, err)
        better = e < best
        best, pick = torch.where(better, e, best), torch.where(better, torch.tensor(a, dtype=torch.float64), pick)
    return tuple(float(a) for a in pick)


@register_policy
@dataclass
class SKVQPolicy(Policy):
    name = "skvq"
    key_bits: int = 2
    value_bits: int | float = 2
    group_size: int = 128
    grouping: str = "kmeans"
    clip_ratio: float | None = None
    window: int = 128
    sinks: int = 5
    flush_every: int = 32

    def __post_init__(self):
        check_bits(self.key_bits, (2, 4, 8), "key_bits")
        if self.value_bits not in (1.5, 2, 4, 8) or isinstance(self.value_bits, bool):
            raise ValueError(f"value_bits must be one of (1.5, 2, 4, 8), got {self.value_bits!r}")
        if isinstance(self.value_bits, float) and self.value_bits != 1.5:
            self.value_bits = int(self.value_bits)
        if self.grouping not in ("kmeans", "sorted"):
            raise ValueError(f"grouping must be 'kmeans' or 'sorted', got {self.grouping!r}")
        check_positive(self.group_size, "group_size")
        check_positive(self.flush_every, "flush_every")
        if self.clip_ratio is not None:
            check_clip(self.clip_ratio)
        check_nonneg(self.window, "window")
        check_nonneg(self.sinks, "sinks")

    def validate(self, head_dim: int, num_kv_heads: int = 1) -> None:
        return None  # groups run over H * D channels: formed at prefill

    def bit_widths(self):
        return (self.key_bits,)

    def _group(self, channels: int) -> int:
        """group_size, or the largest divisor of the token's channels (H x D) not above it (192 -> 96)."""
        g = min(self.group_size, channels)
        while channels % g:
            g -= 1
        return g

    def _layout(self, x: torch.Tensor, mask, kind: str) -> tuple[torch.Tensor, dict]:
        """(channel permutation long `[H * D]`, the QuantSpec fields of this layer's `kind` groups)."""
        flat = _tokens(x, mask)
        C = flat.shape[1]
        if self.grouping == "kmeans":
            perm, bounds = cluster_channels(flat, math.ceil(C / self.group_size))
            fields = {"bounds": bounds}
        else:
            perm, fields = _by_range(flat), {}
        if self.clip_ratio is None:
            base = self.spec(self.key_bits, kind, C)
            spec = QuantSpec(base.bits, base.group_size, 1.0, "token", base.meta_dtype, fields.get("bounds"),
                             None, base.levels)
            fields["clips"] = calibrate_clips(flat[:, perm], spec)
        return perm, fields

    def plan_prefill(self, ctx: PrefillContext) -> BitPlan:
        B, H, S, D = ctx.keys.shape
        bits = uniform_plan(ctx, self.key_bits)
        if self.sinks:
            real = (ctx.token_types != PAD) if ctx.token_types is not None else torch.ones(B, S, dtype=torch.bool)
            first = real.long().cumsum(1) <= self.sinks
            bits[real & first] = 16
        pk, fk = self._layout(ctx.keys, ctx.attention_mask, "key")
        pv, fv = self._layout(ctx.values, ctx.attention_mask, "value")
        return BitPlan(bits, residual=min(self.window, S), channel_perm=(pk, pv), spec_fields=(fk, fv))

    def decode_rule(self, layer_idx: int = 0) -> DecodeRule:
        return DecodeRule(bits=self.key_bits, keep_recent=self.window, flush_every=self.flush_every)

    def spec(self, bits, kind, head_dim):
        # `head_dim` here is the flattened H * D a quantized token carries; a layer's plan adds its bounds and clips
        clip = 1.0 if self.clip_ratio is None else self.clip_ratio
        if kind == "value" and self.value_bits == 1.5:
            return QuantSpec(2, self._group(head_dim), clip, "token", levels=3)
        b = self.value_bits if kind == "value" else bits
        return QuantSpec(b, self._group(head_dim), clip, "token")
