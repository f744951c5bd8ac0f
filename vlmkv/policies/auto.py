"""`auto`: one budget, `bits` per element for the whole cache, spent token by token where the question reads.

Every byte is counted against the budget: codes, norms and scales, the full-precision recent window (at its peak
while decoding: the window plus one flush block), the 16-bit pivot tokens and the int32 slot map that mixed widths
need. An evicted token costs nothing: it is stored nowhere.

Formats, one a width (keys and values Walsh-Hadamard-rotated, AKVQ-VL's WHT, which makes each coordinate of a head
vector about Gaussian):
* 2 and 4 bits: a codebook (TurboQuant's scalar quantizer): one fp16 norm per head vector (groups of up to 128
  channels) and, per channel, the nearest of 2^bits Lloyd-Max levels (`quant.codebook`). On SmolLM2's rotated
  keys and values (1,024 tokens of the Debian licence texts, every layer) it has less error than symmetric groups of
  32 for fewer bytes at 2 bits (squared error 0.106 / 0.114 of the keys' / values' energy at 2.25 bits an element,
  against 0.116 / 0.121 at 2.5) and about the same error per byte at 4 (0.0086 / 0.0091 at 4.25 bits, against
  0.0066 / 0.0073 at 4.5; a quarter bit more divides the error by about 1.4; benchmarks/experiments/codebook_error.py).
* 8 bits: symmetric groups of 32 with an fp16 scale (q4_0's layout), where a uniform grid has the least error.
* 16 bits: pivots (AKVQ-VL's PSA: a massive activation entering the layer, at most 15) and the recent window.
* 0 bits (only with `evict=True`): the token is evicted; its slot stays (positions, RoPE and masks are those of the
  full prompt) and attention never reads it.

Plan, per layer, at prefill:
1. pivots go to 16 bits; the recent window (with its flush block) takes up to a quarter of the spare budget, at most
   128 tokens, sized to the budget (3 bits over 2,048 tokens of SmolLM2 afford about 10 tokens, 4.5 bits 64). Its
   tokens stay in full precision until decoding pushes them out, then take their planned width: the decode width
   (the widest whose cost fits the budget) or, where the question reads them, wider (paid from the budget);
2. every other token starts at the floor (2 bits, or 0 with `evict=True`) and rises one width at a time, by the
   error each step removes per bit it costs: token t at width w contributes a_t * e(w) to the attention output's
   error, where a_t is the attention the question pays it and e(w) the format's relative error (e(0) = 1: the token
   is gone; e(2) = 0.34, e(4) = 0.095, e(8) = 0.005, e(16) = 0). Steps are taken in decreasing order of
   a_t * (e(lo) - e(hi)) / (cost(hi) - cost(lo)) while the budget lasts: a threshold on a_t per step, the same
   greedy as a fractional knapsack, which is optimal for these convex error curves.
3. a_t is SnapKV's observation window: the softmax attention of the prompt's last 32 queries (captured in vlmkv's
   attention function, after RoPE; causal and padding masks applied) over every key, averaged over the queries and
   summed over the heads (the error of every head counts), smoothed along the sequence by a window of 5 tokens.
   Where the question is asked after the cache is built, a_t cannot know it: eviction is irreversible, which is why
   it is an option (docs/RESULTS.md, "Second question"). Without eviction the cache is kept for any later question,
   so each token's a_t gets a uniform prior, `prior` times the mean attention of a token (1 by default: a later
   question, reading every token alike, weighs as much as the one in the prompt; 0 with `evict=True`, where the
   question in the prompt is the one that counts). Measured on SmolLM2 and the Debian licence texts (a second
   question about the document's start), 1 keeps nearly all of what 10 gains over 0 (at 8k tokens and 3 bits, first
   question KL 0.14 -> 0.029, second 0.081 -> 0.056; at 1k and 4 bits the second 0.26 -> 0.15), while on pocket's
   64-frame clips at 3 bits, where the question is in the prompt, 10 cost 12 points of accuracy and 1 matched FP16
   (KL 0.002 with 0, 0.003-0.008 with 1, 0.012-0.063 with 10). Larger values approach a uniform quantizer: every
   token first rises to 4 bits before the most read go wider.
Rows of a batch plan the same number of tokens at each width (a segment is as long as its longest row). Generated
tokens join the recent window and leave it at the widest width whose cost fits the budget, so the average never
rises above it while decoding (it drifts down toward that width's cost over long generations).

The window is paid for at its peak (the window and a flush block at 16 bits, then the decode width), so a cache holds
less than the budget until decoding has pushed the prompt's window out (about 0.1-0.2 bits less at prefill on 1k-4k
tokens of SmolLM2). The plan aims 0.5% below the budget and sets aside the decode segment's first growth (`storage.GROW_MIN` tokens);
its 1/64 growth on long prompts can go about 1.5% over, briefly. `bits_per_element()` of a cache is the measurement;
tests hold it within 2% of `bits`. The fused C++ and Triton kernels read every format it stores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..quant import QuantSpec
from ..storage import GROW_MIN
from .base import PAD, BitPlan, DecodeRule, Policy, PrefillContext, effective_group, register_policy

GROUP = 32  # 8-bit tokens: symmetric groups of 32 channels (or the head dimension when smaller)
CODEBOOK_GROUP = 128  # 2- and 4-bit tokens: one norm per head vector, split in groups of at most 128 channels
CODEBOOK = (2, 4)  # the widths stored as codebooks
WIDTHS = (8, 4, 2)  # the quantized widths (16 and, with evict, 0 besides)
LADDER = (0, 2, 4, 8, 16)  # every width, in the order a token rises through them
ERROR = {0: 1.0, 2: 0.34, 4: 0.095, 8: 0.005, 16: 0.0}  # relative error of each width's format (see the docstring)
WINDOW_MAX = 128  # the seeds' recent window, the most `auto` keeps
WINDOW_SHARE = 0.25  # at most this share of the spare budget goes to the recent window and its flush block
OBSERVE = 32  # the prompt's last queries whose attention ranks the tokens (SnapKV's observation window)
POOL = 5  # tokens the attention is smoothed over (SnapKV's pooling kernel)
PIVOTS, PIVOT_THRESHOLD = 15, 100.0
PRIOR = 1.0  # without eviction: the attention every token may get from a later question, in units of the mean
MARGIN = 0.995  # plan to this fraction of the budget (float rounding, the last partial segment growth)


def _index_bits(head_dim: int, num_kv_heads: int) -> float:
    """A token's int32 slot, per element (shared by K and V of all kv heads)."""
    return 32.0 / (2 * num_kv_heads * head_dim)


