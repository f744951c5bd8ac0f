"""`auto`: one budget, `bits` per element for the whole cache, spent where the seeds say it matters.

Every byte is counted against the budget: codes, scales (and zero points, where a format has them), the
full-precision recent window (at its peak while decoding: the window plus one flush block), the 16-bit pivot
tokens and the int32 slot map that mixed widths need. Per layer, at prefill, for each row:

1. everything starts at 2 bits; `validate` refuses a budget below that;
2. pivot tokens (AKVQ-VL's PSA: a massive activation entering the layer, at most 15) go to 16 bits;
3. the recent window (with its flush block) takes up to a quarter of what is left, at most 128 tokens: sized to
   the budget, not fixed (3 bits over 2,048 tokens of SmolLM2 afford 10 tokens, 4.5 bits 64);
4. the question (the text after the last image, or the last 32 tokens of a text-only prompt) rises first, from
   2 to 4 bits, then to 8: every answer token reads its keys and values, and on pocket's 64-frame clips it held
   most of auto's error (on 34 development clips, raising it alone to 8 bits took next-token KL from 0.023 to
   0.0012 for 0.12 bits an element; benchmarks/experiments/auto_ablation.py, docs/RESULTS.md);
5. the rest goes to windows of tokens, first from 2 to 4 bits, then from 4 to 8, in order: text windows before
   visual ones (AKVQ-VL's TSA), each kind ranked by its keys' attention from the question's keys (WindowQuant's
   similarity).
   Visual windows are frames cut into runs of 32 tokens; text windows are runs of 32 tokens (S / 32 tokens, at
   least 4, on prompts under 1,024 tokens, so that short prompts can spend their budget).
Keys and values are stored Walsh-Hadamard-rotated (AKVQ-VL's WHT), in symmetric groups of 32 channels with one
fp16 scale each and no zero point (llama.cpp's q4_0 layout; 2-bit groups clipped at 0.9). On tight budgets
2-bit tokens take groups of 64 or 128 (dividing the head dimension): the smallest group whose codes and scale
leave a tenth of the budget spare, else the largest, so 2.5 bits fit on head dimension 64 (2.33 bits a token). Rows of a batch plan
the same number of tokens at each width (a segment is as long as its longest row). Generated tokens join the
recent window and leave it at the widest width whose cost fits the budget, so the average never rises above it
while decoding (it drifts down toward that width's cost over long generations).

The plan aims 0.5% below the budget and sets aside the decode segment's first growth (`storage.GROW_MIN` tokens);
its 1/64 growth on long prompts can go about 1.5% over, briefly. `bits_per_element()` of a cache is the
measurement; tests hold it within 2% of `bits`. The fused C++ and Triton kernels read and write this format
(symmetric groups, any group size) like every other.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant import QuantSpec
from ..storage import GROW_MIN
from .base import IMAGE, PAD, TEXT, BitPlan, DecodeRule, Policy, PrefillContext, effective_group, register_policy
from .windows import prompt_mask, token_scores, window_ids

# The format, chosen on SmolLM2 (docs/RESULTS.md, "auto"): symmetric groups of 32 with no zero point (q4_0's layout,
# 0.5 bits of metadata an element) beat asymmetric groups of 64 with int16 zero points at the same bytes, at 2 and
# 4 bits, once keys and values are Hadamard-rotated.
GROUP = 32  # per-token groups: 32, or the head dimension when smaller
GROUPS2 = (32, 64, 128)  # the 2-bit group sizes a tight budget may take, smallest first
LEAN = 0.9  # a 2-bit group must leave this share of the budget for the rest: (2 + 16 / g) <= LEAN * bits
ZERO = "none"  # the zero point's storage (vlmkv.quant.QuantSpec.zero_point)
CLIP2 = 0.9  # clip ratio of 2-bit groups
WIDTHS = (8, 4, 2)
WINDOW_MAX = 128  # the seeds' recent window, the most `auto` keeps
WINDOW_SHARE = 0.25  # at most this share of the spare budget goes to the recent window and its flush block
ITEM_TOKENS = 32  # tokens per ranked window (fewer on prompts under 1,024 tokens: S / 32, at least 4)
PIVOTS, PIVOT_THRESHOLD = 15, 100.0
MARGIN = 0.995  # plan to this fraction of the budget (float rounding, the last partial window)
QUESTION, TEXT_WINDOW, VISUAL = 0, 1, 2  # kinds of ranked windows, served in this order


def _index_bits(head_dim: int, num_kv_heads: int) -> float:
    """A token's int32 slot, per element (shared by K and V of all kv heads)."""
    return 32.0 / (2 * num_kv_heads * head_dim)


def _meta_bits(group: int) -> float:
    """Scale and zero point of one group, per element."""
    return {"int16": 32.0, "int8": 24.0, "none": 16.0}[ZERO] / group