def _group(bits: int, head_dim: int) -> int:
    """Channels per group (one scale or norm each) of a width's format on `head_dim`."""
    if bits in CODEBOOK:
        g = min(CODEBOOK_GROUP, head_dim)
        return g if head_dim % g == 0 else effective_group(GROUP, head_dim)
    return effective_group(GROUP, head_dim)


def _costs(head_dim: int, num_kv_heads: int) -> dict:
    """Bits per element of a token at each width: codes, its fp16 norm or scale, and its int32 slot (0: nothing)."""
    idx = _index_bits(head_dim, num_kv_heads)
    return {0: 0.0, **{w: w + 16.0 / _group(w, head_dim) + idx for w in WIDTHS}, 16: 16.0 + idx}


def attention_received(queries: torch.Tensor, keys: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """float32 `[B, S]`: the attention each of S keys receives from W queries of the prompt's last W positions,
    averaged over the (real) queries and summed over the query heads, smoothed over `POOL` neighbouring tokens.

    queries `[B, Hq, W, D]`, keys `[B, Hkv, S, D]` (one basis: both rotated or neither), real: bool `[B, S]`
    (False on padding; None: all real). Query i sits at position S - W + i and sees keys up to it (causal)."""
    B, Hq, W, D = queries.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    W = min(W, S)
    q = queries[:, :, -W:].float().reshape(B, Hkv, (Hq // Hkv) * W, D)
    s = torch.einsum("bhqd,bhsd->bhqs", q, keys.float()) / math.sqrt(D)
    pos = torch.arange(S, device=keys.device)
    ok = pos[None, :] <= (S - W + torch.arange(W, device=keys.device))[:, None]  # [W, S]
    ok = ok.repeat(Hq // Hkv, 1)[None, None]  # [1, 1, rW, S]
    if real is not None:
        ok = ok & real[:, None, None, :]
    a = torch.softmax(s.masked_fill(~ok, float("-inf")), dim=-1).nan_to_num(0.0)  # an all-masked query weighs 0
    qreal = torch.ones(B, W, device=keys.device) if real is None else real[:, S - W:].float()
    weight = qreal.repeat(1, Hq // Hkv)[:, None, :, None] / qreal.sum(1).clamp_min(1)[:, None, None, None]
    out = (a * weight).sum(2).sum(1) * (Hq // Hkv)  # [B, S]: mean over queries, sum over heads
    if POOL > 1:
        out = torch.nn.functional.avg_pool1d(out[:, None], POOL, stride=1, padding=POOL // 2,
                                             count_include_pad=False)[:, 0]
    return out


def allocate(score: torch.Tensor, spare: float, cost: dict, floor: int, start: torch.Tensor | None = None) -> torch.Tensor:
    """int16 `[n]` widths for n tokens of attention `score` (float `[n]`) starting at `floor` (0 or 2), raised one
    width at a time by decreasing error removed per bit, while `spare` bit-elements (beyond what the starting widths
    cost) last. start: int `[n]` widths some tokens start from instead (already paid for; the recent window's)."""
    ladder = [w for w in LADDER if w >= floor]
    n = score.numel()
    out = torch.full((n,), floor, dtype=torch.int16) if start is None else start.to(torch.int16).cpu().clone()
    if n == 0:
        return out
    steps = list(zip(ladder, ladder[1:]))
    # value of each (token, step): score * error removed / bits added; steps of one token come in order, as the
    # errors are convex in the cost. Steps up to a token's start are taken first and cost nothing.
    rate = torch.tensor([(ERROR[lo] - ERROR[hi]) / (cost[hi] - cost[lo]) for lo, hi in steps])
    price = torch.tensor([cost[hi] - cost[lo] for lo, hi in steps]).repeat(n, 1)
    value = score.float().cpu().clamp_min(0)[:, None] * rate[None, :]  # [n, steps]
    his = torch.tensor([hi for _, hi in steps])
    paid_for = his[None, :] <= out[:, None]
    value = torch.where(paid_for, float("inf"), value)
    price = torch.where(paid_for, 0.0, price)
    order = torch.argsort(value.flatten(), descending=True, stable=True)
    paid = price.flatten()[order].double().cumsum(0)
    take = order[paid <= max(spare, 0.0)]
    # a token's width is the highest step it took (steps of one token are taken in order: see above)
    tok, step = take // len(steps), take % len(steps)
    top = torch.full((n,), -1, dtype=torch.long).scatter_reduce(0, tok, step, "amax")
    widths = torch.tensor(ladder[1:], dtype=torch.int16)
    return torch.where(top >= 0, widths[top.clamp_min(0)], out)


@register_policy
@dataclass
class AutoPolicy(Policy):
    name = "auto"
    revision = 6  # 6: prior 1; 5: a uniform prior (10) without eviction; 4: the window leaves at planned widths;
    # 3: tokens ranked by the queries, codebooks, eviction
    bits: float = 3.0
    evict: bool = False
    prior: float | None = None  # None: PRIOR without eviction, 0 with it

    def __post_init__(self):
        if not isinstance(self.bits, (int, float)) or isinstance(self.bits, bool) or not 0 < self.bits <= 16:
            raise ValueError(f"bits must be an average number of bits per element in (0, 16], got {self.bits!r}")
        self.bits = float(self.bits)
        if self.prior is None:
            self.prior = 0.0 if self.evict is True else PRIOR
        if not isinstance(self.prior, (int, float)) or isinstance(self.prior, bool) or not 0 <= self.prior < math.inf:
            raise ValueError(f"prior must be a finite weight >= 0 (units of the mean attention a token receives), "
                             f"got {self.prior!r}")
        self.prior = float(self.prior)

    @property
    def hadamard_keys(self) -> bool:
        return True

    @property
    def needs_massive_activations(self) -> bool:
        return True

    @property
    def query_window(self) -> int:
        return OBSERVE

    def validate(self, head_dim: int, num_kv_heads: int = 1) -> None:
        super().validate(head_dim, num_kv_heads)
        if self.evict:
            return  # any budget: what it cannot keep is evicted
        need = _costs(head_dim, num_kv_heads)[2] / MARGIN
        if self.bits < need:
            raise ValueError(f"bits must be at least {need:.3f} for head dimension {head_dim} and {num_kv_heads} kv "
                             f"heads (2-bit codes with their norms and slot map; evict=True goes lower), "
                             f"got {self.bits!r}")

    def bit_widths(self):
        return WIDTHS + ((0,) if self.evict else ())

    def _decode_bits(self, cost: dict) -> int:
        return max(w for w in WIDTHS if cost[w] <= self.bits * MARGIN or w == 2)

    def _window(self, spare: float, cost: dict, dec: int) -> tuple[int, int]:
        """(recent window W, flush block F) affordable from `spare` bit-elements: (W + F) tokens at 16 bits cost
        16 - cost[dec] each over their stored width; W at most WINDOW_MAX, F = W / 16 (at least 1)."""
        units = int(max(0.0, WINDOW_SHARE * spare) // (16.0 - cost[dec]))
        if units < 2:
            return 0, 1
        W = min(WINDOW_MAX, units * 16 // 17)
        return W, max(1, W // 16)  # the residual buffer keeps W / 16 of room anyway (storage.Residual)

    def plan_prefill(self, ctx: PrefillContext) -> BitPlan:
        B, H, S, D = ctx.keys.shape
        if ctx.queries is None:
            raise ValueError("auto ranks tokens by the prompt's queries, got a context without them (the cache "
                             "captures them in vlmkv's attention function)")
        cost = _costs(D, H)
        dec = self._decode_bits(cost)
        floor = 0 if self.evict else 2
        dev = ctx.keys.device
        real = ctx.attention_mask if ctx.attention_mask is not None else torch.ones(B, S, dtype=torch.bool, device=dev)
        if ctx.token_types is not None:
            real = real & (ctx.token_types.to(dev) != PAD)
        target = self.bits * MARGIN * S  # bit-elements per row, every slot (padding too) counted
        ratio = ctx.massive_activation
        ratio = torch.zeros(B, S) if ratio is None else ratio.detach().float().cpu().clone()
        ratio[~real.cpu()] = 0
        n_piv = int((ratio >= PIVOT_THRESHOLD).sum(1).clamp(max=PIVOTS).min())
        # the window is shared by all rows: sized by the row that can afford the least
        W, F = self._window(target - S * cost[floor] - n_piv * (cost[16] - cost[floor]), cost, dec)
        W = min(W, S)
        bits = torch.full((B, S), floor, dtype=torch.int16, device=dev)
        window = torch.arange(S, device=dev) >= S - W  # full precision now; once it leaves, `dec` bits or more
        ratio[:, S - W:] = 0
        n_piv = int((ratio >= PIVOT_THRESHOLD).sum(1).clamp(max=PIVOTS).min())
        piv = torch.zeros(B, S, dtype=torch.bool, device=dev)
        if n_piv:
            piv.scatter_(1, ratio.topk(n_piv, dim=1).indices.to(dev), True)
        bits[piv] = 16
        # pivots, the window at its peak, and the decode segment's first growth (GROW_MIN tokens: a few % of
        # a short prompt; its 1/64 growth on long ones stays within the 2% the plan is measured against)
        fixed = n_piv * cost[16] + (W + F) * 16.0 + GROW_MIN * cost[dec]
        n_body = S - W - n_piv
        spare = target - fixed - n_body * cost[floor]
        score = attention_received(ctx.queries.to(dev), ctx.keys, real)
        if self.prior:  # what a later question may read: the same for every token, in units of the mean attention
            mean = (score * real).sum(1, keepdim=True) / real.sum(1, keepdim=True).clamp_min(1)
            score = score + self.prior * mean
        score = score.masked_fill(~real, -1.0)  # padding: raised last (its bytes count, its error does not)
        raised = [w for w in LADDER if w > floor]
        counts, orders = None, []
        for b in range(B):
            # the window's tokens too: they leave it at `dec` (paid for above) or, where the question reads them,
            # wider (paid from the spare)
            pos = (~piv[b]).nonzero().flatten()
            s = score[b, pos]
            start = torch.where(window[pos], dec, floor).cpu()
            w = allocate(s, spare, cost, floor, start)
            # this row's tokens by width, then attention (two stable sorts): the poorer rows' counts keep each row's
            # own best
            order = torch.argsort(s.cpu(), descending=True, stable=True)
            order = order[torch.argsort(w[order], descending=True, stable=True)]
            orders.append(pos[order.to(pos.device)])
            row = torch.stack([(w >= lvl).sum() for lvl in raised])  # tokens at each width or wider
            counts = row if counts is None else torch.minimum(counts, row)
        for b in range(B):  # every row: its best-ranked tokens at the widths the poorest row affords
            pos = orders[b]
            for lvl, upto in zip(raised, counts.tolist()):
                bits[b, pos[:upto]] = lvl
            keep = (window[pos] & (bits[b, pos] < dec)).to(pos.device)  # the window never leaves below `dec`
            bits[b, pos[keep]] = dec
        rule = DecodeRule(bits=dec, keep_recent=W, flush_every=F)
        return BitPlan(bits, residual=W, decode=rule)

    def decode_rule(self, layer_idx: int = 0) -> DecodeRule:
        # the rule a prefill plans (BitPlan.decode) is the one used; this is the no-prompt fallback
        return DecodeRule(bits=2, keep_recent=0, flush_every=1)

    def spec(self, bits, kind, head_dim):
        if bits in CODEBOOK:
            return QuantSpec(bits, _group(bits, head_dim), 1.0, "token", zero_point="none", codebook="lloyd-max")
        return QuantSpec(bits, effective_group(GROUP, head_dim), 1.0, "token", zero_point="none")


__all__ = ["AutoPolicy", "allocate", "attention_received"]