def _group2(bits: float, head_dim: int) -> int:
    """Channels per group of 2-bit tokens under a `bits` budget: the smallest of GROUPS2 dividing `head_dim` whose
    codes and scale cost at most LEAN * bits, else the largest (32, or the head dimension when smaller, on small heads)."""
    ok = [g for g in GROUPS2 if g <= head_dim and head_dim % g == 0] or [effective_group(GROUP, head_dim)]
    return next((g for g in ok if 2 + _meta_bits(g) <= LEAN * bits), ok[-1])


def _costs(head_dim: int, num_kv_heads: int, group2: int) -> dict:
    """Bits per element of a token at each width: codes, fp16 scale, zero point and its int32 slot."""
    g, idx = effective_group(GROUP, head_dim), _index_bits(head_dim, num_kv_heads)
    return {**{w: w + _meta_bits(group2 if w == 2 else g) + idx for w in WIDTHS}, 16: 16.0 + idx}


def _items(types: torch.Tensor, frame_ids: torch.Tensor | None, stored: torch.Tensor, question: torch.Tensor,
           size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(long `[B, S]` window id of each token in `stored` (-1 elsewhere), int8 `[B, n_max]` each window's kind:
    QUESTION, TEXT_WINDOW or VISUAL). Visual windows: runs of `size` tokens inside a frame; question windows: runs of
    `size` tokens of `question` (bool `[B, S]`); text windows: runs of `size` of the other text tokens."""
    B, S = types.shape
    vis = window_ids(types, frame_ids, size)
    out = torch.full((B, S), -1, dtype=torch.long, device=types.device)
    kinds = []
    for b in range(B):
        v = vis[b].clone()
        v[~stored[b]] = -1
        _, v_ids = torch.unique(v[v >= 0], return_inverse=True)
        n = int(v_ids.max()) + 1 if v_ids.numel() else 0
        out[b, v >= 0] = v_ids
        kind = [torch.full((n,), VISUAL, dtype=torch.int8)]
        text = stored[b] & (types[b] != IMAGE) & (types[b] != PAD)
        for k, sel in ((QUESTION, text & question[b]), (TEXT_WINDOW, text & ~question[b])):
            pos = sel.nonzero().flatten()
            out[b, pos] = n + torch.arange(len(pos), device=types.device) // size
            m = -(-len(pos) // size)
            kind.append(torch.full((m,), k, dtype=torch.int8))
            n += m
        kinds.append(torch.cat(kind))
    n = max([len(k) for k in kinds] or [0])
    kind = torch.full((B, n), VISUAL, dtype=torch.int8)
    for b, k in enumerate(kinds):
        kind[b, :len(k)] = k
    return out, kind


def _fill(order: list[int], sizes: torch.Tensor, spare: float, cost: dict,
          out: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """(int16 `[n]` widths, the spare left): every item of `order` from 2 to 4 bits while `spare` bit-elements
    last, then from 4 to 8 bits in the same order; items not in `order` keep their width in `out` (default 2).
    4 bits first: going 2 -> 4 removes about 3/4 of an item's error for 2 bits an element, 4 -> 8 the last 1/4
    for 4 bits, so a budget buys more as many 4-bit items than as fewer 8-bit ones."""
    out = torch.full((len(sizes),), 2, dtype=torch.int16) if out is None else out
    for lo, hi in ((2, 4), (4, 8)):
        for i in order:
            extra = (cost[hi] - cost[lo]) * float(sizes[i])
            if out[i] == lo and extra <= spare:
                out[i] = hi
                spare -= extra
    return out, spare


@register_policy
@dataclass
class AutoPolicy(Policy):
    name = "auto"
    needs_modality = True
    revision = 2  # 2: the question rises first; records of revision 1 are not resumed into it
    bits: float = 3.0

    def __post_init__(self):
        if not isinstance(self.bits, (int, float)) or isinstance(self.bits, bool) or not 0 < self.bits <= 16:
            raise ValueError(f"bits must be an average number of bits per element in (0, 16], got {self.bits!r}")
        self.bits = float(self.bits)

    @property
    def hadamard_keys(self) -> bool:
        return True

    @property
    def needs_massive_activations(self) -> bool:
        return True

    def validate(self, head_dim: int, num_kv_heads: int = 1) -> None:
        super().validate(head_dim, num_kv_heads)
        need = _costs(head_dim, num_kv_heads, _group2(self.bits, head_dim))[2] / MARGIN
        if self.bits < need:
            raise ValueError(f"bits must be at least {need:.3f} for head dimension {head_dim} and {num_kv_heads} kv "
                             f"heads (2-bit codes with their scales and slot map), got {self.bits!r}")

    def bit_widths(self):
        return WIDTHS

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
        cost = _costs(D, H, _group2(self.bits, D))
        dec = self._decode_bits(cost)
        types = ctx.token_types if ctx.token_types is not None else torch.full((B, S), TEXT, dtype=torch.int8)
        types = types.to(ctx.keys.device)
        real = types != PAD
        target = self.bits * MARGIN * S  # bit-elements per row, every slot (padding too) counted
        # Rows of a batch must plan the same number of tokens at each width: a segment is as long as its longest
        # row (shorter rows hold filler, whose bytes count), so every count below is the least over the rows.
        ratio = ctx.massive_activation
        ratio = torch.zeros(B, S) if ratio is None else ratio.detach().float().cpu().clone()
        ratio[~real.cpu()] = 0
        n_piv = int((ratio >= PIVOT_THRESHOLD).sum(1).clamp(max=PIVOTS).min())
        # the window is shared by all rows: sized by the row that can afford the least
        W, F = self._window(target - S * cost[2] - n_piv * (cost[16] - cost[2]), cost, dec)
        W = min(W, S)
        bits = torch.full((B, S), 2, dtype=torch.int16, device=ctx.keys.device)
        bits[:, S - W:] = dec  # the window: full precision now, `dec` bits once it leaves
        body = torch.arange(S, device=ctx.keys.device) < S - W
        ratio[:, S - W:] = 0
        n_piv = int((ratio >= PIVOT_THRESHOLD).sum(1).clamp(max=PIVOTS).min())
        piv = torch.zeros(B, S, dtype=torch.bool, device=ctx.keys.device)
        if n_piv:
            piv.scatter_(1, ratio.topk(n_piv, dim=1).indices.to(piv.device), True)
        bits[piv] = 16
        stored = real & body[None] & ~piv
        prompt = prompt_mask(types)
        if not (types == IMAGE).any():  # text only: the prompt's last tokens ask the question
            last = real.long().flip(1).cumsum(1).flip(1) <= ITEM_TOKENS
            prompt = real & last
        items, kind = _items(types, ctx.frame_ids, stored, prompt, max(4, min(ITEM_TOKENS, S // 32)))
        scores = token_scores(ctx.keys, prompt, stored, "key_attention")
        # pivots, the window at its peak, and the decode segment's first growth (GROW_MIN tokens: a few % of
        # a short prompt; its 1/64 growth on long ones stays within the 2% the plan is measured against)
        fixed = n_piv * cost[16] + (W + F) * 16.0 + GROW_MIN * cost[dec]
        orders, quota = [], None
        for b in range(B):
            m = items[b] >= 0
            n = int(items[b].max()) + 1 if m.any() else 0
            pos = m.nonzero().flatten()
            if n == 0:
                orders.append(pos)
                quota = torch.zeros(len(WIDTHS) - 1, dtype=torch.long)
                continue
            sizes = torch.bincount(items[b][m].cpu(), minlength=n).float()
            score = torch.zeros(n).index_add_(0, items[b][m].cpu(), scores[b, m].float().cpu()) / sizes.clamp_min(1)
            # the question first, to 8 bits before anything else rises (its keys and values are what each answer
            # token reads first), then text windows (TSA), then visual ones, each kind by similarity
            order = sorted(range(n), key=lambda i: (int(kind[b, i]), -float(score[i])))
            rank = torch.empty(n, dtype=torch.long)
            rank[torch.tensor(order)] = torch.arange(n)
            wbits, spare = _fill([i for i in order if kind[b, i] == QUESTION], sizes,
                                 target - fixed - (S - W - n_piv) * cost[2], cost)
            wbits, _ = _fill([i for i in order if kind[b, i] != QUESTION], sizes, spare, cost, wbits)
            # this row's tokens in rank order, and how many it could afford at 8, at 8 or 4
            tok_rank = rank[items[b, pos].cpu()] * S + pos.cpu()
            orders.append(pos[torch.argsort(tok_rank).to(pos.device)])
            per_tok = wbits[items[b, pos].cpu()]
            row = torch.stack([(per_tok >= w).sum() for w in WIDTHS[:-1]])
            quota = row if quota is None else torch.minimum(quota, row)
        for b in range(B):
            start = 0
            for w, upto in zip(WIDTHS[:-1], quota.tolist()):
                bits[b, orders[b][start:upto]] = w
                start = max(start, upto)
        rule = DecodeRule(bits=dec, keep_recent=W, flush_every=F)
        return BitPlan(bits, residual=W, decode=rule)

    def decode_rule(self, layer_idx: int = 0) -> DecodeRule:
        # the rule a prefill plans (BitPlan.decode) is the one used; this is the no-prompt fallback
        return DecodeRule(bits=2, keep_recent=0, flush_every=1)

    def spec(self, bits, kind, head_dim):
        g = _group2(self.bits, head_dim) if bits == 2 else effective_group(GROUP, head_dim)
        return QuantSpec(bits, g, CLIP2 if bits == 2 else 1.0, "token", zero_point=ZERO)


__all__ = ["AutoPolicy"]
